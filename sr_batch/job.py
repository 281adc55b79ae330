"""A region job from start to finish: spec → plan → lazy cube → super-resolution per tile → Zarr.

Everything that can be checked without the cluster (the output location, the checkpoint, the search)
is checked first, so a bad job fails in seconds and writes nothing.

Every run is incremental. Under the output's lock (lock.py), the run reads the output's manifest
(manifest.py), refuses an output made with another model or other settings, and plans only what the
manifest does not record as written: the windows of days it has not seen, and windows a killed run
left unfinished (increment.py). With nothing to do it stops before starting a cluster and writes
nothing. Otherwise it appends the new dates to the store, super-resolves the pending windows, and
records each tile's windows once its task has written them (sink.py). The tasks go to the cluster
a sliding window at a time, with their reads just ahead (`_compute`), and a long time range is read
a time slab after another (tiles.time_slabs), so that memory follows the tile, not the region's size
nor its time range. A run killed at any moment leaves an output the next run completes, equal to
an uninterrupted run's.

`--overwrite` recomputes everything into a hidden staging store beside the output and swaps it in
only when complete: a failed or killed overwrite never destroys the previous output. The output may
be a local folder or an S3 prefix (storage.py: what differs, and how a swap works without rename).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import torch
from dask._task_spec import GraphNode, convert_legacy_graph  # as distributed's scheduler converts graphs
from dask.base import tokenize
from dask.core import get_dependencies
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from distributed import Client, Future, KilledWorker, as_completed

from sr_batch import kill_points
from sr_batch.allocator import allocator_shortfall, how_to_keep_memory
from sr_batch.cluster import dask_client, gpu_workers
from sr_batch.cube import READ_ERROR_TOPIC
from sr_batch.errors import CheckpointError, OutputError, SpecError, SrBatchError
from sr_batch.increment import Increment, check_frames_available, plan_increment
from sr_batch.lock import OutputLock, output_lock
from sr_batch.manifest import KnownDay, Manifest, ManifestWriter, check_compatible, grid_record, output_settings, with_precision
from sr_batch.model import Architecture, LoadedModel, receptive_radius
from sr_batch.plan import SCALE, Plan, Window, resolved_halo
from sr_batch.progress import tile_progress
from sr_batch.search import SearchResult, search
from sr_batch.sink import (
    ReadError,
    align_time_axis,
    append_dates,
    check_location,
    create_store,
    describe_output,
    has_layout,
    move_into_place,
    record_read_errors,
    remove_stale_staging,
    staging_path,
    stored_codec,
    time_length,
    write_tiles_dates,
)
from sr_batch.spec import JobSpec, ModelSettings
from sr_batch.storage import Location
from sr_batch.superres import ModelRef, auto_precision, device_kind, load_model, pick_device, warm_up
from sr_batch.tiles import GPU_RESOURCE, compiled_pass_shape, slab_days, smallest_task_memory_bytes, superresolve_plan, task_memory_bytes, time_slabs

Echo = Callable[[str], None]
Pending = dict[tuple[int, int], list[Window]]
Unit = tuple[int, int, int]
"""(time slab, tile row, tile col): the tasks of one tile in one slab, which share its read block (of a
run of tiles on GPU workers, named by its first tile: `tiles_per_task`)."""


@dataclass
class JobResult:
    plan: Plan
    output: Path | str
    """A Path for a local output, the s3:// URI for one in object storage."""
    seconds: float
    model: LoadedModel
    added_dates: list[dt.date] = field(default_factory=list)
    """Dates appended to the time axis by this run."""
    written_windows: int = 0
    """(tile, date) windows this run wrote (new dates, and any a killed run left unfinished)."""
    written_tiles: int = 0
    written_km2: float = 0.0
    """Area of the written windows, summed over dates."""
    late: list[dt.date] = field(default_factory=list)
    read_errors: list[ReadError] = field(default_factory=list)
    """Reads of checked assets that failed (corrupt blocks) and were taken as no data."""
    task_dates: int = 0
    """Output dates per super-resolution task (the task's memory grows with it)."""
    task_tiles: int = 1
    """Tiles per super-resolution task (more than one on GPU workers for a job of few dates)."""

    def report(self) -> str:
        if not self.written_windows and not self.added_dates:
            return f"Nothing new: {self.output} is up to date ({self.seconds:.1f} s)"
        dates = f" ({self.added_dates[0]} … {self.added_dates[-1]})" if self.added_dates else ""
        line = (
            f"Added {len(self.added_dates)} dates{dates}; wrote {self.written_windows} tile-dates on {self.written_tiles} tiles, "
            f"{self.written_km2:.2f} km² in {self.seconds:.1f} s"
        )
        if self.read_errors:
            first = self.read_errors[0]
            line += (
                f"\nRead as no data: {sum(e.reads for e in self.read_errors)} reads of {len(self.read_errors)} assets failed "
                f"(first: {first.url}: {first.error}); listed in the output's unreadable_blocks attribute"
            )
        return line


def model_ref(spec: JobSpec) -> ModelRef:
    settings = spec.model
    arch = settings.architecture
    return ModelRef(
        checkpoint=settings.checkpoint,
        frames=settings.frames,
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        compile=settings.compile,
        architecture=Architecture(hidden_channels=arch.hidden_channels, encoder_blocks=arch.encoder_blocks) if arch else Architecture(),
        seed=arch.seed if arch else 0,
    )


def checked_model(spec: JobSpec, scheduler: str | None = None) -> LoadedModel:
    """Load the job's model here, before any cluster work, and check that the job can use it.
    The check runs on the CPU: the client must not hold GPU memory that the workers need. The device
    is checked here only for a LocalCluster of this machine: an existing cluster's GPUs are on its
    workers, asked once connected (`check_device`), and a laptop may well submit to them."""
    if scheduler is None:
        pick_device(spec.model.device)  # device: cuda with no GPU visible fails here, in one line
    loaded = load_model(replace(model_ref(spec), device="cpu", compile="off"))
    if loaded.info.frames != spec.model.frames:
        raise SpecError(
            f"model.frames: the checkpoint {loaded.info.name} takes {loaded.info.frames} frames, "
            f"the job asks for {spec.model.frames}; set model.frames: {loaded.info.frames}"
        )
    return loaded


