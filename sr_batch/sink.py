"""Stage 6, the Zarr sink: the super-resolved cube as a self-describing, growing Zarr v3 store.

Layout: `sr` (time, band, y, x) at 2.5 m, stored as uint16 reflectance x 10000 with nodata 0 and CF
scale_factor/_FillValue, so `xr.open_zarr` returns float reflectance with NaN. Georeferencing is a CF
grid-mapping variable (`spatial_ref`, with a GDAL GeoTransform) that rioxarray reads back with
`decode_coords="all"`; x/y are pixel centres. Per date and tile: cloud fraction, frames used and the
window's first date; per date: the source item ids. The model's name and checksum are in the attributes.

How the store grows (the order is what makes a kill at any moment harmless):
1. `create_store` writes the layout with an empty time axis (every time-dependent variable is chunked
   by one date, so an append never rewrites an existing chunk).
2. `append_dates` extends the time axis with the new dates: their coordinates and per-tile tables are
   written, `sr` is only resized (unwritten chunks read as fill: NaN).
3. `write_tile_dates` runs on the workers, one task per tile and group of dates: it encodes and writes
   the whole Zarr chunks of its windows, and only those (a tile-date that is already done or has no
   window is never touched). zarr's LocalStore writes every key to a temporary file and renames it,
   so no reader sees a torn chunk.
4. The job records a window in the manifest only after its task returned (see manifest.py).
The manifest's `times` is committed after step 2; `align_time_axis` cuts the store back to it when a
run was killed between the two, before anything else is written.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from sr_batch import __version__, kill_points
from sr_batch.assets import unreadable_attributes
from sr_batch.cube import BANDS
from sr_batch.errors import OutputError
from sr_batch.manifest import MANIFEST_KEY
from sr_batch.model import LoadedModel
from sr_batch.plan import SCALE, Plan
from sr_batch.spec import spec_json
from sr_batch.storage import Location, location, zarr_options

if TYPE_CHECKING:
    import torch

SENTINEL2_BANDS = ("B02", "B03", "B04", "B08")
MAX_REFLECTANCE = 65535 / 10000
SR_ENCODING = {"dtype": "uint16", "scale_factor": 1e-4, "add_offset": 0.0, "_FillValue": np.uint16(0)}
TIME_ENCODING = {"units": "days since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64", "chunks": (1,)}
"""Whole days since the epoch: every appended date encodes exactly under the units of the first run."""


def check_location(uri: str | Path | Location, overwrite: bool = False) -> Location:
    """Fail before any work if the output's location cannot be written (a local folder, or an S3 bucket:
    credentials, bucket name, endpoint), or if --overwrite would replace something that is not a Zarr
    store (a folder of the user's own files, say)."""
    target = location(uri)
    target.check_writable()
    if target.is_file():
        raise OutputError(f"output.uri: {target} is a file, not a Zarr store; choose another path")
    # Ours without a root zarr.json: a store whose replacement a killed --overwrite left half done on S3,
    # and a first run killed after its manifest but before the store's layout.
    ours = target.has("zarr.json") or target.has(MANIFEST_KEY) or target.replace_interrupted()
    if overwrite and not target.is_empty() and not ours:
        raise OutputError(f"output.uri: {target} exists and is not a Zarr store; --overwrite replaces only Zarr stores, so choose another path")
    return target


def dates_dataset(plan: Plan, days: list[int], model: LoadedModel) -> xr.Dataset:
    """The output Dataset for output days `days` (indices into plan.days): `sr` a lazy placeholder, never computed."""
    times = pd.DatetimeIndex([pd.Timestamp(plan.days[d].date) for d in days], name="time")
    xs, ys = plan.grid.centres(SCALE)
    tile = plan.spec.tiling.tile
    placeholder = da.full((len(days), len(BANDS), len(ys), len(xs)), np.nan, dtype=np.float32, chunks=(1, len(BANDS), SCALE * tile, SCALE * tile))
    reflectance = xr.DataArray(placeholder, dims=("time", "band", "y", "x"), attrs={"long_name": "super-resolved surface reflectance", "units": "1"})
    frames_used, window_start = _window_tables(plan, days)
    ds = xr.Dataset(
        {
            "sr": reflectance,
            "cloud_fraction": (("time", "tile_row", "tile_col"), plan.cloud[days], {"long_name": "unusable fraction of the tile on this date (SCL)"}),
            "frames_used": (("time", "tile_row", "tile_col"), frames_used, {"long_name": "real frames in the window; 0 = no output for this tile and date"}),
            "window_start": (("time", "tile_row", "tile_col"), window_start, {"long_name": "date of the oldest frame in the window"}),
            "source_items": (
                ("time",),
                np.array([",".join(plan.days[d].item_ids) for d in days], dtype=np.dtypes.StringDType()),
                {"long_name": "STAC item ids of this date"},
            ),
        },
        coords={
            "time": times,
            "band": _strings(BANDS),
            "sentinel2_band": ("band", _strings(SENTINEL2_BANDS)),
            "y": ("y", ys, {"units": "m", "standard_name": "projection_y_coordinate", "axis": "Y"}),
            "x": ("x", xs, {"units": "m", "standard_name": "projection_x_coordinate", "axis": "X"}),
            "tile_row_start": ("tile_row", np.array([SCALE * r[0] for r in plan.rows], np.int64)),
            "tile_col_start": ("tile_col", np.array([SCALE * c[0] for c in plan.cols], np.int64)),
        },
        attrs=_attributes(plan, model),
    )
    ds = ds.rio.write_crs(plan.grid.epsg)
    ds = ds.rio.write_transform(plan.grid.transform @ plan.grid.transform.scale(1 / SCALE))
    # As an attribute, not only in .encoding, so an explicit to_zarr encoding cannot drop it.
    ds["sr"].attrs["grid_mapping"] = "spatial_ref"
    return ds


def _strings(values: Any) -> np.ndarray:
    """Variable-length UTF-8 (object) strings: Zarr v3 has a spec for them, not for fixed-width ones."""
    return np.array(list(values), dtype=object)


def _window_tables(plan: Plan, days: list[int]) -> tuple[np.ndarray, np.ndarray]:
    slot = {day: k for k, day in enumerate(days)}
    frames_used = np.zeros((len(days), len(plan.rows), len(plan.cols)), np.uint8)
    window_start = np.full(frames_used.shape, np.datetime64("NaT"), "datetime64[ns]")
    for (row, col), windows in plan.windows.items():
        for window in windows:
            if window.target in slot:
                frames_used[slot[window.target], row, col] = len(window.frames)
                window_start[slot[window.target], row, col] = np.datetime64(plan.days[window.frames[0]].date, "ns")
    return frames_used, window_start


def _attributes(plan: Plan, model: LoadedModel) -> dict[str, Any]:
    spec = plan.spec
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {
        "title": f"sr-batch super-resolution: {spec.name}",
        "sr_batch_version": __version__,
        "created": now,
        "updated": now,
        "model_name": model.info.name,
        "model_sha256": model.checksum,
        "model_trained": model.info.trained,
        "scale": SCALE,
        "resolution_m": plan.grid.resolution / SCALE,
        "source_resolution_m": plan.grid.resolution,
        "tile_lr_px": spec.tiling.tile,
        "halo_lr_px": plan.halo,
        "frames": spec.model.frames,
        "max_cloud_fraction": spec.cloud.max_cloud_fraction,
        "job": spec_json(spec),
        "source": "Contains modified Copernicus Sentinel data",
        **unreadable_attributes(plan.found.unreadable),
    }


SR_CODECS = {
    "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
}
"""`output.codec`. Blosc's byte shuffle groups the high and low bytes of the uint16 values before the
compressor. On super-resolved Sentinel-2, per thread (python -m sr_batch.bench prints it for the machine):
lz4 about 1.2 GB/s to compress and 2.5 GB/s to decompress; zstd level 1 about 0.38 and 0.8 GB/s and
9–14 % smaller (ratios 2.9–3.7 and 3.2–4.3 on the sample); zarr's default (zstd 3, no shuffle) 0.07 GB/s. A GPU that super-resolves 18 M
input px/s produces 2.3 GB/s of stored output, so the codec decides how many cores keep up with it."""


def encoding(ds: xr.Dataset, tile: int, codec: str = "lz4") -> dict[str, dict[str, Any]]:
    """uint16 x 10000 with fill 0; one Zarr chunk per date and tile; per-date tables chunked by date."""
    height, width = ds.sizes["y"], ds.sizes["x"]
    by_date = {name: {"chunks": (1, *ds[name].shape[1:])} for name in ("cloud_fraction", "frames_used")}
    return {
        "sr": {**SR_ENCODING, "chunks": (1, len(BANDS), min(SCALE * tile, height), min(SCALE * tile, width)), "compressors": [SR_CODECS[codec]]},
        "window_start": {"units": "days since 1970-01-01", "dtype": "int32", "_FillValue": np.int32(-(2**31)), "chunks": (1, *ds["window_start"].shape[1:])},
        "source_items": {"chunks": (1,)},
        "time": TIME_ENCODING,
        **by_date,
    }


# --- growing the store ------------------------------------------------------------------------------


def create_store(store: Location, plan: Plan, model: LoadedModel) -> None:
    """The layout with an empty time axis (mode "a": the folder may already hold the manifest)."""
    ds = dates_dataset(plan, [], model)
    layout = encoding(ds, plan.spec.tiling.tile, plan.spec.output.codec)
    ds.to_zarr(**store.zarr_args(), mode="a", zarr_format=3, consolidated=False, compute=False, encoding=layout)


def has_layout(store: Location) -> bool:
    return store.has("zarr.json") and store.has("sr/zarr.json")


def stored_codec(store: Location) -> str | None:
    """The compressor of an existing store's `sr` (lz4, zstd, or whatever wrote it), None without one."""
    codecs = zarr.open_array(**store.zarr_args(), path="sr", mode="r").metadata.codecs
    names = [getattr(codec, "cname", None) for codec in codecs]
    return next((str(getattr(name, "value", name)) for name in names if name is not None), None)


def time_length(store: Location) -> int:
    return zarr.open_array(**store.zarr_args(), path="time", mode="r").shape[0]


def align_time_axis(store: Location, length: int) -> None:
    """Cut every time-dependent array back to the committed `length` (dates a killed run appended but never recorded)."""
    group = zarr.open_group(**store.zarr_args(), mode="r+", zarr_format=3)
    for _, array in group.arrays():
        if "time" in (array.metadata.dimension_names or ()) and array.shape[0] > length:
            array.resize((length, *array.shape[1:]))


def append_dates(store: Location, plan: Plan, days: list[int], model: LoadedModel) -> None:
    """Extend the time axis with output days `days` (all newer than the last date stored); `sr` is only resized."""
    ds = dates_dataset(plan, days, model)
    with xr.open_zarr(**store.zarr_args(), consolidated=False) as existing:
        ds.attrs["created"] = existing.attrs.get("created", ds.attrs["created"])
        if "unreadable_blocks" in existing.attrs:  # the group's attributes are rewritten whole: keep the record of earlier runs
            ds.attrs["unreadable_blocks"] = existing.attrs["unreadable_blocks"]
        last = existing.time.values[-1] if existing.sizes["time"] else None
    if last is not None and days and not pd.Timestamp(plan.days[days[0]].date) > pd.Timestamp(last):
        raise OutputError(f"output.uri: date {plan.days[days[0]].date} is not after the last stored date {str(last)[:10]}; the time axis must stay sorted")
    # `sr` is only resized, by zarr: through xarray its placeholder became a Dask graph of one task per
    # tile and date, never run but built all the same (23 s for 70 dates of a whole Sentinel-2 tile).
    timeless = [name for name in ds.variables if "time" not in ds[name].dims]
    ds.drop_vars([*timeless, "sr"]).to_zarr(**store.zarr_args(), mode="a", append_dim="time", zarr_format=3, consolidated=False)
    sr = zarr.open_array(**store.zarr_args(), path="sr", mode="r+")
    sr.resize((time_length(store), *sr.shape[1:]))


@dataclass
class ReadError:
    """An asset whose reads failed during a run (corrupt blocks) and were taken as no data."""

    url: str
    error: str
    reads: int


def record_read_errors(store: Location, errors: list[ReadError]) -> None:
    """Add this run's failed reads to the store's `unreadable_blocks` attribute (JSON, one entry per
    asset, reads summed over runs), beside `unreadable_items` for the assets skipped before reading."""
    if not errors:
        return
    group = zarr.open_group(**store.zarr_args(), mode="r+", zarr_format=3)
    known = {entry["url"]: entry for entry in json.loads(group.attrs.get("unreadable_blocks", "[]"))}
    for error in errors:
        entry = known.setdefault(error.url, {"url": error.url, "error": error.error, "reads": 0})
        entry["reads"] += error.reads
    group.attrs["unreadable_blocks"] = json.dumps(sorted(known.values(), key=lambda entry: entry["url"]))


def encode_reflectance_tensor(image: torch.Tensor) -> torch.Tensor:
    """(..., y, x) float reflectance, NaN = none → the stored integers, on the device the image is on:
    exactly xarray's CF encoding (clip, divide by the scale factor in float32, NaN to the fill value,
    round half to even; tests/test_sink_encoding.py). The result is int16 holding the
    uint16 bit pattern (torch's uint16 is not usable on every device): view it as uint16 on the host."""
    import torch  # here, not at the top: reading and verifying a store need no torch

    scaled = torch.clamp(image.float(), 1e-4, MAX_REFLECTANCE)  # a new tensor: the steps after it work in place
    # The divisor is made on the device: copied there from the host, it would wait for the device's queued work.
    scaled.div_(torch.full((), SR_ENCODING["scale_factor"], dtype=torch.float32, device=image.device)).nan_to_num_(nan=0.0).round_()
    return scaled.to(torch.int32).to(torch.int16)


def write_tile_dates(
    block: np.ndarray, store: str, slots: list[tuple[int, int]], ys: tuple[int, int], xs: tuple[int, int]
) -> list[tuple[int, list[tuple[int, int]]]]:
    """A task: write the tile's rows `slots` of `block` ((slot in block, index on the time axis)), chunk-aligned.
    `block` holds the stored values already (uint16, encoded where the network ran).

    Returns, per written time index, the Zarr chunks (y, x indices) that were all fill: those are not
    stored (one a killed run may have left is removed), so the manifest lists them as absent by design.
    The emptiness test is ours, per chunk: zarr's own (write_empty_chunks=False) compares every chunk
    with the fill value on its one event-loop thread, several times slower than compressing it with lz4,
    and every writing thread of a worker process waits on it."""
    opened = zarr.open_array(store=store, path="sr", mode="r+", **zarr_options(store))
    stores = opened.with_config({"write_empty_chunks": True})
    removes = opened.with_config({"write_empty_chunks": False})  # writing fill over a stored chunk deletes it
    chunk_y, chunk_x = opened.chunks[2], opened.chunks[3]
    written = []
    for slot, index in slots:
        encoded = block[slot]
        empty = []
        for iy in range(ys[0] // chunk_y, -(-ys[1] // chunk_y)):
            for ix in range(xs[0] // chunk_x, -(-xs[1] // chunk_x)):
                y0, y1 = max(ys[0], iy * chunk_y), min(ys[1], (iy + 1) * chunk_y)
                x0, x1 = max(xs[0], ix * chunk_x), min(xs[1], (ix + 1) * chunk_x)
                chunk = encoded[:, y0 - ys[0] : y1 - ys[0], x0 - xs[0] : x1 - xs[0]]
                has_data = bool(chunk.any())
                (stores if has_data else removes)[index, :, y0:y1, x0:x1] = chunk
                if not has_data:
                    empty.append((iy, ix))
        written.append((index, empty))
    kill_points.reached("written")
    return written


def write_tiles_dates(
    results: list[np.ndarray | None], store: str, writes: list[tuple[int, tuple[int, int], list[tuple[int, int]], tuple[int, int], tuple[int, int]]]
) -> list[tuple[tuple[int, int], list[tuple[int, list[tuple[int, int]]]]]]:
    """A task: write a run of tiles' results (tiles.superresolve_tiles), each entry of `writes` being (its
    place in `results`, tile, slots, ys, xs) as `write_tile_dates` takes them. Returns per tile what
    `write_tile_dates` returns."""
    written = []
    for k, tile, slots, ys, xs in writes:
        block = results[k]
        if block is None:
            raise ValueError(f"tile {tile} has dates to write but its task computed none")
        written.append((tile, write_tile_dates(block, store, slots, ys, xs)))
    return written


# --- replacing an output (--overwrite) ----------------------------------------------------------------


def staging_path(target: Location) -> Location:
    return target.with_name(f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}")


def remove_stale_staging(target: Location) -> list[Location]:
    """Staging stores left by killed --overwrite runs; call only while holding the output's lock.
    A replacement a killed run left half done (S3: storage.py) is finished first: its staging store is complete."""
    target.finish_interrupted_replace()
    stale = target.siblings(f".{target.name}.incomplete-")
    for staging in stale:
        staging.remove()
    return stale


def move_into_place(staging: Location, target: Location) -> None:
    """Swap a complete new store in; the previous output is removed only after the swap (storage.py)."""
    target.replace_by(staging)


def describe_output(target: Location) -> str:
    """A one-screen summary of a written store, read back the way users read it."""
    with xr.open_zarr(**target.zarr_args(), decode_coords="all", consolidated=False) as ds:
        sr = ds["sr"]
        dates = [str(t)[:10] for t in ds.time.values]
        lines = [
            f"Output: {target}",
            f"  sr {dict(sr.sizes)}  {sr.encoding.get('dtype')} x {sr.encoding.get('scale_factor')}  CRS {ds.rio.crs}  pixel {ds.attrs['resolution_m']} m",
            f"  dates written: {len(dates)}" + (f" ({dates[0]} … {dates[-1]})" if dates else " (no cloudless date in the period)"),
            f"  model: {ds.attrs['model_name']} sha256 {ds.attrs['model_sha256'][:12]}…"
            + ("" if ds.attrs["model_trained"] else "  (UNTRAINED: not super-resolution)"),
        ]
    return "\n".join(lines)
