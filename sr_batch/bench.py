"""`python -m sr_batch.bench`: throughput and memory, measured in one run, printed as ratios.

1. Model only: the checkpoint on the current device, one tile-sized batch repeated, for each
   precision/layout option (fp32 eager, channels_last, bf16/fp16 autocast where the device runs them natively) and
   torch.compile mode (`--model-only-compile`; on a GPU max-autotune is the fastest, the figure a GPU job is held to).
   On a CPU also in as many processes as a job has workers (`--workers`), all at once: eager in fp32
   and in the jobs' precision, and compiled in that precision, in each mode.
2. On a GPU, the tile task alone: a job's task on a real tile with its halo, without Dask, 1 to 4 at
   a time. Between 1 and 3 it says what the task adds to the network and what the pipeline adds to
   the task, and whether more tasks side by side would keep the GPU busier. One-date tasks (a nightly
   run's) of one tile (one window per pass) and of a run of `--batch` tiles (a GPU worker's nightly
   task, whose windows share passes) say what small passes cost and what runs of tiles give back.
   One task is then profiled (torch's profiler): host and GPU time per stage of the task, and a
   Chrome trace next to the JSON, so that a gap between task and network shows where it lies.
3. End to end: a job on a region built from the real sample (its clearest dates, mirrored to
   `--size` x `--size` pixels, dated at Sentinel-2's 5-day revisit) served by a local STAC API and run
   on the cluster `sr-batch run` makes (with a GPU worker per GPU), from search to Zarr; its throughput
   ÷ the best model-only figure says how much the pipeline costs. The job's `--dates` dates follow the
   model's frames - 1 dates of history (`time.history_days`), so every window holds all its frames as
   model only's do: a window of fewer frames costs less, and would flatter the pipeline. Tiling is a
   job's default: `--tile` and `halo: auto`, the model's seam-free halo.
   Each job also reports its worker threads' seconds by kind of task, and the best model-only variant
   (and, where the jobs ran another, the best as they ran) is read again after the jobs: the ratios
   take the mean of both readings, as a machine's speed drifts.
   On a GPU the job also reports the GPU's utilisation (NVML) in its super-resolution phase. On a GPU
   (or with `--nightly on`) a nightly run is timed too: the 4x job's one new date, whose tasks take
   runs of tiles on GPU workers.
4. Memory: the peak resident memory of the largest worker process for 1x and 4x the area (the
   kernel's record, read when the job ends: no peak is missed between samples), and on a GPU the
   peak its CUDA allocator reserved; it should not grow with the region. A small job splits its
   dates over smaller tasks, so where the 1x job chose fewer dates per task it runs once more with
   the 4x job's, and the target compares those. Each job also reports its read windows' shapes: a
   task's memory follows its window, so where the two jobs' windows differ their peaks do too.

Throughput is in 10 m input megapixels per second per output date, and km² of one output date per
second (1 Mpx = 100 km²). The numbers go to stdout and to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import queue
import resource
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from dask.utils import key_split
from distributed import get_task_stream

from sr_batch.allocator import allocator_in_use, give_back_freed_memory
from sr_batch.cluster import GPU_SLOTS, cpu_allocator_environment, cpu_worker_layout
from sr_batch.model import LoadedModel
from sr_batch.plan import SCALE
from sr_batch.sample import COLLECTION_ID, SampleCatalog, collection_for, open_sample_cube, sample_aoi, write_date
from sr_batch.spec import Tiling
from sr_batch.superres import (
    STAGE_PREFIX,
    ModelRef,
    Runner,
    auto_precision,
    cpu_has_bf16_matrix_units,
    keep_compiled_kernels,
    load_model,
    pick_autocast,
    pick_device,
    prepare_windows,
)
from sr_batch.tiles import TILE_TOPIC, read_windows

KM2_PER_MPX = 100.0
REVISIT_DAYS = 5
"""Days between the benchmark catalogue's dates: Sentinel-2's revisit with two satellites."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameters (malloc.h)."""
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def allocating_as_cpu_workers() -> Iterator[None]:
    """Run this process's model-only passes keeping freed memory as a job's CPU workers do (allocator.py;
    jemalloc there keeps it as fast as these glibc settings), so that model-only rates compare with theirs: glibc's mallopt at
    run time, which governs the main thread's heap, where the passes run. Afterwards the thresholds
    return to glibc's initial values (fixed now, no longer adapting) and the freed heap goes back to
    the system: kept, the activations of its batches would crowd out the processes the benchmark
    starts next. Nothing happens without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    largest = ctypes.c_int(2**31 - 1)  # mallopt takes an int: an activation over 2 GB (a batch of 4 512 px windows) is still mapped afresh
    mallopt(M_MMAP_THRESHOLD, largest)
    mallopt(M_TRIM_THRESHOLD, largest)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, ctypes.c_int(GLIBC_DEFAULT_THRESHOLD))
        mallopt(M_TRIM_THRESHOLD, ctypes.c_int(GLIBC_DEFAULT_THRESHOLD))
        give_back_freed_memory()


def model_only(
    loaded: LoadedModel, device: torch.device, tile: int, batch: int, repeats: int, compile_modes: Sequence[str], only: str | None = None
) -> list[dict[str, Any]]:
    """LR Mpx/s of the network alone, per variant (or the variant named `only`), on one batch of tile-sized
    windows: eager per precision and layout, then compiled in each of `compile_modes` in the device's
    fastest precision. A variant's row names its compile mode ("off" for eager)."""
    x, a = _model_input(loaded, tile, batch, device)
    variants = [("fp32 eager", torch.float32, False), ("fp32 channels_last", torch.float32, True)]
    if device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # A CPU without native bf16 emulates it, about 5x slower than fp32 (bench/RESULTS.md); `precision: auto` picks it on CPUs with AMX only.
        variants.append(("bf16 autocast + channels_last", torch.bfloat16, True))
    if device.type == "cuda":
        variants.append(("fp16 autocast + channels_last", torch.float16, True))
    results = [
        _time_variant(loaded.network, x, a, name, dtype, channels_last, "off", repeats, device)
        for name, dtype, channels_last in variants
        if only in (None, name)
    ]
    fastest = torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matrix_units() else torch.float32
    label = "bf16 + channels_last" if fastest == torch.bfloat16 else "fp32 channels_last"
    for mode in compile_modes:
        name = f"{label} + torch.compile({mode})"
        if only in (None, name):
            results.append(_time_variant(loaded.network, x, a, name, fastest, True, mode, repeats, device))
    return results


