"""Reading a written store: `open_output` for analysis, `open_input` for the 10 m frames it was made
from, `inspect_output` for `sr-batch inspect`.

A store is recognised as sr-batch's by what the sink always writes: a Zarr group with an `sr`
variable and the model's checksum in its attributes. Anything else (a missing path, a file, some
other Zarr) is refused with one line naming the path, before any data is read. Opening is exactly
`xr.open_zarr(uri, decode_coords="all", consolidated=False)`: float reflectance with NaN for no data,
the CRS as a CF grid mapping that rioxarray reads, and nothing added or renamed, so code written
against one works on the other.

The 10 m input is not stored; `open_input` searches the STAC API recorded in the store's job spec
again for the store's dates and loads them with the job's own cube code onto the 10 m lattice the
output is nested in (each 10 m pixel holds exactly 4 x 4 output pixels). The demo's STAC API lives
only while `make demo` runs, so for a store made from the bundled sample on this machine the sample
is served again when the recorded API is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from rasterio.warp import transform_bounds

from sr_batch.cube import BANDS, Grid, load_cube
from sr_batch.errors import OutputError, SrBatchError
from sr_batch.storage import Location, location, s3_error_code

REQUIRED_ATTRIBUTES = ("model_name", "model_sha256", "job")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_output(uri: str | Path) -> xr.Dataset:
    """The store as a lazy Dataset: (time, band, y, x) float reflectance with CRS, band names and per-date tables."""
    path = _checked_location(uri)
    try:
        ds = xr.open_zarr(**path.zarr_args(), decode_coords="all", consolidated=False)
    except Exception as err:  # noqa: BLE001 - zarr raises many types for a folder that is not a store
        raise OutputError(
            f"{path}: not an sr-batch output (not a readable Zarr store: {type(err).__name__}); give the folder that sr-batch run wrote"
        ) from None
    missing = [name for name in REQUIRED_ATTRIBUTES if name not in ds.attrs]
    if "sr" not in ds.data_vars or missing:
        ds.close()
        what = "no 'sr' variable" if "sr" not in ds.data_vars else f"no {', '.join(missing)} attribute"
        raise OutputError(f"{path}: not an sr-batch output (a Zarr store with {what}); give the folder that sr-batch run wrote")
    return ds


def _checked_location(uri: str | Path | Location) -> Location:
    path = location(uri)
    try:
        exists, is_store = path.exists(), path.has("zarr.json") and not path.is_file()
    except Exception as err:  # noqa: BLE001 - object storage: credentials, bucket, endpoint; one line, no secret
        raise OutputError(f"{path}: cannot read it ({s3_error_code(err)}); check the bucket name and the AWS_* credentials in the environment") from None
    if not exists:
        raise OutputError(f"{path}: no such output; give the output.uri of a finished sr-batch run")
    if not is_store:
        raise OutputError(f"{path}: not an sr-batch output (not a Zarr v3 store: no zarr.json); give the folder that sr-batch run wrote")
    return path


def source_grid(ds: xr.Dataset) -> Grid:
    """The 10 m lattice the store's 2.5 m pixels are nested in."""
    scale = int(ds.attrs.get("scale", 4))
    transform = ds.rio.transform()
    resolution = float(ds.attrs.get("source_resolution_m", abs(transform.a) * scale))
    return Grid(
        epsg=int(ds.rio.crs.to_epsg()), west=transform.c, north=transform.f, width=ds.sizes["x"] // scale, height=ds.sizes["y"] // scale, resolution=resolution
    )


def store_dates(ds: xr.Dataset) -> list[dt.date]:
    return [dt.date.fromisoformat(str(np.datetime_as_string(t, unit="D"))) for t in ds.time.values]


def open_input(uri: str | Path, echo: Callable[[str], None] = print) -> xr.DataArray:
    """The 10 m input of every output date, lazily: (time, band, y, x) float reflectance, NaN = no data, with CRS."""
    with open_output(uri) as ds:
        job, grid, dates = json.loads(ds.attrs["job"]), source_grid(ds), store_dates(ds)
    return load_input(job, grid, dates, echo)


