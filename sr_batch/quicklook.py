"""Quicklooks: the 10 m input next to the 2.5 m output, for a person to look at.

`quicklook_store` works from a written store alone: the output date and extent come from the Zarr,
the 10 m input from the STAC API recorded in the store's job spec (`output.load_input`: searched
again for that one date and loaded by the job's own cube code on the 10 m lattice the output is
nested in). Input and output therefore cover exactly the same ground; the panels' axes are the
store's CRS coordinates. When the source cannot be reached the picture shows the output alone and
says why, in the picture and in one printed line.

Both columns get the same per-band stretch (2nd-98th percentile of the input, or of the output when
there is no input), so differences in brightness are real, not artefacts of separate stretches. The
input is upsampled by bicubic interpolation, the baseline any super-resolution must beat.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sr_batch.cube import Grid
from sr_batch.errors import OutputError, SrBatchError
from sr_batch.output import load_input, open_output, source_grid, store_dates

TRUE_COLOUR = (2, 1, 0)  # red, green, blue in band order blue, green, red, nir
FALSE_COLOUR = (3, 2, 1)  # nir, red, green


@dataclass(frozen=True)
class View:
    """What one quicklook shows: a date and a window of the store in whole 10 m pixels."""

    date: dt.date
    time_index: int
    grid: Grid
    """The window's 10 m lattice (a part of the store's)."""
    rows: slice
    cols: slice
    """The window in the store's 2.5 m pixels."""

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(west, east, south, north) of the window in the store's CRS, for imshow."""
        west, south, east, north = self.grid.bounds
        return west, east, south, north


def quicklook_store(
    uri: str | Path, path: Path, date: str | None = None, bbox: tuple[float, float, float, float] | None = None, echo: Callable[[str], None] = print
) -> Path:
    """Write a PNG of one output date (default: the latest) beside its 10 m input; returns its path."""
    with open_output(uri) as ds:
        view = choose_view(ds, date, bbox)
        high = ds.sr.isel(time=view.time_index, y=view.rows, x=view.cols).values
        job = json.loads(ds.attrs["job"])
        attrs = dict(ds.attrs)
    try:
        low, note = load_input(job, view.grid, [view.date], echo).values[0], ""
    except SrBatchError as err:
        echo(f"10 m input unavailable ({err}): showing the output only")
        low, note = None, f"10 m input unavailable from {job['stac']['url']}: output only (the reason is printed where the quicklook was made)"
    title = f"{job['name']}  {view.date}  —  model {attrs['model_name']}"
    if not attrs.get("model_trained"):
        title += "  —  UNTRAINED MODEL: output is not super-resolution"
    return render(low, high, path, title, extent=view.extent, crs=f"EPSG:{view.grid.epsg}", note=note)


def choose_view(ds: Any, date: str | None, bbox: tuple[float, float, float, float] | None) -> View:
    """The date and the window (whole 10 m pixels of the source lattice, clipped to the store) that a quicklook shows."""
    dates = store_dates(ds)
    if not dates:
        raise OutputError(f"{ds.encoding.get('source', 'the output')}: no dates (no cloudless date in its period); nothing to show")
    index = len(dates) - 1 if date is None else _date_index(dates, date)
    full = source_grid(ds)
    rows, cols = (0, full.height), (0, full.width)
    if bbox is not None:
        rows, cols = _window(ds, bbox, full)
    res, scale = full.resolution, ds.sizes["x"] // full.width
    grid = Grid(
        epsg=full.epsg, west=full.west + cols[0] * res, north=full.north - rows[0] * res, width=cols[1] - cols[0], height=rows[1] - rows[0], resolution=res
    )
    return View(dates[index], index, grid, slice(rows[0] * scale, rows[1] * scale), slice(cols[0] * scale, cols[1] * scale))


def _date_index(dates: list[dt.date], text: str) -> int:
    try:
        wanted = dt.date.fromisoformat(text)
    except ValueError:
        raise OutputError(f"--date {text!r}: not a date; give YYYY-MM-DD, one of the output's dates") from None
    if wanted in dates:
        return dates.index(wanted)
    nearest = min(dates, key=lambda d: abs(d - wanted))
    raise OutputError(f"--date {wanted}: not an output date (the store has {len(dates)}, {dates[0]} … {dates[-1]}); the nearest is {nearest}")


