"""`sr-batch verify OUT`: does the data hold what the manifest says, on the grid the manifest says?

Checks, each problem one line:
- the manifest reads, the store opens the way users open it (`xr.open_zarr`, decode_coords="all");
- model checksum and output settings in the store's attributes are the manifest's;
- the time axis starts with the manifest's dates, sorted, and every recorded date is one of them;
- georeferencing: CRS, affine transform, x/y pixel centres, sizes, the tiles' starts and the chunk
  layout of `sr` (one chunk per date and tile, uint16 x 1e-4, fill 0) all follow from the recorded grid;
- every recorded window is a planned one (recomputed from the recorded cloud scores) with the right
  frame count, and each of its chunks is present (unless recorded as all-fill) and decodes.
Dates the store has beyond the manifest's (a run in progress, or killed) are not problems: no run
trusts them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from sr_batch.cube import Grid
from sr_batch.errors import OutputError
from sr_batch.manifest import Manifest, setting_changes, settings_of
from sr_batch.plan import SCALE, causal_windows
from sr_batch.sink import SR_ENCODING
from sr_batch.storage import Location, location


def verify_output(path: str | Path | Location) -> list[str]:
    """Every problem found, one line each; empty when the output is consistent."""
    path = location(path)
    if path.is_file() or not path.exists():
        raise OutputError(f"OUT: {path} is not a folder; give the path of an sr-batch Zarr output")
    try:
        manifest = Manifest.read(path)
    except OutputError as err:
        return [str(err).removeprefix("output.uri: ")]
    if manifest is None:
        return [f"{path}: no manifest (sr_batch_manifest/zarr.json): not an sr-batch output, or one written before manifests"]
    try:
        ds = xr.open_zarr(**path.zarr_args(), decode_coords="all", consolidated=False)
    except Exception as err:  # any failure to open is the finding
        return [f"{path}: does not open with xr.open_zarr ({type(err).__name__}: {err})"]
    with ds:
        problems = _attribute_problems(ds, manifest)
        problems += _time_problems(ds, manifest)
        problems += _grid_problems(ds, manifest)
        problems += _window_problems(path, ds, manifest)
    return problems


def _attribute_problems(ds: xr.Dataset, manifest: Manifest) -> list[str]:
    problems = []
    if ds.attrs.get("model_sha256") != manifest.model_sha256:
        problems.append(f"attrs model_sha256 {str(ds.attrs.get('model_sha256'))[:12]}… is not the manifest's {manifest.model_sha256[:12]}…")
    try:
        stored = settings_of(json.loads(ds.attrs["job"]))
    except (KeyError, TypeError, ValueError):
        return [*problems, "attrs job is missing or not JSON"]
    changed = setting_changes(manifest.settings, stored)  # the attrs keep the spec as given: `auto` is not a change
    if changed:
        problems.append(f"attrs job settings differ from the manifest's: {'; '.join(changed[:3])}")
    return problems


def _time_problems(ds: xr.Dataset, manifest: Manifest) -> list[str]:
    stored = [str(t)[:10] for t in ds.time.values]
    problems = []
    if stored != sorted(set(stored)):
        problems.append("time is not strictly increasing")
    if stored[: len(manifest.times)] != manifest.times:
        problems.append(f"time does not start with the manifest's {len(manifest.times)} dates (store has {len(stored)} dates)")
    known = {day.date for day in manifest.days}
    strays = sorted(date for date in manifest.done if date not in manifest.times)
    if strays:
        problems.append(f"manifest records windows on dates not on its time axis: {', '.join(strays[:5])}")
    unknown = sorted(date for date in manifest.times if date not in known)
    if unknown:
        problems.append(f"manifest times without a recorded day: {', '.join(unknown[:5])}")
    return problems


def _grid_problems(ds: xr.Dataset, manifest: Manifest) -> list[str]:
    grid = Grid(**manifest.grid)
    problems = []
    crs = ds.rio.crs
    if crs is None or crs.to_epsg() != grid.epsg:
        problems.append(f"CRS is {crs.to_epsg() if crs else None}, the manifest's grid is EPSG:{grid.epsg}")
    expected = grid.transform @ grid.transform.scale(1 / SCALE)
    if not ds.rio.transform().almost_equals(expected, precision=1e-6):
        problems.append(f"transform {tuple(ds.rio.transform())[:6]} is not the manifest's {tuple(expected)[:6]}")
    xs, ys = grid.centres(SCALE)
    if ds.sizes.get("x") != len(xs) or ds.sizes.get("y") != len(ys):
        problems.append(f"size {ds.sizes.get('x')} x {ds.sizes.get('y')} is not the manifest's {len(xs)} x {len(ys)}")
    elif not (np.allclose(ds.x.values, xs, atol=1e-6) and np.allclose(ds.y.values, ys, atol=1e-6)):
        problems.append("x/y are not the pixel centres of the manifest's grid")
    if list(ds.tile_row_start.values) != [SCALE * r[0] for r in manifest.rows] or list(ds.tile_col_start.values) != [SCALE * c[0] for c in manifest.cols]:
        problems.append("tile_row_start/tile_col_start are not the manifest's tiles")
    tile = manifest.settings["tiling"]["tile"]
    chunks = (1, ds.sizes.get("band"), min(SCALE * tile, len(ys)), min(SCALE * tile, len(xs)))
    sr = ds["sr"]
    if tuple(sr.encoding.get("chunks") or ()) != chunks:
        problems.append(f"sr chunks {sr.encoding.get('chunks')} are not one date x one tile {chunks}")
    if sr.encoding.get("dtype") != np.dtype(SR_ENCODING["dtype"]) or sr.encoding.get("scale_factor") != SR_ENCODING["scale_factor"]:
        problems.append(f"sr is stored as {sr.encoding.get('dtype')} x {sr.encoding.get('scale_factor')}, not uint16 x 1e-4")
    return problems


def _window_problems(path: Location, ds: xr.Dataset, manifest: Manifest) -> list[str]:
    """Each recorded window: planned, with the right frame count, its chunks present and readable."""
    settings = manifest.settings
    windows = causal_windows(manifest.cloud(), settings["cloud"]["max_cloud_fraction"], settings["model"]["frames"])
    days = [day.date for day in manifest.days]
    planned = {(days[w.target], tile): len(w.frames) for tile, ws in windows.items() for w in ws}
    index = {date: k for k, date in enumerate(manifest.times)}
    empty = set(manifest.empty_chunks)
    array = zarr.open_array(**path.zarr_args(), path="sr", mode="r")
    chunk_y, chunk_x = array.chunks[2], array.chunks[3]
    frames_used = ds.frames_used.values if "frames_used" in ds else None
    problems = []
    for date, tiles in sorted(manifest.done.items()):
        if date not in index:
            continue  # reported with the time axis
        t = index[date]
        for row, col in tiles:
            name = f"window {date} tile ({row}, {col})"
            if (date, (row, col)) not in planned:
                problems.append(f"{name} is recorded but not planned (the tile is cloudy that date, or the tile does not exist)")
                continue
            if frames_used is not None and t < len(frames_used) and frames_used[t, row, col] != planned[(date, (row, col))]:
                problems.append(f"{name}: frames_used {frames_used[t, row, col]} is not the planned {planned[(date, (row, col))]}")
            (top, bottom), (left, right) = manifest.rows[row], manifest.cols[col]
            for iy in range(SCALE * top // chunk_y, -(-SCALE * bottom // chunk_y)):
                for ix in range(SCALE * left // chunk_x, -(-SCALE * right // chunk_x)):
                    problem = _chunk_problem(path, array, (t, 0, iy, ix), f"{date}/{iy}/{ix}" in empty)
                    if problem:
                        problems.append(f"{name}: chunk {problem}")
    return problems


def _chunk_problem(path: Location, array: zarr.Array, coords: tuple[int, int, int, int], empty_by_design: bool) -> str | None:
    key = array.metadata.encode_chunk_key(coords)
    if not path.has(f"sr/{key}"):
        return None if empty_by_design else f"sr/{key} is missing"
    t, _, iy, ix = coords
    cy, cx = array.chunks[2], array.chunks[3]
    try:
        array[t, :, iy * cy : (iy + 1) * cy, ix * cx : (ix + 1) * cx]
    except Exception as err:  # a chunk that does not decode is the finding
        return f"sr/{key} does not decode ({type(err).__name__})"
    return None


def verify_line(path: str | Path | Location) -> str:
    """The one-line verdict for a consistent output."""
    manifest = Manifest.read(path)
    assert manifest is not None
    return f"OK {path}: {len(manifest.times)} dates, {manifest.done_count()} windows recorded and readable, georeferencing consistent"
