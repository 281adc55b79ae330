"""The benchmark runs end to end and writes its numbers (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sr_batch.allocator import cpu_allocator_env, jemalloc_library
from sr_batch.bench import GpuUtilisation, ModelOnlyDied, _peak_memory, main, model_only_on_workers, tile_task_profile, tile_tasks_alone
from sr_batch.superres import ModelRef, auto_precision, cpu_has_bf16_matrix_units


def test_benchmark_writes_every_number(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.json"
    environment = dict(os.environ)
    arguments = ["--size", "48", "--dates", "2", "--tile", "48", "--batch", "2", "--repeats", "1", "--workers", "2", "--nightly", "on"]
    assert main([*arguments, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # Compiled in the precision a job's `auto` takes on this CPU: bf16 where it has AMX, fp32 elsewhere.
    compiled = "bf16 + channels_last" if cpu_has_bf16_matrix_units() else "fp32 channels_last"
    assert {row["variant"] for row in report["model_only"]} >= {"fp32 eager", "fp32 channels_last", f"{compiled} + torch.compile(default)"}
    assert {row["compile"] for row in report["model_only"]} == {"off", "default"}  # every compile mode a CPU has, beside eager
    assert all(row["lr_mpx_per_s"] > 0 for row in report["model_only"])
    # On CPU the network also runs in the job's worker processes at once, the reference a job is held to:
    # in fp32, and in the precision the jobs run where that is another.
    on_workers = {(row["precision"], row["compile"]) for row in report["model_only"] if row.get("processes") == 2}
    assert on_workers == {("fp32", "off"), (auto_precision("cpu"), "off"), (auto_precision("cpu"), "default")}, on_workers
    assert {row["codec"] for row in report["writing"]} == {"lz4", "zstd"}
    assert all(row["mb_per_s_1_thread"] > 0 and row["mb_per_s_all_threads"] > 0 and row["compression_ratio"] > 1 for row in report["writing"])
    for factor in ("1x", "4x"):
        row = report[f"end_to_end_{factor}"]
        assert row["lr_mpx_per_s"] > 0 and row["peak_worker_memory_mb"] > 0 and row["tile_dates"] > 0
        assert row["peak_gpu_memory_mb"] == 0 and row["cluster_start_seconds"] > 0  # no CUDA here; the cluster is started per job
        assert 0 < row["sr_phase_seconds"] <= row["seconds"] and row["sr_task_seconds"] > 0 and row["before_sr_seconds"] > 0
        assert 0 < row["sr_task_thread_cpu_seconds"] <= row["sr_task_seconds"] + 0.1  # a thread runs on one core at most
        # Where the workers' threads spent the job: the tile tasks among the kinds, all within the threads' time.
        kinds = row["task_seconds_by_kind"]
        assert "superresolve" in kinds and 0 < sum(kinds.values()) <= row["worker_thread_seconds"], kinds
    assert report["end_to_end_4x"]["pixels"] == 4 * report["end_to_end_1x"]["pixels"]
    # Every window holds the model's 8 frames, as model only's do: the first dates take theirs from the history.
    assert all(report[f"end_to_end_{factor}"]["window_frames"] == [8] for factor in ("1x", "4x", "nightly")), report["end_to_end_1x"]["window_frames"]
    # Each job's read windows: the 1x region's one tile has no neighbour to take a halo from; the 4x region's
    # tiles take the 22 px halo from theirs, widened to a multiple of 16 px (tiles.aligned_window).
    assert report["end_to_end_1x"]["read_windows"] == [[48, 48]] and report["end_to_end_4x"]["read_windows"] == [[80, 80]]
    # A nightly run on the 4x region computes its last date only (one tile per task on CPU workers).
    nightly = report["end_to_end_nightly"]
    assert nightly["tile_dates"] == report["end_to_end_4x"]["tile_dates"] // 2 == 4 and nightly["tiles_per_task"] == 1
    assert nightly["lr_mpx_per_s"] > 0 and nightly["tasks"] == 4
    # The tile task alone is a GPU measurement; a CPU job compares with model only on its workers.
    assert "tile_tasks_alone" not in report and "ratio_tile_tasks_alone_over_model_only" not in report
    assert report["end_to_end_4x"]["sr_phase_gpu_utilisation"] is None  # no GPU to sample
    # The best model-only variant is read again after the jobs; the ratios use both readings and show their spread.
    assert report["best_model_only_again"]["variant"] == report["best_model_only"] and report["best_model_only_again"]["lr_mpx_per_s"] > 0
    for key in ("end_to_end", "end_to_end_4x", "sr_phase_4x"):
        low, high = report[f"ratio_{key}_over_model_only_range"]
        assert 0 < low <= report[f"ratio_{key}_over_model_only"] <= high, key
    # Where the best variant is not what the jobs ran (eager here), the best as they ran is read again too.
    if report["best_model_only"] in {row["variant"] for row in report["model_only"] if row["compile"] != "off"}:
        as_ran = report["model_only_as_the_jobs_ran"]
        assert report["model_only_as_the_jobs_ran_again"]["variant"] == as_ran and "torch.compile" not in as_ran
        low, high = report["ratio_end_to_end_4x_over_model_only_as_the_jobs_ran_range"]
        assert 0 < low <= report["ratio_end_to_end_4x_over_model_only_as_the_jobs_ran"] <= high
    # One 1x tile on a two-worker cluster: its dates are split over both; the memory comparison reruns it with the 4x job's tasks.
    assert report["end_to_end_1x"]["dates_per_task"] < report["end_to_end_4x"]["dates_per_task"] == 2
    assert report["end_to_end_1x_same_tasks"]["dates_per_task"] == 2 and report["ratio_memory_4x_over_1x_same_tasks"] > 0
    assert report["end_to_end_1x_same_tasks"]["tasks"] == 1 and report["end_to_end_4x"]["tasks"] == 4  # 1 and 4 tiles of 2 dates
    printed = capsys.readouterr().out
    assert "end to end ÷ best model only" in printed and "worker threads, " in printed and "tile task   alone: measured on a GPU only" in printed
    # Its 1x job with the 4x job's tasks is one task: the memory ratio says it compares one task with a steady state.
    assert "(the 1x job ran 1 tile task(s) on 1 worker(s): its peak is one task's" in printed
    assert "(largest read windows: 1x 48×48 px, 4x 80×80 px: the peaks differ as their passes do" in printed
    # It starts its processes with the CPU workers' allocator settings, and leaves the caller's environment as it was.
    assert {name: os.environ.get(name) for name in cpu_allocator_env()} == {name: environment.get(name) for name in cpu_allocator_env()}
    # Each job row says how its workers allocated: jemalloc where it is installed (the `jemalloc` fixture).
    expected = ["jemalloc"] if jemalloc_library() else ["glibc"]
    assert all(report[f"end_to_end_{factor}"]["worker_allocators"] == expected for factor in ("1x", "4x")), report["end_to_end_4x"]["worker_allocators"]


def test_a_model_only_process_that_dies_stops_the_benchmark_in_one_line() -> None:
    """A process that cannot allocate its input (here a 200000² px tile) ends without a result; the
    others would wait for it at their barrier for ever, and the benchmark with them."""
    with pytest.raises(ModelOnlyDied, match=r"batch 1: a process ended with exit code (1|-9 \(killed: out of memory)"):
        model_only_on_workers("default", tile=200_000, batch=1, repeats=1, workers=2, threads=1)


def test_gpu_utilisation_averages_the_samples_of_the_phase_only() -> None:
    """The mean of the samples taken within the phase, as a fraction; None where nothing was sampled."""
    utilisation = GpuUtilisation()
    utilisation.samples = [(9.9, 0.0), (10.0, 100.0), (10.5, 50.0), (11.0, 90.0), (11.1, 0.0)]
    assert utilisation.mean_between(10.0, 11.0) == 0.8
    assert utilisation.mean_between(20.0, 30.0) is None


def test_the_tile_task_alone_runs_the_jobs_task_on_a_real_tile_with_its_halo() -> None:
    """What the benchmark runs on a GPU, on a small tile here: one row per count of tasks at once, each
    task super-resolving `dates` windows of a real block with the job's seam-free halo."""
    rows = tile_tasks_alone(ModelRef(checkpoint="default", batch_size=2), 32, 2, 1, [1, 2])
    assert [(row["threads"], row["tasks"], row["dates"]) for row in rows] == [(1, 1, 2), (2, 2, 2)]
    assert all(row["halo"] == 22 and row["seconds"] > 0 and row["lr_mpx_per_s"] > 0 for row in rows)
    # A nightly run's task, one date: of one tile (one window per pass), and of a run of 2 tiles sharing passes.
    for tiles in (1, 2):
        (nightly,) = tile_tasks_alone(ModelRef(checkpoint="default", batch_size=2), 32, 1, 2, [1], tiles)
        assert (nightly["threads"], nightly["tasks"], nightly["dates"], nightly["tiles"]) == (1, 2, 1, tiles) and nightly["lr_mpx_per_s"] > 0


