"""Where the work runs: a LocalCluster of worker processes by default, or an existing Dask cluster.

A LocalCluster on a machine with CUDA GPUs gets one extra worker process per GPU, pinned to it with
CUDA_VISIBLE_DEVICES and advertising the Dask resource `GPU` (two super-resolution slots); the job then
sends super-resolution only to those workers. The other workers read; writes follow the output to the
GPU workers, which get half the cores for them. On an existing cluster the same holds for any worker
started with `--resources GPU=N` (N tasks at once on its GPU). Without GPUs every worker runs the
network on its CPU, and starts with an allocator that keeps a pass's memory for the next (allocator.py:
jemalloc where installed, else glibc's settings).
A LocalCluster also profiles its tasks and checks its event loops less often than Dask's defaults, whose
wake-ups compete with the tasks for the CPU (QUIET_DASK_SETTINGS).
Workers too small to start the work are refused on connecting, and a worker Dask keeps paused for
memory is named in the log: either would otherwise stall the job without an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from sr_batch.allocator import allocator_in_use, cpu_allocator_env, jemalloc_library
from sr_batch.errors import SrBatchError
from sr_batch.tiles import GPU_RESOURCE

GPU_SLOTS = 2
"""Super-resolution tasks a LocalCluster's GPU worker runs at once (its resource GPU=2; each task takes 1):
one task's host work (the tile's upload, the result's copy back) overlaps the other's kernels."""
MIN_GPU_WORKER_THREADS = 4
MIN_WORKER_MEMORY = 1e9
"""The smallest worker memory limit a job can run on: a worker that has imported what the tasks use
(PyTorch, GDAL, xarray) holds 0.4-0.5 GB before its first task, and Dask pauses a worker at 80 % of its
limit until its memory falls, so a smaller worker stops in the cloud scores and the job waits forever."""
PAUSED_NOTE_SECONDS = 30.0
"""How long Dask may keep a worker paused for memory before the job says so in its log."""
QUIET_DASK_SETTINGS = {"distributed.worker.profile.interval": "100ms", "distributed.admin.tick.interval": "1s"}
"""Dask's housekeeping, made less frequent in a LocalCluster: each worker's event loop samples its
running tasks' stacks for the dashboard's profile every 10 ms, and every server checks its own event
loop every 20 ms. In a job on 2 cores, Dask's event loops used 15 % of the CPU time with Dask's
defaults and 7 % with these (bench/RESULTS.md), time the tasks' network waited for. 100 ms still
gives the profile ten samples a second of tasks that run for seconds, and a blocked event loop is
still reported past 3 s. A value set in Dask's own configuration, other than Dask's default, wins."""


def gpu_worker_threads(cores: int, gpus: int) -> int:
    """Threads of a LocalCluster's GPU worker: its super-resolution slots, and the rest write. The writes
    land there because that is where their 2.5 m input is (Dask moves work to its data), and compressing
    the output costs several times the network's time on a fast GPU, so half the cores go to them."""
    return max(MIN_GPU_WORKER_THREADS, cores // (2 * gpus))


def cpu_worker_layout(gpus: int, workers: int | None = None) -> tuple[int, int]:
    """(worker processes, threads each) of a LocalCluster's CPU workers: the cores the GPU workers leave,
    in at most 4 processes."""
    cores = os.cpu_count() or 1
    cpu_cores = max(1, cores - (gpu_worker_threads(cores, gpus) * gpus if gpus else 0))
    workers = workers or min(cpu_cores, 4)
    return workers, max(1, cpu_cores // workers)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, echo=print) -> Iterator[Client]:
    """A connected client; a LocalCluster started here is closed on exit, an existing cluster is left running."""
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")  # TLS (tls://) from Dask's config: DASK_DISTRIBUTED__COMM__TLS__*
        except (TypeError, ValueError) as err:
            if not scheduler.startswith("tls://"):
                raise
            raise SrBatchError(
                f"--scheduler: {scheduler} needs TLS settings ({type(err).__name__}); set DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
                "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (or distributed.comm.tls in the Dask config)"
            ) from None
        except (OSError, TimeoutError) as err:
            raise SrBatchError(
                f"--scheduler: cannot connect to a Dask scheduler at {scheduler} ({type(err).__name__}); check the address and that it is running"
            ) from None
        with client:
            echo(f"Dask: connected to {scheduler} ({len(client.scheduler_info()['workers'])} workers); dashboard {client.dashboard_link}")
            check_worker_memory(client, "--scheduler", "start the workers with --memory-limit 1GB or more")
            with reporting_paused_workers(client, echo):
                yield client
        return
    gpus = visible_gpus()
    gpu_threads = gpu_worker_threads(os.cpu_count() or 1, gpus) if gpus else 0
    workers, threads = cpu_worker_layout(gpus, workers)
    # Without a GPU each worker process runs one task at a time and gives PyTorch its share of the cores.
    # Beside GPU workers the others only read, encode and write: they run a task per core.
    env = {"SR_BATCH_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    per_worker = threads if gpus else 1
    dask_logger = logging.getLogger("distributed")
    level = dask_logger.level
    try:
        # The cluster starts empty and then all its workers at once: made with its CPU workers, it would
        # wait for them before the GPU workers began, and each worker process takes seconds to start.
        # Without a GPU the workers run the network on their CPUs: they start with the allocator settings for it.
        with (
            contextlib.nullcontext() if gpus else cpu_allocator_environment(),
            dask.config.set(quiet_dask_settings()),  # read as the scheduler, nannies and workers start
            LocalCluster(n_workers=0, threads_per_worker=per_worker, processes=True, dashboard_address="127.0.0.1:0", env=env) as cluster,
        ):
            cluster.worker_spec.update(_gpu_worker_specs(cluster, gpus, gpu_threads))
            cluster.scale(workers + gpus)
            with Client(cluster) as client:
                client.wait_for_workers(workers + gpus, timeout=120)
                gpu_note = f" and {gpus} GPU worker(s)" if gpus else allocator_label(client)
                echo(f"Dask: LocalCluster of {workers} worker processes{gpu_note}; dashboard {client.dashboard_link}")
                try:
                    check_worker_memory(client, "--workers", "run fewer worker processes")
                    with reporting_paused_workers(client, echo):
                        yield client
                except BaseException:
                    _quiet_teardown(client)
                    raise
    finally:
        dask_logger.setLevel(level)


def allocator_label(client: Client) -> str:
    """How the CPU workers allocate, for the line that announces the cluster (asked of the workers: an
    allocator that failed to preload would otherwise go unnoticed)."""
    used = sorted(set(client.run(allocator_in_use).values()))
    note = f" (allocating with {', '.join(used)}"
    if used == ["glibc"] and not jemalloc_library():
        note += "; apt-get install libjemalloc2 for workers that hold less memory"
    return note + ")"


def quiet_dask_settings() -> dict[str, str]:
    """QUIET_DASK_SETTINGS, less those the user's Dask configuration (YAML or DASK_* variables) sets."""
    shipped = dask.config.merge(*dask.config.defaults)
    return {key: value for key, value in QUIET_DASK_SETTINGS.items() if dask.config.get(key) == dask.config.get(key, config=shipped)}


def check_worker_memory(client: Client, option: str, fix: str) -> None:
    """Refuse workers too small to start the work, before any task: Dask would pause them, not fail them."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    small = [limit for info in workers.values() if 0 < (limit := info.get("memory_limit") or 0) < MIN_WORKER_MEMORY]
    if small:
        raise SrBatchError(
            f"{option}: {len(small)} of {len(workers)} Dask workers have a memory limit of {min(small) / 1e9:.2f} GB, under the "
            f"{MIN_WORKER_MEMORY / 1e9:.0f} GB a worker needs (its libraries alone take about 0.5 GB and Dask pauses a worker at 80 %); {fix}"
        )


@contextlib.contextmanager
def reporting_paused_workers(client: Client, echo=print, interval: float = 5.0) -> Iterator[None]:
    """Say in the job's log when Dask keeps a worker paused for memory: a paused worker runs nothing
    until its memory falls, and a job that waits on it would otherwise show nothing at all."""
    stop = threading.Event()
    thread = threading.Thread(target=_watch_paused_workers, args=(client, echo, interval, stop), daemon=True, name="sr-batch-paused-workers")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _watch_paused_workers(client: Client, echo, interval: float, stop: threading.Event) -> None:
    """One line per pause that lasts PAUSED_NOTE_SECONDS; a worker paused again later is reported again."""
    paused_since: dict[str, float] = {}
    reported: set[str] = set()
    while not stop.wait(interval):
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # the client is closing: nothing left to watch
            return
        now = time.monotonic()
        for address, info in workers.items():
            if info.get("status") != "paused":
                paused_since.pop(address, None)
                reported.discard(address)
                continue
            since = paused_since.setdefault(address, now)
            if address not in reported and now - since >= PAUSED_NOTE_SECONDS:
                reported.add(address)
                echo(paused_worker_note(address, info, now - since))


def paused_worker_note(address: str, info: dict, seconds: float) -> str:
    held, limit = info.get("metrics", {}).get("memory", 0), info.get("memory_limit") or 0
    pause = dask.config.get("distributed.worker.memory.pause", None)
    line = f"at {pause:.0%}" if isinstance(pause, float) else "past its pause fraction"  # the client's Dask config; the workers' usually matches
    return (
        f"Dask has paused worker {address} for {seconds:.0f} s: its process holds {held / 1e9:.2f} GB of its {limit / 1e9:.2f} GB memory limit "
        f"(Dask pauses a worker {line}); the job waits until that falls: give the workers more memory, or lower tiling.tile or model.batch_size"
    )


_ENVIRONMENT_LOCK = threading.Lock()
_environment_users = 0
_environment_before: dict[str, str | None] = {}


@contextlib.contextmanager
def cpu_allocator_environment() -> Iterator[None]:
    """allocator.cpu_allocator_env() in this process's environment while the block runs, for the processes
    started in it to inherit: a process reads them when it starts. Dask's nanny also takes its
    MALLOC_TRIM_THRESHOLD_ from there. Blocks may overlap (jobs run from threads): the environment
    is restored when the last one ends."""
    global _environment_users, _environment_before
    with _ENVIRONMENT_LOCK:
        if not _environment_users:
            settings = cpu_allocator_env()
            _environment_before = {name: os.environ.get(name) for name in settings}
            os.environ.update(settings)
        _environment_users += 1
    try:
        yield
    finally:
        with _ENVIRONMENT_LOCK:
            _environment_users -= 1
            if not _environment_users:
                for name, value in _environment_before.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def _quiet_teardown(client: Client) -> None:
    """Silence Dask's own logs before a failed job's LocalCluster closes under tasks still in flight: every
    connection cut under a worker is logged with a traceback, noise after the one line that says what went
    wrong (the failed task itself was logged when it failed). Called while the failure's traceback still
    holds the job's futures, so before anything is cancelled."""
    with contextlib.suppress(Exception):
        client.run(_silence_dask_logs)
    _silence_dask_logs()  # the scheduler and the nannies live in this process


def _silence_dask_logs() -> None:
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without torch's CUDA build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_worker_specs(cluster: LocalCluster, gpus: int, threads: int) -> dict[str, dict]:
    """One worker process per GPU, alone on its device, marked with the GPU resource: the cluster's
    worker spec entries, from its template for new workers."""
    template = cluster.new_spec
    specs = {}
    for index in range(gpus):
        env = {**template["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": str(index), "SR_BATCH_TORCH_THREADS": str(GPU_SLOTS)}
        options = {**template["options"], "nthreads": threads, "resources": {GPU_RESOURCE: GPU_SLOTS}, "env": env}
        specs[f"gpu-{index}"] = {"cls": template["cls"], "options": options}
    return specs


def _add_gpu_workers(cluster: LocalCluster, gpus: int, threads: int) -> None:
    """Add GPU workers (`_gpu_worker_specs`) to a running LocalCluster and start them."""
    cluster.worker_spec.update(_gpu_worker_specs(cluster, gpus, threads))
    cluster.scale(len(cluster.worker_spec))


def gpu_workers(client: Client) -> list[str]:
    """Addresses of the workers that advertise the GPU resource."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(address for address, info in workers.items() if info.get("resources", {}).get(GPU_RESOURCE, 0) > 0)