def plan_job(spec: JobSpec, scheduler: str | None = None, workers: int | None = None, echo: Echo = print) -> Plan:
    """The dry run: search, cloud scores and windows, without super-resolving anything; on an existing
    output, what a run would add. The search runs before any cluster starts, so a bad one fails fast."""
    loaded = checked_model(spec, scheduler)
    target = check_location(spec.output.uri)
    manifest = existing_manifest(target, loaded, output_settings(spec))
    radius = receptive_radius(loaded.info.architecture, spec.model.frames)
    resolved_halo(spec, radius)
    found = search(spec)
    with dask_client(scheduler, workers, echo) as client:
        check_device(client, spec, network_gpu_workers(client, spec))
        increment = plan_increment(spec, found, manifest, radius)
    echo(increment.plan.summary())
    _warn_late(increment, echo)
    if manifest is not None:
        new = set(increment.new_days)
        added = [day for day in increment.plan.output_days if day in new]
        echo(f"Existing output {target}: a run would add {len(added)} dates and compute {_count(increment.pending(manifest))} tile-dates.")
    return increment.plan


def run_job(
    spec: JobSpec,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    echo: Echo = print,
    performance_report: Path | None = None,
    task_dates: int | None = None,
    in_flight: int | None = None,
) -> JobResult:
    """Run a job to completion. `task_dates` pins the output dates per task (benchmarks compare equal
    tasks with it), `in_flight` the tasks kept submitted at once (benchmarks compare windows with it);
    by default `dates_per_task` and `tasks_in_flight` choose."""
    started = time.monotonic()
    target = check_location(spec.output.uri, overwrite)
    loaded = checked_model(spec, scheduler)
    settings = output_settings(spec)
    if not overwrite:
        existing_manifest(target, loaded, settings)  # refuse a mismatch before searching
    if not loaded.info.trained:
        echo(f"WARNING: model {loaded.info.name} is UNTRAINED (random weights): the output checks the pipeline, it is not super-resolution.")
    radius = receptive_radius(loaded.info.architecture, spec.model.frames)
    resolved_halo(spec, radius)  # a tile smaller than the model's seam-free halo fails here, before the search
    found = search(spec)
    with output_lock(target) as lock:
        remove_stale_staging(target)
        manifest = None if overwrite else existing_manifest(target, loaded, settings)
        store = staging_path(target) if overwrite and target.exists() else target
        quick = plan_increment(spec, found, manifest, radius, score_new=False)
        if manifest is not None and not quick.new_days and not _count(quick.pending(manifest)):
            _warn_late(quick, echo)
            result = JobResult(plan=quick.plan, output=target.native, seconds=time.monotonic() - started, model=loaded, late=[d.date for d in quick.late])
            echo(result.report())
            return result
        with (
            dask_client(scheduler, workers, echo) as client,
            performance_report_to(performance_report),
            read_errors_of(client, job_hrefs(found)) as read_errors,
        ):
            on_gpus = network_gpu_workers(client, spec)
            check_device(client, spec, on_gpus)
            check_smallest_task(client, quick.plan, on_gpus)
            increment = plan_increment(spec, found, manifest, radius)
            echo(increment.plan.summary())
            _warn_late(increment, echo)
            if on_gpus:
                echo(f"Super-resolution runs on the {len(on_gpus)} GPU worker(s) only: {', '.join(on_gpus)}")
            # The windows this run computes (the manifest's record of what is written does not change
            # before the run writes them), and their tasks' size, checked before anything is written.
            work = replace(increment.plan, windows=increment.pending(manifest))
            sr_workers, limit = super_resolution_workers(client, on_gpus), memory_per_running_task(client, on_gpus)
            slots = sum(sr_workers.values()) or 1
            layout = task_layout(work, spec.model, slots, task_dates, in_flight, on_gpu=bool(on_gpus), memory_limit=limit)
            echo(check_task_memory(client, work, on_gpus, layout))
            precision, why = resolved_precision(client, spec, on_gpus, manifest)
            echo(f"Network precision: {precision}" + (f" (model.precision: auto, {why})" if spec.model.precision == "auto" else ""))
            settings = with_precision(settings, precision)
            ref = replace(model_ref(spec), precision=precision)
            compiled_pass = compile_in_warm_up(client, spec, work, ref, layout, on_gpus)
            if compiled_pass:
                windows, height, width = compiled_pass
                echo(f"Compiling the network ({spec.model.compile}) for passes of {windows} windows of {height} x {width} px while the first tiles are read")
            warming = warm_up_workers(client, ref, on_gpus, compiled_pass)  # while the store is laid out and the graph built
            if note := cpu_allocator_note(client, spec, on_gpus):
                echo(note)
            if manifest is not None:
                check_compatible(manifest, target, loaded.checksum, settings)
            manifest, added = commit_dates(store, increment, manifest, loaded, settings, lock)
            _note_kept_codec(store, spec.output.codec, echo)
            pending = increment.pending(manifest)
            check_frames_available(increment.plan, pending)
            if not increment.plan.output_days:
                echo("No cloudless date in any tile for this period: the output's time axis stays empty.")
            with (
                tile_progress(client, spec.output.uri, _count(pending), show_progress, echo),
                keep_annotations(bool(on_gpus)),
            ):
                workers_now = None if on_gpus else current_cpu_workers(client, work, layout, pinned_in_flight=in_flight is not None)
                try:
                    written = write_pending(client, store, increment.plan, pending, manifest, lock, ref, bool(on_gpus), layout, echo, sr_workers, workers_now)
                except KilledWorker as died:
                    memory = task_memory_note(work, layout, bool(on_gpus))
                    raise SrBatchError(
                        f"tiling.tile: Dask workers died running {died.task} (out of memory is the usual cause; {memory}); "
                        "lower tiling.tile or model.batch_size, or give workers more memory, and run again: written windows are kept"
                    ) from None
            del warming  # held until the tiles are done: a released warm-up not yet started would be cancelled
            record_read_errors(store, read_errors.found())
        if performance_report:
            echo(f"Dask performance report: {performance_report}")
        if store != target:
            move_into_place(store, target)
    plan = increment.plan
    result = JobResult(
        plan=plan,
        output=target.native,
        seconds=time.monotonic() - started,
        model=loaded,
        added_dates=[plan.days[d].date for d in added],
        written_windows=_count(written),
        written_tiles=sum(1 for windows in written.values() if windows),
        written_km2=sum(_tile_km2(plan, tile) * len(windows) for tile, windows in written.items()),
        late=[d.date for d in increment.late],
        read_errors=read_errors.found(),
        task_dates=layout.dates,
        task_tiles=layout.tiles,
    )
    echo(describe_output(target) + f"\n  time taken: {result.seconds:.1f} s\n" + result.report())
    return result


def network_gpu_workers(client: Client, spec: JobSpec) -> list[str]:
    """The GPU workers the job's network is restricted to: none for `model.device: cpu` (every worker)."""
    return gpu_workers(client) if spec.model.device != "cpu" else []


