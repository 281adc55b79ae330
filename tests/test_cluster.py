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
import torch
from dask.utils import parse_timedelta
from distributed import Client, LocalCluster, get_worker

from sr_batch import cluster
from sr_batch.cluster import QUIET_DASK_SETTINGS, cpu_allocator_environment, dask_client, quiet_dask_settings
from sr_batch.job import cpu_allocator_note
from sr_batch.spec import parse_spec
from sr_batch.superres import CPU_ALLOCATOR_ENV
from sr_batch.tiles import KEPT_MEMORY_GROWTH, give_back_memory_if_tight

from conftest import make_job

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


def test_cpu_workers_keep_freed_memory_for_the_next_pass(scheduler: str, tmp_path: Path, catalog) -> None:
    spec = parse_spec(make_job("http://127.0.0.1:9/", tmp_path / "out.zarr", catalog))  # the note needs only model.device
    before = {name: os.environ.get(name) for name in CPU_ALLOCATOR_ENV}
    with dask_client(echo=lambda _: None) as client:
        kept = client.gather([client.submit(_faults_of_a_second_allocation, pure=False, workers=[w]) for w in client.scheduler_info()["workers"]])
        assert cpu_allocator_note(client, spec, on_gpus=[]) is None
    with Client(scheduler) as plain:  # a LocalCluster with Dask's defaults, for contrast
        returned = plain.submit(_faults_of_a_second_allocation, pure=False).result()
        # A job on a cluster of such workers says how to start them.
        note = cpu_allocator_note(plain, spec, on_gpus=[])
        assert note is not None and "2 of 2 workers" in note and all(f"{name}={value}" in note for name, value in CPU_ALLOCATOR_ENV.items())
    assert returned > 0.5, f"the contrast did not fault ({returned:.2f}): this test can no longer tell the settings apart"
    assert max(kept) < 0.05, f"workers faulted {kept} of a second allocation's pages: they did not start with {CPU_ALLOCATOR_ENV}"
    assert {name: os.environ.get(name) for name in CPU_ALLOCATOR_ENV} == before, "the settings stayed in the caller's environment"


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


def test_a_tight_worker_gives_its_kept_memory_back_after_a_task() -> None:
    """A worker past half its memory limit must not keep a pass's memory: Dask would pause it at 80 %
    and wait for memory that never comes back. A roomy one keeps it for speed."""
    for limit, gives_back in (("2.5GB", True), ("16GB", False)):
        with (
            cpu_allocator_environment(),
            LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=limit, dashboard_address="127.0.0.1:0") as local,
            Client(local) as client,
        ):
            before, after = client.submit(_memory_after_a_freed_allocation, pure=False).result()
        assert before > 1000 * MB, f"the freed GB was not kept ({before / MB:.0f} MB): the allocator settings did not reach the worker"
        if gives_back:
            assert after < before - 800 * MB, f"{limit}: {before / MB:.0f} MB before, {after / MB:.0f} MB after"
        else:
            assert after > before - 100 * MB, f"{limit}: {before / MB:.0f} MB before, {after / MB:.0f} MB after"


def test_a_worker_gives_back_memory_its_heap_grew_past_its_first_task() -> None:
    """A roomy worker keeps a pass's memory from task to task, but not a heap that goes on growing: past
    KEPT_MEMORY_GROWTH times its memory after its first task it gives the freed memory back, or its
    memory would grow with the tasks it runs. (Two tasks of 1 GB each do not reuse one GB here: what
    the worker allocates in between splits the freed GB, and the second takes a new one.)"""
    with (
        cpu_allocator_environment(),
        LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="16GB", dashboard_address="127.0.0.1:0") as local,
        Client(local) as client,
    ):
        first, smaller, larger = (client.submit(_memory_after_a_freed_allocation, megabytes, pure=False).result() for megabytes in (1024, 512, 2048))
    for name, (before, after) in (("first", first), ("smaller", smaller)):
        assert before > 1000 * MB and after > before - 100 * MB, f"{name} task: {before / MB:.0f} MB before, {after / MB:.0f} MB after: not kept"
    before, after = larger
    assert before > KEPT_MEMORY_GROWTH * first[1], f"the larger task did not grow the worker ({before / MB:.0f} MB)"
    assert after < before - 1500 * MB, f"grown past its first task: {before / MB:.0f} MB before, {after / MB:.0f} MB after"


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
