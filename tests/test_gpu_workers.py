"""GPU workers: super-resolution tasks go only to workers that advertise the `GPU` resource, and the
restriction survives Dask's graph optimisation (it is checked where the scheduler applies it, and where
the tasks really ran). No GPU is needed: the resource is what Dask schedules on; here the "GPU worker"
is a real worker process, added the way a LocalCluster on a CUDA machine adds one, that runs on CPU.
The CUDA path itself is in test_cuda.py (skipped without a CUDA device)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr
from distributed import Client, LocalCluster, get_task_stream
from distributed.diagnostics.plugin import SchedulerPlugin

from sr_batch.cluster import GPU_SLOTS, _add_gpu_workers, gpu_workers
from sr_batch.job import JobResult, run_job, tasks_in_flight
from sr_batch.manifest import Manifest
from sr_batch.spec import parse_spec
from sr_batch.tiles import TILE_TOPIC, tasks_sharing_the_device

from conftest import SMALL_MODEL, make_job


class RecordRestrictions(SchedulerPlugin):
    """Records, on the scheduler, the restrictions of every super-resolution task it sees: its resources,
    the workers it was asked for, and whether others are allowed."""

    name = "record-restrictions"

    def __init__(self) -> None:
        self.restrictions: dict[str, dict] = {}

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if "superresolve" in str(key) and key in self.scheduler.tasks:
            task = self.scheduler.tasks[key]
            workers = sorted(task.worker_restrictions or ())
            self.restrictions[str(key)] = {"resources": dict(task.resource_restrictions or {}), "workers": workers, "loose": task.loose_restrictions}


def _restrictions(dask_scheduler) -> dict[str, dict]:
    return dask_scheduler.plugins[RecordRestrictions.name].restrictions


def _forget(dask_scheduler) -> None:
    dask_scheduler.plugins[RecordRestrictions.name].restrictions.clear()


def _model_loads() -> tuple[int, int]:
    """(models loaded, loads answered from the process's cache) in this process (run on a worker)."""
    from sr_batch.superres import _runner_cached

    info = _runner_cached.cache_info()
    return info.misses, info.hits


def test_superresolution_runs_on_gpu_workers_only(tmp_path: Path, stac_url: str, catalog) -> None:
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", env={"SR_BATCH_TORCH_THREADS": "1"}) as cluster:
        _add_gpu_workers(cluster, 1, 2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            gpu = gpu_workers(client)
            assert len(gpu) == 1
            client.register_plugin(RecordRestrictions())
            lines: list[str] = []
            job = make_job(stac_url, tmp_path / "gpu.zarr", catalog, time=period, tiling={"tile": 32, "halo": 18})
            with get_task_stream(client=client) as stream:
                result = run_job(parse_spec(job), scheduler=cluster.scheduler_address, show_progress=False, echo=lines.append)
            restricted = client.run_on_scheduler(_restrictions)
            events = [event for _, event in client.get_events(TILE_TOPIC) if event["output"] == str(result.output)]
            loads = client.run(_model_loads)

            # model.device: cpu spreads super-resolution over every worker: no restriction is attached.
            client.run_on_scheduler(_forget)
            model = {"checkpoint": "untrained", "device": "cpu", "architecture": {"hidden_channels": 16, "encoder_blocks": 2}}
            job = make_job(stac_url, tmp_path / "cpu.zarr", catalog, time=period, tiling={"tile": 32, "halo": 18}, model=model)
            run_job(parse_spec(job), scheduler=cluster.scheduler_address, show_progress=False, echo=lambda _: None)
            unrestricted = client.run_on_scheduler(_restrictions)
            # The tasks that run at once on a worker's GPU share its memory budget: read from the worker's resource.
            addresses = client.scheduler_info(n_workers=-1)["workers"]
            sharing = {address: client.submit(tasks_sharing_the_device, workers=[address], pure=False).result() for address in addresses}

    tasks = len(result.plan.rows) * len(result.plan.cols)
    assert tasks >= 9
    # The GPU resource alone: a task asked for one worker but allowed others could end up on a CPU worker.
    assert len(restricted) >= tasks and all(r == {"resources": {"GPU": 1}, "workers": [], "loose": False} for r in restricted.values()), restricted
    assert len(events) >= tasks and {event["worker"] for event in events} == set(gpu)
    assert sum(event["dates"] for event in events) == result.plan.tile_dates
    assert any("GPU worker" in line for line in lines)
    assert any("100%" in line for line in lines), lines  # the per-tile progress reached its end
    # On CPU workers each task asks for one worker (job.TaskSpread), any other allowed.
    assert len(unrestricted) >= tasks and all(r["resources"] == {} and len(r["workers"]) == 1 and r["loose"] for r in unrestricted.values()), unrestricted
    assert sharing == {address: GPU_SLOTS if address in gpu else 1 for address in sharing} and GPU_SLOTS > 1
    # The model was loaded once on the GPU worker, and only there, and every tile task there reused it.
    assert {address: misses for address, (misses, _) in loads.items()} == {address: int(address in gpu) for address in loads}, loads
    assert loads[gpu[0]][1] >= tasks
    # It was run there once before the first tile began (the warm-up).
    started = {str(record["key"]): (record["worker"], min(span["start"] for span in record["startstops"])) for record in stream.data}
    warm_ups = [at for key, at in started.items() if key.startswith("sr-batch-warm-up")]
    first_tile = min(start for key, (_, start) in started.items() if "superresolve" in key)
    assert [worker for worker, _ in warm_ups] == gpu and warm_ups[0][1] < first_tile, (warm_ups, first_tile)
    assert tasks_sharing_the_device() == 1  # outside a worker
    with xr.open_zarr(result.output, consolidated=False) as ds:
        assert ds.sizes["time"] == len(result.plan.output_days) > 0


def test_a_gpu_job_reads_tiles_as_the_gpu_takes_them_and_each_only_once(tmp_path: Path, stac_url: str, catalog) -> None:
    """With the network on one worker, the others could read the whole region ahead of it and the GPU
    worker would gather every task's input: memory would grow with the region. The job keeps a window
    of tasks in flight instead, and holds each read block until the tiles that take their halo from it
    are done, so that no block is read twice."""
    period = {"start": "2019-07-01", "end": "2019-07-31"}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", env={"SR_BATCH_TORCH_THREADS": "1"}) as cluster:
        _add_gpu_workers(cluster, 1, 2)
        with Client(cluster) as client, get_task_stream(client=client) as stream:
            client.wait_for_workers(2, timeout=60)
            lines: list[str] = []
            job = make_job(stac_url, tmp_path / "gpu.zarr", catalog, time=period, tiling={"tile": 20, "halo": 18})
            run_job(parse_spec(job), scheduler=cluster.scheduler_address, show_progress=False, echo=lines.append)
            records = stream.data
    # A task's record repeats the compute spans of its earlier runs: one read is one (key, start).
    computed = {(str(record["key"]), span["start"], span["stop"]) for record in records for span in record["startstops"] if span["action"] == "compute"}
    reads = [(key, start) for key, start, _ in computed if "fetch_raster_window" in key]
    writes = [(start, stop) for key, start, stop in computed if "write-sr" in key]
    limit = tasks_in_flight(GPU_SLOTS)
    (tasks,) = [int(line.split()[1]) for line in lines if line.startswith("Computing")]
    assert f"up to {limit} at once" in "".join(lines) and limit < tasks == len(writes), (limit, tasks, len(writes))
    read_keys = [key for key, _ in reads]
    assert len(read_keys) == len(set(read_keys)), "a tile's block was read more than once"
    first_write_done = min(stop for _, stop in writes)
    assert max(start for _, start in reads) > first_write_done, "every tile was read before the first was written"


@contextlib.contextmanager
def _a_cpu_and_a_gpu_worker() -> Iterator[tuple[str, Client]]:
    """A cluster of one CPU worker and one "GPU" worker (2 slots), as a LocalCluster on a CUDA machine adds one: its address and a client."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0", env={"SR_BATCH_TORCH_THREADS": "1"}) as cluster:
        _add_gpu_workers(cluster, 1, 2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            yield cluster.scheduler_address, client


NIGHTLY_PERIOD = {"start": "2019-07-01", "end": "2019-07-31"}


def _all_on_cpus_then_all_but_the_last_date(tmp_path: Path, stac_url: str, catalog, address: str) -> tuple[JobResult, dt.date, dict]:
    """The reference (the whole period at once on CPU workers, one tile per task) and a GPU job run up to
    the day before the period's last date: its next run of the whole period is a nightly run of one date.
    Every tile has every date (no cloud limit), 20 px tiles."""
    tiling, cloud = {"tile": 20, "halo": 18}, {"max_cloud_fraction": 1.0}
    on_cpus = make_job(stac_url, tmp_path / "cpu.zarr", catalog, time=NIGHTLY_PERIOD, tiling=tiling, cloud=cloud, model={**SMALL_MODEL, "device": "cpu"})
    whole = run_job(parse_spec(on_cpus), scheduler=address, show_progress=False, echo=lambda _: None)
    last = whole.plan.days[max(whole.plan.output_days)].date
    before_last = {**NIGHTLY_PERIOD, "end": (last - dt.timedelta(days=1)).isoformat()}
    nightly = make_job(stac_url, tmp_path / "gpu.zarr", catalog, time=before_last, tiling=tiling, cloud=cloud)
    run_job(parse_spec(nightly), scheduler=address, show_progress=False, echo=lambda _: None)
    return whole, last, nightly


def test_a_nightly_date_goes_to_the_gpu_in_tasks_of_several_tiles_that_share_passes(tmp_path: Path, stac_url: str, catalog) -> None:
    """A nightly run adds one date: a task of one tile would pass one window at a time, a small share of
    what a GPU computes at once. On GPU workers such a job's tasks take a run of tiles of a row, as many
    as fill a batch (4 here), and their windows go through the network together. The output is the one
    an all-at-once run on CPU workers writes (one tile per task), and every tile's date is recorded."""
    with _a_cpu_and_a_gpu_worker() as (address, client):
        whole, last, nightly = _all_on_cpus_then_all_but_the_last_date(tmp_path, stac_url, catalog, address)
        lines: list[str] = []
        earlier = len(client.get_events(TILE_TOPIC))
        added = run_job(parse_spec({**nightly, "time": NIGHTLY_PERIOD}), scheduler=address, show_progress=False, echo=lines.append)
        events = [event for _, event in client.get_events(TILE_TOPIC)[earlier:]]
        again = run_job(parse_spec({**nightly, "time": NIGHTLY_PERIOD}), scheduler=address, show_progress=False, echo=lambda _: None)

    tiles = [tile for tile, windows in added.plan.windows.items() if any(added.plan.days[w.target].date == last for w in windows)]
    assert added.added_dates == [last] and added.task_dates == 1 and added.task_tiles == 4
    assert any(line.startswith("Memory:") and "task (1 date of 4 tiles)" in line for line in lines), lines
    assert added.written_windows == len(tiles) >= 16
    (tasks,) = [int(line.split()[1]) for line in lines if line.startswith("Computing")]
    shared = [event for event in events if len(event["tiles"]) > 1]
    assert tasks < len(tiles) and shared and max(len(event["tiles"]) for event in events) == 4, [event["tiles"] for event in events]
    assert len(events) == tasks and sum(event["dates"] for event in events) == len(tiles)
    assert sorted(tuple(tile) for event in events for tile in event["tiles"]) == sorted(tiles)
    assert again.written_windows == 0  # every tile's date was recorded: nothing is computed again
    with xr.open_zarr(whole.output, consolidated=False) as expected, xr.open_zarr(added.output, consolidated=False) as got:
        assert list(got.time.values) == list(expected.time.values)
        np.testing.assert_allclose(got.sr.values, expected.sr.values, atol=1.01e-4, equal_nan=True)


def test_a_nightly_run_of_tiles_killed_midway_resumes_to_the_same_output(tmp_path: Path, stac_url: str, catalog) -> None:
    """The client of a nightly run whose GPU tasks take runs of tiles is SIGKILLed once 5 windows are
    recorded (a run records its tiles together); the next run computes only the tiles not recorded,
    in runs of those alone, and the output is the one an uninterrupted run writes."""
    from test_nightly import cli_run, write_job

    with _a_cpu_and_a_gpu_worker() as (address, client):
        whole, last, nightly = _all_on_cpus_then_all_but_the_last_date(tmp_path, stac_url, catalog, address)
        before = Manifest.read(tmp_path / "gpu.zarr").done_count()
        job = write_job(tmp_path, {**nightly, "time": NIGHTLY_PERIOD})
        killed = cli_run(job, "--scheduler", address, kill="recorded:5")
        recorded = Manifest.read(tmp_path / "gpu.zarr").done_count() - before
        resumed = cli_run(job, "--scheduler", address)

    new = sum(1 for windows in whole.plan.windows.values() if any(whole.plan.days[w.target].date == last for w in windows))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert 5 <= recorded < new
    assert resumed.returncode == 0 and f"wrote {new - recorded} tile-dates" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "of 4 tiles)" in resumed.stdout  # the resumed run's tasks are runs of tiles too
    assert Manifest.read(tmp_path / "gpu.zarr").done_count() == Manifest.read(whole.output).done_count()
    with xr.open_zarr(whole.output, consolidated=False) as expected, xr.open_zarr(tmp_path / "gpu.zarr", consolidated=False) as got:
        np.testing.assert_allclose(got.sr.values, expected.sr.values, atol=1.01e-4, equal_nan=True)