def load_input(job: dict[str, Any], grid: Grid, dates: list[dt.date], echo: Callable[[str], None] = print) -> xr.DataArray:
    """`dates` of the job's source on `grid`, from the recorded STAC API, or the bundled sample served again."""
    try:
        return _load_from(job["stac"]["url"], job, grid, dates)
    except SrBatchError as err:
        failure = err
    with _sample_server_if_bundled(job, grid) as sample_url:
        if sample_url:
            echo(f"The STAC API recorded in the store ({job['stac']['url']}) is gone; serving the bundled sample region again at {sample_url}")
            return _load_from(sample_url, job, grid, dates)
    raise failure


def _load_from(url: str, job: dict[str, Any], grid: Grid, dates: list[dt.date]) -> xr.DataArray:
    """Search the dates again (±1 day: solar days and UTC days differ), keep the store's solar days, load them lazily."""
    from sr_batch.search import search
    from sr_batch.spec import parse_spec

    if not dates:
        raise OutputError("the store has no dates; there is no input to load")
    west, south, east, north = grid.bounds
    lonlat = [float(v) for v in transform_bounds(f"EPSG:{grid.epsg}", "EPSG:4326", west, south, east, north, densify_pts=21)]
    raw = {**job, "stac": {**job["stac"], "url": url}, "aoi": {"bbox": lonlat}, "crs": grid.epsg}
    today = dt.datetime.now(dt.UTC).date()  # the spec refuses an end in the future: a date written today ends today
    raw["time"] = {"start": str(min(dates) - dt.timedelta(days=1)), "end": str(min(max(dates) + dt.timedelta(days=1), today))}
    spec = parse_spec(raw, source="the store's job spec")
    wanted = set(dates)
    days = [day for day in search(spec).days if day.date in wanted]
    missing = sorted(wanted - {day.date for day in days})
    if missing:
        raise OutputError(f"the STAC API at {url} has no {spec.stac.collection} item of {missing[0]} any more ({len(missing)} dates missing)")
    assets = spec.stac.assets.in_model_order()[:4]
    dn = load_cube(days, grid, assets, list(BANDS), ((grid.height,), (grid.width,)))
    reflectance = (dn.where(dn != 0) / 10000.0).astype(np.float32)
    reflectance.attrs = {"long_name": "surface reflectance (10 m input)", "units": "1"}
    return reflectance.rio.write_crs(grid.epsg)


@contextlib.contextmanager
def _sample_server_if_bundled(job: dict[str, Any], grid: Grid) -> Iterator[str | None]:
    """A fresh STAC API of the bundled sample when the store was made from it (loopback API, sample footprint); else None."""
    from sr_batch.sample import COLLECTION_ID, build_sample_catalog

    if urlsplit(job["stac"]["url"]).hostname not in LOOPBACK or job["stac"]["collection"] != COLLECTION_ID:
        yield None
        return
    try:
        catalog = build_sample_catalog()
    except Exception:  # noqa: BLE001 - no sample here (e.g. offline): the caller reports the original failure
        yield None
        return
    first = catalog.items[0]["properties"]
    west, south, east, north = grid.bounds
    sx0, sy0, sx1, sy1 = first["proj:bbox"]
    if int(first.get("proj:epsg") or 0) != grid.epsg or not (sx0 <= west and east <= sx1 and sy0 <= south and north <= sy1):
        yield None
        return
    from sr_batch.stac_server import serve_items

    with serve_items(catalog.collection, catalog.items) as url:
        yield url


@dataclass(frozen=True)
class DateCoverage:
    date: str
    data_fraction: float
    """Fraction of the output's pixels that hold reflectance (not nodata) on this date."""
    tiles_with_output: int
    tiles: int
    window_frames: int
    """The most real frames any tile's window had on this date."""


@dataclass(frozen=True)
class Inspection:
    path: Path | str
    crs: str
    resolution_m: float
    source_resolution_m: float
    shape: dict[str, int]
    bounds: tuple[float, float, float, float]
    lonlat_bounds: tuple[float, float, float, float]
    coverage: list[DateCoverage]
    attributes: dict[str, Any]
    job: dict[str, Any]
    bytes_on_disk: int

    def text(self) -> str:
        return _describe(self)