def test_the_task_profile_splits_one_tile_task_into_its_stages(tmp_path: Path) -> None:
    """A task of 3 dates in passes of 2 windows: its tile goes to the device once, and each of its two
    passes is gathered, run and finished; on a CPU a pass's output is written where the task's result
    is, so nothing is copied back or collected."""
    trace = tmp_path / "trace.json"
    profiled = tile_task_profile(ModelRef(checkpoint="default", batch_size=2), 32, 3, trace)
    calls = {row["stage"]: row["calls"] for row in profiled["stages"]}
    assert calls == {"tile to device": 1, "windows": 2, "network": 2, "output": 2}
    assert profiled["dates"] == 3 and profiled["halo"] == 22 and profiled["device_kernels_ms"] is None
    network = next(row for row in profiled["stages"] if row["stage"] == "network")
    assert 0 < network["host_ms"] < profiled["seconds"] * 1e3 and network["device_ms"] is None
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "sr-batch: network" in names


def test_whole_tile_client_benchmark_writes_its_numbers(tmp_path: Path) -> None:
    """`bench/whole_tile_client.py` at a small size: the plan's tasks and windows, and every cost measured."""
    script = Path(__file__).parent.parent / "bench" / "whole_tile_client.py"
    out = tmp_path / "whole-tile.json"
    command = [sys.executable, str(script), "--size", "1200", "--tile", "256", "--days", "10", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text())
    assert (row["tiles"], row["days"], row["dates_per_task"]) == (25, 10, 8)
    assert row["tasks"] == 25 * 2 and row["windows"] == 25 * 10, "every day is cloudless in every tile"
    measured = ("search_s", "plan_s", "graph_s", "submission_ms_per_task", "manifest_mb", "manifest_write_s", "store_layout_s", "append_dates_s")
    assert all(row[key] > 0 for key in measured)
    assert "tasks of 8 dates" in done.stdout


def test_task_placement_benchmark_counts_every_task_of_each_run(tmp_path: Path) -> None:
    """`bench/task_placement.py` at a small size: each run's tasks, counted per worker, are the job's tasks."""
    script = Path(__file__).parent.parent / "bench" / "task_placement.py"
    command = [sys.executable, str(script), "--size", "128", "--tile", "64", "--dates", "2", "--runs", "2"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = re.findall(r"tasks per worker \[(\d+), (\d+)\]", done.stdout)
    assert len(runs) == 2 and all(int(a) + int(b) == 4 for a, b in runs), done.stdout  # 2 x 2 tiles, the 2 dates in one task each
    assert re.search(r"\d of 2 runs uneven", done.stdout)


def test_a_workers_peak_memory_is_its_own_not_its_parents() -> None:
    """A worker process is started by fork and exec from a process that may hold gigabytes (the
    benchmark's own model-only passes): its peak is its own. getrusage's would keep the parent's."""
    import multiprocessing

    import numpy as np

    held = np.ones(3_000_000_000 // 8)  # 3 GB resident in this process
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, gpu_peak = pool.apply(_peak_memory)
    assert 50e6 < peak < 2e9 and gpu_peak == 0 and held[-1] == 1
