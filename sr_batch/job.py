"""A region job from start to finish: spec → plan → lazy cube → super-resolution per tile → Zarr.

Everything that can be checked without the cluster (the output location, the checkpoint) is checked
first, so a bad job fails in a second and writes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask

from sr_batch.cluster import dask_client, gpu_workers
from sr_batch.errors import SpecError
from sr_batch.model import Architecture, LoadedModel, receptive_radius
from sr_batch.plan import Plan, make_plan
from sr_batch.progress import tile_progress
from sr_batch.sink import build_dataset, check_writable, describe_output, write_dataset
from sr_batch.spec import JobSpec
from sr_batch.superres import ModelRef, load_model, pick_device
from sr_batch.tiles import superresolve_plan

Echo = Callable[[str], None]


@dataclass
class JobResult:
    plan: Plan
    output: Path
    seconds: float
    model: LoadedModel


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


def checked_model(spec: JobSpec) -> LoadedModel:
    """Load the job's model here, before any cluster work, and check that the job can use it.
    The check runs on the CPU: the client must not hold GPU memory that the workers need."""
    pick_device(spec.model.device)  # device: cuda with no GPU visible fails here, in one line
    loaded = load_model(replace(model_ref(spec), device="cpu", compile="off"))
    if loaded.info.frames != spec.model.frames:
        raise SpecError(
            f"model.frames: the checkpoint {loaded.info.name} takes {loaded.info.frames} frames, "
            f"the job asks for {spec.model.frames}; set model.frames: {loaded.info.frames}"
        )
    return loaded


def plan_job(spec: JobSpec, scheduler: str | None = None, workers: int | None = None, echo: Echo = print) -> Plan:
    """The dry run: search, cloud scores and windows, without super-resolving anything."""
    loaded = checked_model(spec)
    with dask_client(scheduler, workers, echo):
        plan = make_plan(spec, receptive_radius(loaded.info.architecture, spec.model.frames))
    echo(plan.summary())
    return plan


def run_job(
    spec: JobSpec,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    echo: Echo = print,
    performance_report: Path | None = None,
) -> JobResult:
    started = time.monotonic()
    target = check_writable(spec.output.uri, overwrite)
    ref = model_ref(spec)
    loaded = checked_model(spec)
    if not loaded.info.trained:
        echo(f"WARNING: model {loaded.info.name} is UNTRAINED (random weights): the output checks the pipeline, it is not super-resolution.")
    with dask_client(scheduler, workers, echo) as client:
        plan = make_plan(spec, receptive_radius(loaded.info.architecture, spec.model.frames))
        echo(plan.summary())
        if not plan.output_days:
            echo("No cloudless date in any tile for this period: writing an output with an empty time axis.")
        on_gpus = gpu_workers(client) if spec.model.device != "cpu" else []
        if on_gpus:
            echo(f"Super-resolution runs on the {len(on_gpus)} GPU worker(s) only: {', '.join(on_gpus)}")
        sr = superresolve_plan(plan, ref, dates_per_task=spec.model.batch_size, gpu_workers_only=bool(on_gpus))
        dataset = build_dataset(plan, sr, loaded)
        report = performance_report_to(performance_report)
        with report, tile_progress(client, spec.output.uri, plan.tile_dates, show_progress, echo), keep_annotations(bool(on_gpus)):
            write_dataset(dataset, target, spec.tiling.tile, overwrite, lambda delayed: client.compute(delayed).result())
        if performance_report:
            echo(f"Dask performance report: {performance_report}")
    result = JobResult(plan=plan, output=target, seconds=time.monotonic() - started, model=loaded)
    echo(describe_output(target) + f"\n  time taken: {result.seconds:.1f} s")
    return result


def keep_annotations(needed: bool) -> Any:
    """Low-level task fusion merges a tile's read, super-resolution and write into one task and drops the
    GPU annotation on the way (dask 2026.8; tests/test_gpu_workers.py catches it): switch fusion off
    while such a graph is built and run. Without GPU workers the fused graph is kept (fewer tasks)."""
    return dask.config.set({"optimization.fuse.active": False}) if needed else contextlib.nullcontext()


def performance_report_to(path: Path | None) -> Any:
    """Dask's HTML performance report of the super-resolution and write, when asked for."""
    if path is None:
        return contextlib.nullcontext()
    from distributed import performance_report

    path.parent.mkdir(parents=True, exist_ok=True)
    return performance_report(filename=str(path))