def compile_modes_to_measure(setting: str, device: torch.device, job_mode: str) -> tuple[str, ...]:
    """The torch.compile modes model only measures: `auto` is every mode on a GPU (max-autotune is the
    fastest there, and the reference a GPU job is held to) and `default` on a CPU; the jobs' own mode
    (`--compile`) is always among them, so that each job also has a like-for-like reference."""
    if setting == "auto":
        modes = ["default", "max-autotune"] if device.type == "cuda" else ["default"]
    else:
        modes = [mode for mode in setting.split(",") if mode and mode != "none"]
    return tuple(dict.fromkeys([*modes, *([job_mode] if job_mode != "off" else [])]))


def model_only_again(row: dict[str, Any], loaded: LoadedModel, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """A model-only variant (the best, and the best as the jobs ran) measured again after the end-to-end
    jobs. A shared machine's speed drifts by tens of percent over minutes (bench/RESULTS.md): a ratio to
    one reading taken minutes before the jobs would carry that drift, so the ratios use both readings
    and show their spread."""
    if "processes" in row:
        return model_only_on_workers(
            args.checkpoint, args.tile, row["batch"], row["repeats"], row["processes"], row["threads"], row["precision"], row["compile"]
        )
    with allocating_as_cpu_workers() if device.type == "cpu" else contextlib.nullcontext():
        return model_only(loaded, device, args.tile, args.batch, args.repeats, [row["compile"]] if row["compile"] != "off" else [], only=row["variant"])[0]


def _model_input(loaded: LoadedModel, tile: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prepared tile-sized windows (the network's speed does not depend on the values)."""
    shape = (loaded.info.frames, 4, tile, tile)
    frames = (0.1 + np.random.default_rng(0).normal(0, 0.02, shape)).astype(np.float32)
    stack, alphas = prepare_windows([frames] * batch, loaded.info.frames, np.asarray(loaded.info.mean, np.float32), np.asarray(loaded.info.std, np.float32))
    return torch.from_numpy(stack).to(device), torch.from_numpy(alphas).to(device)


def model_only_on_workers(
    checkpoint: str, tile: int, batch: int, repeats: int, workers: int, threads: int, precision: str = "fp32", compile_mode: str = "off"
) -> dict[str, Any]:
    """channels_last in `precision` (fp32, or an autocast dtype) in `workers` processes of `threads` torch
    threads at once, as a CPU job's workers run it, timed as a group; compiled with `compile_mode` as a
    compiled job's workers run it (with sr-batch's kernel cache). One process with every core can be
    slower than that, and end to end ÷ model only must compare with the best the machine does."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(workers), context.Queue()
    arguments = (checkpoint, tile, batch, repeats, threads, precision, compile_mode, ready, results)
    processes = [context.Process(target=_worker_rate, args=arguments) for _ in range(workers)]
    with cpu_allocator_environment():  # they start with the allocator of a job's CPU workers
        for process in processes:
            process.start()
    layout = "fp32 channels_last" if precision == "fp32" else f"{precision} autocast + channels_last"
    layout += f" + torch.compile({compile_mode})" if compile_mode != "off" else ""
    name = f"{layout}, {workers} processes x {threads} thread{'s' if threads > 1 else ''}, batch {batch}"
    spans = _spans_of(processes, results, name)
    # The group's rate from the first start to the last end: a process that finishes early does not
    # count the time the others then run with the machine to themselves.
    mpx = workers * batch * repeats * tile * tile / 1e6 / (max(end for _, end in spans) - min(start for start, _ in spans))
    row = {"variant": name, "compile": compile_mode, "lr_mpx_per_s": mpx, "km2_date_per_s": mpx * KM2_PER_MPX}
    return row | {"processes": workers, "threads": threads, "batch": batch, "repeats": repeats, "precision": precision}


MODEL_ONLY_TIMEOUT_S = 3600.0


class ModelOnlyDied(RuntimeError):
    """A model-only process ended without its result (the kernel's out-of-memory killer, most often)."""


def _spans_of(processes: list[Any], results: Any, name: str) -> list[tuple[float, float]]:
    """Each process's (start, end), or ModelOnlyDied as soon as one has died: the others would wait for
    it at their barrier, and the benchmark with them, for ever."""
    spans: list[tuple[float, float]] = []
    deadline = time.monotonic() + MODEL_ONLY_TIMEOUT_S
    while len(spans) < len(processes):
        try:
            spans.append(results.get(timeout=2))
        except queue.Empty:
            died = [process.exitcode for process in processes if process.exitcode not in (None, 0)]
            if died or time.monotonic() > deadline:
                for process in processes:
                    process.terminate()
                    process.join()
                if not died:
                    raise ModelOnlyDied(f"{name}: no result within {MODEL_ONLY_TIMEOUT_S:.0f} s; lower --repeats") from None
                killed = " (killed: out of memory, most likely; lower --batch or --tile)" if -signal.SIGKILL in died else ""
                raise ModelOnlyDied(f"{name}: a process ended with exit code {died[0]}{killed}") from None
    for process in processes:
        process.join()
    return spans


def _worker_rate(checkpoint: str, tile: int, batch: int, repeats: int, threads: int, precision: str, compile_mode: str, ready: Any, results: Any) -> None:
    """One process of `model_only_on_workers`: warm up (compiling), wait for the others, then time the repeats."""
    torch.set_num_threads(threads)
    if compile_mode != "off":
        keep_compiled_kernels()
    loaded = load_model(ModelRef(checkpoint=checkpoint))
    x, a = _model_input(loaded, tile, batch, torch.device("cpu"))
    dtype = pick_autocast(precision, torch.device("cpu")) or torch.float32
    row = _time_variant(loaded.network, x, a, "", dtype, True, compile_mode, repeats, torch.device("cpu"), before_timing=ready.wait)
    results.put((time.time() - row["seconds"], time.time()))


def _time_variant(
    network: torch.nn.Module,
    x: torch.Tensor,
    a: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    channels_last: bool,
    compile_mode: str,
    repeats: int,
    device: torch.device,
    before_timing: Callable[[], object] = lambda: None,
) -> dict[str, Any]:
    net = network.to(memory_format=torch.channels_last) if channels_last else network.to(memory_format=torch.contiguous_format)
    run = torch.compile(net, mode=compile_mode, dynamic=False) if compile_mode != "off" else net
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        started = time.perf_counter()
        run(x, a)  # warm-up (and compilation)
        _sync(device)
        warm_up = time.perf_counter() - started
        before_timing()
        started = time.perf_counter()
        for _ in range(repeats):
            run(x, a)
        _sync(device)
        seconds = time.perf_counter() - started
    mpx = x.shape[0] * x.shape[-1] * x.shape[-2] * repeats / 1e6 / seconds
    return {"variant": name, "compile": compile_mode, "lr_mpx_per_s": mpx, "km2_date_per_s": mpx * KM2_PER_MPX, "warm_up_s": warm_up, "seconds": seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def writing(loaded: LoadedModel, device: torch.device, tile: int, threads: int) -> list[dict[str, Any]]:
    """The sink alone, per `output.codec`: one tile's real super-resolved output (the sample's clearest
    dates, mirrored to the tile's size) written again and again into a local Zarr store by the job's
    own write function, on one thread and on `threads` at once. MB/s count the stored uint16 before
    compression; on a GPU this, not the network, is what the host has to keep up with."""
    from sr_batch.sink import SR_CODECS, encode_reflectance_tensor
    from sr_batch.superres import eager_runner, superresolve_windows

    cube = open_sample_cube()
    frames = _mirrored_days(cube, clearest_days(cube, loaded.info.frames), ("B2", "B3", "B4", "B8"), tile).astype(np.float32) / 10000
    output = superresolve_windows(eager_runner(loaded, str(device)), [frames], batch_size=1)
    block = encode_reflectance_tensor(torch.from_numpy(output)).numpy().view(np.uint16)  # (1, 4, 4·tile, 4·tile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sr-batch-bench-write-") as tmp:
        for name, codec in SR_CODECS.items():
            store = str(Path(tmp) / f"{name}.zarr")
            zarr.create_array(store=store, name="sr", shape=(100_000, *block.shape[1:]), chunks=block.shape, dtype="uint16", fill_value=0, compressors=[codec])
            row: dict[str, Any] = {"codec": name, "chunk_mb": block.nbytes / 1e6, "threads": threads}
            row["mb_per_s_1_thread"] = _write_rate(block, store, 1)
            row["mb_per_s_all_threads"] = _write_rate(block, store, threads)
            chunks = [f.stat().st_size for f in Path(store, "sr", "c").rglob("*") if f.is_file()]
            row["compression_ratio"] = block.nbytes * len(chunks) / sum(chunks)
            rows.append(row)
    return rows


def tile_tasks_alone(model: ModelRef, tile: int, dates: int, repeats: int, at_once: Sequence[int], tiles: int = 1) -> list[dict[str, Any]]:
    """The job's tile task alone, without Dask (`_tile_task`), `repeats` times per thread on each count
    of threads in `at_once`, as a GPU worker runs its tasks side by side: where more threads give more,
    one task's host work leaves the GPU idle. LR Mpx/s count the tiles' pixels, not their halo, as the
    end-to-end rates do.

    It splits the gap between model only and a job's super-resolution phase in two: what a task adds to
    the network (the halo, the cloud mask, the windows and their gaps, the encoding, the copies), and
    what the pipeline adds (Dask, reading, writing)."""
    runner, task, halo = _tile_task(model, tile, dates, tiles)
    task(0)  # warm-up: the first pass of a shape allocates and, on a GPU, picks its kernels
    rows = []
    for threads in at_once:
        with ThreadPoolExecutor(threads) as pool:
            _sync(runner.device)
            started = time.perf_counter()
            list(pool.map(task, range(threads * repeats)))
            seconds = time.perf_counter() - started
        mpx = threads * repeats * dates * tiles * tile * tile / 1e6 / seconds
        row = {"threads": threads, "tasks": threads * repeats, "dates": dates, "tiles": tiles, "halo": halo, "seconds": seconds, "lr_mpx_per_s": mpx}
        rows.append(row)
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()  # the jobs' GPU workers run on this GPU next: leave them the memory these tasks held
    return rows


def tile_task_profile(model: ModelRef, tile: int, dates: int, trace: Path | None = None) -> dict[str, Any]:
    """Where one tile task's time goes, stage by stage (superres.STAGE_PREFIX): the task alone
    (`_tile_task`), once warmed up, under torch's profiler. Per stage: the host's time in it, and on a
    GPU the time of the kernels it queued. A stage's host time counts waiting: "collect" waits for the
    GPU to finish the batch. The profiler's own cost inflates the host times, so the shares say more than
    the milliseconds; `trace` keeps the Chrome trace (chrome://tracing, Perfetto) for a closer look."""
    from torch.profiler import ProfilerActivity, profile

    runner, task, halo = _tile_task(model, tile, dates, 1)
    task(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        _sync(runner.device)
        started = time.perf_counter()
        task(1)
        _sync(runner.device)
        seconds = time.perf_counter() - started
    events = profiled.key_averages()
    stages = [
        {
            "stage": event.key.removeprefix(STAGE_PREFIX),
            "calls": event.count,
            "host_ms": event.cpu_time_total / 1e3,
            "device_ms": event.device_time_total / 1e3 if runner.device.type == "cuda" else None,
        }
        for event in events
        if event.key.startswith(STAGE_PREFIX) and event.cpu_time_total > 0  # the CPU side; a GPU annotation has no CPU time
    ]
    # Kernels alone (every op's own device time): how busy the task kept the GPU.
    kernels_ms = sum(event.self_device_time_total for event in events if not event.key.startswith(STAGE_PREFIX)) / 1e3
    if trace is not None:
        profiled.export_chrome_trace(str(trace))
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "dates": dates,
        "halo": halo,
        "seconds": seconds,
        "device_kernels_ms": kernels_ms if runner.device.type == "cuda" else None,
        "stages": sorted(stages, key=lambda row: -row["host_ms"]),
    }


def _tile_task(model: ModelRef, tile: int, dates: int, tiles: int) -> tuple[Runner, Callable[[int], None], int]:
    """A job's tile task without Dask: a real block (the sample's clearest days mirrored to the tile and
    its seam-free halo, 4 bands + SCL) and `dates` windows of the model's frames, `tiles` such blocks to a
    task (a GPU worker's run of tiles), super-resolved by `tiles.superresolve_tiles` with passes as wide
    as a job's. Returns the runner, the task (its argument numbers the task, as a job's tile) and the halo."""
    from sr_batch.model import receptive_radius
    from sr_batch.spec import Cloud
    from sr_batch.superres import load_runner
    from sr_batch.tiles import aligned_window, superresolve_tiles

    runner = load_runner(model)
    runner.loaded.network.to(memory_format=torch.channels_last)  # as loaded for a job: model only may have changed it
    info = runner.loaded.info
    dilate = Cloud().dilate_pixels
    halo = receptive_radius(info.architecture, info.frames) + dilate  # a job's `halo: auto`
    size = aligned_window(tile + 2 * halo)  # widened with more halo after the tile, as a job's windows are
    cube = open_sample_cube()
    block = _mirrored_days(cube, clearest_days(cube, info.frames + dates - 1), ("B2", "B3", "B4", "B8", "SCL"), size).astype(np.uint16)
    windows = [(k, tuple(range(k, k + info.frames))) for k in range(dates)]
    crop = (halo, size - tile - halo, halo, size - tile - halo)

    def task(index: int) -> None:
        # Passes as wide as a job's task of `dates` dates and `tiles` tiles (tiles.superresolve_plan).
        run = [(0, index * tiles + k) for k in range(tiles)]
        passes = min(model.batch_size, dates * tiles)
        superresolve_tiles([block] * tiles, [windows] * tiles, dates, [crop] * tiles, dilate, model, ("bench", run, 0), passes)

    return runner, task, halo


def _write_rate(block: np.ndarray, store: str, threads: int, seconds: float = 2.0) -> float:
    """MB/s of `write_tile_dates` on `threads` threads at once, each writing its own dates, for about `seconds`."""
    from sr_batch.sink import write_tile_dates

    height, width = block.shape[-2:]
    counter = iter(range(100_000))
    lock = threading.Lock()

    def writer(deadline: float) -> int:
        written = 0
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter)
            write_tile_dates(block, store, [(0, index)], (0, height), (0, width))
            written += 1
        return written

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        written = sum(pool.map(writer, [started + seconds] * threads))
    return written * block.nbytes / 1e6 / (time.perf_counter() - started)


def mirrored_catalog(root: Path, size: int, dates: int) -> SampleCatalog:
    """The sample's `dates` clearest days, mirrored to size x size pixels, as COGs + STAC items dated
    REVISIT_DAYS apart up to the last one's date (the clearest days span years: a job's history could
    not reach back over them). As a real catalogue serves Sentinel-2, the scenes reach SCENE_MARGIN
    pixels beyond the region (a job's grid is a block of a scene's pixels) and the SCL is 20 m."""
    import xarray as xr
    from affine import Affine

    cube = open_sample_cube()
    chosen = clearest_days(cube, dates)
    edge = size + 2 * SCENE_MARGIN
    reps = int(np.ceil(edge / cube.sizes["x"]))
    x0, y0 = float(cube.x[0]) - 5 - 10 * SCENE_MARGIN, float(cube.y[0]) + 5 + 10 * SCENE_MARGIN
    transform = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)

    last = cube.time.values[chosen[-1]].astype("datetime64[D]")
    dated = [last - np.timedelta64(REVISIT_DAYS * (len(chosen) - 1 - k), "D") for k in range(len(chosen))]

    def write(index: int, date: np.datetime64) -> dict[str, Any]:
        scene = cube.isel(time=int(index))
        # Mirrored around the region's corner, so the region holds what it held without the margin.
        names = ("B2", "B3", "B4", "B8", "SCL")
        mirrored = {name: (("y", "x"), _around_corner(_mirror(scene[name].values, reps), SCENE_MARGIN)[:edge, :edge]) for name in names}
        return write_date(xr.Dataset(mirrored, coords={"time": date}), transform, root / "scenes", coarser={"scl": 2})

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # GDAL releases the GIL while writing COGs
        items = list(pool.map(write, chosen, dated))
    return SampleCatalog(collection=collection_for(items), items=items, root=root, margin=SCENE_MARGIN)


SCENE_MARGIN = 64
"""10 m pixels of the bench's scenes beyond its region on every side (an even number: the 20 m SCL's
pixels stay on the region's lattice)."""


def _around_corner(mirrored: np.ndarray, margin: int) -> np.ndarray:
    """The mirrored image shifted by `margin` down and right: it repeats, so what leaves one edge comes in
    at the other without a seam, and the region (from the margin on) holds what it held without one."""
    return np.roll(mirrored, margin, axis=(0, 1))


def history_before(catalog: SampleCatalog, frames: int) -> dict[str, Any]:
    """`time.start` at the catalogue's `frames`-th date and `time.history_days` back to its first."""
    dates = sorted({dt.date.fromisoformat(item["properties"]["datetime"][:10]) for item in catalog.items})
    start = dates[min(frames, len(dates)) - 1]
    return {"start": start.isoformat(), "history_days": (start - dates[0]).days}


def clearest_days(cube: Any, count: int) -> np.ndarray:
    """Indices of the sample's `count` days with the most clear pixels (SCL 4, 5, 6, 7, 11: vegetation, bare soil, water, unclassified, snow), in time order."""
    clear = np.isin(cube.SCL.values, (4, 5, 6, 7, 11)).mean(axis=(1, 2))
    return np.sort(np.argsort(-clear)[:count])


def _mirrored_days(cube: Any, days: np.ndarray, names: tuple[str, ...], size: int) -> np.ndarray:
    """(days, variable, size, size): the sample's `names` on each of `days`, mirrored to size x size pixels."""
    reps = int(np.ceil(size / cube.sizes["x"]))
    return np.stack([np.stack([_mirror(cube[name].values[day], reps)[:size, :size] for name in names]) for day in days])


def _mirror(image: np.ndarray, reps: int) -> np.ndarray:
    """Tile an image with alternating reflections, so no seam is a discontinuity."""
    tile = np.block([[image, image[:, ::-1]], [image[::-1], image[::-1, ::-1]]])
    times = int(np.ceil(reps / 2))
    return np.tile(tile, (times, times))


def end_to_end(
    catalog: SampleCatalog,
    out: Path,
    model: dict[str, Any],
    workers: int | None,
    tile: int,
    task_dates: int | None = None,
    in_flight: int | None = None,
    end: str = "2021-12-31",
    frames: int = 1,
) -> dict[str, Any]:
    """A whole job (search → Zarr) on the cluster a plain `sr-batch run` makes here (GPU workers included),
    started for it; throughput, and the peak memory of the largest worker process (and GPU allocator).
    The job's clock starts once the cluster is up, as a job on an existing cluster's would: the
    LocalCluster's start is reported beside it. An existing output at `out` is extended, as a nightly
    run extends it; throughput counts what this run wrote. The catalogue's first `frames` - 1 dates are
    the job's history: its first output date's window holds `frames` frames."""
    from sr_batch.cluster import dask_client
    from sr_batch.job import run_job
    from sr_batch.spec import parse_spec
    from sr_batch.stac_server import serve_items

    with serve_items(catalog.collection, catalog.items) as url:
        job = {
            "name": "bench",
            "stac": {"url": url, "collection": COLLECTION_ID},
            "aoi": {"geometry": sample_aoi(catalog)},
            "time": {**history_before(catalog, frames), "end": end},
            "cloud": {"max_cloud_fraction": 1.0},
            "model": model,
            "tiling": {"tile": tile},  # and halo: auto, the model's seam-free halo, as a job gets by default
            "output": {"uri": str(out)},
        }
        spec = parse_spec(job)
        opened = time.perf_counter()
        with (
            dask_client(workers=workers, echo=lambda _: None) as client,
            TileEvents(client) as tiles,
            GpuUtilisation() as gpus,
            get_task_stream(client=client) as stream,
        ):
            threads = sum(info["nthreads"] for info in client.scheduler_info(n_workers=-1)["workers"].values())
            started, wall_started = time.perf_counter(), time.time()
            result = run_job(spec, scheduler=client.scheduler.address, show_progress=False, echo=lambda _: None, task_dates=task_dates, in_flight=in_flight)
            seconds, wall_ended = time.perf_counter() - started, time.time()
            events = tiles.wait_for(result.written_windows)
            peak_memory, peak_gpu_memory = (max(column) for column in zip(*client.run(_peak_memory).values()))
            allocators = sorted(set(client.run(allocator_in_use).values()))
        devices = sorted({event["device"] for _, event in events})
    plan = result.plan
    lr_pixels = result.written_km2 * 1e6 / plan.grid.resolution**2
    mpx = lr_pixels / 1e6 / seconds
    # The super-resolution phase, from the tile tasks' own events: the first task's start to the last
    # task's end. Its rate is what a long job streams at; the rest of `seconds` is the job's fixed cost
    # (cluster, search, cloud scores, layout) and the last writes.
    first = min(stamp - event["seconds"] for stamp, event in events)
    last = max(stamp for stamp, _ in events)
    phase = max(last - first, 1e-9)
    return {
        "pixels": plan.grid.width * plan.grid.height,
        "tile_dates": result.written_windows,
        "halo": plan.halo,
        "read_windows": _window_shapes(plan, model.get("compile", "off")),
        "window_frames": sorted({len(window.frames) for windows in plan.windows.values() for window in windows}),
        "dates_per_task": result.task_dates,
        "tiles_per_task": result.task_tiles,
        "tasks": len(events),
        "sr_workers": len({event["worker"] for _, event in events}),
        "tasks_per_worker": sorted(Counter(event["worker"] for _, event in events).values()),
        "seconds": seconds,
        "lr_mpx_per_s": mpx,
        "km2_date_per_s": mpx * KM2_PER_MPX,
        "peak_worker_memory_mb": peak_memory / 1e6,
        "peak_gpu_memory_mb": peak_gpu_memory / 1e6,
        "worker_allocators": allocators,
        "cluster_start_seconds": started - opened,
        "devices": devices,
        "sr_phase_seconds": phase,
        "sr_phase_lr_mpx_per_s": lr_pixels / 1e6 / phase,
        "sr_task_seconds": sum(event["seconds"] for _, event in events),
        "sr_task_thread_cpu_seconds": sum(event["thread_cpu_seconds"] for _, event in events),
        "before_sr_seconds": first - wall_started,
        "after_sr_seconds": wall_ended - last,
        "worker_thread_seconds": threads * seconds,
        "task_seconds_by_kind": task_seconds_by_kind(stream.data),
        "sr_phase_gpu_utilisation": gpus.mean_between(first, last),
    }


def _window_shapes(plan: Any, compile_mode: str) -> list[list[int]]:
    """The distinct (height, width) of the job's read windows, largest first: a task's memory follows its
    window, so two jobs' peaks compare only as their windows do."""
    windows = read_windows(plan, same_shape=compile_mode != "off").values()
    shapes = {(ys[1] - ys[0], xs[1] - xs[0]) for ys, xs in windows}
    return [list(shape) for shape in sorted(shapes, key=lambda shape: (-shape[0] * shape[1], shape))]


def nightly_run(
    catalog: SampleCatalog, out: Path, model: dict[str, Any], workers: int | None, tile: int, in_flight: int | None = None, frames: int = 1
) -> dict[str, Any]:
    """A nightly run: the job up to the day before the catalogue's last date (not counted), then the same
    job once that date is there, which computes one new date per tile (end_to_end's row for it). On
    GPU workers its tasks take runs of tiles (job.tiles_per_task), whose windows share passes."""
    last = max(dt.date.fromisoformat(item["properties"]["datetime"][:10]) for item in catalog.items)
    end_to_end(catalog, out, model, workers, tile, in_flight=in_flight, end=(last - dt.timedelta(days=1)).isoformat(), frames=frames)
    return end_to_end(catalog, out, model, workers, tile, in_flight=in_flight, frames=frames)


def task_seconds_by_kind(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds the workers' threads spent computing each kind of task (its key's name), largest first:
    with the threads' seconds in the job, where the time went besides the network."""
    busy: Counter[str] = Counter()
    for record in records:
        busy[key_split(record["key"])] += sum(step["stop"] - step["start"] for step in record["startstops"] if step["action"] == "compute")
    return {kind: round(seconds, 2) for kind, seconds in busy.most_common()}


def _time_split(row: dict[str, Any]) -> str:
    """The threads' seconds by task kind, as shares of all the threads' seconds in the job."""
    available = row["worker_thread_seconds"]
    kinds = row["task_seconds_by_kind"]
    shown = [f"{kind} {seconds:.1f} s ({seconds / available:.0%})" for kind, seconds in list(kinds.items())[:5]]
    idle = available - sum(kinds.values())
    return f"worker threads, {available:.0f} s in all: " + ", ".join(shown) + f"; no task {idle:.1f} s ({idle / available:.0%})"


class TileEvents:
    """Every tile task's event while the block runs: a subscription, not `get_events`, which keeps only
    the scheduler's last thousand events of a topic (a large job has more tasks than that)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.events: list[tuple[float, dict[str, Any]]] = []

    def __enter__(self) -> TileEvents:
        self.client.subscribe_topic(TILE_TOPIC, lambda event: self.events.append(event))
        return self

    def wait_for(self, tile_dates: int, timeout: float = 30.0) -> list[tuple[float, dict[str, Any]]]:
        """The events, once the tasks of `tile_dates` have reported (events travel scheduler → client after the task's result)."""
        deadline = time.monotonic() + timeout
        while (arrived := sum(event["dates"] for _, event in list(self.events))) < tile_dates:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tile events of {arrived} tile-dates arrived of the {tile_dates} computed")
            time.sleep(0.05)
        return list(self.events)

    def __exit__(self, *exc: object) -> None:
        self.client.unsubscribe_topic(TILE_TOPIC)


class GpuUtilisation:
    """The GPUs' utilisation as NVML reports it (the share of time a kernel ran), sampled while the block
    runs: near 100 % in the super-resolution phase, the GPU is the bottleneck and what is missing is
    work it does besides the network; well under, it waits for the host. Nothing without NVML."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._read = lambda handle: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # no NVML library, no driver or no GPU: nothing to sample
            self._handles = []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.time(), sum(self._read(handle) for handle in self._handles) / len(self._handles)))

    def mean_between(self, start: float, end: float) -> float | None:
        """The mean utilisation (0–1) of the samples taken between two wall-clock times, or None."""
        within = [value for stamp, value in self.samples if start <= stamp <= end]
        return sum(within) / len(within) / 100 if within else None

    def __enter__(self) -> GpuUtilisation:
        if self._handles:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._handles:
            self._thread.join()


def _peak_memory() -> tuple[int, int]:
    """This process's peak resident memory since it started (the kernel's own record, which no sampling
    can miss: a worker of a cluster started for one job has run nothing else), and the peak its CUDA
    allocator reserved (0 where it never ran). Run on each worker at the end of a job.

    The record is Linux's VmHWM, which starts again at exec. getrusage's ru_maxrss does not: a worker
    is started by fork and exec from a process that may hold gigabytes (this benchmark's own passes),
    and it would report its parent's size at the fork."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    peak_kb = next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), None)
    if peak_kb is None:  # not Linux: the best there is
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return peak_kb * 1024, torch.cuda.max_memory_reserved() if torch.cuda.is_initialized() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr_batch.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--size", type=int, default=512, help="edge of the 1x region in 10 m pixels (the 4x region is twice that)")
    parser.add_argument("--dates", type=int, default=8, help="output dates of the end-to-end jobs (after the model's frames - 1 dates of history)")
    parser.add_argument("--tile", type=int, default=Tiling().tile, help="tiling.tile of the end-to-end jobs (default: a job's)")
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass (model only) and dates per task (end to end)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: as `sr-batch run`)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="end-to-end model.precision")
    parser.add_argument("--compile", default="off", choices=("off", "default", "max-autotune"), help="torch.compile mode of the end-to-end jobs")
    parser.add_argument(
        "--model-only-compile",
        default="auto",
        help="torch.compile modes model only measures, comma-separated, or none (default auto: default and max-autotune on a GPU, default on a CPU)",
    )
    parser.add_argument("--in-flight", type=int, default=None, help="tasks an end-to-end job keeps submitted at once (default: as a job chooses)")
    parser.add_argument(
        "--nightly",
        default="auto",
        choices=("auto", "on", "off"),
        help="also time a nightly run of one new date on the 4x region (auto: on a GPU, where its tasks take several tiles)",
    )
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args(argv)

    ref = ModelRef(checkpoint=args.checkpoint)
    loaded = load_model(ref)
    device = pick_device("auto")
    loaded.network.to(device)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": loaded.info.name,
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    _write(report, args.out)
    with allocating_as_cpu_workers() if device.type == "cpu" else contextlib.nullcontext():
        modes = compile_modes_to_measure(args.model_only_compile, device, args.compile)
        report["model_only"] = model_only(loaded, device, args.tile, args.batch, args.repeats, modes)
    workers, threads = cpu_worker_layout(0, args.workers)
    if device.type == "cpu" and workers > 1:
        # A CPU task's pass holds as many windows as its memory budget allows, often one: measure that too,
        # in fp32 and in the precision the jobs run (`precision: auto` is bf16 on a CPU with AMX), and
        # compiled in that precision: two compiled processes do more than one of every core.
        jobs_precision = args.precision if args.precision != "auto" else auto_precision("cpu")
        rows = [(precision, batch, "off") for precision in dict.fromkeys(("fp32", jobs_precision)) for batch in sorted({1, args.batch})]
        for precision, batch, mode in rows + [(jobs_precision, 1, mode) for mode in modes]:
            repeats = args.repeats * args.batch // batch
            try:
                report["model_only"].append(model_only_on_workers(args.checkpoint, args.tile, batch, repeats, workers, threads, precision, mode))
            except ModelOnlyDied as died:
                if batch == 1 and mode == "off":  # the reference a CPU job's tasks compare with
                    raise SystemExit(f"model only: {died}") from None
                print(f"model only  {died}; left out")
                report.setdefault("model_only_died", []).append(str(died))
    for row in report["model_only"]:
        print(f"model only  {row['variant']:<52} {row['lr_mpx_per_s']:9.4f} LR Mpx/s  {row['km2_date_per_s']:9.2f} km²·date/s ")
    _write(report, args.out)
    best = max(report["model_only"], key=lambda row: row["lr_mpx_per_s"])
    # What the host must write to keep up with the network: 16 output px of 4 uint16 bands per input px.
    stored_mb_per_s = best["lr_mpx_per_s"] * SCALE**2 * 4 * 2
    report["writing"] = writing(loaded, device, args.tile, os.cpu_count() or 1)
    for row in report["writing"]:
        row["cores_to_keep_up"] = stored_mb_per_s / row["mb_per_s_1_thread"]
        speeds = f"{row['mb_per_s_1_thread']:7.0f} MB/s on 1 thread, {row['mb_per_s_all_threads']:7.0f} on {row['threads']}"
        print(
            f"writing     output.codec {row['codec']:<5} {speeds}; compression {row['compression_ratio']:.2f}x; "
            f"the best model-only rate makes {stored_mb_per_s:.1f} MB/s of output: {row['cores_to_keep_up']:.2f} cores to write it"
        )
    _write(report, args.out)
    if device.type == "cuda":
        # 1 to twice a GPU worker's slots at once: would more tasks side by side keep the GPU busier?
        alone = ModelRef(checkpoint=args.checkpoint, batch_size=args.batch, precision=args.precision, compile=args.compile)
        report["tile_tasks_alone"] = tile_tasks_alone(alone, args.tile, args.batch, args.repeats, range(1, 2 * GPU_SLOTS + 1))
        # A nightly run's task of one new date: one tile (one window per pass), as before runs of tiles
        # and on CPU workers, and a GPU worker's run of a batch of tiles, whose windows share passes.
        for tiles in (1, args.batch):
            report["tile_tasks_alone"] += tile_tasks_alone(alone, args.tile, 1, args.repeats * args.batch // tiles, (GPU_SLOTS,), tiles)
        for row in report["tile_tasks_alone"]:
            print(
                f"tile task   alone, {row['threads']} at a time ({row['dates']} dates x {row['tiles']} tiles, {args.tile} px + halo {row['halo']})  "
                f"{row['lr_mpx_per_s']:9.4f} LR Mpx/s  ({row['lr_mpx_per_s'] / best['lr_mpx_per_s']:.2f} of the best model only)"
            )
        trace = args.out.with_suffix(".task-trace.json")
        report["tile_task_profile"] = profiled = tile_task_profile(alone, args.tile, args.batch, trace)
        print(
            f"tile task   profiled alone ({profiled['dates']} dates, {profiled['seconds'] * 1e3:.0f} ms under the profiler; "
            f"kernels {profiled['device_kernels_ms']:.0f} ms; trace in {trace}):"
        )
        for stage in profiled["stages"]:
            print(f"            {stage['stage']:<16} {stage['calls']:4d} calls  host {stage['host_ms']:8.1f} ms  GPU {stage['device_ms']:8.1f} ms")
    else:
        # A CPU job's tasks run in worker processes started with their own allocator settings, which
        # tasks on this process's threads would not have: here the rate would say more about the heap.
        print("tile task   alone: measured on a GPU only (a CPU job's tasks compare with model only on its workers)")
    _write(report, args.out)
    if args.skip_end_to_end:
        return 0
    model = {"checkpoint": args.checkpoint, "batch_size": args.batch, "precision": args.precision, "compile": args.compile}
    frames = loaded.info.frames  # every window of the jobs holds them, as model only's do
    with tempfile.TemporaryDirectory(prefix="sr-batch-bench-") as tmp:
        catalogs = {}
        for factor, size in (("1x", args.size), ("4x", 2 * args.size)):
            catalog = catalogs[factor] = mirrored_catalog(Path(tmp) / f"catalog-{factor}", size, args.dates + frames - 1)
            row = end_to_end(catalog, Path(tmp) / f"{factor}.zarr", model, args.workers, args.tile, in_flight=args.in_flight, frames=frames)
            report[f"end_to_end_{factor}"] = row
            print(
                f"end to end  {factor} ({size}² px, {args.dates} dates of {frames} frames)  "
                f"{row['lr_mpx_per_s']:9.4f} LR Mpx/s  {row['km2_date_per_s']:9.2f} km²·date/s  "
                f"peak worker memory {row['peak_worker_memory_mb']:.0f} MB ({'/'.join(row['worker_allocators'])})  "
                f"({row['seconds']:.1f} s on {', '.join(row['devices'])}; "
                f"the LocalCluster started in {row['cluster_start_seconds']:.1f} s before)"
            )
            if row["peak_gpu_memory_mb"]:
                print(f"            peak GPU memory reserved by a worker: {row['peak_gpu_memory_mb']:.0f} MB")
            print(
                f"            super-resolution phase {row['sr_phase_seconds']:.1f} s at {row['sr_phase_lr_mpx_per_s']:.4f} LR Mpx/s "
                f"(tasks busy {row['sr_task_seconds']:.1f} s, their own threads on a core {row['sr_task_thread_cpu_seconds']:.1f} s); "
                f"{row['before_sr_seconds']:.1f} s before it, {row['after_sr_seconds']:.1f} s after it; "
                f"{row['dates_per_task']} dates and {row['tiles_per_task']} tile(s) per task, halo {row['halo']} px"
            )
            if row["sr_phase_gpu_utilisation"] is not None:
                print(f"            GPU utilisation in the super-resolution phase (NVML): {row['sr_phase_gpu_utilisation']:.0%}")
            print(f"            {_time_split(row)}")
            _write(report, args.out)
        # A small job splits its dates over more, smaller tasks to keep every slot busy, and a task's
        # memory grows with its dates: the memory target compares jobs whose tasks are alike.
        same = report["end_to_end_4x"]["dates_per_task"]
        if report["end_to_end_1x"]["dates_per_task"] != same:
            like_4x = dict(task_dates=same, in_flight=args.in_flight, frames=frames)
            row = end_to_end(catalogs["1x"], Path(tmp) / "1x-same-tasks.zarr", model, args.workers, args.tile, **like_4x)
            report["end_to_end_1x_same_tasks"] = row
            print(
                f"end to end  1x again with the 4x job's {same} dates per task: "
                f"peak worker memory {row['peak_worker_memory_mb']:.0f} MB ({row['seconds']:.1f} s)"
            )
            _write(report, args.out)
        if args.nightly == "on" or (args.nightly == "auto" and device.type == "cuda"):
            row = report["end_to_end_nightly"] = nightly_run(catalogs["4x"], Path(tmp) / "nightly.zarr", model, args.workers, args.tile, args.in_flight, frames)
            print(
                f"end to end  nightly, one new date on the 4x region  {row['lr_mpx_per_s']:9.4f} LR Mpx/s  ({row['seconds']:.1f} s; "
                f"{row['tile_dates']} tile-dates in {row['tasks']} tasks of {row['tiles_per_task']} tile(s)); "
                f"super-resolution phase {row['sr_phase_seconds']:.1f} s at {row['sr_phase_lr_mpx_per_s']:.4f} LR Mpx/s"
            )
            _write(report, args.out)
    again = report["best_model_only_again"] = model_only_again(best, loaded, device, args)
    print(f"model only  {best['variant']} again, after the jobs: {again['lr_mpx_per_s']:.4f} LR Mpx/s (before them: {best['lr_mpx_per_s']:.4f})")
    readings = (best["lr_mpx_per_s"], again["lr_mpx_per_s"])
    reference = sum(readings) / 2
    report["best_model_only"] = best["variant"]
    report["best_model_only_lr_mpx_per_s"] = reference
    for key, row, rate in (
        ("end_to_end", "end_to_end_1x", "lr_mpx_per_s"),
        ("end_to_end_4x", "end_to_end_4x", "lr_mpx_per_s"),
        ("sr_phase_4x", "end_to_end_4x", "sr_phase_lr_mpx_per_s"),
    ):
        value = report[row][rate]
        report[f"ratio_{key}_over_model_only"] = value / reference
        report[f"ratio_{key}_over_model_only_range"] = [value / max(readings), value / min(readings)]
    report["ratio_memory_4x_over_1x"] = report["end_to_end_4x"]["peak_worker_memory_mb"] / report["end_to_end_1x"]["peak_worker_memory_mb"]
    alike = report.get("end_to_end_1x_same_tasks", report["end_to_end_1x"])
    report["ratio_memory_4x_over_1x_same_tasks"] = report["end_to_end_4x"]["peak_worker_memory_mb"] / alike["peak_worker_memory_mb"]
    target = "0.8 on CUDA" if device.type == "cuda" else "0.85 on CPU"
    print(
        f"end to end ÷ best model only ({best['variant']}, the mean of its two readings): 1x {_ratio(report, 'end_to_end')}, "
        f"4x {_ratio(report, 'end_to_end_4x')}   (target ≥ {target})"
    )
    print(f"super-resolution phase of the 4x job ÷ best model only: {_ratio(report, 'sr_phase_4x')}")
    # The best figure may be a compiled one while the jobs ran eager (or the other way): also compare like with like.
    eager_or_compiled = [row for row in report["model_only"] if row["compile"] == args.compile]
    if eager_or_compiled and (as_ran := max(eager_or_compiled, key=lambda row: row["lr_mpx_per_s"]))["variant"] != best["variant"]:
        report["model_only_as_the_jobs_ran"] = as_ran["variant"]
        as_ran_again = report["model_only_as_the_jobs_ran_again"] = model_only_again(as_ran, loaded, device, args)
        readings = (as_ran["lr_mpx_per_s"], as_ran_again["lr_mpx_per_s"])
        value = report["end_to_end_4x"]["lr_mpx_per_s"]
        report["ratio_end_to_end_4x_over_model_only_as_the_jobs_ran"] = value / (sum(readings) / 2)
        report["ratio_end_to_end_4x_over_model_only_as_the_jobs_ran_range"] = [value / max(readings), value / min(readings)]
        low, high = report["ratio_end_to_end_4x_over_model_only_as_the_jobs_ran_range"]
        print(
            f"end to end 4x ÷ the best model only run as the jobs ran (compile {args.compile}: {as_ran['variant']}, "
            f"{readings[0]:.4f} LR Mpx/s before the jobs, {readings[1]:.4f} after): "
            f"{report['ratio_end_to_end_4x_over_model_only_as_the_jobs_ran']:.2f} ({low:.2f}–{high:.2f} against each reading)"
        )
    if "tile_tasks_alone" in report:
        as_run = [row for row in report["tile_tasks_alone"] if row["threads"] == GPU_SLOTS]  # as a GPU worker runs them
        together, one_tile, one_run = as_run[0], as_run[-2], as_run[-1]
        report["ratio_tile_tasks_alone_over_model_only"] = together["lr_mpx_per_s"] / reference
        report["ratio_sr_phase_4x_over_tile_tasks_alone"] = report["end_to_end_4x"]["sr_phase_lr_mpx_per_s"] / together["lr_mpx_per_s"]
        report["ratio_one_date_one_tile_tasks_over_tile_tasks"] = one_tile["lr_mpx_per_s"] / together["lr_mpx_per_s"]
        report["ratio_one_date_run_of_tiles_tasks_over_tile_tasks"] = one_run["lr_mpx_per_s"] / together["lr_mpx_per_s"]
        print(
            f"  of which the tile task ({together['threads']} at a time, no Dask) ÷ best model only: {report['ratio_tile_tasks_alone_over_model_only']:.2f}, "
            f"and the phase ÷ the tile task alone: {report['ratio_sr_phase_4x_over_tile_tasks_alone']:.2f}; against a task of {together['dates']} dates, "
            f"a one-date task of one tile: {report['ratio_one_date_one_tile_tasks_over_tile_tasks']:.2f}, "
            f"of a run of {one_run['tiles']} tiles (a GPU worker's nightly task): {report['ratio_one_date_run_of_tiles_tasks_over_tile_tasks']:.2f}"
        )
    print(
        f"peak worker memory 4x ÷ 1x area, tasks alike: {report['ratio_memory_4x_over_1x_same_tasks']:.2f}   (target ≤ 1.2); "
        f"as each job chose its tasks: {report['ratio_memory_4x_over_1x']:.2f}"
    )
    largest = {name: "×".join(map(str, row["read_windows"][0])) for name, row in (("1x", alike), ("4x", report["end_to_end_4x"]))}
    if largest["1x"] != largest["4x"]:
        # A pass's large tensors (a feature map is 64 channels of the window) come in jemalloc's size classes, 4 to a
        # doubling: a window just past a power of two keeps up to 25 % more than its pixels (bench/RESULTS.md).
        print(f"  (largest read windows: 1x {largest['1x']} px, 4x {largest['4x']} px: the peaks differ as their passes do, not as the regions)")
    if alike["tasks"] < 2 * alike["sr_workers"]:
        # A worker's peak over one task is that task's; over several it also holds the next read and the last write.
        print(
            f"  (the 1x job ran {alike['tasks']} tile task(s) on {alike['sr_workers']} worker(s): its peak is one task's, not a steady state; "
            "a --size with at least 2 tasks per worker compares like with like)"
        )
    _write(report, args.out)
    print(f"written: {args.out}")
    return 0


def _ratio(report: dict[str, Any], key: str) -> str:
    low, high = report[f"ratio_{key}_over_model_only_range"]
    return f"{report[f'ratio_{key}_over_model_only']:.2f} ({low:.2f}–{high:.2f} against each reading)"


def _write(report: dict[str, Any], path: Path) -> None:
    """Written after every step: a run cut short still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
