"""Stage 5, super-resolution per tile: the Dask graph that turns the lazy cube into the lazy output.

Strategy: each tile is read with its halo as one chunk of a lazy cube, by a task of its own
(`read_windows`, `window_reads`): no padding at the region's edge, exactly as a whole-image run sees it;
for a compiled model the windows at the edge reach further inward, so that every window has one shape.
A window holds every day its tile's windows use (4 bands + SCL), and nothing of it is shared with the
neighbours' reads: the halo is read again by each window that takes it (an inner tile's window has
10-20 % more pixels than the tile at 1024-512 px), so a job holds a read only while its own tile's
tasks run, whatever the region's width. A job over years would make that chunk as long as its
history, so the job splits its windows by output date into time slabs (`time_slabs`) whose days fit
READ_BLOCK_BYTES per tile, a cube each: a slab re-reads only the few earlier frames its first windows
need. One task super-resolves one tile for a group of output dates (on GPU workers, a job of fewer
dates than a batch gives a task a run of tiles of a row, whose windows share the network's passes)
and crops the halo (4 x halo at 2.5 m), so with halo >= the receptive field the tiles join without
seams. Output chunks are (dates of the group, band, 4·tile, 4·tile), already encoded as the sink
stores them (uint16): the Zarr sink writes each one whole, never sharing a Zarr chunk between tasks.

A task moves its tile to the network's device as read (uint16) and does everything else there: the
cloud mask, gathering the windows, normalisation and gap filling, the network, the crop and the
encoding. On a GPU worker the CPU then only moves bytes, and the GPU is not kept waiting for it.

On a cluster with GPU workers (workers that advertise the Dask resource `GPU`), the super-resolution
layer carries the annotation resources={"GPU": 1}, so only those workers run it, as many tasks at a
time as a worker's GPU resource; reading and writing stay on any worker. The annotation is on the
layer itself, which graph optimisation keeps (the job tests check where the tasks really ran). Every task reports itself on the
`sr-batch-tile` event topic: that drives the per-tile progress bar and shows where tiles ran.
"""

from __future__ import annotations

import operator
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import dask.array as da
import numpy as np
import torch
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from torch.profiler import record_function

from sr_batch.allocator import allocator_in_use, give_back_freed_memory
from sr_batch.clouds import usable_reflectance_tensor
from sr_batch.cube import BANDS, SCL, load_cube
from sr_batch.plan import SCALE, Plan
from sr_batch.search import SolarDay
from sr_batch.sink import encode_reflectance_tensor
from sr_batch.superres import (
    STAGE_PREFIX,
    ModelRef,
    load_runner,
    superresolve_frames,
    to_device,
    window_activation_bytes,
    windows_per_device_pass,
)

TileWindows = list[tuple[int, tuple[int, ...]]]
"""(position of the output date within its group, positions of its frames in the tile block)."""

GPU_RESOURCE = "GPU"
"""The Dask worker resource that marks a GPU worker (`dask worker ... --resources GPU=1`)."""
TILE_TOPIC = "sr-batch-tile"
"""Dask event topic: one event per finished super-resolution task."""
READ_BLOCK_BYTES = 256e6
"""The read block (a tile with its halo and the days of a time slab, 4 bands + SCL) a job aims at. The
job holds the blocks of the tiles it is computing, and a block of a whole multi-year history would
grow with the time range: past this size the days are read in time slabs (one group of a task's
dates may need more)."""


@dataclass(frozen=True)
class TileGraph:
    """The lazy output, the tasks that compute it and the reads they take."""

    output: da.Array
    """(output date, band, y, x) at 2.5 m, uint16 as the sink stores it (reflectance x 10000; 0 where nothing was computed)."""
    tasks: dict[tuple[int, int, int], tuple[Any, list[tuple[int, int]]]] = field(default_factory=dict)
    """Per (group of dates, row, first column) of a run of tiles: its super-resolution task's key and
    the run's tiles that have a window in the group, in the order of the task's results (`output`
    cuts each tile's block from them). A run with no window in a group has no task."""
    reads: dict[tuple[int, int], Any] = field(default_factory=dict)
    """Per tile, the key of its read window (the tile with its halo and every day, 4 bands + SCL: window_reads)."""


