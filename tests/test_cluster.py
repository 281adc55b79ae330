"""The LocalCluster a job starts: its CPU workers allocate the way a CPU forward pass needs.

A pass allocates and frees activations of hundreds of MB layer after layer; with glibc's defaults each
is a fresh mapping whose pages are faulted in and zeroed again on every pass (40 % of a pass on CPU).
The workers `dask_client` starts keep freed memory for the next allocation. Checked where it matters:
in a task thread of a real worker process, by the page faults of a second large allocation. A job on
a cluster whose workers lack the settings says how to start them."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import dask
import pytest
import torch
from dask.utils import parse_timedelta
from distributed import Client, LocalCluster, get_worker

from sr_batch import cluster
from sr_batch.allocator import ALLOCATOR_SETTING, GLIBC_ALLOCATOR_ENV, JEMALLOC_CONF, allocator_in_use, cpu_allocator_env, how_to_keep_memory
from sr_batch.cluster import QUIET_DASK_SETTINGS, cpu_allocator_environment, dask_client, quiet_dask_settings
from sr_batch.errors import SrBatchError
from sr_batch.job import cpu_allocator_note
from sr_batch.spec import parse_spec
from sr_batch.tiles import KEPT_MEMORY_GROWTH, give_back_memory_if_tight

from conftest import make_job, needs_jemalloc

MB = 1 << 20


def _faults_of_a_second_allocation(megabytes: int = 256, tries: int = 4) -> float:
    """In the calling thread: allocate, touch and free `megabytes` again and again, as PyTorch allocates;
    the fewest page faults of an allocation after the first, as a share of its pages (about 1 when freed
    memory goes back to the kernel, about 0 when it is kept; a worker's first few may still fault while
    its heap settles). Not NumPy: it asks for transparent huge pages, which fault once per 2 MB."""
    shares = []
    torch.ones(megabytes * MB // 4).sum()
    for _ in range(tries):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(megabytes * MB // 4).sum()
        shares.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (megabytes * MB / resource.getpagesize()))
    return min(shares)


@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_cpu_workers_keep_freed_memory_for_the_next_pass(allocator: str, jemalloc: str | None, scheduler: str, tmp_path: Path, catalog, monkeypatch) -> None:
    """The workers `dask_client` starts keep a pass's memory with jemalloc where it is installed, and with
    glibc's settings where it is not (or where SR_BATCH_CPU_ALLOCATOR=glibc asks for them)."""
    if allocator == "jemalloc":
        needs_jemalloc(jemalloc)
    monkeypatch.setenv(ALLOCATOR_SETTING, allocator)
    spec = parse_spec(make_job("http://127.0.0.1:9/", tmp_path / "out.zarr", catalog))  # the note needs only model.device
    settings = cpu_allocator_env()
    assert ("LD_PRELOAD" in settings) == (allocator == "jemalloc")
    before = {name: os.environ.get(name) for name in settings}
    lines: list[str] = []
    with dask_client(echo=lines.append) as client:
        kept = client.gather([client.submit(_faults_of_a_second_allocation, pure=False, workers=[w]) for w in client.scheduler_info()["workers"]])
        assert set(client.run(allocator_in_use).values()) == {allocator}
        assert cpu_allocator_note(client, spec, on_gpus=[]) is None
    assert f"(allocating with {allocator}" in lines[0], lines[0]
    with Client(scheduler) as plain:  # a LocalCluster with Dask's defaults, for contrast
        returned = plain.submit(_faults_of_a_second_allocation, pure=False).result()
        # A job on a cluster of such workers says how to start them.
        note = cpu_allocator_note(plain, spec, on_gpus=[])
        assert note is not None and note.startswith("Note: 2 of 2 workers run the network on their CPUs with glibc's default settings"), note
        assert how_to_keep_memory() in note
    assert returned > 0.5, f"the contrast did not fault ({returned:.2f}): this test can no longer tell the settings apart"
    assert max(kept) < 0.05, f"workers faulted {kept} of a second allocation's pages: they did not start with {settings}"
    assert {name: os.environ.get(name) for name in settings} == before, "the settings stayed in the caller's environment"


def test_jemalloc_with_its_default_purging_is_named_in_the_note(jemalloc: str | None, tmp_path: Path, catalog, monkeypatch) -> None:
    """jemalloc preloaded by hand but left to purge (its default) faults every pass in afresh, as glibc's
    defaults do: the job says so, and what to set."""
    monkeypatch.setenv("LD_PRELOAD", needs_jemalloc(jemalloc))
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    spec = parse_spec(make_job("http://127.0.0.1:9/", tmp_path / "out.zarr", catalog))
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        assert set(client.run(allocator_in_use).values()) == {"jemalloc"}
        faults = client.submit(_faults_of_a_second_allocation, pure=False).result()
        note = cpu_allocator_note(client, spec, on_gpus=[])
    assert faults > 0.5, f"jemalloc's defaults kept the pages ({faults:.2f}): the note would be wrong"
    assert note is not None and "1 of 1 workers run the network on their CPUs with jemalloc purging freed memory (dirty_decay_ms 10000" in note, note
    assert f"MALLOC_CONF={JEMALLOC_CONF}" in note


