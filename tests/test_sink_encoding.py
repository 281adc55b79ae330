"""The sink writes `sr` with da.store (which keeps the GPU annotations) rather than through xarray's
delayed write: the bytes on disk must be exactly what xarray itself writes."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from sr_batch.sink import _store_reflectance, encoding


def test_store_matches_xarray_encoding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(1e-4, 0.6, (3, 4, 64, 64)).astype(np.float32)
    values[0, :, :5, :7] = np.nan
    values[1, 2, 10:20, 30:40] = 0.123449997  # rounding at the half step
    values[2] = np.nan  # an all-NaN date: its chunks are never written, in both paths
    ds = xr.Dataset({"sr": (("time", "band", "y", "x"), da.from_array(values, chunks=(1, 4, 32, 32)))})
    layout = {"sr": encoding(ds, tile=8)["sr"]}

    ds.to_zarr(tmp_path / "xarray.zarr", zarr_format=3, consolidated=False, encoding=layout)
    ds.to_zarr(tmp_path / "ours.zarr", zarr_format=3, consolidated=False, compute=False, encoding=layout)
    _store_reflectance(ds["sr"], layout["sr"], tmp_path / "ours.zarr").compute()

    theirs = zarr.open_array(tmp_path / "xarray.zarr" / "sr")
    ours = zarr.open_array(tmp_path / "ours.zarr" / "sr")
    assert ours.dtype == theirs.dtype == np.uint16
    np.testing.assert_array_equal(ours[:], theirs[:])
    assert ours.nchunks_initialized == theirs.nchunks_initialized < ours.nchunks
    with xr.open_zarr(tmp_path / "ours.zarr", consolidated=False) as back:
        np.testing.assert_allclose(back.sr.values, values, atol=0.5e-4 + 1e-7, equal_nan=True)
