"""Where the work runs: a LocalCluster of worker processes by default, or an existing Dask cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from sr_batch.errors import SrBatchError


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
            yield client
        return
    cores = os.cpu_count() or 1
    workers = workers or min(cores, 4)
    threads = max(1, cores // workers)
    # Each worker process runs one task at a time and gives PyTorch its share of the cores.
    env = {"SR_BATCH_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", env=env) as cluster, Client(cluster) as client:
        echo(f"Dask: LocalCluster of {workers} worker processes; dashboard {client.dashboard_link}")
        yield client