def inspect_output(uri: str | Path) -> Inspection:
    """Everything `sr-batch inspect` prints; reads one band of `sr` once to count pixels with data."""
    with open_output(uri) as ds:
        where = location(uri)
        coverage = _coverage(ds)
        west, south, east, north = ds.rio.bounds()
        lonlat = ds.rio.transform_bounds("EPSG:4326", densify_pts=21) if ds.rio.crs else (np.nan,) * 4
        return Inspection(
            path=where.native,
            crs=str(ds.rio.crs),
            resolution_m=abs(float(ds.rio.resolution()[0])),
            source_resolution_m=float(ds.attrs.get("source_resolution_m", np.nan)),
            shape={k: int(v) for k, v in ds.sr.sizes.items()},
            bounds=(west, south, east, north),
            lonlat_bounds=tuple(float(v) for v in lonlat),
            coverage=coverage,
            attributes=dict(ds.attrs),
            job=json.loads(ds.attrs["job"]),
            bytes_on_disk=where.size_bytes(),
        )


def _coverage(ds: xr.Dataset) -> list[DateCoverage]:
    """Per date: pixels with data (the first band; the network writes all bands of a pixel together) and tiles with output."""
    if ds.sizes["time"] == 0:
        return []
    has_data = ds.sr.isel(band=0).notnull().mean(("y", "x")).values
    frames = ds.frames_used.values
    tiles = int(frames.shape[1] * frames.shape[2])
    return [
        DateCoverage(
            date=str(np.datetime_as_string(t, unit="D")),
            data_fraction=float(fraction),
            tiles_with_output=int((used > 0).sum()),
            tiles=tiles,
            window_frames=int(used.max()),
        )
        for t, fraction, used in zip(ds.time.values, has_data, frames)
    ]


def _describe(found: Inspection) -> str:
    attrs, job = found.attributes, found.job
    west, south, east, north = found.bounds
    lon0, lat0, lon1, lat1 = found.lonlat_bounds
    dates = [c.date for c in found.coverage]
    trained = "trained" if attrs.get("model_trained") else "UNTRAINED (random weights: not super-resolution)"
    lines = [
        f"Output: {found.path}",
        f"  dates: {len(dates)}" + (f" ({dates[0]} … {dates[-1]})" if dates else " (no cloudless date in the period)"),
        f"  CRS: {found.crs}; pixel {found.resolution_m:g} m (input {found.source_resolution_m:g} m); "
        f"{found.shape.get('x', 0)} x {found.shape.get('y', 0)} px, bands {found.shape.get('band', 0)}",
        f"  extent ({found.crs}): x {west:.1f} … {east:.1f}, y {south:.1f} … {north:.1f} ({(east - west) / 1000:.2f} x {(north - south) / 1000:.2f} km)",
        f"  extent (lon/lat): {lon0:.5f}, {lat0:.5f}, {lon1:.5f}, {lat1:.5f}",
        f"  model: {attrs.get('model_name')} sha256 {attrs.get('model_sha256')} — {trained}",
        f"  settings: frames {attrs.get('frames')}, max_cloud_fraction {attrs.get('max_cloud_fraction')}, "
        f"tile {attrs.get('tile_lr_px')} px, halo {attrs.get('halo_lr_px')} px, dilate {job.get('cloud', {}).get('dilate_pixels')} px",
        f"  source: {job.get('stac', {}).get('url')} ({job.get('stac', {}).get('collection')}), "
        f"time {job.get('time', {}).get('start')} … {job.get('time', {}).get('end') or 'now'}",
        f"  written: {attrs.get('created')} by sr-batch {attrs.get('sr_batch_version')}; size on disk {_size(found.bytes_on_disk)}",
    ]
    if found.coverage:
        lines.append("  date          data  tiles with output  frames")
        lines += [f"  {c.date}  {c.data_fraction:6.1%}  {c.tiles_with_output:>7} / {c.tiles:<7}  {c.window_frames:>6}" for c in found.coverage]
    return "\n".join(lines)


def _size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