def test_a_preload_that_did_not_take_is_named_in_the_note(tmp_path: Path, catalog, monkeypatch) -> None:
    """Workers told to preload an allocator the machine lacks run glibc's defaults (the loader skips the
    library with a message in the worker's log): the job's note says so, and names jemalloc's package."""
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc-missing.so.2")
    for name in (*GLIBC_ALLOCATOR_ENV, "MALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    spec = parse_spec(make_job("http://127.0.0.1:9/", tmp_path / "out.zarr", catalog))
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        assert set(client.run(allocator_in_use).values()) == {"glibc"}
        note = cpu_allocator_note(client, spec, on_gpus=[])
    assert note is not None and "1 of 1 workers run the network on their CPUs with glibc's default settings" in note, note
    assert "apt-get install libjemalloc2" in note


def test_the_allocator_setting_is_checked_and_a_users_preload_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv(ALLOCATOR_SETTING, "tcmalloc")
    with pytest.raises(SrBatchError, match="^SR_BATCH_CPU_ALLOCATOR='tcmalloc' is not an allocator; use jemalloc or glibc"):
        cpu_allocator_env()
    monkeypatch.setenv(ALLOCATOR_SETTING, "jemalloc")
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc.so.4")
    assert cpu_allocator_env() == GLIBC_ALLOCATOR_ENV


def _housekeeping_intervals(dask_worker: Any) -> tuple[float, float]:
    """In a worker: (ms between profile samples, s between event-loop checks), as the worker runs them."""
    return dask_worker.periodic_callbacks["profile"].callback_time, dask_worker._tick_interval


def test_local_cluster_runs_dask_housekeeping_less_often() -> None:
    """Dask samples a worker's task stacks every 10 ms and checks each event loop every 20 ms; the
    LocalCluster a job starts does both less often, in the workers themselves and in the scheduler."""
    expected = (
        parse_timedelta(QUIET_DASK_SETTINGS["distributed.worker.profile.interval"]) * 1000,
        parse_timedelta(QUIET_DASK_SETTINGS["distributed.admin.tick.interval"]),
    )
    assert expected == (100, 1.0)
    with dask_client(workers=1, echo=lambda _: None) as client:
        assert set(client.run(_housekeeping_intervals).values()) == {expected}
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == expected[1]
    defaults = dask.config.get("distributed.worker.profile.interval"), dask.config.get("distributed.admin.tick.interval")
    assert defaults == ("10ms", "20ms"), "the settings stayed in this process's Dask configuration"


def test_dask_settings_of_the_user_win_over_the_quieter_ones() -> None:
    assert quiet_dask_settings() == QUIET_DASK_SETTINGS
    with dask.config.set({"distributed.worker.profile.interval": "50ms"}):  # as a YAML file or DASK_* variable sets it
        assert quiet_dask_settings() == {"distributed.admin.tick.interval": "1s"}


def _memory_after_a_freed_allocation(megabytes: int = 1024) -> tuple[int, int]:
    """In a worker: allocate and touch `megabytes`, free it, then do what a CPU task does at its end.
    Returns the process memory before and after that step."""
    torch.ones(megabytes * MB // 4).sum()
    worker = get_worker()
    before = worker.monitor.get_process_memory()
    give_back_memory_if_tight()
    return before, worker.monitor.get_process_memory()


@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_a_tight_worker_gives_its_kept_memory_back_after_a_task(allocator: str, jemalloc: str | None, monkeypatch) -> None:
    """A worker past half its memory limit must not keep a pass's memory: Dask would pause it at 80 %
    and wait for memory that never comes back. A roomy one keeps it for speed. Either allocator."""
    if allocator == "jemalloc":
        needs_jemalloc(jemalloc)
    monkeypatch.setenv(ALLOCATOR_SETTING, allocator)
    for limit, gives_back in (("2.5GB", True), ("16GB", False)):
        with (
            cpu_allocator_environment(),
            LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=limit, dashboard_address="127.0.0.1:0") as local,
            Client(local) as client,
        ):
            assert set(client.run(allocator_in_use).values()) == {allocator}
            before, after = client.submit(_memory_after_a_freed_allocation, pure=False).result()
        assert before > 1000 * MB, f"the freed GB was not kept ({before / MB:.0f} MB): the allocator settings did not reach the worker"
        if gives_back:
            assert after < before - 800 * MB, f"{limit}: {before / MB:.0f} MB before, {after / MB:.0f} MB after"
        else:
            assert after > before - 100 * MB, f"{limit}: {before / MB:.0f} MB before, {after / MB:.0f} MB after"


def _three_tasks_on_a_roomy_worker() -> list[tuple[int, int]]:
    """Tasks that allocate and free 1 GB, 0.5 GB, then 2 GB, on one worker with 16 GB: (before, after) each."""
    with (
        cpu_allocator_environment(),
        LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="16GB", dashboard_address="127.0.0.1:0") as local,
        Client(local) as client,
    ):
        return [client.submit(_memory_after_a_freed_allocation, megabytes, pure=False).result() for megabytes in (1024, 512, 2048)]


