"""Stage 2, the lazy cube: the job's grid and a stackstac array of harmonised 10 m digital numbers.

The grid is the source's own pixel grid (one projected CRS per job, 10 m, origin taken from the
items), so nothing is resampled when the items are already on it: such assets (the 10 m bands, the
20 m SCL) are read straight from their files (AssetReader), where stackstac would warp them; an item
in another UTM zone is warped. Either way a GeoTIFF stays open for the next windows. Values stay
uint16 with nodata 0 (a quarter of stackstac's float64 default) and are harmonised to one meaning
across processing baselines: reflectance = DN / 10000. Baseline 04.00 and later store DN + 1000; that
offset is read per item from its metadata, never guessed from the date.

Every band is in one chunk, and the callers choose the spatial chunks: the plan reads only the SCL
band, by tile; the super-resolution reads each tile's window (tile and halo) as one chunk, with
only the dates its windows use (tiles.window_reads).
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import shapely
import xarray as xr
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry
from stackstac.rio_reader import (
    DEFAULT_GDAL_ENV,
    MULTITHREADED_DRIVER_ALLOWLIST,
    AutoParallelRioReader,
    SelfCleaningDatasetReader,
    SingleThreadedRioDataset,
    ThreadLocalRioDataset,
    exception_matches,
    nodata_for_window,
)

from sr_batch.clouds import SATURATED_DN
from sr_batch.errors import SearchError
from sr_batch.search import SolarDay

RESOLUTION = 10.0
READ_ERRORS_AS_NODATA = (
    r"HTTP response code: 404",  # stackstac's own default: an object gone since the search
    r"Read failed",  # a block GDAL cannot decode (corrupt bytes a header check cannot see); rasterio's message, details in its cause
    r".*IReadBlock failed",
)
"""Read errors that become no data for that asset's chunk instead of failing the job. The assets were
checked before the cube was built (sr_batch.assets), so these are rare, local defects; each one is
reported on the Dask event topic READ_ERROR_TOPIC, and the job counts them (job.py)."""
READ_ERROR_TOPIC = "sr-batch-read-error"
READ_CACHE_BYTES = 64 * 2**20
"""GDAL's cache of decoded COG blocks while a window is read (GDAL's default: 5 % of the machine's
memory). A window's read decodes each block it needs once, and a job's readers (stackstac's reader
table) are made again for each read, so a larger cache only kept earlier windows' blocks while some
reader stayed open: a worker's memory grew with what it had read, up to that 5 %. At 256 px tiles of
a 2048² px region its peak was 0.12 GB lower with this cache, reading as fast (bench/RESULTS.md)."""
BANDS = ("blue", "green", "red", "nir")
SCL = "scl"


@dataclass(frozen=True)
class Grid:
    """The job's 10 m pixel grid: north-up, `width` x `height` pixels from (`west`, `north`)."""

    epsg: int
    west: float
    north: float
    width: int
    height: int
    resolution: float = RESOLUTION

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.west, 0.0, -self.resolution, self.north)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.west, self.north - self.height * self.resolution, self.west + self.width * self.resolution, self.north)

    def centres(self, scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre x and y coordinates, at `scale` times finer pixels nested in the 10 m ones."""
        step = self.resolution / scale
        xs = self.west + (np.arange(self.width * scale) + 0.5) * step
        ys = self.north - (np.arange(self.height * scale) + 0.5) * step
        return xs, ys


def item_epsg(item: dict[str, Any]) -> int | None:
    props = item["properties"]
    if props.get("proj:epsg"):
        return int(props["proj:epsg"])
    code = str(props.get("proj:code") or "")
    return int(code.split(":")[1]) if code.upper().startswith("EPSG:") else None


def utm_epsg(lon: float, lat: float) -> int:
    """The WGS84 UTM zone's EPSG code at a lon/lat point."""
    zone = min(60, max(1, int((lon + 180) // 6) + 1))
    return (32600 if lat >= 0 else 32700) + zone


def choose_grid(days: list[SolarDay], aoi: BaseGeometry, epsg: int | None = None) -> tuple[Grid, str]:
    """The grid covering the AOI on the items' own pixel lattice; also a note on the CRS choice.

    An AOI across UTM zones is not an error: the output takes one CRS, the one most items use (on a
    tie, the zone of the AOI's centre), and the other zones' items are warped onto it (nearest
    neighbour). The note says so, and `crs:` in the job picks another."""
    items = [item for day in days for item in day.items]
    counts = Counter(item_epsg(item) for item in items)
    counts.pop(None, None)
    if epsg is None:
        if not counts:
            raise SearchError("crs: the items carry no proj:epsg/proj:code; set crs: EPSG code in the job")
        centre = utm_epsg(aoi.centroid.x, aoi.centroid.y)
        epsg = max(sorted(counts), key=lambda code: (counts[code], code == centre))
    note = f"EPSG:{epsg}"
    if len(counts) > 1:
        note += " (items span " + ", ".join(f"EPSG:{c} x{n}" for c, n in counts.most_common()) + f"; output on EPSG:{epsg}, others warped; set crs: to change)"
    origin_x, origin_y = _lattice_origin([i for i in items if item_epsg(i) == epsg])
    to_grid = Transformer.from_crs(CRS.from_epsg(4326), CRS.from_epsg(epsg), always_xy=True)
    west, south, east, north = shapely.transform(aoi.segmentize(0.001), to_grid.transform, interleaved=False).bounds
    west = origin_x + math.floor((west - origin_x) / RESOLUTION) * RESOLUTION
    north = origin_y + math.ceil((north - origin_y) / RESOLUTION) * RESOLUTION
    # At least 2 x 2 pixels: the network's decoder pads by reflection, which needs two.
    width = max(2, math.ceil(round((east - west) / RESOLUTION, 6)))
    height = max(2, math.ceil(round((north - south) / RESOLUTION, 6)))
    return Grid(epsg=epsg, west=west, north=north, width=width, height=height), note


def _lattice_origin(items: list[dict[str, Any]]) -> tuple[float, float]:
    """Where the items' 10 m pixel edges fall (their transform's origin modulo 10 m)."""
    for item in items:
        transform = item["properties"].get("proj:transform")
        for asset in item.get("assets", {}).values():
            if asset.get("proj:transform") and abs(asset["proj:transform"][0] - RESOLUTION) < 1e-9:
                transform = asset["proj:transform"]
                break
        if transform:
            return float(transform[2]) % RESOLUTION, float(transform[5]) % RESOLUTION
    return 0.0, 0.0


def dn_offset(item: dict[str, Any], asset_key: str) -> int:
    """The DN offset to add so that DN / 10000 is reflectance: 0, or -1000 from baseline 04.00 on.

    The asset's raster:bands offset/scale is the authority (a catalogue that already removed the
    offset says 0 there); otherwise the item's processing baseline decides.
    """
    asset = item["assets"][asset_key]
    bands = asset.get("raster:bands") or []
    if bands and "offset" in bands[0]:
        scale = float(bands[0].get("scale", 1e-4)) or 1e-4
        return int(round(float(bands[0]["offset"]) / scale))
    baseline = item["properties"].get("s2:processing_baseline")
    if baseline is not None and _version(str(baseline)) >= (4, 0):
        return -1000
    return 0


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def load_cube(
    days: list[SolarDay],
    grid: Grid,
    asset_keys: list[str],
    band_names: list[str],
    chunks: tuple[tuple[int, ...], tuple[int, ...]],
    days_per_chunk: int | None = None,
) -> xr.DataArray:
    """(time, band, y, x) uint16 harmonised DN, nodata 0, one time entry per solar day, lazily.

    `asset_keys` are the collection's names, `band_names` the names the output uses for them. `chunks`
    are the (y, x) chunks; along time a chunk holds `days_per_chunk` days, or every day when None,
    whether or not some day's granules had to be mosaicked.
    """
    import stackstac
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioIOError

    items = [item for day in days for item in day.items]
    stack = stackstac.stack(
        items,
        assets=asset_keys,
        epsg=grid.epsg,
        resolution=grid.resolution,
        bounds=grid.bounds,
        snap_bounds=False,
        dtype="uint16",
        fill_value=np.uint16(0),
        rescale=False,
        resampling=Resampling.nearest,
        chunksize=(days_per_chunk or -1, -1, chunks[0], chunks[1]),
        xy_coords="center",
        properties=False,
        sortby_date=False,
        errors_as_nodata=tuple(RasterioIOError(pattern) for pattern in READ_ERRORS_AS_NODATA),
        reader=AssetReader,
        gdal_env=DEFAULT_GDAL_ENV.updated(read={"GDAL_CACHEMAX": READ_CACHE_BYTES}),  # in bytes, as rasterio.Env takes it
    )
    _check_grid(stack, grid)
    stack = stack.assign_coords(band=band_names)
    stack = _harmonise(stack, items, asset_keys, band_names)
    # Mosaicking leaves a chunk per day along time: the callers' tasks take a chunk as their days.
    stack = _mosaic_solar_days(stack, days).chunk({"time": days_per_chunk or -1})
    return stack.drop_vars([c for c in stack.coords if c not in ("time", "band", "y", "x")])


class AssetReader(AutoParallelRioReader):
    """stackstac's reader of one asset, with three changes.

    An asset on the job's pixel lattice is read straight from its file. stackstac warps any asset whose
    grid is not exactly the job's (a WarpedVRT, nearest neighbour), and a job's grid is the AOI's block
    of the scene's pixels, never a whole scene: every real read went through GDAL's warper, 3-6x slower
    than reading the same window (bench/RESULTS.md). Where the asset has the grid's CRS and its pixels
    are whole multiples of the grid's, edges on the grid's lattice (Sentinel-2's 10 m bands, and its
    20 m SCL, which nearest-neighbour warping only repeats), the window is read from the file and its
    pixels repeated: the values warping gives, pixel for pixel (test_search_cube). Any other asset
    (another UTM zone, a shifted lattice, rescaled values) is warped as before.

    A GeoTIFF, on the lattice or warped, stays open for the next readers in this process (KEPT_DATASETS),
    and is opened again once its file changes or it is no longer kept.

    A read error stackstac would turn into no data is also reported: stackstac only warns in the
    worker's log, where no one counts."""

    def __init__(self, *, errors_as_nodata: tuple[Exception, ...] = (), **options: Any) -> None:
        super().__init__(errors_as_nodata=(), **options)  # stackstac raises; read() decides
        self.as_nodata = errors_as_nodata
        self._kept_key: tuple[Any, ...] | None = None
        """The KEPT_DATASETS key of the dataset this reader reads, while it is a kept one."""

    def __getstate__(self) -> dict[str, Any]:  # stackstac pickles a reader as its __init__ arguments
        return {**super().__getstate__(), "errors_as_nodata": self.as_nodata}

    def _open(self) -> Any:
        """The asset's dataset as read on the lattice where it is on it, else as stackstac opens it
        (warped); kept open for the next reads of this process (KEPT_DATASETS)."""
        key = (self.url, local_file_version(self.url), self.spec.epsg, tuple(self.spec.transform))
        self._kept_key = key
        if (kept := KEPT_DATASETS.get(key)) is not None:
            return kept
        with self.gdal_env.open:
            try:
                dataset = SelfCleaningDatasetReader(self.url, sharing=False)
            except Exception as err:
                raise RuntimeError(f"Error opening {self.url!r}: {err!r}") from err
        lattice = asset_lattice(dataset, self.spec.epsg, self.spec.transform) if dataset.count == 1 and self.scale_offset == (1, 0) else None
        # Only datasets with a copy per reading thread are shared: another driver's one dataset, closed
        # by KEPT_DATASETS while a reader still held it, would fail that reader's next read.
        shared = dataset.driver in MULTITHREADED_DRIVER_ALLOWLIST
        if lattice is None:  # warped: stackstac opens it again, with its VRT (a warp costs far more than the open)
            dataset.close()
            opened = super()._open()
        else:
            threads = ThreadLocalRioDataset if shared else SingleThreadedRioDataset
            opened = OnLattice(threads(self.gdal_env, dataset), lattice, dataset.height, dataset.width)
        if not shared:
            self._kept_key = None
            return opened
        return KEPT_DATASETS.keep(key, opened)

    def _current(self) -> Any:
        """The dataset to read. One kept open that KEPT_DATASETS has since closed (evicted, or a newer
        version of the file kept), or whose local file has changed since, is let go and the asset opened
        again: read through it, stackstac's wrapper would reopen the file lazily with the old file's
        geometry (its lattice, or its warp), and a reader lives as long as its slab's reader table."""
        opened = self.dataset
        key = self._kept_key
        if key is not None and (not KEPT_DATASETS.holds(opened) or local_file_version(self.url) != key[1]):
            with self._dataset_lock:
                if self._dataset is opened:
                    self._dataset = None
            opened = self.dataset
        return opened

    def close(self) -> None:
        """Let go of the dataset; one KEPT_DATASETS holds stays open for the next reader (it closes it)."""
        with self._dataset_lock:
            if self._dataset is not None and not KEPT_DATASETS.holds(self._dataset):
                self._dataset.close()
            self._dataset = None

    def read(self, window: Any, **options: Any) -> np.ndarray:
        try:
            opened = self._current()
            if not isinstance(opened, OnLattice):
                return super().read(window, **options)
            try:
                return opened.read(window, self.dtype, self.fill_value)
            except Exception as err:
                raise RuntimeError(f"Error reading {window} from {self.url!r}: {err!r}") from err
        except RuntimeError as err:  # an open or a read failed
            cause = err.__cause__
            if cause is None or not exception_matches(cause, self.as_nodata):
                raise
            report_read_error(self.url, cause)
            return nodata_for_window(window, self.fill_value, self.dtype)


class KeptDatasets:
    """Assets kept open between reads in this process (the least recently used closed first): on the
    lattice (OnLattice) or warped (stackstac's dataset and its VRT).

    A job reads each tile's window in a task of its own, and stackstac makes a task's readers afresh, so
    every read opened its file again: half of a read's time at 256 px tiles (bench/RESULTS.md), and on
    object storage a request for the file's header (a warped asset also made its VRT again). The next
    window of the same days reads the same files. At most `capacity` stay open (a dataset per reading
    thread: file descriptors, and GDAL's block cache, cube.READ_CACHE_BYTES, holds blocks of open
    datasets only), each for `seconds` at most, so that a remote file replaced in place is opened again
    within that time. A key is (url, version, ...): a local file's version (`local_file_version`)
    changes when it is rewritten or replaced, and keeping a new version closes the old one's dataset."""

    def __init__(self, capacity: int, seconds: float) -> None:
        self.capacity, self.seconds = capacity, seconds
        self._open: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return None
            if time.monotonic() - entry[0] > self.seconds:
                del self._open[key]
                entry[1].close()
                return None
            self._open.move_to_end(key)
            return entry[1]

    def holds(self, opened: Any) -> bool:
        with self._lock:
            return any(kept is opened for _, kept in self._open.values())

    def keep(self, key: Any, opened: Any) -> Any:
        with self._lock:
            if not self._open:
                self.capacity = min(self.capacity, assets_to_keep(allow_open_files(OPEN_FILES_WANTED), reading_threads()))
            url, version = key[:2]
            for earlier in [k for k in self._open if k[0] == url and (k == key or k[1] != version)]:
                self._open.pop(earlier)[1].close()  # the same key, or another version of the file
            self._open[key] = (time.monotonic(), opened)
            while len(self._open) > self.capacity:
                self._open.popitem(last=False)[1][1].close()
        return opened


def local_file_version(url: str) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns) of a local file (a plain path or a file:// URI), which
    changes when the file is rewritten or replaced (renamed over); None for a remote asset or a file
    that cannot be seen (its open then fails as it would). A stat costs microseconds a read; a remote
    file has no such cheap check, so a kept one is trusted for `KeptDatasets.seconds`."""
    if url.startswith("file://"):
        path = unquote(urlparse(url).path)
    elif "://" in url or url.startswith("/vsi"):
        return None
    else:
        path = url
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


KEPT_DATASETS = KeptDatasets(capacity=128, seconds=300.0)
"""This process's assets kept open: 128, enough for the 8 days x 5 assets of a window of 8 frames
several times over."""
OPEN_FILES_WANTED = 8192
"""Open files a reading process asks to be allowed (its soft limit, within the hard one): each of its
reading threads keeps a dataset of every kept asset, 128 x 8 threads on a large machine's CPU worker,
where a soft limit of 1024 (a common default) would make opens fail. Where the hard limit is lower,
fewer assets are kept (`assets_to_keep`)."""


def assets_to_keep(open_files: int, threads: int) -> int:
    """Kept assets that fit half of a soft limit of `open_files` (the rest stays for sockets, outputs and
    libraries) where each takes a file per reading thread: a hard limit of 1024 with 32 reading threads
    keeps 16, not 128 that would make opens fail."""
    return max(8, open_files // 2 // max(1, threads))


def reading_threads() -> int:
    """Threads that may read in this process: a Dask worker's, or else one per core (a local scheduler's pool)."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError):
        return os.cpu_count() or 1


def allow_open_files(wanted: int) -> int:
    """Raise this process's soft limit on open files to `wanted`, or to the hard limit below it; never
    lower it. Returns the soft limit in force (`wanted` where there is none)."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class Lattice:
    """How an asset's pixels sit on the job's grid: each is `factor` x `factor` grid pixels, and grid
    pixel (row, col) lies in asset pixel ((row + row_offset) // factor, (col + col_offset) // factor)."""

    factor: int
    row_offset: int
    col_offset: int

    def source(self, start: int, length: int, offset: int, size: int) -> tuple[slice, slice] | None:
        """Along one axis, for grid pixels [start, start + length): the asset pixels to read (clipped to
        the asset's `size`), and where their repeated pixels land in the window; None if none do."""
        first = max(start, -offset)  # the window's first grid pixel inside the asset ...
        last = min(start + length, size * self.factor - offset)  # ... and its end
        if first >= last:
            return None
        return slice((first + offset) // self.factor, (last - 1 + offset) // self.factor + 1), slice(first - start, last - start)


def asset_lattice(dataset: Any, epsg: int, grid: Affine, tolerance: float = 1e-6) -> Lattice | None:
    """The asset's Lattice on the grid (a north-up `grid` transform in CRS `epsg`), or None where its
    pixels are not whole blocks of the grid's: another CRS, a rotation, a finer or fractional pixel, a
    shifted edge."""
    source = dataset.transform
    if dataset.crs is None or source.b or source.d or grid.b or grid.d or source.a <= 0 or grid.a <= 0:
        return None
    if abs(source.e + source.a) > tolerance * source.a or abs(grid.e + grid.a) > tolerance * grid.a:  # square pixels, north up
        return None
    factor, columns, rows = source.a / grid.a, (grid.c - source.c) / grid.a, (source.f - grid.f) / grid.a
    if any(abs(value - round(value)) > tolerance for value in (factor, columns, rows)) or round(factor) < 1:
        return None
    if dataset.crs.to_epsg() != epsg:
        return None
    return Lattice(round(factor), round(rows), round(columns))


@dataclass
class OnLattice:
    """An asset's dataset read on the job's lattice: its window's pixels, each repeated `factor` times
    along both axes, the fill value where the window leaves the asset (as a warp would give)."""

    dataset: Any
    """stackstac's thread-safe wrapper of the file's dataset (a dataset per thread for GeoTIFFs)."""
    lattice: Lattice
    height: int
    width: int

    def read(self, window: Any, dtype: np.dtype, fill_value: int | float) -> np.ndarray:
        window_rows, window_cols = int(window.row_off), int(window.col_off)
        rows = self.lattice.source(window_rows, int(window.height), self.lattice.row_offset, self.height)
        cols = self.lattice.source(window_cols, int(window.width), self.lattice.col_offset, self.width)
        out = np.full((int(window.height), int(window.width)), fill_value, dtype)
        if rows is None or cols is None:
            return out
        (source_rows, out_rows), (source_cols, out_cols) = rows, cols
        read = Window.from_slices(source_rows, source_cols)
        values = np.ma.filled(self.dataset.read(read, indexes=1, out_dtype=dtype, masked=True), fill_value)
        factor = self.lattice.factor
        if factor > 1:
            # The grid pixels of the asset's first row and column that fall before the window are dropped.
            skip_rows = window_rows + out_rows.start + self.lattice.row_offset - factor * source_rows.start
            skip_cols = window_cols + out_cols.start + self.lattice.col_offset - factor * source_cols.start
            values = values.repeat(factor, axis=0)[skip_rows : skip_rows + out_rows.stop - out_rows.start]
            values = values.repeat(factor, axis=1)[:, skip_cols : skip_cols + out_cols.stop - out_cols.start]
        out[out_rows, out_cols] = values
        return out

    def close(self) -> None:
        self.dataset.close()


def report_read_error(url: str, error: BaseException) -> None:
    """Tell the job that a read became no data: a Dask event from a worker, a warning elsewhere."""
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        warnings.warn(f"read as no data: {url}: {message}", stacklevel=2)
        return
    worker.log_event(READ_ERROR_TOPIC, {"url": url, "error": message})


def _check_grid(stack: xr.DataArray, grid: Grid) -> None:
    xs, ys = grid.centres()
    if stack.shape[-2:] != (grid.height, grid.width) or not (np.allclose(stack.x, xs) and np.allclose(stack.y, ys)):
        raise AssertionError(f"stackstac grid {stack.shape[-2:]} does not match the planned grid {(grid.height, grid.width)}")


def _harmonise(stack: xr.DataArray, items: list[dict[str, Any]], asset_keys: list[str], band_names: list[str]) -> xr.DataArray:
    """Add each item's DN offset to its data bands (nodata 0 and saturated 65535 stay; others clip to 1..65534)."""
    offsets = np.array([[dn_offset(item, key) if name != SCL else 0 for key, name in zip(asset_keys, band_names)] for item in items], np.int32)
    if not offsets.any():
        return stack
    shift = xr.DataArray(offsets, dims=("time", "band"))
    shifted = (stack.astype(np.int32) + shift).clip(1, SATURATED_DN - 1).astype(np.uint16)
    return xr.where((stack == 0) | (stack == SATURATED_DN), stack, shifted).astype(np.uint16)


def _mosaic_solar_days(stack: xr.DataArray, days: list[SolarDay]) -> xr.DataArray:
    """One frame per solar day; where several granules cover a pixel the last item is on top."""
    import pandas as pd

    day_of_item = [np.datetime64(day.date, "ns") for day in days for _ in day.items]
    if len(day_of_item) == len(days):
        return stack.assign_coords(time=pd.DatetimeIndex(day_of_item))
    import stackstac

    stack = stack.assign_coords(time=pd.DatetimeIndex(day_of_item))

    def mosaic(group: xr.DataArray) -> xr.DataArray:
        return stackstac.mosaic(group, dim="time", nodata=0) if group.sizes["time"] > 1 else group.squeeze("time", drop=True)

    return stack.groupby("time").map(mosaic)
