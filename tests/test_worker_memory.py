"""Out of memory on a worker: a tiling whose tasks cannot fit is refused before anything is written, and
a worker that dies anyway is reported in one line naming what to change, with written windows kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import yaml
from distributed import Client, LocalCluster

from conftest import make_job

SR_BATCH = str(Path(sys.executable).parent / "sr-batch")


def _job(tmp_path: Path, stac_url: str, catalog, **sections) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_job(stac_url, tmp_path / "out.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}, **sections)))
    return job


def _run_on_cluster(job: Path, workers: int, threads: int, memory_limit: str, timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """`sr-batch run JOB --scheduler` on a fresh LocalCluster, and the number of tasks its workers ran."""
    with (
        LocalCluster(n_workers=workers, threads_per_worker=threads, memory_limit=memory_limit, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        run = subprocess.run([SR_BATCH, "run", str(job), "--scheduler", cluster.scheduler_address], capture_output=True, text=True, timeout=timeout)
        return run, sum(client.run(lambda dask_worker: len(dask_worker.state.log)).values())


def test_tasks_too_big_for_the_workers_are_refused_before_writing(tmp_path: Path, stac_url: str, catalog) -> None:
    """A worker of 2.4 GB running 12 tasks at once has 0.2 GB per task: too little for this tiling's 0.15 GB
    estimate (with the worker's other needs), though the worker itself is large enough to score the clouds."""
    job = _job(tmp_path, stac_url, catalog, tiling={"tile": 128, "halo": 18})
    with LocalCluster(n_workers=1, threads_per_worker=12, memory_limit="2400MB", dashboard_address="127.0.0.1:0") as cluster:
        run = subprocess.run([SR_BATCH, "run", str(job), "--scheduler", cluster.scheduler_address], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sr-batch: error: tiling.tile:") and "0.20 GB per running task" in lines[0], run.stderr
    assert "lower tiling.tile" in lines[0]
    assert not (tmp_path / "out.zarr").exists()


def test_a_tile_too_large_for_any_task_is_refused_before_the_clouds_are_scored(tmp_path: Path, stac_url: str, catalog) -> None:
    """A worker of 2.4 GB running 64 tasks at once has 0.04 GB per task: too little even for a task of one
    date with one frame of this tile (0.03 GB, with the worker's other needs). No reading of clouds can change that, so the run stops
    before scoring them: the workers run no task."""
    job = _job(tmp_path, stac_url, catalog, tiling={"tile": 128, "halo": 18})
    run, tasks_run = _run_on_cluster(job, workers=1, threads=64, memory_limit="2400MB", timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sr-batch: error: tiling.tile: even a super-resolution task of one date needs about 0.03 GB"), run.stderr
    assert "0.04 GB per running task" in lines[0] and "lower tiling.tile, or give the workers more memory" in lines[0]
    assert tasks_run == 0, "the clouds were scored before the refusal"
    assert not (tmp_path / "out.zarr").exists()


def test_workers_too_small_to_start_are_refused_before_any_task(tmp_path: Path, stac_url: str, catalog) -> None:
    """A 600 MB worker would pass Dask's 80 % pause line once it has imported what the tasks use, and the job
    would wait on it forever: it is refused on connecting, in one line, and the worker runs nothing."""
    job = _job(tmp_path, stac_url, catalog)
    run, tasks_run = _run_on_cluster(job, workers=2, threads=1, memory_limit="600MB", timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("sr-batch: error: --scheduler: 2 of 2 Dask workers have a memory limit of 0.60 GB"), run.stderr
    assert "--memory-limit 1GB" in lines[0]
    assert tasks_run == 0, "the job sent work to workers it refused"
    assert not (tmp_path / "out.zarr").exists()


def test_a_worker_that_dies_is_reported_in_one_line(tmp_path: Path, stac_url: str, catalog) -> None:
    """A worker is SIGKILLed in its first write (the resume tests' hook), and the scheduler allows no
    retry: the run stops with one line; the store's finished windows stay recorded."""
    job = _job(tmp_path, stac_url, catalog)
    env = {"SR_BATCH_TEST_KILL": "written", "SR_BATCH_TEST_KILL_MARKER": str(tmp_path / "killed"), "SR_BATCH_TORCH_THREADS": "1"}
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(n_workers=1, threads_per_worker=1, env=env, dashboard_address="127.0.0.1:0") as cluster,
    ):
        run = subprocess.run(
            [SR_BATCH, "run", str(job), "--scheduler", cluster.scheduler_address, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("SR_BATCH_TEST")},
        )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith(("20", " "))]  # Dask's own log lines aside
    assert lines == [lines[0]] and "workers died" in lines[0] and "lower tiling.tile or model.batch_size" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    verify = subprocess.run([SR_BATCH, "verify", str(tmp_path / "out.zarr")], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # what was recorded is intact