def _window(ds: Any, bbox: tuple[float, float, float, float], full: Grid) -> tuple[tuple[int, int], tuple[int, int]]:
    """The lon/lat bbox as 10 m pixel rows and columns of the store, snapped outward, clipped to it."""
    from rasterio.warp import transform_bounds

    minx, miny, maxx, maxy = transform_bounds("EPSG:4326", f"EPSG:{full.epsg}", *bbox, densify_pts=21)
    res = full.resolution
    col0, col1 = max(0, int(np.floor((minx - full.west) / res))), min(full.width, int(np.ceil((maxx - full.west) / res)))
    row0, row1 = max(0, int(np.floor((full.north - maxy) / res))), min(full.height, int(np.ceil((full.north - miny) / res)))
    if col1 - col0 < 2 or row1 - row0 < 2:
        lon0, lat0, lon1, lat1 = ds.rio.transform_bounds("EPSG:4326", densify_pts=21)
        raise OutputError(
            f"--bbox {','.join(f'{v:g}' for v in bbox)}: does not overlap the output (lon/lat {lon0:.5f},{lat0:.5f},{lon1:.5f},{lat1:.5f}); give one inside"
        )
    return (row0, row1), (col0, col1)


def bicubic(image: np.ndarray, scale: int = 4) -> np.ndarray:
    """(bands, H, W) → (bands, sH, sW) cubic-spline upsampling, with pixel centres kept aligned."""
    filled = np.nan_to_num(image, nan=float(np.nanmean(image)) if np.isfinite(image).any() else 0.0)
    height, width = image.shape[-2:]
    # Output pixel centre i maps to input coordinate (i + 0.5) / scale - 0.5.
    ys = (np.arange(height * scale) + 0.5) / scale - 0.5
    xs = (np.arange(width * scale) + 0.5) / scale - 0.5
    grid = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([ndimage.map_coordinates(band, grid, order=3, mode="nearest") for band in filled])


def _blank_nodata(upsampled: np.ndarray, image: np.ndarray, scale: int) -> np.ndarray:
    """Nodata stays nodata in the picture: a 2.5 m pixel is blank where its 10 m pixel was."""
    missing = np.repeat(np.repeat(~np.isfinite(image).all(axis=0), scale, axis=0), scale, axis=1)
    return np.where(missing, np.nan, upsampled)


def render(
    low: np.ndarray | None,
    high: np.ndarray,
    path: Path,
    title: str,
    extent: tuple[float, float, float, float] | None = None,
    crs: str = "",
    note: str = "",
) -> Path:
    """Write a PNG: rows true and false colour; columns 10 m input (bicubic) and 2.5 m output, or the output alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(high, "2.5 m output")]
    if low is not None:
        scale = high.shape[-1] // low.shape[-1]
        columns.insert(0, (_blank_nodata(bicubic(low, scale), low, scale), "10 m input, bicubic ×4"))
    reference = low if low is not None else high
    fig, axes = plt.subplots(2, len(columns), figsize=(5 * len(columns), 10.6), constrained_layout=True, squeeze=False)
    for row, (bands, name) in enumerate(((TRUE_COLOUR, "true colour"), (FALSE_COLOUR, "false colour (NIR, red, green)"))):
        limits = _stretch(reference, bands)
        for col, (image, label) in enumerate(columns):
            axis = axes[row, col]
            shown_extent = None if extent is None else tuple(v / 1000 for v in extent)
            axis.imshow(_rgb(image, bands, limits), interpolation="nearest", extent=shown_extent)
            axis.set_title(f"{label} — {name}", fontsize=10)
            if extent is None:
                axis.set_axis_off()
            else:
                axis.tick_params(labelsize=7)
                axis.ticklabel_format(useOffset=False, style="plain")
                axis.set_xlabel(f"x (km, {crs})", fontsize=8)
                axis.set_ylabel(f"y (km, {crs})", fontsize=8)
    width = 60 * len(columns)
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(note, width)), fontsize=11 if len(columns) > 1 else 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stretch(image: np.ndarray, bands: tuple[int, int, int]) -> list[tuple[float, float]]:
    limits = []
    for band in bands:
        values = image[band][np.isfinite(image[band])]
        low, high = np.percentile(values, (2, 98)) if values.size else (0.0, 1.0)
        limits.append((float(low), float(max(high, low + 1e-6))))
    return limits


def _rgb(image: np.ndarray, bands: tuple[int, int, int], limits: list[tuple[float, float]]) -> np.ndarray:
    channels = [(image[b] - lo) / (hi - lo) for b, (lo, hi) in zip(bands, limits)]
    rgb = np.clip(np.stack(channels, axis=-1), 0, 1)
    return np.nan_to_num(rgb, nan=0.0)