def check_device(client: Client, spec: JobSpec, on_gpus: list[str]) -> None:
    """`model.device: cuda` asks the workers that will run the network (the GPU workers, or else all of
    them) whether they see a CUDA device, before anything is written."""
    if spec.model.device != "cuda":
        return
    answers = client.run(torch.cuda.is_available, workers=on_gpus or None)
    blind = sorted(address for address, visible in answers.items() if not visible)
    if blind:
        raise CheckpointError(
            f"model.device: cuda was asked for but {len(blind)} of the {len(answers)} workers that would run the network see no CUDA device "
            f"(first: {blind[0]}); use auto or cpu, or give the network to GPU workers (dask worker --resources GPU=N)"
        )


def resolved_precision(client: Client, spec: JobSpec, on_gpus: list[str], manifest: Manifest | None = None) -> tuple[str, str]:
    """What `model.precision` means for this run, asked of the workers that will run the network, and
    why: the output records it, so a date made in bf16 on a GPU and one made in fp32 on a CPU never mix.
    On CPU workers `auto` extends an output made in fp32 in fp32: a CPU with AMX, which would take bf16,
    must not make an output of earlier nights (or of a CPU without AMX) unextendable."""
    if spec.model.precision != "auto":
        return spec.model.precision, ""
    answers = client.run(auto_precision, spec.model.device, workers=on_gpus or None)
    found = sorted(set(answers.values()))
    if len(found) != 1:
        raise SpecError(
            f"model.precision: auto means {' on some workers and '.join(found)} on others of this cluster; "
            "set model.precision to one of fp32, bf16, fp16, or run the network on GPU workers only (--resources GPU=N)"
        )
    stored = manifest.settings.get("model", {}).get("precision") if manifest is not None else None
    if stored == "fp32" != found[0] and set(client.run(device_kind, spec.model.device, workers=on_gpus or None).values()) == {"cpu"}:
        return "fp32", "as the output was made; these CPU workers would take bf16 for a new output"
    return found[0], "as resolved on the workers"


def cpu_allocator_note(client: Client, spec: JobSpec, on_gpus: list[str]) -> str | None:
    """A line for a cluster whose workers run the network on their CPUs with an allocator that gives a
    pass's memory back at once, about 1.7 times slower (allocator.py); a LocalCluster's workers keep it."""
    if on_gpus:
        return None
    answers = client.run(_cpu_allocator_shortfall, spec.model.device)
    reasons = sorted({reason for reason in answers.values() if reason})
    if not reasons:
        return None
    slow = sum(1 for reason in answers.values() if reason)
    return (
        f"Note: {slow} of {len(answers)} workers run the network on their CPUs with {'; '.join(reasons)}, which fault a pass's memory in afresh "
        f"on every pass (about 1.7x slower); start them with {how_to_keep_memory()} in their environment"
    )


def _cpu_allocator_shortfall(device: str) -> str | None:
    """On a worker: why its allocator slows the network down, if it runs the network on its CPU."""
    return allocator_shortfall() if device_kind(device) == "cpu" else None


def warm_up_workers(client: Client, ref: ModelRef, on_gpus: list[str], compiled_pass: tuple[int, int, int] | None = None) -> list[Future]:
    """Start loading the model on the workers that will run it (the GPU workers, or else all of them) and
    pass zeros through it, while the job goes on: on a GPU worker that takes a second (CUDA's and
    cuDNN's start) that the first tiles would otherwise wait for, and with `compiled_pass` the minutes of
    compiling the job's pass. The futures are for the caller to hold; a warm-up that fails is left
    alone, as the tile tasks report the same failure themselves."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    targets = on_gpus or sorted(workers)
    return [
        client.submit(warm_up, ref, compiled_pass, _gpu_slots(workers.get(address, {})), workers=[address], key=f"sr-batch-warm-up-{uuid.uuid4().hex}")
        for address in targets
    ]


def compile_in_warm_up(client: Client, spec: JobSpec, work: Plan, ref: ModelRef, layout: TaskLayout, on_gpus: list[str]) -> tuple[int, int, int] | None:
    """The pass a compiled job's warm-up compiles, where the network runs on GPUs: there a pass costs
    a fraction of a second, and the GPU worker would otherwise start compiling only once its first tile
    is read. On a CPU the warm-up's pass would cost as much as a task's, and the compiling happens on
    the same worker either way."""
    shape = compiled_pass_shape(work, ref, layout.dates, layout.tiles)
    if shape is None or set(client.run(device_kind, spec.model.device, workers=on_gpus or None).values()) != {"cuda"}:
        return None
    return shape


def _gpu_slots(info: dict[str, Any]) -> int:
    """Super-resolution tasks a worker runs at once on its GPU (its GPU resource; 1 without one)."""
    return max(1, int(info.get("resources", {}).get(GPU_RESOURCE, 1)))


def job_hrefs(found: SearchResult) -> set[str]:
    """Every asset href of the job's items: read errors of other jobs on a shared cluster are not ours."""
    return {asset["href"] for day in found.days for item in day.items for asset in item.get("assets", {}).values() if "href" in asset}


class ReadErrors:
    """The job's reads that became no data (cube.READ_ERROR_TOPIC events), gathered as they happen: the
    scheduler keeps only the last events of a topic, and other jobs on a shared cluster send theirs too."""

    def __init__(self, hrefs: set[str]) -> None:
        self.hrefs = hrefs
        self.by_url: dict[str, ReadError] = {}

    def on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        url = message.get("url")
        if url in self.hrefs:
            known = self.by_url.setdefault(url, ReadError(url=url, error=str(message.get("error", "")), reads=0))
            known.reads += 1

    def found(self) -> list[ReadError]:
        return sorted(self.by_url.values(), key=lambda error: error.url)


@contextlib.contextmanager
def read_errors_of(client: Client, hrefs: set[str]) -> Iterator[ReadErrors]:
    """Follow the read-error events while the block runs (the cloud scores and the super-resolution)."""
    collected = ReadErrors(hrefs)
    client.subscribe_topic(READ_ERROR_TOPIC, collected.on_event)
    try:
        yield collected
    finally:
        client.unsubscribe_topic(READ_ERROR_TOPIC)


MEMORY_SHARE = 0.6
"""Share of a worker's memory limit one super-resolution task may be estimated to need: Dask pauses a
worker at 80 % and the worker also holds its neighbours' blocks and the write's encoded chunks."""


