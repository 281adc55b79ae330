"""The sink stores what the inference tasks encode where the network ran (sink.encode_reflectance_tensor): the bytes must be
exactly what xarray's own CF encoding writes for the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from sr_batch.sink import MAX_REFLECTANCE, SR_ENCODING, encode_reflectance_tensor


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_tile_encoding_matches_xarray(tmp_path: Path, device: str) -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-0.01, 7.0, (4, 64, 64)).astype(np.float32)  # below 1e-4 and above the uint16 range
    values[:, :5, :7] = np.nan
    values[2, 10:20, 30:40] = 0.123449997  # rounding at the half step
    values[1, 30, :20] = np.arange(20, dtype=np.float32) * 5e-5  # half steps around the first codes
    clipped = np.clip(values, 1e-4, MAX_REFLECTANCE)
    xr.Dataset({"sr": (("band", "y", "x"), clipped)}).to_zarr(tmp_path / "x.zarr", zarr_format=3, consolidated=False, encoding={"sr": dict(SR_ENCODING)})
    theirs = zarr.open_array(tmp_path / "x.zarr" / "sr")[:]
    ours = encode_reflectance_tensor(torch.from_numpy(values).to(device)).cpu().numpy().view(np.uint16)
    assert ours.dtype == theirs.dtype == np.uint16
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[:, :5, :7] == 0).all() and ours.max() == 65535 and ours[ours > 0].min() == 1
