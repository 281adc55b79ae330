"""The sink stores what the inference tasks encode where the network ran (sink.encode_reflectance_tensor): the bytes must be
exactly what xarray's own CF encoding writes for the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from sr_batch.sink import MAX_REFLECTANCE, SR_CODECS, SR_ENCODING, encode_reflectance_tensor, write_tile_dates


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


def test_a_tile_writes_its_chunks_with_data_and_removes_empty_ones(tmp_path: Path) -> None:
    """write_tile_dates decides emptiness itself (zarr's own check is slow and serial): a chunk with any data
    is stored exactly, an all-fill chunk is reported and not stored, and one a killed run left is removed."""
    store = str(tmp_path / "x.zarr")
    zarr.create_array(store=store, name="sr", shape=(3, 4, 40, 30), chunks=(1, 4, 16, 16), dtype="uint16", fill_value=0, compressors=[SR_CODECS["lz4"]])
    # A tile of 2 dates covering rows 16..40 and columns 0..30: chunks (1, 0), (1, 1), (2, 0), (2, 1), the last ones partial.
    block = np.zeros((2, 4, 24, 30), np.uint16)
    block[0, :, :16, :16] = 7  # date 0: only chunk (1, 0) has data
    block[0, 2, 20, 25] = 1  # and one pixel of chunk (2, 1)
    block[1, :, 3:5, 20:22] = 65535  # date 1: only chunk (1, 1)
    left_by_a_killed_run = zarr.open_array(store=store, path="sr", mode="r+")
    left_by_a_killed_run[2, :, 32:40, 0:16] = 9  # chunk (2, 0) of time index 2, to be replaced by an empty one
    chunk_key = tmp_path / "x.zarr" / "sr" / "c" / "2" / "0" / "2" / "0"
    assert chunk_key.exists()

    written = write_tile_dates(block, store, [(0, 1), (1, 2)], (16, 40), (0, 30))

    assert written == [(1, [(1, 1), (2, 0)]), (2, [(1, 0), (2, 0), (2, 1)])]
    stored = zarr.open_array(store=store, path="sr", mode="r")
    np.testing.assert_array_equal(stored[1, :, 16:40, :], block[0])
    np.testing.assert_array_equal(stored[2, :, 16:40, :], block[1])
    assert not stored[0].any() and not stored[1:, :, :16].any()
    assert not chunk_key.exists()
    chunks = sorted(str(p.relative_to(tmp_path / "x.zarr" / "sr" / "c")) for p in (tmp_path / "x.zarr" / "sr" / "c").rglob("*") if p.is_file())
    assert chunks == ["1/0/1/0", "1/0/2/1", "2/0/1/1"]
