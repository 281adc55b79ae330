"""Seam-free tiling: with halo ≥ receptive field + cloud dilation, a tiled run equals a whole-image run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from sr_batch.job import run_job
from sr_batch.spec import parse_spec

from conftest import SMALL_HALO, make_job


def run(stac_url: str, catalog, scheduler: str, out: Path, tile: int, halo: int | str) -> np.ndarray:
    # Every date counts as cloudless in every tile, so all tilings get the same windows.
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    job = make_job(stac_url, out, catalog, time=period, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": tile, "halo": halo})
    result = run_job(parse_spec(job), scheduler=scheduler, show_progress=False)
    if tile < 100:
        assert len(result.plan.rows) >= 4 and len(result.plan.cols) >= 4
    with xr.open_zarr(result.output, consolidated=False) as ds:
        assert ds.attrs["halo_lr_px"] == result.plan.halo == (SMALL_HALO if halo == "auto" else halo)
        return ds.sr.values


def test_tiled_output_equals_whole_image_output(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    whole = run(stac_url, catalog, scheduler, tmp_path / "whole.zarr", tile=128, halo=SMALL_HALO)
    # halo: auto, the default, is the smallest seam-free halo of the job's model (18 px for the small one).
    tiled = run(stac_url, catalog, scheduler, tmp_path / "tiled.zarr", tile=24, halo="auto")
    assert whole.shape == tiled.shape and whole.shape[0] >= 3
    assert np.array_equal(np.isnan(whole), np.isnan(tiled))
    # Outputs are quantised to 1e-4: float noise between tile sizes may flip one step of rounding.
    np.testing.assert_allclose(tiled, whole, atol=1.01e-4, equal_nan=True)
    assert np.nanmean(np.abs(tiled - whole)) < 1e-6

    # The same tiling with too small a halo shows seams: the comparison above can fail.
    seamy = run(stac_url, catalog, scheduler, tmp_path / "seamy.zarr", tile=24, halo=4)
    assert np.nanmax(np.abs(seamy - whole)) > 1e-3