def check_task_memory(client: Client, plan: Plan, on_gpus: list[str], layout: TaskLayout) -> str:
    """Refuse, before anything is written, a tiling whose tasks (`layout`: dates and tiles each) cannot fit the workers that run them."""
    limit = memory_per_running_task(client, on_gpus)
    needed = task_memory_bytes(plan, layout.dates, on_gpu=bool(on_gpus), tiles=layout.tiles)
    _refuse_over(needed, limit, "a super-resolution task needs", "lower tiling.tile or model.batch_size")
    return task_memory_note(plan, layout, bool(on_gpus)) + (f"; workers have {limit / 1e9:.2f} GB per running task" if limit else "")


def check_smallest_task(client: Client, plan: Plan, on_gpus: list[str]) -> None:
    """Refuse, before the clouds are scored, a tiling whose smallest possible task (one date, one frame of
    the largest tile) cannot fit the workers: no reading of clouds would change the answer."""
    needed = smallest_task_memory_bytes(plan, on_gpu=bool(on_gpus))
    _refuse_over(needed, memory_per_running_task(client, on_gpus), "even a super-resolution task of one date needs", "lower tiling.tile")


def memory_per_running_task(client: Client, on_gpus: list[str]) -> float:
    """The smallest memory limit per running super-resolution task among the workers that run them (0: no limit).
    A GPU worker runs as many at once as its GPU resource says; a CPU worker one per thread."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_running_task = [(workers[address].get("memory_limit") or 0) / slots for address, slots in super_resolution_workers(client, on_gpus).items()]
    return min((value for value in per_running_task if value), default=0)


def _refuse_over(needed: int, limit: float, what: str, fix: str) -> None:
    if limit and needed > MEMORY_SHARE * limit:
        raise SpecError(
            f"tiling.tile: {what} about {needed / 1e9:.2f} GB but the workers have {limit / 1e9:.2f} GB per running task, "
            f"of which a task may use {MEMORY_SHARE:.0%}; {fix}, or give the workers more memory (or fewer threads)"
        )


def task_memory_note(plan: Plan, layout: TaskLayout, on_gpu: bool = False) -> str:
    needed = task_memory_bytes(plan, layout.dates, on_gpu, tiles=layout.tiles)
    each = f"{layout.dates} date{'s' * (layout.dates != 1)}" + (f" of {layout.tiles} tiles" if layout.tiles > 1 else "")
    return f"Memory: about {needed / 1e9:.2f} GB per super-resolution task ({each})"


def existing_manifest(target: Location, model: LoadedModel, settings: dict[str, Any]) -> Manifest | None:
    """The output's manifest, checked against this job; None for a new output, or for one whose --overwrite
    was killed while swapping on S3 (the run finishes that swap under the lock, then reads it again)."""
    manifest = Manifest.read(target) if target.exists() else None
    if manifest is None:
        if not target.is_empty() and not target.replace_interrupted():
            raise OutputError(
                f"output.uri: {target} already exists and is not an sr-batch output with a manifest; choose another path or pass --overwrite to replace it"
            )
        return None
    check_compatible(manifest, target, model.checksum, settings)
    return manifest


def commit_dates(
    store: Location, increment: Increment, manifest: Manifest | None, model: LoadedModel, settings: dict[str, Any], lock: OutputLock
) -> tuple[Manifest, list[int]]:
    """Make the store hold every planned date, then record the new days: the manifest never claims more than the store has."""
    plan = increment.plan
    if manifest is None:
        manifest = Manifest(
            model_sha256=model.checksum, settings=settings, grid=grid_record(plan.grid), rows=[list(r) for r in plan.rows], cols=[list(c) for c in plan.cols]
        )
        store.mkdir()
        manifest.write(store)  # first, so an interrupted first run leaves a store the next run recognises
    if not has_layout(store):
        if manifest.times:
            raise OutputError(f"output.uri: {store} has a manifest but no Zarr layout; run `sr-batch verify`, or pass --overwrite to recompute")
        create_store(store, plan, model)
    if time_length(store) < len(manifest.times):
        raise OutputError(f"output.uri: {store} holds fewer dates than its manifest records; run `sr-batch verify`, or pass --overwrite to recompute")
    align_time_axis(store, len(manifest.times))
    new = set(increment.new_days)
    added = [day for day in plan.output_days if day in new]
    if not new and not increment.late:
        return manifest, added
    if added:
        append_dates(store, plan, added, model)
        kill_points.reached("appended")
    manifest.days.extend(KnownDay(date=plan.days[d].date.isoformat(), items=plan.days[d].item_ids, cloud=plan.cloud[d].tolist()) for d in sorted(new))
    manifest.times.extend(plan.days[d].date.isoformat() for d in added)
    manifest.late_days = sorted(set(manifest.late_days) | {day.date.isoformat() for day in increment.late})
    lock.check_held()
    manifest.write(store)
    return manifest, added


def super_resolution_workers(client: Client, on_gpus: list[str], workers: dict[str, Any] | None = None) -> dict[str, int]:
    """The workers that run super-resolution, and how many tasks each runs at once: its GPU slots, or
    else its threads. `workers`: the scheduler's record of them, where the caller has it."""
    workers = workers if workers is not None else client.scheduler_info(n_workers=-1)["workers"]
    if on_gpus:
        return {address: _gpu_slots(workers[address]) for address in on_gpus if address in workers}
    return {address: max(1, int(info.get("nthreads", 1))) for address, info in sorted(workers.items())}


@dataclass(frozen=True)
class TaskLayout:
    """How a job's super-resolution is cut into tasks, and how many it keeps submitted."""

    dates: int
    """Output dates per task."""
    tiles: int
    """Tiles per task: a run of a tile row (tiles.superresolve_plan)."""
    in_flight: int
    """Tasks kept submitted at once (`_compute`)."""


