"""The sink encodes each tile-date itself on the workers (sink.encode_reflectance): the bytes must be
exactly what xarray's own CF encoding writes for the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from sr_batch.sink import MAX_REFLECTANCE, SR_ENCODING, encode_reflectance


def test_tile_encoding_matches_xarray(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.01, 7.0, (4, 64, 64)).astype(np.float32)  # below 1e-4 and above the uint16 range
    values[:, :5, :7] = np.nan
    values[2, 10:20, 30:40] = 0.123449997  # rounding at the half step
    clipped = np.clip(values, 1e-4, MAX_REFLECTANCE)
    xr.Dataset({"sr": (("band", "y", "x"), clipped)}).to_zarr(tmp_path / "x.zarr", zarr_format=3, consolidated=False, encoding={"sr": dict(SR_ENCODING)})
    theirs = zarr.open_array(tmp_path / "x.zarr" / "sr")[:]
    ours = encode_reflectance(values)
    assert ours.dtype == theirs.dtype == np.uint16
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:, :5, :7] == 0).all() and ours.max() == 65535 and ours[ours > 0].min() == 1