SUPER_RESOLUTION_PREFIX = "superresolve"
"""The super-resolution tasks' key names start with it: their task prefix in Dask."""


def superresolve_plan(
    plan: Plan, model: ModelRef, dates_per_task: int, gpu_workers_only: bool = False, first_group: int = 0, tiles_per_task: int = 1
) -> TileGraph:
    """The plan's super-resolution as a Dask graph: one task per run of `tiles_per_task` tiles of a row
    (runs start at multiples of it) and group of `dates_per_task` output dates. The groups are numbered
    from `first_group` in the tasks' events (a time slab's groups follow the slab before)."""
    spec = plan.spec
    ychunks, xchunks = plan.chunks()
    hr_chunks = (len(BANDS),), tuple(SCALE * c for c in ychunks), tuple(SCALE * c for c in xchunks)
    outputs = plan.output_days
    if not outputs:
        return TileGraph(da.zeros((0, len(BANDS), SCALE * plan.grid.height, SCALE * plan.grid.width), dtype=np.uint16, chunks=((0,), *hr_chunks)))
    frame_days = plan.frame_days
    position = {day: k for k, day in enumerate(frame_days)}
    assets = spec.stac.assets.in_model_order()
    spans = read_windows(plan, same_shape=model.compile != "off")
    reads = window_reads([plan.days[d] for d in frame_days], plan, assets, spans)
    groups = [outputs[i : i + dates_per_task] for i in range(0, len(outputs), dates_per_task)]
    pass_windows = windows_per_pass(model, dates_per_task, tiles_per_task)
    runs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, col in sorted(plan.windows):
        runs.setdefault((row, col - col % tiles_per_task), []).append((row, col))
    tasks, members_of = {}, {}
    for g, group in enumerate(groups):
        slot = {day: k for k, day in enumerate(group)}
        for (row, first), run in runs.items():
            selected = {tile: [(slot[w.target], tuple(position[f] for f in w.frames)) for w in plan.windows[tile] if w.target in slot] for tile in run}
            members = [tile for tile in run if selected[tile]]  # a tile with no window here is not read for this task
            if members:
                members_of[(g, row, first)] = members
                tasks[(g, row, first)] = (
                    [reads.key_of[tile] for tile in members],
                    [selected[tile] for tile in members],
                    len(group),
                    [_crop(plan, spans[tile], *tile) for tile in members],
                    spec.cloud.dilate_pixels,
                    model,
                    (spec.output.uri, members, first_group + g),
                    pass_windows,
                )
    # The name hashes every task's arguments: jobs sharing a cluster never share keys by accident. The
    # model is hashed once, and the rest (numbers and strings) by their text: dask's tokenize walks
    # every nested tuple of every task, 6 s of client time for a whole Sentinel-2 tile's 16,641 tasks.
    name = f"{SUPER_RESOLUTION_PREFIX}-{tokenize(model, repr({key: args[:5] + args[6:] for key, args in tasks.items()}))}"  # args[5] is the model
    graph = {(name, g, row, first): (superresolve_tiles, *args) for (g, row, first), args in tasks.items()}
    annotations = {"resources": {GPU_RESOURCE: 1}} if gpu_workers_only else None
    layers = HighLevelGraph(
        {**reads.graph.layers, name: MaterializedLayer(graph, annotations=annotations)}, {**reads.graph.dependencies, name: set(reads.graph.layers)}
    )
    # The output, a block per tile cut from its run's results, zeros where a tile has no window in a
    # group (only the Dask array needs these tasks: a job writes each run's results from its task).
    tiled = f"{name}-tile"
    per_tile: dict[Any, Any] = {}
    for g, group in enumerate(groups):
        for (row, first), run in runs.items():
            at = {tile: k for k, tile in enumerate(members_of.get((g, row, first), []))}
            for tile in run:
                if tile in at:
                    per_tile[(tiled, g, 0, *tile)] = (operator.getitem, (name, g, row, first), at[tile])
                else:
                    height, width = (SCALE * (end - start) for start, end in (plan.rows[tile[0]], plan.cols[tile[1]]))
                    per_tile[(tiled, g, 0, *tile)] = (np.zeros, (len(group), len(BANDS), height, width), np.uint16)
    output = HighLevelGraph({**layers.layers, tiled: MaterializedLayer(per_tile)}, {**layers.dependencies, tiled: {name}})
    chunks = (tuple(len(g) for g in groups), *hr_chunks)
    keys = {key: ((name, *key), members_of[key]) for key in tasks}
    return TileGraph(da.Array(output, tiled, chunks, dtype=np.uint16), keys, reads.key_of)


