"""Stage 6, the Zarr sink: the super-resolved cube as a self-describing Zarr v3 store.

Layout: `sr` (time, band, y, x) at 2.5 m, stored as uint16 reflectance x 10000 with nodata 0 and CF
scale_factor/_FillValue, so `xr.open_zarr` returns float reflectance with NaN. Georeferencing is a CF
grid-mapping variable (`spatial_ref`, with a GDAL GeoTransform) that rioxarray reads back with
`decode_coords="all"`; x/y are pixel centres. Per date and tile: cloud fraction and frames used;
per date: the source item ids. The model's name and checksum are in the attributes.

Each Dask chunk covers whole Zarr chunks (one date x one tile), so no two tasks write one chunk.
A job writes into a hidden staging store beside the target and renames it into place only when
every chunk is written: a failure never leaves a half-written store where the output belongs.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
import zarr

from sr_batch import __version__
from sr_batch.assets import unreadable_attributes
from sr_batch.cube import BANDS
from sr_batch.errors import OutputError
from sr_batch.model import LoadedModel
from sr_batch.plan import SCALE, Plan
from sr_batch.spec import spec_json

SENTINEL2_BANDS = ("B02", "B03", "B04", "B08")
MAX_REFLECTANCE = 65535 / 10000


def check_writable(uri: str, overwrite: bool) -> Path:
    """Fail before any work if the output exists (without --overwrite) or its folder is not writable."""
    target = Path(uri)
    if target.exists() and not overwrite:
        raise OutputError(f"output.uri: {target} already exists; choose another path or pass --overwrite to replace it")
    if target.exists() and not (target / "zarr.json").is_file():
        raise OutputError(f"output.uri: {target} exists and is not a Zarr store; --overwrite replaces only Zarr stores, so choose another path")
    # The nearest folder that exists must be writable; missing folders are made only when writing.
    existing = next(folder for folder in (target.parent, *target.parent.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output.uri: cannot write in {existing}; choose a writable location")
    return target


def build_dataset(plan: Plan, sr: da.Array, model: LoadedModel) -> xr.Dataset:
    """The output Dataset, lazily: `sr` still a Dask array, everything else small and in memory."""
    outputs = plan.output_days
    times = pd.DatetimeIndex([pd.Timestamp(plan.days[d].date) for d in outputs], name="time")
    xs, ys = plan.grid.centres(SCALE)
    reflectance = xr.DataArray(
        da.clip(sr, 1e-4, MAX_REFLECTANCE),
        dims=("time", "band", "y", "x"),
        attrs={"long_name": "super-resolved surface reflectance", "units": "1"},
    )
    frames_used, window_start = _window_tables(plan)
    ds = xr.Dataset(
        {
            "sr": reflectance,
            "cloud_fraction": (("time", "tile_row", "tile_col"), plan.cloud[outputs], {"long_name": "unusable fraction of the tile on this date (SCL)"}),
            "frames_used": (("time", "tile_row", "tile_col"), frames_used, {"long_name": "real frames in the window; 0 = no output for this tile and date"}),
            "window_start": (("time", "tile_row", "tile_col"), window_start, {"long_name": "date of the oldest frame in the window"}),
            "source_items": (("time",), _strings([",".join(plan.days[d].item_ids) for d in outputs]), {"long_name": "STAC item ids of this date"}),
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


def _window_tables(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    outputs = plan.output_days
    slot = {day: k for k, day in enumerate(outputs)}
    frames_used = np.zeros((len(outputs), len(plan.rows), len(plan.cols)), np.uint8)
    window_start = np.full(frames_used.shape, np.datetime64("NaT"), "datetime64[ns]")
    for (row, col), windows in plan.windows.items():
        for window in windows:
            frames_used[slot[window.target], row, col] = len(window.frames)
            window_start[slot[window.target], row, col] = np.datetime64(plan.days[window.frames[0]].date, "ns")
    return frames_used, window_start


def _attributes(plan: Plan, model: LoadedModel) -> dict[str, Any]:
    spec = plan.spec
    return {
        "title": f"sr-batch super-resolution: {spec.name}",
        "sr_batch_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_name": model.info.name,
        "model_sha256": model.checksum,
        "model_trained": model.info.trained,
        "scale": SCALE,
        "resolution_m": plan.grid.resolution / SCALE,
        "source_resolution_m": plan.grid.resolution,
        "tile_lr_px": spec.tiling.tile,
        "halo_lr_px": spec.tiling.halo,
        "frames": spec.model.frames,
        "max_cloud_fraction": spec.cloud.max_cloud_fraction,
        "job": spec_json(spec),
        "source": "Contains modified Copernicus Sentinel data",
        **unreadable_attributes(plan.found.unreadable),
    }


def encoding(ds: xr.Dataset, tile: int) -> dict[str, dict[str, Any]]:
    """uint16 x 10000 with fill 0; one Zarr chunk per date and tile (matching the Dask chunks)."""
    height, width = ds.sizes["y"], ds.sizes["x"]
    return {
        "sr": {
            "dtype": "uint16",
            "scale_factor": 1e-4,
            "add_offset": 0.0,
            "_FillValue": np.uint16(0),
            "chunks": (1, len(BANDS), min(SCALE * tile, height), min(SCALE * tile, width)),
        },
        "window_start": {"units": "days since 1970-01-01", "dtype": "int32", "_FillValue": np.int32(-(2**31))},
    }


def write_dataset(ds: xr.Dataset, target: Path, tile: int, overwrite: bool, compute: Any) -> None:
    """Write into a staging store, then move it into place; `compute` runs the Dask write (with progress)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.incomplete-{uuid.uuid4().hex[:8]}")
    try:
        layout = encoding(ds, tile)
        # Metadata and the small variables are written here; `sr` itself below, one task per chunk.
        ds.to_zarr(staging, mode="w-", zarr_format=3, consolidated=False, compute=False, encoding=layout)
        compute(_store_reflectance(ds["sr"], layout["sr"], staging))
        _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _store_reflectance(sr: xr.DataArray, layout: dict[str, Any], store: Path) -> da.Array:
    """The lazy write of `sr` into its Zarr array, CF-encoded exactly as xarray encodes it.

    Not xarray's own delayed write: turning that into a Delayed rewrites the graph and drops the layer
    annotations that keep super-resolution on GPU workers (dask 2026.8), where `da.store` keeps them."""
    variable = sr.variable.copy(deep=False)
    variable.encoding = {key: value for key, value in layout.items() if key != "chunks"}
    encoded = xr.conventions.encode_cf_variable(variable, name="sr")
    target = zarr.open_array(store / "sr", mode="r+")
    return da.store(encoded.data, target, lock=False, compute=False)


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        staging.rename(target)
        return
    if not overwrite:
        raise OutputError(f"output.uri: {target} appeared while the job ran; nothing was replaced (the new output was discarded)")
    retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def describe_output(target: Path) -> str:
    """A one-screen summary of a written store, read back the way users read it."""
    with xr.open_zarr(target, decode_coords="all", consolidated=False) as ds:
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