def task_layout(
    work: Plan,
    model: ModelSettings,
    slots: int,
    task_dates: int | None = None,
    in_flight: int | None = None,
    on_gpu: bool = False,
    memory_limit: float = 0,
) -> TaskLayout:
    """The tasks of a cluster that runs `slots` super-resolution tasks at once; `task_dates` and
    `in_flight` pin theirs. A compiled pass is padded to a whole pass, so a compiled model's tasks keep
    whole batches even where splitting them would fill more slots. On GPU workers a task of fewer dates
    than a batch takes several tiles (`tiles_per_task`), as many as fit a running task's share of
    `memory_limit` (0: no limit); the job then keeps fewer of them in flight, so that what it holds
    read stays about as many tiles as with one tile per task."""
    per_task = task_dates or dates_per_task(work, model.batch_size, 1 if model.compile != "off" else slots)
    tiles = tiles_per_task(work, model.batch_size, per_task, slots) if on_gpu else 1
    while tiles > 1 and memory_limit and task_memory_bytes(work, per_task, on_gpu, tiles) > MEMORY_SHARE * memory_limit:
        tiles //= 2
    return TaskLayout(per_task, tiles, in_flight or max(slots + 1, -(-tasks_in_flight(slots) // tiles)))


def tiles_per_task(plan: Plan, batch_size: int, per_task: int, slots: int) -> int:
    """Tiles of a row per GPU task, so that a task of fewer dates than a batch still fills its passes: a
    nightly run of one new date would otherwise pass one tile's window at a time, a small fraction of
    what a GPU computes at once. A power of two, at most `batch_size` windows per task, and as long as
    every slot still gets a task. On a CPU a pass's speed does not grow with its windows, and a task of
    several tiles would only hold more."""
    groups = -(-len(plan.output_days) // per_task)
    tiles = 1
    while 2 * tiles * per_task <= batch_size and 2 * tiles <= len(plan.cols):
        runs = {(row, col // (2 * tiles)) for (row, col), windows in plan.windows.items() if windows}
        if groups * len(runs) < slots:
            break
        tiles *= 2
    return tiles


def dates_per_task(plan: Plan, batch_size: int, slots: int) -> int:
    """Output dates per task: a forward pass's worth (`model.batch_size`), or fewer when a job has fewer
    tiles than the cluster has slots, so that a small region still keeps every worker busy (its tiles'
    dates are split over more tasks; each task still reads its tile once from the shared block)."""
    tiles = max(1, sum(1 for windows in plan.windows.values() if windows))
    groups = -(-slots // tiles)
    return max(1, min(batch_size, -(-len(plan.output_days) // groups)))


def write_pending(
    client: Client,
    store: Location,
    plan: Plan,
    pending: Pending,
    manifest: Manifest,
    lock: OutputLock,
    ref: ModelRef,
    gpu_workers_only: bool,
    layout: TaskLayout,
    echo: Echo,
    sr_workers: dict[str, int] | None = None,
    workers_now: CurrentWorkers | None = None,
) -> Pending:
    """Super-resolve and write the pending windows; record each tile's windows as its task returns.
    `sr_workers` (worker: slots) spreads the tasks over the workers that run them (`TaskSpread`), unless
    they are GPU workers: a task asked for a worker but allowed others may run on any worker once its
    own is busy or gone, its GPU resource notwithstanding (Dask's fallback and work stealing), and the
    network would then run on a CPU worker. GPU tasks keep the resource alone."""
    written: Pending = {tile: [] for tile in pending}
    if not _count(pending):
        return written
    tasks = write_tasks(store, replace(plan, windows=pending), manifest, ref, gpu_workers_only, layout.dates, layout.tiles)
    time_index = {date: k for k, date in enumerate(manifest.times)}
    date_at = {k: date for date, k in time_index.items()}
    by_date = {(plan.days[w.target].date.isoformat(), tile): w for tile, windows in pending.items() for w in windows}

    records = ManifestWriter(manifest, store, before_write=lock.check_held)

    def recorded(windows: int) -> None:
        for _ in range(windows):
            kill_points.reached("recorded")

    def record(unit: Unit, result: list[tuple[tuple[int, int], list[tuple[int, list[tuple[int, int]]]]]]) -> None:
        for tile, dates in result:
            for index, empty_chunks in dates:
                records.add(date_at[index], *tile, empty_chunks)
                written[tile].append(by_date[(date_at[index], tile)])
        recorded(records.write_if_due())

    try:
        _compute(client, tasks, layout.in_flight, echo, record, TaskSpread({} if gpu_workers_only else sr_workers or {}), workers_now)
    finally:
        # Also when the run fails: the windows whose tasks returned are kept (but not without the lock).
        if not lock.lost:
            recorded(records.write())
    return written


def write_tasks(store: Location, work: Plan, manifest: Manifest, ref: ModelRef, gpu_workers_only: bool, per_task: int, tiles: int = 1) -> WriteTasks:
    """Per time slab and run of `tiles` tiles of a row, one task per group of `per_task` dates:
    super-resolve (tiles.py), then write the tiles' pending dates. Each slab reads its own days
    (tiles.time_slabs). A unit is the run, named by its first tile."""
    slabs = time_slabs(work, slab_days(work), per_task)
    per_unit: dict[Unit, list[Delayed]] = {}
    reads: dict[Unit, list[Delayed]] = {}
    tables: list[list[Delayed]] = []
    first_group = 0
    for s, slab in enumerate(slabs):
        tasks, slab_reads, slab_tables, groups = _slab_write_tasks(store, slab, manifest, ref, gpu_workers_only, per_task, first_group, tiles)
        first_group += groups
        per_unit |= {(s, *tile): per_tile for tile, per_tile in tasks.items()}
        reads |= {(s, *tile): taken for tile, taken in slab_reads.items()}
        tables.append(slab_tables)
    return WriteTasks(per_unit, reads, [len(slab.frame_days) for slab in slabs], tables)


def _slab_write_tasks(
    store: Location, work: Plan, manifest: Manifest, ref: ModelRef, gpu_workers_only: bool, per_task: int, first_group: int, tiles: int
) -> tuple[dict[tuple[int, int], list[Delayed]], dict[tuple[int, int], list[Delayed]], list[Delayed], int]:
    """One slab's write tasks per run of tiles (by its first tile); per run, the reads of its tiles'
    windows as Delayeds; what all those reads take (WriteTasks.tables); and its number of groups of dates."""
    graph_of_tiles = superresolve_plan(work, ref, per_task, gpu_workers_only=gpu_workers_only, first_group=first_group, tiles_per_task=tiles)
    sizes = graph_of_tiles.output.chunks[0]
    time_index = {date: k for k, date in enumerate(manifest.times)}
    outputs = work.output_days
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    name = f"write-sr-{tokenize(graph_of_tiles.output.name, str(store))}"
    graph: dict[Any, Any] = {}
    runs: dict[Any, tuple[int, int]] = {}
    read_by: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for (g, row, first), (key, run) in graph_of_tiles.tasks.items():
        group = outputs[starts[g] : starts[g] + sizes[g]]
        writes = []
        for k, tile in enumerate(run):
            targets = {w.target for w in work.windows[tile]}
            slots = [(i, time_index[work.days[day].date.isoformat()]) for i, day in enumerate(group) if day in targets]
            if slots:
                ys = (SCALE * work.rows[tile[0]][0], SCALE * work.rows[tile[0]][1])
                xs = (SCALE * work.cols[tile[1]][0], SCALE * work.cols[tile[1]][1])
                writes.append((k, tile, slots, ys, xs))
        if writes:
            graph[(name, g, row, first)] = (write_tiles_dates, key, str(store), writes)
            runs[(name, g, row, first)] = (row, first)
            read_by.setdefault((row, first), set()).update(run)
    # The writes take the runs' results, not the output's per-tile blocks cut from them: that layer is left out.
    sr_layers, per_tile = graph_of_tiles.output.dask, graph_of_tiles.output.name
    layers = {layer: tasks for layer, tasks in sr_layers.layers.items() if layer != per_tile} | {name: MaterializedLayer(graph)}
    dependencies = {layer: needs for layer, needs in sr_layers.dependencies.items() if layer != per_tile}
    dependencies[name] = {key[0] for key, _ in graph_of_tiles.tasks.values()}
    whole = Subgraphs(HighLevelGraph(layers, dependencies))
    # `_compute` submits a run's reads before its tasks, which refer to them by key.
    read_keys = set(graph_of_tiles.reads.values())
    tasks: dict[tuple[int, int], list[Delayed]] = {}
    for key, run_start in runs.items():
        tasks.setdefault(run_start, []).append(whole.delayed(key, held=read_keys))
    reads = {run_start: whole.delayed_together([graph_of_tiles.reads[tile] for tile in sorted(run)]) for run_start, run in read_by.items()}
    tables = whole.delayed_together(sorted(whole.needed(read_keys) - read_keys, key=str))
    return tasks, reads, tables, len(sizes)


class Subgraphs:
    """Each task of a graph with only what it depends on, cut from the whole graph once.

    A job submits its tasks one at a time (`_compute`); a task submitted with the whole job's graph
    makes Dask cull that graph again at every submission, a cost in proportion to the region, so the
    job's client time would grow with the square of its tasks (minutes for a whole Sentinel-2 tile).
    Each task's own graph keeps its layers' annotations: the GPU resource of super-resolution.

    A task's graph may also stop at keys the job has already submitted (`held`): it then refers to them
    without carrying their tasks. The read blocks are such keys: their graphs hold stackstac's table of
    every asset of the slab, and pickling that table made 12 of a task's 15 ms of submission at a whole
    Sentinel-2 tile. A task that refers to a held key is sent in Dask's task spec, whose references to
    keys outside a graph stay references (in a legacy tuple they would be read as literal tuples); the
    others stay as they are, as converting the whole graph would take seconds at that scale."""

    def __init__(self, graph: HighLevelGraph) -> None:
        self.graph = graph
        self.tasks: dict[Any, Any] = {}
        self.layer_of: dict[Any, str] = {}
        for name, layer in graph.layers.items():
            for key, task in layer.items():
                self.tasks[key] = task
                self.layer_of[key] = name
        self.dependencies = {key: get_dependencies(self.tasks, task=task) for key, task in self.tasks.items()}
        self._specs: dict[Any, GraphNode] = {}

    def delayed(self, key: Any, held: Set[Any] = frozenset()) -> Delayed:
        """`key` as a Delayed whose graph holds that task and every task it needs, by their own layers,
        but for the `held` keys and what they need."""
        (task,) = self.delayed_together([key], held)
        return task

    def delayed_together(self, keys: list[Any], held: Set[Any] = frozenset()) -> list[Delayed]:
        """Each of `keys` as a Delayed, all of them on one graph (as `delayed` makes it, of every task they
        need). Computed together, Dask culls that graph to the ones asked for; Delayeds with graphs of their
        own would not merge, as their layers share names but not tasks."""
        needed = self.needed(keys, held)
        by_layer: dict[str, dict[Any, Any]] = {}
        for needed_key in needed:
            task = self._spec(needed_key) if held and not held.isdisjoint(self.dependencies[needed_key]) else self.tasks[needed_key]
            by_layer.setdefault(self.layer_of[needed_key], {})[needed_key] = task
        layers = {name: MaterializedLayer(tasks, annotations=self.graph.layers[name].annotations) for name, tasks in by_layer.items()}
        dependencies = {name: self.graph.dependencies[name] & by_layer.keys() for name in by_layer}
        graph = HighLevelGraph(layers, dependencies)
        return [Delayed(key, graph, layer=self.layer_of[key]) for key in keys]

    def needed(self, keys: Iterable[Any], held: Set[Any] = frozenset()) -> set[Any]:
        """`keys` and every key they need, but for the `held` keys and what they need."""
        needed, todo = set(keys), list(keys)
        while todo:
            for dependency in self.dependencies[todo.pop()]:
                if dependency not in held and dependency not in needed:
                    needed.add(dependency)
                    todo.append(dependency)
        return needed

    def _spec(self, key: Any) -> GraphNode:
        """The task of `key` in Dask's task spec, each key of the graph it names a reference."""
        if key not in self._specs:
            self._specs[key] = convert_legacy_graph({key: self.tasks[key]}, all_keys=self.tasks.keys())[key]
        return self._specs[key]


@dataclass(frozen=True)
class WriteTasks:
    """A job's tasks per unit (time slab, tile row, first tile col of a run), and each unit's reads: the
    windows of its tiles, a block each of every day its slab reads."""

    per_unit: dict[Unit, list[Delayed]]
    reads: dict[Unit, list[Delayed]]
    slab_days: list[int]
    """Days each time slab reads, in time order."""
    tables: list[list[Delayed]]
    """Per time slab, what every read of the slab takes: stackstac's tables of the slab's assets and of
    their readers, one of each for all its tiles. `_compute` holds them from the slab's first read to its
    last: released with a tile's read while another tile's read still held them, they were computed
    again for the next tile's read on the worker that had computed them first, where they waited for
    its thread (0.3–1 s before each tile's read; bench/RESULTS.md, twenty-second measurement)."""


def _compute(
    client: Client,
    tasks: WriteTasks,
    in_flight: int,
    echo: Echo,
    on_done: Callable[[Unit, Any], None],
    spread: TaskSpread | None = None,
    workers_now: CurrentWorkers | None = None,
) -> None:
    """Run the write tasks on the cluster, at most `in_flight` at once (one per slot where `spread`
    spreads them: TaskSpread.window; `workers_now` follows the workers that join or leave meanwhile),
    in `TaskOrder`; `on_done(unit, result)` as each returns, in completion order. Progress comes from
    the tasks' own events (progress.py).

    Submitting everything at once would let the cluster read the whole region ahead of the network: on
    a cluster with GPU workers the CPU workers read every tile long before the GPU can take it, and the
    GPU worker gathers the input of every task assigned to it, so memory would grow with the region.
    A window of tasks slides over the tiles instead. A unit's reads (its tiles' windows with their halo,
    tiles.window_reads) are submitted with its first task and held until its last task is done, and no
    other unit takes them: what a job holds read is the units in flight, whatever the region's height,
    width or time range. Where the job places its tasks on CPU workers (`spread`), a unit's reads are
    asked of its first task's worker, which reads them just before it computes, and the unit's next
    tasks go to that worker (TaskOrder): such a worker runs one task per thread, so a read ahead would
    only wait for a thread there, or be read on another worker and travel. GPU workers do not read: the
    other workers read `in_flight` units ahead of the tasks, so that a GPU task's input is there when
    its slot is free."""
    order = TaskOrder(tasks.per_unit)
    split = f" in {len(tasks.slab_days)} time slabs of up to {max(tasks.slab_days)} days" if len(tasks.slab_days) > 1 else ""
    window = spread.window(in_flight) if spread else in_flight
    echo(f"Computing {order.count} tile tasks{split}, up to {min(window, order.count)} at once … (dashboard: {client.dashboard_link})")
    remaining = Counter({unit: len(unit_tasks) for unit, unit_tasks in tasks.per_unit.items()})
    units_left = Counter(slab for slab, *_ in tasks.per_unit)
    held: dict[Unit, list[Any]] = {}
    tables: dict[int, list[Any]] = {}
    unit_of: dict[str, Unit] = {}

    def read(unit: Unit, options: dict[str, Any]) -> None:
        # Each unit's reads are asked for once, with the place of its first task as their priority, and
        # its slab's tables with its slab's first read: see WriteTasks.tables.
        if unit not in held:
            slab = unit[0]
            if slab not in tables:
                tables[slab] = client.compute(tasks.tables[slab], priority=-order.first_task[unit], **options)
            held[unit] = client.compute(tasks.reads[unit], priority=-order.first_task[unit], **options)

    def submit(count: int) -> list[Any]:
        # One submission per task, its place in the order as its priority: the cluster reads and
        # computes the tiles in that order, which one submission of many tasks would not keep.
        futures = []
        for _ in range(count):
            worker = spread.freest() if spread else None
            if (taken := order.take(worker)) is None:
                break
            position, unit, task = taken
            options = spread.place(task.key, worker) if spread else {}
            read(unit, options)
            if not (spread and spread.slots):
                for upcoming in order.units_after(unit, in_flight):
                    read(upcoming, {})
            (future,) = client.compute([task], priority=-position, **options)
            unit_of[future.key] = unit
            futures.append(future)
        return futures

    running = as_completed(submit(window), with_results=True)
    next_look = time.monotonic() + WORKERS_LOOK_S
    for future, result in running:
        unit = unit_of.pop(future.key)
        if spread:
            spread.done(future.key)
        remaining[unit] -= 1
        if not remaining[unit]:
            for read_future in held.pop(unit):
                read_future.release()
            units_left[unit[0]] -= 1
            for table_future in tables.pop(unit[0]) if not units_left[unit[0]] else []:
                table_future.release()
        on_done(unit, result)
        if spread and workers_now and time.monotonic() >= next_look:
            in_flight = workers_now.follow(spread, in_flight, echo)
            window = spread.window(in_flight)
            next_look = time.monotonic() + WORKERS_LOOK_S
        # One more for the one done; more where workers joined, none while a window that shrank drains.
        for more in submit(window - running.count()):
            running.add(more)


class TaskOrder:
    """The order a job submits its tasks in: time slab by time slab, tile by tile in row-major order, a
    unit's tasks (its tile's groups of dates) one after another, each task's place in that order its
    priority. Without a worker to choose for (GPU workers, which do not read), the next task in that order.

    For a CPU worker whose slot is free (`take(worker)`), the next task of a unit it reads, else the first
    of a unit no worker has taken (which it then reads), else the next of the earliest unit with tasks
    left (its read then travels to the worker). Taken in plain order, each unit's tasks went to both
    workers in turn: its read, asked of its first task's worker, travelled to the other, which waited
    0.25–0.75 s for it (read, then sent) at every unit (bench/RESULTS.md, twenty-second measurement).
    A unit's tasks now stay on its reader, and units are shared only when none is left to
    start (a region of one tile still keeps every worker busy). The units started are still a prefix of
    the order, so what the job holds read stays one unit or two per slot."""

    def __init__(self, per_unit: dict[Unit, list[Delayed]]) -> None:
        self.units = sorted(per_unit)
        positions = iter(range(sum(len(unit_tasks) for unit_tasks in per_unit.values())))
        self.queued = {unit: deque((next(positions), task) for task in per_unit[unit]) for unit in self.units if per_unit[unit]}
        self.count = sum(len(queue) for queue in self.queued.values())
        self.first_task = {unit: queue[0][0] for unit, queue in self.queued.items()}
        self._index = {unit: k for k, unit in enumerate(self.units)}
        self._not_started = deque(self.queued)
        self._read_by: dict[str, deque[Unit]] = {}

    def take(self, worker: str | None = None) -> tuple[int, Unit, Delayed] | None:
        """The next task for `worker` (None: in plain order), with its place and unit; None when all are taken."""
        unit = self._unit_for(worker)
        if unit is None:
            return None
        if self._not_started and self._not_started[0] == unit:
            self._not_started.popleft()
            if worker is not None:
                self._read_by.setdefault(worker, deque()).append(unit)
        queue = self.queued[unit]
        position, task = queue.popleft()
        if not queue:
            del self.queued[unit]
        return position, unit, task

    def units_after(self, unit: Unit, count: int) -> list[Unit]:
        """The `count` units after `unit` in the order (those a GPU job reads ahead)."""
        start = self._index[unit] + 1
        return self.units[start : start + count]

    def _unit_for(self, worker: str | None) -> Unit | None:
        if worker is not None:
            own = self._read_by.get(worker, deque())
            while own and own[0] not in self.queued:
                own.popleft()
            if own:
                return own[0]
            if self._not_started:
                return self._not_started[0]
        return next(iter(self.queued), None)


WORKERS_LOOK_S = 2.0
"""Seconds between two looks of a running job at the cluster's workers, for those that joined or left."""


@dataclass(frozen=True)
class CurrentWorkers:
    """The workers a CPU job runs on, as they change while it runs (a cluster scaled up or down, workers
    of a batch queue arriving one by one and leaving when their time is up): the job's window, its reads
    ahead and its placement, sized from the workers at the start, would leave a newcomer idle for the
    rest of the job and keep asking for a worker that left."""

    current: Callable[[], dict[str, int]]
    """The workers that would run super-resolution now, with their slots."""
    in_flight: Callable[[int], int] | None
    """The tasks to keep in flight for so many slots; None where the job's value was pinned."""

    def follow(self, spread: TaskSpread, in_flight: int, echo: Echo) -> int:
        """Update `spread` to the workers there now, say so when they changed; the tasks to keep in flight."""
        slots = self.current()
        if not slots or slots == spread.slots:  # none at all: a cluster between workers; keep the last known
            return in_flight
        spread.slots = slots
        total = sum(slots.values())
        if self.in_flight is not None:
            in_flight = max(in_flight, self.in_flight(total))
        window = spread.window(in_flight)
        echo(f"Workers changed: {len(slots)} now run super-resolution ({_count_of(total, 'slot')}), up to {_count_of(window, 'task')} at once")
        return in_flight


def _count_of(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def current_cpu_workers(client: Client, plan: Plan, layout: TaskLayout, pinned_in_flight: bool) -> CurrentWorkers:
    """The workers of a CPU job as they change: any worker a task fits (the check the job made of the
    workers at its start), one slot per thread."""
    needed = task_memory_bytes(plan, layout.dates, on_gpu=False, tiles=layout.tiles)

    def current() -> dict[str, int]:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        return {
            address: slots
            for address, slots in super_resolution_workers(client, [], workers).items()
            if needed <= MEMORY_SHARE * (workers[address].get("memory_limit") or float("inf")) / slots
        }

    return CurrentWorkers(current, None if pinned_in_flight else tasks_in_flight)


class TaskSpread:
    """The worker each task is asked to run on: of the workers that run super-resolution, the one with
    the fewest of the job's tasks in flight per slot. Dask puts a task whose inputs are all on one worker
    on that worker, however many tasks it already has queued, and a super-resolution task's one input
    is its tile's read block. A small job's tasks, submitted together, thus followed wherever the reads
    happened to be: a job of 4 tasks on 2 CPU workers ran 3 on one in 4 of 21 runs (bench/RESULTS.md,
    twelfth CPU measurement). The block travels to the worker instead, a transfer between workers that
    a task's compute outweighs many times. The worker is a preference, not a rule (allow_other_workers):
    a task whose worker left runs elsewhere, and Dask's work stealing may still give a queued task to an
    idle worker. A CPU job looks at the workers again as it runs (CurrentWorkers): one that joins gets
    tasks of its own, and none is asked for one that left."""

    def __init__(self, slots: dict[str, int]) -> None:
        self.slots = slots
        self.in_flight: Counter[str] = Counter()
        self.worker_of: dict[Any, str] = {}

    def freest(self) -> str | None:
        """The worker with the fewest of the job's tasks in flight per slot; None when no worker is known."""
        return min(self.slots, key=lambda address: self.in_flight[address] / self.slots[address]) if self.slots else None

    def place(self, key: Any, worker: str | None = None) -> dict[str, Any]:
        """The submission's options for the task of `key`, asked of `worker` (by default the freest);
        nothing when no worker is known."""
        worker = worker or self.freest()
        if worker is None:
            return {}
        self.in_flight[worker] += 1
        self.worker_of[key] = worker
        return {"workers": [worker], "allow_other_workers": True}

    def done(self, key: Any) -> None:
        if (worker := self.worker_of.pop(key, None)) is not None:
            self.in_flight[worker] -= 1

    def window(self, in_flight: int) -> int:
        """Tasks to keep submitted (the reads still run `in_flight` units ahead): one per slot. A worker
        learns of a task's write only from the scheduler, once the task is done, and meanwhile starts the
        next task it holds: with more tasks than slots queued on a worker, every write waited a whole
        task behind (its result held meanwhile), the job saw the worker's tasks end a task late and in
        pairs, and its next tasks went to the other worker; a job of 16 tasks on 2 CPU workers ran 9 and 7
        in 4 of 10 runs, the worker with 7 idle for the last two (bench/RESULTS.md). One task per slot, the
        next one given to whichever worker ended a task, costs a worker the round trips of a write's
        start and the next task's submission, milliseconds against a task's seconds."""
        return min(in_flight, sum(self.slots.values())) if self.slots else in_flight


def tasks_in_flight(slots: int) -> int:
    """Write tasks a job keeps submitted at once (on CPU workers TaskSpread.window keeps one per slot)
    and tiles its reads run ahead of them on GPU workers: four per super-resolution slot and two more,
    so that no GPU slot waits for its next tile's input, and no more, so that memory does not grow
    with the region."""
    return 4 * slots + 2


def keep_annotations(needed: bool) -> Any:
    """Low-level task fusion can merge a tile's read, super-resolution and write into one task and drop
    the GPU annotation on the way (dask 2026.8; tests/test_gpu_workers.py checks where tasks ran):
    switch fusion off while such a graph is built and run. Without GPU workers nothing changes."""
    return dask.config.set({"optimization.fuse.active": False}) if needed else contextlib.nullcontext()


def performance_report_to(path: Path | None) -> Any:
    """Dask's HTML performance report of the job's time on the cluster (cloud scores, reading,
    super-resolution, writing), when asked for."""
    if path is None:
        return contextlib.nullcontext()
    from distributed import performance_report

    path.parent.mkdir(parents=True, exist_ok=True)
    return performance_report(filename=str(path))


def _note_kept_codec(store: Location, wanted: str, echo: Echo) -> None:
    """An output grows in the codec it was created with: say so when the job asks for another."""
    kept = stored_codec(store)
    if kept != wanted:
        echo(f"output.codec: this output keeps {kept}, the codec it was created with (--overwrite rewrites it with {wanted})")


def _warn_late(increment: Increment, echo: Echo) -> None:
    if increment.late:
        shown = ", ".join(str(day.date) for day in increment.late[:5]) + (" …" if len(increment.late) > 5 else "")
        echo(
            f"WARNING: {len(increment.late)} late-arriving dates older than the newest date already processed ({shown}) are SKIPPED: "
            "including them would change outputs already written. Run with --overwrite to recompute the output with them."
        )


def _count(windows: Pending) -> int:
    return sum(len(w) for w in windows.values())


def _tile_km2(plan: Plan, tile: tuple[int, int]) -> float:
    (top, bottom), (left, right) = plan.rows[tile[0]], plan.cols[tile[1]]
    return (bottom - top) * (right - left) * plan.grid.resolution**2 / 1e6
