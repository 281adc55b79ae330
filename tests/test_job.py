"""End to end: a real STAC API on loopback, a real Dask cluster of processes, a real Zarr store."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rioxarray  # noqa: F401
import torch
import xarray as xr
import zarr
from dask.task_spec import GraphNode
from distributed import Client, LocalCluster, SchedulerPlugin, get_task_stream
from distributed.utils import key_split

from sr_batch import job as job_module
from sr_batch import superres as superres_module
from sr_batch import tiles as tiles_module
from sr_batch.errors import CheckpointError, OutputError
from sr_batch.job import JobResult, TaskLayout, model_ref, plan_job, run_job, task_layout, tasks_in_flight, write_tasks
from sr_batch.manifest import Manifest, grid_record
from sr_batch.sink import check_location
from sr_batch.spec import parse_spec
from sr_batch.tiles import SUPER_RESOLUTION_PREFIX

from conftest import SMALL_MODEL, make_job


@pytest.fixture(scope="module")
def summer(tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog, scheduler: str) -> JobResult:
    """Summer 2019 on 2 x 2 tiles: the job most tests below read."""
    out = tmp_path_factory.mktemp("summer") / "summer.zarr"
    spec = parse_spec(make_job(stac_url, out, catalog))
    return run_job(spec, scheduler=scheduler, show_progress=False)


def open_output(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, decode_coords="all", consolidated=False)


def test_output_dates_are_the_planned_cloudless_dates(summer: JobResult) -> None:
    plan = summer.plan
    assert (len(plan.rows), len(plan.cols)) == (2, 2)
    ds = open_output(summer.output).load()
    planned = [plan.days[d].date for d in plan.output_days]
    written = [dt.date.fromisoformat(str(t)[:10]) for t in ds.time.values]
    assert written == planned and len(written) >= 3
    # Per tile: an output exactly where the tile's cloud score allows it, nodata elsewhere.
    for k, day in enumerate(plan.output_days):
        for (row, col), windows in plan.windows.items():
            expected = any(w.target == day for w in windows)
            assert expected == (plan.cloud[day, row, col] <= 0.05)
            assert (ds.frames_used[k, row, col].item() > 0) == expected
            ys = slice(4 * plan.rows[row][0], 4 * plan.rows[row][1])
            xs = slice(4 * plan.cols[col][0], 4 * plan.cols[col][1])
            block = ds.sr[k, :, ys, xs].values
            if expected:
                assert np.isfinite(block).mean() > 0.9
            else:
                assert np.isnan(block).all()
    # Some (tile, date) pairs must be cloudy, or the test above proves little.
    assert any(plan.cloud[d].max() > 0.05 for d in plan.output_days) or any((plan.cloud[:, r, c] > 0.05).any() for r in range(2) for c in range(2))


def test_output_is_float_reflectance_stored_as_uint16(summer: JobResult) -> None:
    ds = open_output(summer.output)
    assert ds.sr.encoding["dtype"] == np.uint16
    assert ds.sr.encoding["scale_factor"] == pytest.approx(1e-4)
    values = ds.sr.values
    assert np.issubdtype(values.dtype, np.floating)  # Zarr attributes are JSON: CF decoding gives float64
    finite = values[np.isfinite(values)]
    assert finite.min() >= 1e-4 and finite.max() <= 6.5535
    assert list(ds.band.values) == ["blue", "green", "red", "nir"]
    assert list(ds.sentinel2_band.values) == ["B02", "B03", "B04", "B08"]
    assert ds.attrs["model_trained"] is False and len(ds.attrs["model_sha256"]) == 64
    ids = ds.source_items.values
    assert all(i.startswith("S2_L2A_RO_SAMPLE_") for i in ids)
    codecs = zarr.open_array(summer.output / "sr", mode="r").metadata.codecs
    assert [c.to_dict()["name"] for c in codecs] == ["bytes", "blosc"] and codecs[1].shuffle.value == "shuffle" and codecs[1].cname.value == "lz4"


def test_georeferencing_nests_2_5m_pixels_in_the_10m_input_grid(summer: JobResult, source_cube: xr.Dataset) -> None:
    ds = open_output(summer.output)
    assert ds.rio.crs.to_epsg() == 3035
    assert ds.sizes["x"] == 4 * source_cube.sizes["x"] and ds.sizes["y"] == 4 * source_cube.sizes["y"]
    # Pixel centres: every 4 x 4 block of output pixels centres on one input pixel centre.
    np.testing.assert_allclose(ds.x.values.reshape(-1, 4).mean(axis=1), source_cube.x.values, atol=1e-6)
    np.testing.assert_allclose(ds.y.values.reshape(-1, 4).mean(axis=1), source_cube.y.values, atol=1e-6)
    assert np.allclose(np.diff(ds.x.values), 2.5) and np.allclose(np.diff(ds.y.values), -2.5)
    transform = ds.rio.transform()
    assert transform.a == pytest.approx(2.5) and transform.e == pytest.approx(-2.5)
    assert transform.c == pytest.approx(float(source_cube.x[0]) - 5.0)
    assert transform.f == pytest.approx(float(source_cube.y[0]) + 5.0)


def test_windows_are_causal_and_cloudless(summer: JobResult) -> None:
    plan = summer.plan
    for (row, col), windows in plan.windows.items():
        for window in windows:
            assert window.frames[-1] == window.target
            assert list(window.frames) == sorted(window.frames) and len(window.frames) <= 8
            assert all(plan.cloud[f, row, col] <= 0.05 for f in window.frames)
            # The window is the most recent cloudless days: none skipped between its first frame and the target.
            clear = [d for d in range(window.frames[0], window.target + 1) if plan.cloud[d, row, col] <= 0.05]
            assert tuple(clear) == window.frames
    ds = open_output(summer.output)
    starts = ds.window_start.values
    times = ds.time.values[:, None, None]
    assert (starts[~np.isnat(starts)] <= np.broadcast_to(times, starts.shape)[~np.isnat(starts)]).all()


def test_later_dates_never_change_earlier_outputs(summer: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """The same job ending a month earlier gives bit-identical outputs for the dates both have."""
    spec = parse_spec(make_job(stac_url, tmp_path / "short.zarr", catalog, time={"start": "2019-05-01", "end": "2019-07-31"}))
    short = run_job(spec, scheduler=scheduler, show_progress=False)
    full, part = open_output(summer.output), open_output(short.output)
    assert 0 < part.sizes["time"] < full.sizes["time"]
    common = full.sel(time=part.time)
    np.testing.assert_array_equal(common.sr.values, part.sr.values)


def test_history_days_give_the_first_dates_their_earlier_frames_and_no_output_of_their_own(
    summer: JobResult, tmp_path: Path, stac_url: str, catalog, scheduler: str, capsys
) -> None:
    """A job from July with 61 days of history (back to May) writes for its dates exactly what the
    May–August job wrote for them: the same windows, reaching into June, and the same pixels. The
    history's dates get no output; without the history the first July dates have fewer frames."""
    july = np.datetime64("2019-07-01")
    history = parse_spec(make_job(stac_url, tmp_path / "july.zarr", catalog, time={"start": "2019-07-01", "end": "2019-08-31", "history_days": 61}))
    late = run_job(history, scheduler=scheduler, show_progress=False)
    assert re.search(r"\(history: [1-9]\d* solar days before 2019-07-01, frames only\)", capsys.readouterr().out)
    full, part = open_output(summer.output), open_output(late.output)
    expected = full.sel(time=full.time >= july)
    np.testing.assert_array_equal(part.time.values, expected.time.values)
    assert (expected.window_start.values < july).any(), "some July window reaches back into June: the history is used"
    for name in ("sr", "frames_used", "window_start"):
        np.testing.assert_array_equal(part[name].values, expected[name].values, err_msg=name)

    plain = parse_spec(make_job(stac_url, tmp_path / "plain.zarr", catalog, time={"start": "2019-07-01", "end": "2019-08-31"}))
    windows = plan_job(plain, scheduler, echo=lambda _: None).windows
    first = {tile: ws[0] for tile, ws in windows.items() if ws}
    used = part.frames_used.sel(time=part.time[0]).values
    assert all(len(window.frames) == 1 for window in first.values()) and used.max() > 1, used

    # The history decides pixels: an output is extended only with the history it was made with.
    shorter = parse_spec(make_job(stac_url, tmp_path / "july.zarr", catalog, time={"start": "2019-07-01", "end": "2019-08-31", "history_days": 30}))
    with pytest.raises(OutputError, match=r"other settings \(time.history_days: 61 → 30\)"):
        run_job(shorter, scheduler=scheduler, show_progress=False)