def test_a_glibc_worker_gives_back_memory_its_heap_grew_past_its_first_task(monkeypatch) -> None:
    """A roomy glibc worker keeps a pass's memory from task to task, but not a heap that goes on growing:
    past KEPT_MEMORY_GROWTH times its memory after its first task it gives the freed memory back, or its
    memory would grow with the tasks it runs. (Two tasks of 1 GB each do not reuse one GB here: what
    the worker allocates in between splits the freed GB, and the second takes a new one.)"""
    monkeypatch.setenv(ALLOCATOR_SETTING, "glibc")
    first, smaller, larger = _three_tasks_on_a_roomy_worker()
    for name, (before, after) in (("first", first), ("smaller", smaller)):
        assert before > 1000 * MB and after > before - 100 * MB, f"{name} task: {before / MB:.0f} MB before, {after / MB:.0f} MB after: not kept"
    before, after = larger
    assert before > KEPT_MEMORY_GROWTH * first[1], f"the larger task did not grow the worker ({before / MB:.0f} MB)"
    assert after < before - 1500 * MB, f"grown past its first task: {before / MB:.0f} MB before, {after / MB:.0f} MB after"


def test_a_jemalloc_worker_keeps_what_a_larger_task_needed(jemalloc: str | None, monkeypatch) -> None:
    """jemalloc's heap does not fragment the way glibc's does, so a roomy jemalloc worker keeps what its
    largest task needed for the next one: giving it back would only cost that task its page faults."""
    needs_jemalloc(jemalloc)
    monkeypatch.setenv(ALLOCATOR_SETTING, "jemalloc")
    first, smaller, larger = _three_tasks_on_a_roomy_worker()
    for name, (before, after) in (("first", first), ("smaller", smaller), ("larger", larger)):
        assert after > before - 100 * MB, f"{name} task: {before / MB:.0f} MB before, {after / MB:.0f} MB after: not kept"
    assert larger[0] > KEPT_MEMORY_GROWTH * first[1] and larger[0] > 2000 * MB, f"the larger task did not grow the worker ({larger[0] / MB:.0f} MB)"


def _hold_memory_past_the_pause_line(dask_worker) -> None:
    """Unmanaged memory (touched pages no Dask key holds) up to 87 % of the worker's limit: past the 80 %
    where Dask pauses a worker, short of the 95 % where its nanny kills it."""
    limit = dask_worker.memory_manager.memory_limit
    missing = int(0.87 * limit) - dask_worker.monitor.get_process_memory()
    dask_worker.sr_batch_test_hold = torch.ones(max(missing, 0) // 4)


def _release_memory(dask_worker) -> None:
    del dask_worker.sr_batch_test_hold


def test_a_worker_dask_pauses_for_memory_is_reported_in_the_log(monkeypatch) -> None:
    """A paused worker runs nothing and raises nothing: a job waiting on it says why in one line, once."""
    monkeypatch.setattr(cluster, "PAUSED_NOTE_SECONDS", 3.0)
    lines: list[str] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GB", dashboard_address="127.0.0.1:0") as local:
        with dask_client(local.scheduler_address, echo=lines.append) as client:
            first, second = sorted(client.scheduler_info(n_workers=-1)["workers"])
            client.run(_hold_memory_past_the_pause_line, workers=[first])
            deadline = time.monotonic() + 60
            while not any(line.startswith("Dask has paused") for line in lines) and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(5)  # still paused: no second line for the same pause
            client.run(_release_memory, workers=[first])
    notes = [line for line in lines if line.startswith("Dask has paused")]
    assert len(notes) == 1, lines
    assert notes[0].startswith(f"Dask has paused worker {first} for ") and "of its 2.00 GB memory limit" in notes[0], notes[0]
    assert "lower tiling.tile or model.batch_size" in notes[0] and second not in notes[0]
