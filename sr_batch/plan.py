"""The plan: what a job will compute, decided before any pixel is super-resolved.

search → grid → tiles → cloud score per (tile, date) from the SCL band → causal windows. Windows are
causal (a date's frames are it and earlier cloudless dates only), so a later run that finds new dates
never changes an earlier date's output. `sr-batch plan` stops here and prints the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np

from sr_batch.assets import describe_problems
from sr_batch.clouds import cloudy_fraction
from sr_batch.cube import SCL, Grid, choose_grid, load_cube
from sr_batch.errors import SpecError
from sr_batch.model import Architecture, receptive_radius
from sr_batch.search import SearchResult, SolarDay, search
from sr_batch.spec import MAX_AREA_KM2_UNCONFIRMED, JobSpec, aoi_area_km2

SCALE = 4
FLOP_PER_LR_PIXEL = 15.3e6
"""HighRes-net default config, 8 frames: 7.67 M multiply-adds per 10 m pixel and output date."""


@dataclass(frozen=True)
class Window:
    """One output: the target day and the days of its frames, oldest first (indices into plan.days)."""

    target: int
    frames: tuple[int, ...]


@dataclass
class Plan:
    spec: JobSpec
    found: SearchResult
    grid: Grid
    crs_note: str
    rows: list[tuple[int, int]]
    """Tile edges along y, in 10 m pixels; the last tile absorbs a remainder smaller than the halo."""
    cols: list[tuple[int, int]]
    cloud: np.ndarray
    """(day, tile row, tile col) unusable fraction."""
    radius: int = 28
    """The model's receptive field in 10 m pixels (the default architecture's unless told)."""
    windows: dict[tuple[int, int], list[Window]] = field(default_factory=dict)

    @property
    def days(self) -> list[SolarDay]:
        return self.found.days

    @property
    def output_days(self) -> list[int]:
        """Days that get an output in at least one tile, in time order."""
        return sorted({w.target for windows in self.windows.values() for w in windows})

    @property
    def frame_days(self) -> list[int]:
        """Days whose pixels some window reads, in time order."""
        return sorted({f for windows in self.windows.values() for w in windows for f in w.frames})

    @property
    def tile_dates(self) -> int:
        return sum(len(windows) for windows in self.windows.values())

    @property
    def halo(self) -> int:
        """`tiling.halo` in pixels, `auto` resolved for this plan's model."""
        return resolved_halo(self.spec, self.radius)

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(b - a for a, b in self.rows), tuple(b - a for a, b in self.cols)

    def summary(self) -> str:
        return _summary(self)


def make_plan(spec: JobSpec, radius: int | None = None) -> Plan:
    """Search, grid, tiles, cloud scores and windows; computes only the SCL band (on the active Dask client).

    `radius` is the model's receptive field, for the seam check in the summary."""
    radius = radius if radius is not None else receptive_radius(spec.model.architecture or Architecture(), spec.model.frames)
    found = search(spec)
    grid, crs_note = choose_grid(found.days, spec.aoi.shape(), spec.crs)
    rows, cols = tile_grid(grid, spec, radius)
    empty = np.zeros((0, len(rows), len(cols)), np.float32)
    plan = Plan(spec=spec, found=found, grid=grid, crs_note=crs_note, rows=rows, cols=cols, cloud=empty, radius=radius)
    plan.cloud = score_clouds(plan)
    plan.windows = causal_windows(plan.cloud, spec.cloud.max_cloud_fraction, spec.model.frames, first_output_day(found.days, spec))
    return plan


def resolved_halo(spec: JobSpec, radius: int) -> int:
    """The halo in pixels: `auto` is the seam-free one for a model of receptive field ±`radius`."""
    if spec.tiling.halo != "auto":
        return spec.tiling.halo
    halo = seamless_halo(spec, radius)
    if spec.tiling.tile < halo:
        raise SpecError(
            f"tiling.tile: {spec.tiling.tile} px is smaller than the seam-free halo of this model, {halo} px "
            f"(receptive field ±{radius} + cloud.dilate_pixels {spec.cloud.dilate_pixels}); set tiling.tile ≥ {halo}"
        )
    return halo


