"""Seam-free tiling: with halo ≥ receptive field + cloud dilation, a tiled run equals a whole-image run,
and a region wider than a strip of tiles, read strip by strip, gives the same output."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client, LocalCluster, SchedulerPlugin, wait
from distributed.utils import key_split

from sr_batch import job as job_module
from sr_batch import superres
from sr_batch import tiles as tiles_module
from sr_batch.job import model_ref, plan_job, run_job
from sr_batch.plan import Plan
from sr_batch.sample import cache_dir
from sr_batch.spec import parse_spec
from sr_batch.superres import ModelRef, Runner, auto_precision
from sr_batch.tiles import aligned_window, compiled_pass_shape, read_windows, superresolve_plan

from conftest import SMALL_HALO, SMALL_MODEL, make_job


def run(stac_url: str, catalog, scheduler: str, out: Path, tile: int, halo: int | str, **model: object) -> np.ndarray:
    # Every date counts as cloudless in every tile, so all tilings get the same windows.
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    job = make_job(stac_url, out, catalog, time=period, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": tile, "halo": halo}, model={**SMALL_MODEL, **model})
    result = run_job(parse_spec(job), scheduler=scheduler, show_progress=False)
    if tile < 100:
        assert len(result.plan.rows) >= 4 and len(result.plan.cols) >= 4
    with xr.open_zarr(result.output, consolidated=False) as ds:
        assert ds.attrs["halo_lr_px"] == result.plan.halo == (SMALL_HALO if halo == "auto" else halo)
        return ds.sr.values


def test_tiled_output_equals_whole_image_output(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    whole = run(stac_url, catalog, scheduler, tmp_path / "whole.zarr", tile=128, halo=SMALL_HALO)
    # halo: auto, the default, is the smallest seam-free halo of the job's model (18 px for the small one).
    tiled = run(stac_url, catalog, scheduler, tmp_path / "tiled.zarr", tile=24, halo="auto")
    assert whole.shape == tiled.shape and whole.shape[0] >= 3
    assert np.array_equal(np.isnan(whole), np.isnan(tiled))
    # Outputs are quantised to 1e-4: float noise between tile sizes may flip one step of rounding.
    np.testing.assert_allclose(tiled, whole, atol=1.01e-4, equal_nan=True)
    assert np.nanmean(np.abs(tiled - whole)) < 1e-6

    # The same tiling with too small a halo shows seams: the comparison above can fail.
    seamy = run(stac_url, catalog, scheduler, tmp_path / "seamy.zarr", tile=24, halo=4)
    assert np.nanmax(np.abs(seamy - whole)) > 1e-3


def test_a_compiled_model_sees_one_window_shape_and_the_tiles_still_join(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """torch.compile compiles once per input shape (minutes each with max-autotune), and the windows of
    a region's edge tiles, clipped at the edge, would make up to nine. For a compiled model the edge
    windows reach further inward instead, to an inner window's shape: one shape, and the output still
    equals a whole-image run's."""
    spec = parse_spec(make_job(stac_url, tmp_path / "plan.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}, tiling={"tile": 24}))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    shape = {(ys[1] - ys[0], xs[1] - xs[0]) for ys, xs in read_windows(plan, same_shape=False).values()}
    assert len(shape) == 4, "the region's edges make more shapes (2 x 2 here, as windows are widened to multiples of 16 px)"
    same = read_windows(plan, same_shape=True)
    inner = (aligned_window(max(plan.chunks()[0]) + 2 * plan.halo), aligned_window(max(plan.chunks()[1]) + 2 * plan.halo))
    assert {(ys[1] - ys[0], xs[1] - xs[0]) for ys, xs in same.values()} == {inner}
    # With two tiles along an axis no tile has a neighbour on both sides: one halo is enough there (here
    # 2 x 2 tiles of 60 and 40 px, and one row of tiles: a window the region's height).
    two = replace(plan, rows=[(0, 60), (60, plan.grid.height)], cols=[(0, 60), (60, plan.grid.width)])
    assert {(ys[1] - ys[0], xs[1] - xs[0]) for ys, xs in read_windows(two, same_shape=True).values()} == {(aligned_window(60 + plan.halo),) * 2}
    one_row = replace(two, rows=[(0, plan.grid.height)])
    assert {ys[1] - ys[0] for ys, _ in read_windows(one_row, same_shape=True).values()} == {plan.grid.height}
    for checked in (plan, two, one_row):
        for (row, col), (ys, xs) in read_windows(
            checked, same_shape=True
        ).items():  # each tile inside its window, a halo deep where the window is not at the region's edge
            (top, bottom), (left, right) = checked.rows[row], checked.cols[col]
            assert (top - ys[0] >= plan.halo or ys[0] == 0) and (ys[1] - bottom >= plan.halo or ys[1] == plan.grid.height)
            assert (left - xs[0] >= plan.halo or xs[0] == 0) and (xs[1] - right >= plan.halo or xs[1] == plan.grid.width)

    whole = run(stac_url, catalog, scheduler, tmp_path / "whole.zarr", tile=128, halo=SMALL_HALO)
    with Client(scheduler) as client:
        before = client.run(_compiled_graphs)
        compiled = run(stac_url, catalog, scheduler, tmp_path / "compiled.zarr", tile=24, halo="auto", compile="default")
        graphs = {worker: count - before.get(worker, 0) for worker, count in client.run(_compiled_graphs).items()}
    assert sorted(graphs.values()) == [1] * len(graphs), f"graphs compiled per worker: {graphs}"
    assert np.array_equal(np.isnan(whole), np.isnan(compiled))
    np.testing.assert_allclose(compiled, whole, atol=1.01e-4, equal_nan=True)
    assert np.nanmean(np.abs(compiled - whole)) < 1e-5


@pytest.mark.parametrize("tile", [24, 40])
def test_read_windows_are_widened_to_multiples_of_16_px_with_more_halo(tmp_path: Path, stac_url: str, catalog, scheduler: str, tile: int) -> None:
    """The network runs faster on widths that are multiples of 16 px (tiles.WINDOW_ALIGN), so a window
    takes up to 15 px more halo where its neighbouring tiles have them: it still holds its tile and the
    halo on every side with a neighbour, and reaches no further than those neighbours (whose blocks it
    reads anyway), so it is narrower only where they are thin. (That the output does not change is
    test_tiled_output_equals_whole_image_output's, which reads such windows.)"""
    spec = parse_spec(make_job(stac_url, tmp_path / "plan.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}, tiling={"tile": tile}))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    widened = 0
    for (row, col), window in read_windows(plan).items():
        for (first, last), tiles, k, size in zip(window, (plan.rows, plan.cols), (row, col), (plan.grid.height, plan.grid.width)):
            (start, end), low, high = tiles[k], tiles[k - 1][0] if k else 0, tiles[k + 1][1] if k + 1 < len(tiles) else size
            needed = (max(0, start - plan.halo), min(size, end + plan.halo))
            assert low <= first <= needed[0] and needed[1] <= last <= high, (window, needed, (low, high))
            assert (last - first) % 16 == 0 or (first, last) == (low, high), window
            assert last - first < needed[1] - needed[0] + 16, window
            widened += (last - first) > (needed[1] - needed[0])
    assert widened, "no window needed widening: the test checks nothing"


def test_the_warm_up_compiles_the_pass_a_compiled_job_runs(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """On GPU workers a compiled job's warm-up compiles the job's own pass while the first tiles are read
    (`job.compile_in_warm_up`), so that the minutes of max-autotune overlap the reads. It must be the very
    pass the tasks run, or the tasks compile again: after the warm-up, the job compiles nothing. (A CPU
    job's warm-up does not compile, its pass costing as much as a task's: here it is made to, on the CPU
    workers.) The compiled kernels are kept with sr-batch's cache for later runs."""
    # A network of its own shapes: torch.compile reuses a graph for any network of the same shapes.
    model = {**SMALL_MODEL, "compile": "default", "architecture": {**SMALL_MODEL["architecture"], "hidden_channels": 12}}
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    spec = parse_spec(make_job(stac_url, tmp_path / "out.zarr", catalog, time=period, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": 24}, model=model))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    layout = job_module.task_layout(plan, spec.model, slots=2)
    ref = replace(model_ref(spec), precision=auto_precision("cpu"))  # as the job resolves `precision: auto` on CPU workers
    compiled_pass = compiled_pass_shape(plan, ref, layout.dates, layout.tiles)
    assert compiled_pass == (min(4, layout.dates), aligned_window(max(plan.chunks()[0]) + 2 * plan.halo), aligned_window(max(plan.chunks()[1]) + 2 * plan.halo))
    with Client(scheduler) as client:
        assert job_module.compile_in_warm_up(client, spec, plan, ref, layout, []) is None, "a CPU job's warm-up compiles"
        before = client.run(_compiled_graphs)
        wait(job_module.warm_up_workers(client, ref, [], compiled_pass))
        warmed = client.run(_compiled_graphs)
        result = run_job(spec, scheduler=scheduler, show_progress=False)
        after = client.run(_compiled_graphs)
        kept = client.run(lambda: os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    assert result.written_windows > 0
    assert all(warmed[worker] > before.get(worker, 0) for worker in warmed), f"the warm-up compiled nothing: {before} → {warmed}"
    assert after == warmed, f"the job's tasks compiled again after the warm-up: {warmed} → {after}"
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        assert set(kept.values()) == {str(cache_dir() / "torchinductor")}
        assert any((cache_dir() / "torchinductor").iterdir())


def test_a_compiled_job_of_one_date_passes_one_window_not_a_padded_batch(tmp_path: Path, stac_url: str, catalog, scheduler: str, monkeypatch) -> None:
    """A compiled network pads every pass to one size, so that it compiles one graph. A nightly run has
    one new date: its tasks hold one window each, and padding their passes to `model.batch_size` (4
    here, 8 by default) would compute that many windows for one. The pass is as wide as the job's task."""
    period, every_tile_every_date = {"start": "2019-07-01", "end": "2019-08-31"}, {"max_cloud_fraction": 1.0}
    spec = parse_spec(make_job(stac_url, tmp_path / "plan.zarr", catalog, time=period, tiling={"tile": 24}, cloud=every_tile_every_date))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    latest = max(plan.output_days)
    one_date = replace(plan, windows={tile: [w for w in windows if w.target == latest] for tile, windows in plan.windows.items()})
    compiled = replace(model_ref(spec), compile="default")
    assert compiled.batch_size == 4 and len(one_date.output_days) == 1

    passes: list[int] = []

    def eager_pass_counted(runner: Runner, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        passes.append(x.shape[0])
        return superres._forward(replace(runner, forward=runner.loaded.network), x, alphas).float()

    monkeypatch.setattr(superres, "_forward_kept", eager_pass_counted)  # the pass as compiled, without the minutes of compiling
    output = superresolve_plan(one_date, compiled, dates_per_task=1).output
    tiles = sum(1 for windows in one_date.windows.values() if windows)
    assert output.compute(scheduler="sync").any() and tiles > 1
    assert passes == [1] * tiles, passes

    # With the job's tasks of 2 dates, the passes are 2 wide, the last group padded to them.
    passes.clear()
    two_dates = replace(plan, windows={tile: windows[-3:] for tile, windows in plan.windows.items()})
    superresolve_plan(two_dates, compiled, dates_per_task=2).output.compute(scheduler="sync")
    assert passes and set(passes) == {2}, passes

    # Tasks of 2 tiles (on GPU workers): a compiled window has one shape, so the two tiles' windows share
    # a pass even at the region's edge, where their halos lie on different sides. Only a tile whose
    # cropped output differs (a narrower last column's) passes on its own.
    passes.clear()
    runs = superresolve_plan(one_date, compiled, dates_per_task=1, tiles_per_task=2)
    shared = runs.output.compute(scheduler="sync")

    def core(row: int, col: int) -> tuple[int, int]:
        return plan.rows[row][1] - plan.rows[row][0], plan.cols[col][1] - plan.cols[col][0]

    cores = [{core(*tile) for tile in run if one_date.windows[tile]} for _, run in runs.tasks.values()]
    assert set(passes) == {2} and len(passes) == sum(len(shapes) for shapes in cores) < tiles, (passes, cores)
    assert any(0 in {col for _, col in run} and len(run) == 2 for _, run in runs.tasks.values())  # an edge tile beside an inner one
    np.testing.assert_allclose(shared, output.compute(scheduler="sync"), atol=1.01e-4)

    # A tile with no window in the task's dates (a cloudy one) is left out of its run's task, which does
    # not take its read, and its output is zeros.
    cloudy = replace(one_date, windows={tile: [] if tile == (1, 1) else windows for tile, windows in one_date.windows.items()})
    sparse = superresolve_plan(cloudy, compiled, dates_per_task=1, tiles_per_task=2)
    key, members = sparse.tasks[(0, 1, 0)]
    assert members == [(1, 0)] and [tuple(block[3:]) for block in dict(sparse.output.dask)[key][1]] == [(1, 0)]
    left_out = sparse.output.compute(scheduler="sync")
    (top, bottom), (left, right) = (tuple(4 * edge for edge in span) for span in (plan.rows[1], plan.cols[1]))
    assert not left_out[:, :, top:bottom, left:right].any() and shared[:, :, top:bottom, left:right].any()
    left_out[:, :, top:bottom, left:right] = shared[:, :, top:bottom, left:right]
    np.testing.assert_allclose(left_out, shared, atol=1.01e-4)


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (run on a worker)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class _ReadsHeld(SchedulerPlugin):
    """In the scheduler: each task computed (its key and size), the reads (what super-resolution tasks
    take) and at each super-resolution task's end how many reads are held in memory."""

    name = "sr-batch-reads-held"

    def __init__(self) -> None:
        self.computed: list[tuple[str, int]] = []
        self.reads: set[str] = set()
        self.held: list[int] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start != "processing" or finish != "memory":
            return
        self.computed.append((str(key), self.scheduler.tasks[key].nbytes))
        if key_split(key) == "superresolve":
            self.reads.update(str(dependency.key) for dependency in self.scheduler.tasks[key].dependencies)
            held = [task for task in self.scheduler.tasks.values() if task.state == "memory" and self._is_read(task)]
            self.held.append(len(held))

    def _is_read(self, task: Any) -> bool:
        return str(task.key) in self.reads or any(key_split(dependent.key) == "superresolve" for dependent in task.dependents)


def _reads_held(dask_scheduler: Any) -> tuple[list[tuple[str, int]], list[str], list[int]]:
    plugin = dask_scheduler.plugins[_ReadsHeld.name]
    return plugin.computed, sorted(plugin.reads), plugin.held


def test_each_tile_reads_its_own_window_once_and_a_job_holds_only_the_reads_of_its_tasks_in_flight(tmp_path: Path, stac_url: str, catalog) -> None:
    """A tile's window (the tile and its halo, every day of the job, 4 bands + SCL) is read whole by one
    task of its own, once, and taken by that tile's tasks only: the halo is read again for each window
    that takes it, not cut from the neighbours' reads. So a job holds a read only while its own tile's
    tasks run: on 5 x 5 tiles and 2 workers running a task each, at most the reads of 3 tiles at a
    task's end (cutting the neighbours' halo from shared reads held two rows of tiles: 10-11 of them)."""
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    job = make_job(stac_url, tmp_path / "held.zarr", catalog, time=period, tiling={"tile": 20, "halo": "auto"})
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(_ReadsHeld())
        result = run_job(parse_spec(job), scheduler=cluster.scheduler_address, show_progress=False, echo=lambda _: None, in_flight=2)
        computed, reads, held = client.run_on_scheduler(_reads_held)
    plan = result.plan
    assert len(plan.rows) == len(plan.cols) == 5 and len(held) >= 25
    windows = read_windows(plan)
    assert len({(ys[1] - ys[0], xs[1] - xs[0]) for ys, xs in windows.values()}) > 1
    expected = Counter(len(plan.frame_days) * 5 * (ys[1] - ys[0]) * (xs[1] - xs[0]) * 2 for ys, xs in windows.values())
    times = Counter(key for key, _ in computed)
    assert len(reads) == 25 and all(times[key] == 1 for key in reads), "each window read once"
    assert Counter(size for key, size in computed if key in reads) == expected, "each read is its window, every day, 4 bands + SCL, uint16"
    assert max(held) <= 3, held


@pytest.mark.parametrize("tile, halo", [(20, 18), (24, 18), (20, 4), (100, 18), (7, 18)])
def test_read_windows_are_split_into_cubes_whose_chunks_are_the_windows(tile: int, halo: int) -> None:
    """Windows overlap their neighbours' (and, with a halo wider than a tile, tiles further away): each
    axis's windows go into classes whose windows do not overlap, and each is one chunk of its class's
    axis, the gaps between them chunks of their own."""
    size = 100
    tiles = [(start, min(size, start + tile)) for start in range(0, size, tile)]
    spans = [(max(0, start - halo), min(size, end + halo)) for start, end in tiles]
    classes = tiles_module._disjoint_classes(spans)
    assert sorted(k for members in classes for k in members) == list(range(len(spans)))
    assert len(classes) == max(sum(1 for s, e in spans if s <= x < e) for x in range(size)), "as few classes as windows over one pixel"
    for members in classes:
        chunks, chunk_of = tiles_module._chunks_at(members, [spans[k] for k in members], size)
        assert sum(chunks) == size and min(chunks) > 0
        for k in members:
            start = sum(chunks[: chunk_of[k]])
            assert (start, start + chunks[chunk_of[k]]) == spans[k]


def test_the_tasks_name_follows_everything_they_compute(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """Two jobs on one cluster share task keys only when their tasks are the same: the model, the output,
    the windows and the tiling all change the name; building the same graph again does not."""
    spec = parse_spec(make_job(stac_url, tmp_path / "a.zarr", catalog, time={"start": "2019-07-01", "end": "2019-08-31"}, tiling={"tile": 48}))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    ref = model_ref(spec)

    def name(work: Plan = plan, model: ModelRef = ref, dates: int = 2) -> str:
        return superresolve_plan(work, model, dates_per_task=dates).output.name

    assert name() == name()
    first_tile = next(tile for tile, windows in plan.windows.items() if len(windows) > 1)
    fewer = {**plan.windows, first_tile: plan.windows[first_tile][:-1]}
    other_output = replace(plan, spec=spec.model_copy(update={"output": spec.output.model_copy(update={"uri": str(tmp_path / "b.zarr")})}))
    others = [
        name(model=replace(ref, precision="fp32" if ref.precision != "fp32" else "bf16")),
        name(model=replace(ref, seed=ref.seed + 1)),
        name(work=replace(plan, windows=fewer)),
        name(work=other_output),
        name(dates=1),
    ]
    assert len({name(), *others}) == 1 + len(others)