def slab_days(plan: Plan) -> int:
    """Days a time slab may read: READ_BLOCK_BYTES of the largest tile with its halo, and at least the
    frames of one task's windows (a batch of consecutive dates)."""
    height, width = _largest_read(plan)
    per_day = (len(BANDS) + 1) * height * width * 2
    return max(plan.spec.model.frames + plan.spec.model.batch_size - 1, int(READ_BLOCK_BYTES // per_day))


def time_slabs(plan: Plan, max_days: int, dates_per_task: int = 1) -> list[Plan]:
    """The plan's windows split by output date into consecutive slabs, oldest first, each reading at most
    `max_days` days over all its tiles, unless a single group of `dates_per_task` dates needs more (a
    slab holds whole groups, so that its tasks keep their full batches). Windows are causal, so a slab
    needs no later day; it re-reads only the earlier frames its first windows need."""
    frames_of: dict[int, set[int]] = {}
    for windows in plan.windows.values():
        for window in windows:
            frames_of.setdefault(window.target, set()).update(window.frames)
    targets = sorted(frames_of)
    slabs: list[list[int]] = []
    days: set[int] = set()
    for start in range(0, len(targets), dates_per_task):
        group = targets[start : start + dates_per_task]
        group_days = set().union(*(frames_of[target] for target in group))
        if slabs and len(days | group_days) <= max_days:
            slabs[-1].extend(group)
            days |= group_days
        else:
            slabs.append(list(group))
            days = group_days
    members = [set(slab) for slab in slabs]
    return [replace(plan, windows={tile: [w for w in windows if w.target in member] for tile, windows in plan.windows.items()}) for member in members]


def frames_per_task(plan: Plan, dates_per_task: int) -> int:
    """The most days one task converts: a task's windows are a run of at most `dates_per_task` of its
    tile's windows in time order (those of its group of dates), and the run's frames are its days."""
    most = 0
    for windows in plan.windows.values():
        for start in range(max(1, len(windows) - dates_per_task + 1)):
            most = max(most, len({day for window in windows[start : start + dates_per_task] for day in window.frames}))
    return most


def _largest_tile(plan: Plan) -> tuple[int, int]:
    """(height, width) of the largest tile, without its halo."""
    rows, cols = plan.chunks()
    return max(rows), max(cols)


def _largest_read(plan: Plan) -> tuple[int, int]:
    """(height, width) of the largest window a task reads: the largest tile with its halo on both sides,
    widened as read windows are, and no larger than the region."""
    core_y, core_x = _largest_tile(plan)
    return min(plan.grid.height, aligned_window(core_y + 2 * plan.halo)), min(plan.grid.width, aligned_window(core_x + 2 * plan.halo))


def task_memory_bytes(plan: Plan, dates_per_task: int, on_gpu: bool = False, tiles: int = 1) -> int:
    """A rough upper bound of one super-resolution task's host memory, from the largest tile with its
    halo, for the plan's windows split into tasks of `dates_per_task` dates and `tiles` tiles (see `_task_bytes`)."""
    days = max((len(slab.frame_days) for slab in time_slabs(plan, slab_days(plan), dates_per_task)), default=0)
    used = frames_per_task(plan, dates_per_task)  # a task converts only its own windows' frames
    return _task_bytes(plan, days, used, plan.spec.model.batch_size, on_gpu, tiles)


def smallest_task_memory_bytes(plan: Plan, on_gpu: bool = False) -> int:
    """The host memory even the smallest task of the largest tile needs, whatever the clouds: one date
    whose window has one frame. Known before the clouds are scored, so a tile far too large for the
    workers is refused before that reading (a run whose clouds leave nothing to compute is refused
    too: the same job would be refused on the first run with a window to compute)."""
    return _task_bytes(plan, 1, 1, 1, on_gpu)


def _task_bytes(plan: Plan, days: int, used: int, dates: int, on_gpu: bool, tiles: int = 1) -> int:
    """The largest tile's block of `days` days (and its copies on the way to the device), once per tile
    of a run of `tiles`; on a CPU also what a GPU would hold in its own memory (the reflectance of the
    `used` days the task converts, a pass of `dates` windows twice, the network's activations capped
    per pass and a pass's float32 output); then the task's encoded output of `dates` windows (a run's
    windows are at most a batch, job.tiles_per_task) and its pinned copy."""
    height, width = _largest_read(plan)
    core_y, core_x = _largest_tile(plan)
    frames, bands = plan.spec.model.frames, len(BANDS)
    block = days * (bands + 1) * height * width * 2
    used_block = used * (bands + 1) * height * width * 2
    encoded = 2 * dates * bands * SCALE**2 * core_y * core_x * 2
    if on_gpu:
        return tiles * (block + 2 * used_block) + encoded  # Dask's blocks, the days gathered from them and their pinned copies
    reflectance = used * bands * height * width * 4 + 2 * used_block  # and the mask's int32 copy of the DN
    windows = 2 * dates * frames * bands * height * width * 4  # a window is padded to the model's frames
    cpu = torch.device("cpu")
    cpu_pass = min(dates, windows_per_device_pass(cpu, 64, frames, height, width))  # at least one window, whatever the budget
    activations = cpu_pass * window_activation_bytes(cpu, 64, frames, height, width)
    output = dates * bands * SCALE**2 * height * width * 4
    return tiles * (block + reflectance) + windows + int(activations) + output + encoded


def windows_per_pass(model: ModelRef, dates_per_task: int, tiles_per_task: int = 1) -> int:
    """Windows per forward pass: a task's windows, up to the model's batch. A compiled network pads every
    pass to this one size (one graph per job), so a job of fewer dates than a batch (a nightly run of one
    new date) must not pad its passes to `model.batch_size`: that would compute up to 8x its windows."""
    return min(model.batch_size, dates_per_task * tiles_per_task)


def compiled_pass_shape(plan: Plan, model: ModelRef, dates_per_task: int, tiles_per_task: int = 1) -> tuple[int, int, int] | None:
    """(windows, height, width) of the one pass a compiled job's network is compiled for, so that its
    workers can compile it before their first tile (`superres.warm_up`); None when not compiled or when
    there is nothing to compute. Every compiled window has one shape (`read_windows`)."""
    if model.compile == "off" or not plan.output_days or not any(plan.windows.values()):
        return None
    ((ys, xs), *_) = read_windows(plan, same_shape=True).values()
    return windows_per_pass(model, dates_per_task, tiles_per_task), ys[1] - ys[0], xs[1] - xs[0]


Span = tuple[int, int]
"""[start, end) in 10 m pixels of the region."""


def read_windows(plan: Plan, same_shape: bool = False) -> dict[tuple[int, int], tuple[Span, Span]]:
    """Per tile, the (y, x) pixels its task reads: the tile and `plan.halo` pixels on each side that has
    a neighbour, widened to a multiple of WINDOW_ALIGN where the neighbouring tiles have the pixels. A window stops at the
    region's edge, which the network then sees as a whole-image run does, so the tiles join exactly.
    With `same_shape`, a window at the region's edge reaches further inward instead (more halo on its
    inner side) to the shape of the widest window: a compiled network compiles once per input shape,
    and the edge windows would otherwise add up to eight. That is an inner tile's window where the
    region has inner tiles; with two tiles along an axis, a tile with its halo on its one inner side."""
    rows = [_span(plan.rows, k, plan.halo, plan.grid.height, max(plan.chunks()[0]), same_shape) for k in range(len(plan.rows))]
    cols = [_span(plan.cols, k, plan.halo, plan.grid.width, max(plan.chunks()[1]), same_shape) for k in range(len(plan.cols))]
    return {(row, col): (rows[row], cols[col]) for row in range(len(rows)) for col in range(len(cols))}


def _span(tiles: list[Span], index: int, halo: int, size: int, longest: int, same_shape: bool) -> Span:
    start, end = tiles[index]
    if same_shape:
        inner_sides = min(2, len(tiles) - 1)  # the sides of a tile that have a neighbour, at most
        length = min(size, aligned_window(longest + inner_sides * halo))
        first = min(max(0, start - halo), size - length)
        return first, first + length
    first, last = max(0, start - halo), min(size, end + halo)
    # Widened within the neighbouring tiles only: a window reaching a second tile away would read its block too.
    low, high = tiles[index - 1][0] if index else 0, tiles[index + 1][1] if index + 1 < len(tiles) else size
    extra = min(high - low, aligned_window(last - first)) - (last - first)
    after = min(extra, high - last)  # more halo after the tile, before it where there is no more room
    return first - min(extra - after, first - low), last + after


WINDOW_ALIGN = 16
"""Read windows are widened with more halo, where the neighbouring tiles have the pixels, to a multiple of this:
the network's convolutions run faster on such widths (on a CPU with AMX in bf16, a 1046 px window took
12.0 s and a 1056 px one 10.8 s). More halo changes no output pixel, as a halo only has to be wide enough."""


def aligned_window(pixels: int) -> int:
    """`pixels` rounded up to a multiple of WINDOW_ALIGN."""
    return -(-pixels // WINDOW_ALIGN) * WINDOW_ALIGN


@dataclass(frozen=True)
class WindowReads:
    """Each tile's read window (tile and halo, every day of the plan, 4 bands + SCL) as one whole chunk of
    a lazy cube, read by one task of its own."""

    graph: HighLevelGraph
    """The read tasks and what they need (stackstac's asset and reader tables), culled to the windows."""
    key_of: dict[tuple[int, int], Any]
    """Per tile, the key of its window's chunk."""


def window_reads(days: list[SolarDay], plan: Plan, assets: list[str], windows: dict[tuple[int, int], tuple[Span, Span]]) -> WindowReads:
    """The tiles' read windows, each read whole from the assets by one task: the halo is read again by
    each window that takes it, not cut from the neighbours' reads, so a task needs no other tile's read
    and a job holds a read only as long as its own tile's tasks run (job._compute). Windows overlap, so
    they cannot all be chunks of one cube: they are split into classes whose windows do not overlap
    along either axis (about two per axis: every other row or column), and each pair of classes is one
    cube chunked at its windows' edges (the gaps between them are chunks no task reads)."""
    row_classes = _disjoint_classes([windows[(row, 0)][0] for row in range(len(plan.rows))])
    col_classes = _disjoint_classes([windows[(0, col)][1] for col in range(len(plan.cols))])
    tasks: dict[Any, Any] = {}
    key_of: dict[tuple[int, int], Any] = {}
    for rows in row_classes:
        ychunks, ychunk_of = _chunks_at(rows, [windows[(row, 0)][0] for row in rows], plan.grid.height)
        for cols in col_classes:
            xchunks, xchunk_of = _chunks_at(cols, [windows[(0, col)][1] for col in cols], plan.grid.width)
            cube = load_cube(days, plan.grid, assets, [*BANDS, SCL], (ychunks, xchunks)).data
            keys = {(row, col): (cube.name, 0, 0, ychunk_of[row], xchunk_of[col]) for row in rows for col in cols}
            # Only the windows' chunks and what they need (a few tasks per window): the gaps' chunks are never read.
            tasks |= dict(cube.__dask_graph__().cull(set(keys.values())))
            key_of |= keys
    # One layer: the cubes share their asset and reader tables, and a layer's dependencies on others must be
    # declared for Dask to cull them in order (Dask's own cull also renames the layers it keeps).
    name = f"window-reads-{tokenize(sorted(map(str, key_of.values())))}"
    return WindowReads(HighLevelGraph({name: MaterializedLayer(tasks)}, {name: set()}), key_of)


def _disjoint_classes(spans: list[Span]) -> list[list[int]]:
    """The indices of `spans` in the fewest classes whose spans do not overlap (greedy by start, which is
    optimal for intervals): a region's windows overlap only their neighbours', so that is every other one."""
    classes: list[list[int]] = []
    ends: list[int] = []
    for index in sorted(range(len(spans)), key=lambda k: spans[k]):
        start, end = spans[index]
        free = next((k for k, last in enumerate(ends) if last <= start), None)
        if free is None:
            classes.append([])
            ends.append(0)
            free = len(classes) - 1
        classes[free].append(index)
        ends[free] = end
    return classes


def _chunks_at(indices: list[int], spans: list[Span], size: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """Chunks of an axis of `size` pixels with the (disjoint) `spans` as chunks, and the gaps between them;
    per index, the number of its span's chunk."""
    chunks: list[int] = []
    chunk_of: dict[int, int] = {}
    at = 0
    for index, (start, end) in sorted(zip(indices, spans), key=lambda pair: pair[1]):
        if start > at:
            chunks.append(start - at)
        chunk_of[index] = len(chunks)
        chunks.append(end - start)
        at = end
    if at < size:
        chunks.append(size - at)
    return tuple(chunks), chunk_of


def _crop(plan: Plan, window: tuple[Span, Span], row: int, col: int) -> tuple[int, int, int, int]:
    """The halo pixels (top, bottom, left, right) around the tile in its window."""
    (y0, y1), (x0, x1) = window
    (top, bottom), (left, right) = plan.rows[row], plan.cols[col]
    return top - y0, y1 - bottom, left - x0, x1 - right


def superresolve_tiles(
    blocks: list[np.ndarray],
    windows: list[TileWindows],
    n_dates: int,
    crops: list[tuple[int, int, int, int]],
    dilate: int,
    model: ModelRef,
    task: tuple[str, list[tuple[int, int]], int],
    pass_windows: int | None = None,
) -> list[np.ndarray | None]:
    """One task: a run of tiles, each a (days, band+scl, y, x) uint16 block with its halo and its
    windows → per tile (n_dates, band, 4y, 4x) uint16 as stored, halo cropped (None for a tile with no
    window). `task` is (output uri, the tiles, group of dates): which job and task, for the progress
    events. `pass_windows` is the job's windows per forward pass (`model.batch_size` by default), to
    which a compiled network pads every pass.

    Each tile goes to the network's device as it was read (uint16, the smallest form) and everything
    after that happens there: the cloud mask, the windows, the network and the encoding. A GPU worker's
    CPU only moves bytes, and the result that travels on to the writer is half the size of float32. On a
    GPU the tasks sharing it queue their passes in turn (superres.results_stream says why).

    The tiles whose windows have one shape, before and after their halo is cropped, go through the
    network together, their windows in shared passes: a task of a nightly run's one date and several
    tiles fills a pass that one tile's single window would leave mostly empty. Eager, a region's edge
    tiles have smaller windows and pass on their own; compiled, every window has one shape
    (`read_windows`) and only a narrower last column's tile passes on its own."""
    started, started_on_cpu = time.perf_counter(), time.thread_time()
    results: list[np.ndarray | None] = [None] * len(blocks)
    alike: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for k, (block, crop) in enumerate(zip(blocks, crops)):
        if windows[k]:
            height, width = block.shape[2:]
            top, bottom, left, right = crop
            alike.setdefault(((height, width), (height - top - bottom, width - left - right)), []).append(k)
    if not alike:
        return results
    runner = load_runner(model)
    with torch.inference_mode():
        for members in alike.values():
            stacked, positions = _frames_on_device([blocks[k] for k in members], [windows[k] for k in members], dilate, runner.device)
            window_crops = [crops[k] for k in members for _ in windows[k]]
            encoded = superresolve_frames(
                runner, stacked, positions, pass_windows or model.batch_size, window_crops, encode_reflectance_tensor, sharing=tasks_sharing_the_device()
            )
            del stacked
            first = 0
            for k in members:
                count = len(windows[k])
                results[k] = _in_slots(encoded[first : first + count], [slot for slot, _ in windows[k]], n_dates)
                first += count
    pixels = sum(_core_pixels(blocks[k], crops[k]) for k in range(len(blocks)) if windows[k])
    computed = sum(len(w) for w in windows)
    output, run, group = task
    done = (output, [tile for k, tile in enumerate(run) if windows[k]], group)
    _report_tiles(done, computed, pixels, str(runner.device), time.perf_counter() - started, time.thread_time() - started_on_cpu)
    if runner.device.type == "cpu":
        give_back_memory_if_tight()
    return results


def _frames_on_device(blocks: list[np.ndarray], windows: list[TileWindows], dilate: int, device: torch.device) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The days the tiles' windows take, moved to the device as read and made usable reflectance (the
    cloud mask per tile), in one stack of frames; and each window's positions in that stack, tile by tile."""
    frames: list[torch.Tensor] = []
    positions: list[tuple[int, ...]] = []
    for block, tile_windows in zip(blocks, windows):
        needed = sorted({f for _, days in tile_windows for f in days})
        at = {day: sum(len(f) for f in frames) + i for i, day in enumerate(needed)}
        with record_function(STAGE_PREFIX + "tile to device"):
            raw = to_device(torch.from_numpy(np.ascontiguousarray(block[needed]).view(np.int16)), device)
            frames.append(usable_reflectance_tensor(raw, dilate))
            del raw
        positions += [tuple(at[f] for f in days) for _, days in tile_windows]
    return (frames[0] if len(frames) == 1 else torch.cat(frames)), positions


def _in_slots(encoded: np.ndarray, slots: list[int], n_dates: int) -> np.ndarray:
    """A tile's results in the rows of its output dates (zeros where it has no window)."""
    if slots == list(range(n_dates)):
        return encoded
    out = np.zeros((n_dates, *encoded.shape[1:]), np.uint16)
    out[slots] = encoded
    return out


def _core_pixels(block: np.ndarray, crop: tuple[int, int, int, int]) -> int:
    top, bottom, left, right = crop
    return (block.shape[2] - top - bottom) * (block.shape[3] - left - right)


def superresolve_tile(
    block: np.ndarray,
    windows: TileWindows,
    n_dates: int,
    crop: tuple[int, int, int, int],
    dilate: int,
    model: ModelRef,
    tile: tuple[str, int, int, int],
    pass_windows: int | None = None,
) -> np.ndarray:
    """One tile's task (`superresolve_tiles` with one tile): (days, band+scl, y, x) uint16 tile with halo
    → (n_dates, band, 4y, 4x) uint16 as stored, halo cropped. `tile` is (output uri, row, col, group of dates)."""
    output, row, col, group = tile
    (result,) = superresolve_tiles([block], [windows], n_dates, [crop], dilate, model, (output, [(row, col)], group), pass_windows)
    if result is None:
        top, bottom, left, right = crop
        return np.zeros((n_dates, len(BANDS), SCALE * (block.shape[2] - top - bottom), SCALE * (block.shape[3] - left - right)), np.uint16)
    return result


TIGHT_MEMORY_FRACTION = 0.5
"""Share of a worker's memory limit past which a CPU task gives its freed memory back to the system."""
KEPT_MEMORY_GROWTH = 1.1
"""How far past its memory after its first task a glibc worker's memory may grow before it gives its freed
memory back: beyond that the heap has not kept a pass's memory but grown with fragmentation."""
_FIRST_TASK_MEMORY: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""Per worker in this process: its process memory after its first super-resolution task."""


def give_back_memory_if_tight() -> None:
    """A CPU worker keeps its largest pass's memory for the next pass (allocator.py). It gives its freed
    memory back after a task (and then faults the next task's activations in again) in two cases. Past
    half its memory limit: Dask counts kept memory against the limit, and a worker past 80 % of it is
    paused until its memory falls, which it then never would. And, under glibc, once it holds more than
    KEPT_MEMORY_GROWTH times what its first task left it with: the read blocks, results and Dask's
    buffers allocated between passes take pieces of the space the last pass freed, the next pass's
    largest activations no longer fit there, and the heap grows task after task with memory nobody
    uses (a 2-worker job of 8 tasks per worker: at most 2.2 GB in use, up to 4.5 GB kept free;
    bench/RESULTS.md), up to half the limit. jemalloc's size classes keep that growth small and
    bounded (2.5 to 3.0-3.35 GB in the same job, flat after 3-5 tasks), so a purge there would only
    cost the next task its page faults. Nothing happens outside a Dask worker."""
    worker = _current_worker()
    if worker is None:
        return
    memory = worker.monitor.get_process_memory()
    first = _FIRST_TASK_MEMORY.setdefault(worker, memory)
    limit = worker.memory_manager.memory_limit
    fragmented = allocator_in_use() == "glibc" and memory > KEPT_MEMORY_GROWTH * first
    if fragmented or (limit and memory > TIGHT_MEMORY_FRACTION * limit):
        give_back_freed_memory()


def tasks_sharing_the_device() -> int:
    """Super-resolution tasks this worker runs at once on its device: the units of its GPU resource (each
    task takes one; a worker started with `--resources GPU=2` runs two), 1 outside a Dask worker."""
    worker = _current_worker()
    if worker is None:
        return 1
    return max(1, int(worker.state.total_resources.get(GPU_RESOURCE, 1)))


def _report_tiles(task: tuple[str, list[tuple[int, int]], int], dates: int, pixels: int, device: str, seconds: float, thread_cpu_seconds: float) -> None:
    """Tell the client a task is done (progress, where it ran, and how long its thread ran on a core: on
    a CPU worker whose PyTorch runs in the task's thread, the rest of `seconds` it waited for one).
    `dates` counts the task's tile-dates, `pixels` its tiles' 10 m pixels, "tiles" the tiles it computed;
    "tile" (the first of them) and "group" name the task."""
    worker = _current_worker()
    if worker is None:
        return
    output, tiles, group = task
    event = {"output": output, "tile": list(tiles[0]), "tiles": [list(tile) for tile in tiles], "group": group, "dates": dates, "pixels": pixels}
    event |= {"device": device, "seconds": seconds, "thread_cpu_seconds": thread_cpu_seconds, "worker": worker.address}
    worker.log_event(TILE_TOPIC, event)


def _current_worker() -> Any:
    """The Dask worker running this task, or None when the task runs outside one (tests, `superresolve`)."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None