def tile_grid(grid: Grid, spec: JobSpec, radius: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Tile edges along y and x; a last tile never ends up thinner than the halo (the overlap needs it)."""
    min_last = max(resolved_halo(spec, radius), spec.cloud.dilate_pixels)
    return tile_edges(grid.height, spec.tiling.tile, min_last), tile_edges(grid.width, spec.tiling.tile, min_last)


def tile_edges(size: int, tile: int, min_last: int) -> list[tuple[int, int]]:
    """[start, stop) of each tile; a last remainder under `min_last` joins the tile before it."""
    starts = list(range(0, size, tile))
    if len(starts) > 1 and size - starts[-1] < min_last:
        starts.pop()
    return [(start, stops) for start, stops in zip(starts, starts[1:] + [size])]


SCORE_BLOCK_BYTES = 64e6
"""SCL read at once by one cloud-score task (a tile with its margin, some days): a long history is
scored a group of days at a time, as each day's score is its own."""


def score_clouds(plan: Plan) -> np.ndarray:
    """(day, row, col) unusable fraction, each tile scored with a margin so dilation sees its edges."""
    assets = plan.spec.stac.assets
    depth = plan.spec.cloud.dilate_pixels
    height = max(bottom - top for top, bottom in plan.rows) + 2 * depth
    width = max(right - left for left, right in plan.cols) + 2 * depth
    days_per_chunk = max(1, int(SCORE_BLOCK_BYTES // (height * width * 2)))
    scl = load_cube(plan.days, plan.grid, [assets.scl], [SCL], plan.chunks(), days_per_chunk).data[:, 0]
    depths = {0: 0, 1: depth if len(plan.rows) > 1 else 0, 2: depth if len(plan.cols) > 1 else 0}
    padded = da.overlap.overlap(scl, depth=depths, boundary="none") if depth else scl
    scores = da.map_blocks(
        _score_block,
        padded,
        depths=depths,
        shape=(len(plan.rows), len(plan.cols)),
        dilate=depth,
        chunks=(scl.chunks[0], (1,) * len(plan.rows), (1,) * len(plan.cols)),
        dtype=np.float32,
    )
    (result,) = dask.compute(scores)
    return result


def _score_block(block: np.ndarray, depths: dict[int, int], shape: tuple[int, int], dilate: int, block_info: dict | None = None) -> np.ndarray:
    row, col = block_info[None]["chunk-location"][1:]
    core = tuple(
        slice(depths[axis] if index > 0 else 0, block.shape[axis] - (depths[axis] if index < count - 1 else 0))
        for axis, index, count in ((1, row, shape[0]), (2, col, shape[1]))
    )
    return cloudy_fraction(block, dilate, core)[:, None, None]


def causal_windows(cloud: np.ndarray, max_fraction: float, frames: int, first_target: int = 0) -> dict[tuple[int, int], list[Window]]:
    """Per tile, one window per cloudless day from `first_target` on: that day and up to frames-1 earlier
    cloudless days (history days before `first_target` are frames only)."""
    windows: dict[tuple[int, int], list[Window]] = {}
    for row in range(cloud.shape[1]):
        for col in range(cloud.shape[2]):
            clear = [int(day) for day in np.flatnonzero(cloud[:, row, col] <= max_fraction)]
            windows[(row, col)] = [
                Window(target=day, frames=tuple(clear[max(0, k - frames + 1) : k + 1])) for k, day in enumerate(clear) if day >= first_target
            ]
    return windows


def first_output_day(days: list[SolarDay], spec: JobSpec) -> int:
    """The first of `days` (in time order) that gets outputs: the first on or after `time.start` when the
    job searches history before it; else the first searched (a solar day may fall just before `start`'s UTC day)."""
    if not spec.time.history_days:
        return 0
    return next((index for index, day in enumerate(days) if day.date >= spec.time.start), len(days))


def seamless_halo(spec: JobSpec, radius: int) -> int:
    """The smallest halo for which tiles join exactly: the receptive field, plus the cloud-mask
    dilation, since the mask of a pixel at the halo's edge depends on pixels beyond it (`auto` is this)."""
    return radius + spec.cloud.dilate_pixels


def _summary(plan: Plan) -> str:
    spec, grid, days = plan.spec, plan.grid, plan.days
    area_km2 = grid.width * grid.height * grid.resolution**2 / 1e6
    radius, needed = plan.radius, seamless_halo(plan.spec, plan.radius)
    outputs = plan.output_days
    full = sum(len(w.frames) == spec.model.frames for ws in plan.windows.values() for w in ws)
    lr_pixels = sum(len(ws) * (r[1] - r[0]) * (c[1] - c[0]) for (i, j), ws in plan.windows.items() for r, c in [(plan.rows[i], plan.cols[j])])
    per_tile = [len(ws) for ws in plan.windows.values()]
    lines = [
        f"Job {spec.name}: {plan.found.found} items found at {spec.stac.url} ({spec.stac.collection}), {spec.time.as_interval()}"
        + (f" (history: {first_output_day(days, spec)} solar days before {spec.time.start}, frames only)" if spec.time.history_days else ""),
        f"  kept {len(plan.found.items)} items on {len(days)} solar days"
        + (f" ({days[0].date} … {days[-1].date})" if days else "")
        + f"; dropped {len(plan.found.duplicates)} duplicates, {plan.found.outside_aoi} outside the AOI, "
        f"{plan.found.too_cloudy} over max_scene_cloud_cover, {len(plan.found.missing_assets)} missing assets",
        f"Grid: {plan.crs_note}, {grid.width} x {grid.height} px at 10 m ({area_km2:.2f} km²) -> {grid.width * SCALE} x {grid.height * SCALE} px at 2.5 m",
        f"Tiles: {len(plan.rows)} x {len(plan.cols)} of up to {spec.tiling.tile} px, halo {plan.halo} px{' (auto)' if spec.tiling.halo == 'auto' else ''} "
        f"(needs ≥ {needed}: receptive field ±{radius} + cloud dilation {spec.cloud.dilate_pixels}"
        f"{')' if plan.halo >= needed else '; TILES WILL SHOW SEAMS, raise tiling.halo)'}",
        f"Cloudless (unusable ≤ {spec.cloud.max_cloud_fraction:.0%} of a tile): {len(outputs)} of {len(days)} days in at least one tile; "
        f"per tile {min(per_tile, default=0)}–{max(per_tile, default=0)}",
        f"Windows: {plan.tile_dates} tile-dates, {full} with all {spec.model.frames} frames; reading {len(plan.frame_days)} days",
        f"Work: {lr_pixels / 1e6:.2f} M input px, ≈ {lr_pixels * FLOP_PER_LR_PIXEL / 1e12:.1f} TFLOP, "
        f"output ≤ {len(outputs) * grid.width * grid.height * SCALE**2 * 4 * 2 / 1e6:.0f} MB uncompressed",
    ]
    if outputs:
        first, last = days[outputs[0]].date, days[outputs[-1]].date
        lines.append(f"Output dates: {first} … {last}")
    if aoi_area_km2(spec.aoi) > MAX_AREA_KM2_UNCONFIRMED:
        lines.append(f"Large AOI: more than {MAX_AREA_KM2_UNCONFIRMED:,.0f} km², so `sr-batch run` needs --yes")
    if plan.found.unreadable:
        lines.append(describe_problems(plan.found.unreadable))
    return "\n".join(lines)