def test_all_cloudy_period_writes_an_empty_in_time_output(tmp_path: Path, stac_url: str, catalog, scheduler: str, source_cube: xr.Dataset, capsys) -> None:
    cloudy = np.isin(source_cube.SCL.values, (0, 1, 3, 8, 9, 10)).mean(axis=(1, 2))
    day = str(source_cube.time.values[int(np.argmax(cloudy > 0.9))])[:10]
    spec = parse_spec(make_job(stac_url, tmp_path / "cloudy.zarr", catalog, time={"start": day, "end": day}))
    result = run_job(spec, scheduler=scheduler, show_progress=False)
    assert "No cloudless date" in capsys.readouterr().out
    ds = open_output(result.output)
    assert ds.sizes["time"] == 0
    assert ds.sr.shape == (0, 4, 400, 400)
    assert ds.rio.crs.to_epsg() == 3035


def test_each_task_is_submitted_with_its_own_tiles_graph_only(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """A job submits its tasks one at a time; with the whole region's graph every submission would make
    Dask cull that graph again, and the client's time would grow with the square of the tasks. Each
    task carries only its tile's work, refers to its own tile's read, and keeps the GPU annotation."""
    spec = parse_spec(make_job(stac_url, tmp_path / "graphs.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}, tiling={"tile": 20, "halo": 18}))
    plan = plan_job(spec, scheduler, echo=lambda _: None)
    manifest = Manifest(model_sha256="-", settings={}, grid=grid_record(plan.grid), rows=[list(r) for r in plan.rows], cols=[list(c) for c in plan.cols])
    manifest.times.extend(plan.days[d].date.isoformat() for d in plan.output_days)
    tasks = write_tasks(check_location(str(tmp_path / "graphs.zarr")), plan, manifest, model_ref(spec), gpu_workers_only=True, per_task=2)
    assert len(plan.rows) * len(plan.cols) >= 16 and len(plan.output_days) >= 3
    whole = sum(len(task.dask) for per_tile in tasks.per_unit.values() for task in per_tile)
    for (_, row, col), per_tile in tasks.per_unit.items():
        for task in per_tile:
            graph = dict(task.dask)
            # Keys of a tile's work end in its (row, col); the reads may be its neighbours'.
            places = {tuple(key[-2:]) for key in graph if isinstance(key, tuple) and len(key) >= 4}
            assert all(abs(r - row) < 2 and abs(c - col) < 2 for r, c in places), ((row, col), sorted(places))
            gpu = [layer.annotations for name, layer in task.dask.layers.items() if name.startswith("superresolve")]
            assert gpu == [{"resources": {"GPU": 1}}]
    assert whole < 40 * sum(len(per_tile) for per_tile in tasks.per_unit.values())
    # A unit's reads are its tiles' windows (here one tile's), each read whole by a task of its own from the
    # assets (a few tasks of stackstac's), no other unit's: submitted with the unit's first task, which
    # refers to them without carrying their graphs.
    read_keys = {unit: {read.key for read in reads} for unit, reads in tasks.reads.items()}
    assert read_keys.keys() == tasks.per_unit.keys() and all(len(keys) == 1 for keys in read_keys.values())
    assert len(set().union(*read_keys.values())) == len(read_keys)
    assert all(len(dict(read.dask)) <= 8 for reads in tasks.reads.values() for read in reads)
    for unit, per_tile in tasks.per_unit.items():
        for task in per_tile:
            graph = dict(task.dask)
            assert not read_keys[unit] & graph.keys()
            referred = {key for node in graph.values() if isinstance(node, GraphNode) for key in node.dependencies} - graph.keys()
            assert referred == read_keys[unit]


class _AskedWorkers(SchedulerPlugin):
    """In the scheduler: the workers each super-resolution task was asked to run on, and where it ran;
    and, as each was sent to its worker, how many super-resolution tasks that worker then held."""

    name = "sr-batch-test-asked-workers"

    def __init__(self) -> None:
        self.tasks: list[tuple[list[str], bool, str]] = []
        self.held: list[int] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "processing" and key_split(key) == SUPER_RESOLUTION_PREFIX:
            task = self.scheduler.tasks[key]
            self.tasks.append((sorted(task.worker_restrictions or ()), task.loose_restrictions, task.processing_on.address))
            self.held.append(sum(1 for other in task.processing_on.processing if key_split(other.key) == SUPER_RESOLUTION_PREFIX))


def _asked_and_held(dask_scheduler: Any) -> tuple[list[tuple[list[str], bool, str]], list[int]]:
    plugin = dask_scheduler.plugins[_AskedWorkers.name]
    return plugin.tasks, plugin.held


def test_a_jobs_tasks_are_spread_over_the_workers_not_queued_where_their_reads_are(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """A super-resolution task's one input is its tile's read block, and Dask puts a task whose inputs
    are on one worker there, however busy that worker is: a small job could queue most of its tasks on
    one worker while another had none. Each task is asked for the worker with the fewest of the job's
    tasks in flight per slot, as a preference (a task whose worker left runs elsewhere). And a worker
    holds one task per slot, no more: it hears of a task's write only once the task is done, and would
    first run the next task it held, so each write (and the job's count of the worker's tasks) lagged a
    whole task behind and the next tasks went to the other worker. A worker is given the next task of
    a tile it has read, so a tile's read block does not travel between workers."""
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    spec = parse_spec(make_job(stac_url, tmp_path / "spread.zarr", catalog, time=period, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": 24}))
    with Client(scheduler) as client:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        client.register_plugin(_AskedWorkers())
        fetched_before = client.run(_read_blocks_fetched)
        try:
            with get_task_stream(client=client) as stream:
                result = run_job(spec, scheduler=scheduler, show_progress=False)
            tasks, held = client.run_on_scheduler(_asked_and_held)
        finally:
            client.unregister_scheduler_plugin(_AskedWorkers.name)
        fetched = {worker: blocks[len(fetched_before.get(worker, [])) :] for worker, blocks in client.run(_read_blocks_fetched).items()}
    assert len(workers) == 2 and len(tasks) == result.written_tiles * -(-len(result.plan.output_days) // result.task_dates) >= 16
    assert all(len(asked) == 1 and loose for asked, loose, _ in tasks), tasks
    asked = Counter(asked[0] for asked, _, _ in tasks)
    assert sorted(asked) == workers and min(asked.values()) >= len(tasks) // 4, asked
    assert {ran for _, _, ran in tasks} == set(workers)
    assert max(held) == 1, f"a worker held up to {max(held)} super-resolution tasks at once (one slot each)"
    # Each worker keeps the tiles it read (job.TaskOrder): of 16 tiles on 2 workers, at most the last
    # tile's read travels, where a worker that ran out of tiles shares it (taken in plain order, every
    # tile's read travelled to the other worker, 16 of 16).
    assert result.written_tiles >= 2 * len(workers) and sum(map(len, fetched.values())) <= 1, fetched
    # The tables every read of a time slab takes (stackstac's assets and readers: one of each per slab, and
    # the cloud scores' own) are computed once each: released with a tile's read, they were computed again
    # for later tiles' reads, behind another task.
    tables = Counter(str(record["key"]) for record in stream.data if key_split(record["key"]) in ("asset-table", "asset_table_to_reader_and_window"))
    assert tables and set(tables.values()) == {1}, tables


def _read_blocks_fetched(dask_worker: Any) -> list[str]:
    """In a worker: the read blocks it has fetched from other workers, oldest first."""
    return [str(key) for transfer in dask_worker.transfer_incoming_log for key in transfer["keys"] if key_split(key) == "fetch_raster_window"]


@dataclass
class _HeldJob:
    cluster: LocalCluster
    client: Client
    running: Future
    lines: list[str]
    release: Path
    spec: Any


@contextlib.contextmanager
def _a_job_held_after_its_first_task(tmp_path: Path, stac_url: str, catalog, monkeypatch: pytest.MonkeyPatch, workers: int) -> Iterator[_HeldJob]:
    """A job of 32 small tasks on a LocalCluster of `workers` single-threaded processes, run in a thread
    that holds after its first task (SR_BATCH_TEST_HOLD_UNTIL) until `release` exists, and looks at the
    cluster's workers after every task; the scheduler records where each task was asked for and ran."""
    release = tmp_path / "release"
    monkeypatch.setenv("SR_BATCH_TEST_HOLD_UNTIL", str(release))
    monkeypatch.setattr(job_module, "WORKERS_LOOK_S", 0.0)
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    spec = parse_spec(make_job(stac_url, tmp_path / "held.zarr", catalog, time=period, cloud={"max_cloud_fraction": 1.0}, tiling={"tile": 24}))
    lines: list[str] = []
    options = {"threads_per_worker": 1, "processes": True, "dashboard_address": "127.0.0.1:0", "env": {"SR_BATCH_TORCH_THREADS": "1"}}
    with LocalCluster(n_workers=workers, **options) as cluster, Client(cluster) as client, ThreadPoolExecutor(1) as pool:
        client.register_plugin(_AskedWorkers())
        running = pool.submit(run_job, spec, scheduler=cluster.scheduler_address, show_progress=False, echo=lines.append)
        try:
            while not any(line.startswith("Computing") for line in lines) and not running.done():  # the job has sized its window
                time.sleep(0.1)
            yield _HeldJob(cluster, client, running, lines, release, spec)
        finally:
            release.touch()  # a failed test must not leave the job held, and the pool waiting for it


def _started(ref: Any, href: str) -> None:
    """In a worker: what its first task would start, the network and the reading of an asset."""
    import rasterio

    superres_module.warm_up(ref)
    with rasterio.open(href) as dataset:
        dataset.crs.to_epsg()
        dataset.read(1, window=((0, 8), (0, 8)))


def test_a_cpu_job_gives_tasks_to_a_worker_that_joins_while_it_runs(tmp_path: Path, stac_url: str, catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster scaled up while a job runs, or workers of a batch queue arriving one by one: a job that
    started on one worker keeps one task per slot of the workers there now, so the newcomer is asked for
    tasks of its own instead of waiting for work to steal. The job is held after its first task until
    the second worker has joined."""
    with _a_job_held_after_its_first_task(tmp_path, stac_url, catalog, monkeypatch, workers=1) as job:
        (first,) = job.client.scheduler_info(n_workers=-1)["workers"]
        assert "up to 1 at once" in job.lines[-1], job.lines[-1]
        job.cluster.scale(2)
        job.client.wait_for_workers(2, timeout=120)
        # A new process's start (PyTorch, the network, GDAL and PROJ at its first read) is its own cost,
        # seconds on 2 shared cores against these tiny tasks: what is checked is how the job shares its
        # tasks once the newcomer can run them.
        (newcomer,) = set(job.client.scheduler_info(n_workers=-1)["workers"]) - {first}
        job.client.run(_started, model_ref(job.spec), catalog.items[0]["assets"]["red"]["href"], workers=[newcomer])
        job.release.touch()
        result = job.running.result(timeout=600)
        tasks, held = job.client.run_on_scheduler(_asked_and_held)
    (joined,) = {ran for _, _, ran in tasks} - {first}
    asked = Counter(asked[0] for asked, _, _ in tasks)
    assert len(tasks) == result.written_tiles * -(-len(result.plan.output_days) // result.task_dates) >= 16
    # The newcomer is asked for one of the first tasks once it has joined, and from then on the two
    # share the rest, a task per slot each. Its first task is of a tile no worker has read (job.TaskOrder),
    # so it starts once the newcomer has read that tile, while the first worker may start one more.
    ran = [worker for _, _, worker in tasks]
    assert joined in ran[1:4], ran
    assert ran[1:].count(joined) >= (len(ran) - 1) // 3, (asked, ran)
    assert max(held) == 1, f"a worker held up to {max(held)} super-resolution tasks at once (one slot each)"
    assert any(line.startswith("Workers changed: 2 now run super-resolution (2 slots), up to 2 tasks at once") for line in job.lines), job.lines


def test_a_cpu_job_whose_worker_leaves_finishes_on_the_others_and_asks_no_task_of_it(
    tmp_path: Path, stac_url: str, catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker retired while a job runs (a cluster scaled down, a batch-queue worker out of time): the
    job's window shrinks to the slots left, no later task is asked for the worker that left, and the
    job writes every tile."""
    with _a_job_held_after_its_first_task(tmp_path, stac_url, catalog, monkeypatch, workers=2) as job:
        assert "up to 2 at once" in job.lines[-1], job.lines[-1]
        while not job.client.run_on_scheduler(_asked_and_held)[0]:  # a first task is running: the job holds once it is done
            time.sleep(0.1)
        leaving = sorted(job.client.scheduler_info(n_workers=-1)["workers"])[0]
        job.client.retire_workers([leaving])
        before = len(job.client.run_on_scheduler(_asked_and_held)[0])
        job.release.touch()
        result = job.running.result(timeout=600)
        tasks, _ = job.client.run_on_scheduler(_asked_and_held)
    expected = result.written_tiles * -(-len(result.plan.output_days) // result.task_dates)
    assert expected <= len(tasks) <= expected + 1 and expected >= 16  # + the task the retired worker was running, run again
    assert result.written_tiles == len(result.plan.windows)
    after = tasks[before:]
    assert after and all(ran != leaving for _, _, ran in after), after
    # None asked for it, but the task it may have been running, asked for before it left and started again elsewhere.
    assert sum(asked == [leaving] for asked, _, _ in after) <= 1, after
    assert any(line.startswith("Workers changed: 1 now run super-resolution (1 slot), up to 1 task at once") for line in job.lines), job.lines


def test_task_spread_asks_for_the_worker_with_the_fewest_tasks_in_flight_per_slot() -> None:
    spread = job_module.TaskSpread({"a": 1, "b": 2})
    asked = [spread.place(k)["workers"][0] for k in range(6)]
    assert Counter(asked) == {"a": 2, "b": 4}
    spread.done(asked.index("a"))
    assert spread.place(6) == {"workers": ["a"], "allow_other_workers": True}
    assert job_module.TaskSpread({}).place(7) == {}
    # One task per slot is kept submitted; without workers to spread over, the job's window.
    assert spread.window(10) == 3 and spread.window(2) == 2 and job_module.TaskSpread({}).window(10) == 10


def test_task_order_keeps_a_workers_tasks_on_the_tiles_it_read_and_shares_only_the_last() -> None:
    """A free worker takes the next task of a unit it reads, else starts the next unit, else shares the
    earliest unit with tasks left; without a worker (GPU jobs), tasks go in plain order."""
    first, second, third = (0, 0, 0), (0, 0, 1), (0, 1, 0)
    per_unit: dict[Any, list[Any]] = {third: ["t5"], first: ["t0", "t1", "t2"], second: ["t3", "t4"]}
    order = job_module.TaskOrder(per_unit)
    assert order.count == 6 and order.first_task == {first: 0, second: 3, third: 5}
    taken = [order.take(worker) for worker in ["a", "b", "a", "a", "a", "a"]]
    assert taken == [(0, first, "t0"), (3, second, "t3"), (1, first, "t1"), (2, first, "t2"), (5, third, "t5"), (4, second, "t4")]
    assert order.take("b") is None
    plain = job_module.TaskOrder(per_unit)
    assert [plain.take() for _ in range(7)] == [(k, unit, f"t{k}") for k, unit in enumerate([first] * 3 + [second] * 2 + [third])] + [None]
    assert plain.units_after(first, 1) == [second] and plain.units_after(second, 5) == [third]


def test_a_compiled_model_keeps_whole_batches_and_every_slot_fed(summer: JobResult) -> None:
    """A small region's eager tasks split their dates so that every slot has a task; a compiled pass is
    padded to a full batch, so a compiled model's tasks keep whole batches. Either way the job keeps
    enough tasks in flight for all the cluster's slots (here 16: eight GPUs of two)."""
    plan, slots = summer.plan, 16
    eager = plan.spec.model.model_copy(update={"batch_size": 4})
    compiled = eager.model_copy(update={"compile": "max-autotune"})
    assert len(plan.windows) < slots and len(plan.output_days) >= 4
    assert task_layout(plan, eager, slots).dates < 4
    assert task_layout(plan, compiled, slots) == TaskLayout(4, 1, tasks_in_flight(slots))
    assert task_layout(plan, eager, slots).in_flight == tasks_in_flight(slots)
    assert task_layout(plan, compiled, slots, task_dates=2, in_flight=3) == TaskLayout(2, 1, 3)


def test_gpu_tasks_of_few_dates_take_runs_of_tiles_while_every_slot_has_one(summer: JobResult) -> None:
    """A task of fewer dates than a batch takes several tiles of a row on GPU workers (a power of two,
    up to a batch of windows), never on CPU workers, and never so many that a slot is left without a task."""
    plan = summer.plan
    model = plan.spec.model.model_copy(update={"batch_size": 8})
    one_date = replace(plan, windows={tile: windows[-1:] for tile, windows in plan.windows.items()})
    tiles = sum(1 for windows in one_date.windows.values() if windows)
    assert len(one_date.output_days) == 1 and len(plan.cols) >= 2 and tiles >= 4
    widest = min(8, 1 << (len(plan.cols).bit_length() - 1))  # the widest power of two within a row
    assert task_layout(one_date, model, 1, on_gpu=True).tiles == widest
    assert task_layout(one_date, model, 1, on_gpu=False).tiles == 1
    assert task_layout(one_date, model, 1, task_dates=3, on_gpu=True).tiles == 2  # 3 dates x 2 tiles fill 6 of 8
    assert task_layout(one_date, model, tiles, on_gpu=True).tiles == 1  # as many slots as tiles: one tile each
    # As many tiles as fit a running task's share of memory, and fewer runs in flight than tiles would be.
    one, two = (job_module.task_memory_bytes(one_date, 1, on_gpu=True, tiles=tiles) / job_module.MEMORY_SHARE for tiles in (1, 2))
    assert one < two
    fits_two = task_layout(one_date, model, 1, on_gpu=True, memory_limit=two)
    assert fits_two.tiles == 2 and fits_two.in_flight == max(2, -(-tasks_in_flight(1) // 2)) < tasks_in_flight(1)
    assert task_layout(one_date, model, 1, on_gpu=True, memory_limit=one) == TaskLayout(1, 1, tasks_in_flight(1))


def test_a_cpu_task_estimate_counts_a_whole_window_where_one_exceeds_the_pass_budget(summer: JobResult, monkeypatch) -> None:
    """A CPU pass takes at least one window, however large (superres.windows_per_device_pass): a 512 px tile's
    window needs more than CPU_PASS_BYTES, and its task's estimate must count all of it."""
    plan = summer.plan
    height, width = tiles_module._largest_read(plan)
    one_window = superres_module.window_activation_bytes(torch.device("cpu"), 64, plan.spec.model.frames, height, width)
    monkeypatch.setattr(superres_module, "CPU_PASS_BYTES", one_window / 2)
    assert tiles_module.task_memory_bytes(plan, 2) - tiles_module.task_memory_bytes(plan, 1) < one_window, "two windows would exceed the budget: one per pass"
    assert tiles_module.task_memory_bytes(plan, 1) > one_window


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal where no CUDA device is visible")
def test_device_cuda_is_asked_of_the_workers_that_would_run_the_network(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """A laptop submits to a GPU cluster: with --scheduler, `model.device: cuda` is checked on the workers,
    not on the client. None of these sees a GPU, so the run and the dry run are refused in one line that
    says so, before the store is made; without --scheduler the check is this machine's, before any cluster."""
    out = tmp_path / "cuda.zarr"
    spec = parse_spec(make_job(stac_url, out, catalog, model={**SMALL_MODEL, "device": "cuda"}))
    on_workers = r"model.device: cuda was asked for but \d+ of the \d+ workers that would run the network see no CUDA device \(first: tcp://"
    with pytest.raises(CheckpointError, match=on_workers):
        run_job(spec, scheduler=scheduler, show_progress=False, echo=lambda _: None)
    with pytest.raises(CheckpointError, match=on_workers):
        plan_job(spec, scheduler=scheduler, echo=lambda _: None)
    assert not (out / "zarr.json").exists()
    with pytest.raises(CheckpointError, match="model.device: cuda was asked for but no CUDA device is visible"):
        run_job(spec, show_progress=False, echo=lambda _: None)
