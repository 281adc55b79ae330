"""Container health check of the sr-batch images (Docker HEALTHCHECK; compose uses it too).

One image plays three roles: the `sr-batch` job, a Dask scheduler and a Dask worker. The check is
cheap enough to run every minute and proves what each role needs:

- always: the package imports and the shipped default checkpoint is in place and readable
  (its safetensors header parses), so a broken build or a missing model is reported at once;
- SR_BATCH_HEALTH_URL set (a Dask scheduler's or worker's http://127.0.0.1:PORT/health): that
  process answers "ok", so a hung scheduler or worker is restarted;
- LD_PRELOAD naming jemalloc (the CPU image): jemalloc is the process's allocator, with its purging
  off, so a worker whose preload failed (library missing) is reported instead of allocating slowly;
- SR_BATCH_REQUIRE_CUDA=1 (the GPU worker): PyTorch sees a CUDA device, so a worker that lost its GPU
  (no device passed through, driver mismatch) is reported instead of silently running on CPU.

Exit status 0 is healthy, 1 unhealthy, with one line saying why.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import urllib.request
from pathlib import Path


def check_checkpoint() -> str:
    """The default model ships inside the package; read its safetensors header (cheap, no torch)."""
    import sr_batch

    weights = Path(sr_batch.__file__).parent / "model" / "weights" / "default.safetensors"
    with weights.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    tensors = [key for key in header if key != "__metadata__"]
    if not tensors:
        raise RuntimeError(f"{weights} holds no tensors")
    return f"model {weights.name} ({len(tensors)} tensors)"


def check_url(url: str) -> str:
    """A Dask scheduler or worker answers 'ok' on /health while its event loop is alive."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL set by the deployment
        body = response.read().decode().strip()
    if body != "ok":
        raise RuntimeError(f"{url} answered {body[:60]!r}, not 'ok'")
    return f"{url} ok"


def check_allocator() -> str:
    """The preload took and jemalloc keeps freed memory (sr_batch/allocator.py)."""
    from sr_batch.allocator import JEMALLOC_CONF, allocator_in_use, allocator_shortfall

    if allocator_in_use() != "jemalloc":
        raise RuntimeError(f"LD_PRELOAD={os.environ['LD_PRELOAD']} but jemalloc is not this process's allocator; install it (apt-get install libjemalloc2)")
    if shortfall := allocator_shortfall():
        raise RuntimeError(f"{shortfall}: set MALLOC_CONF={JEMALLOC_CONF}")
    return "allocator jemalloc"


def check_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("SR_BATCH_REQUIRE_CUDA is set but PyTorch sees no CUDA device; pass the GPU through (driver, NVIDIA container toolkit)")
    return f"cuda {torch.cuda.get_device_name(0)}"


def main() -> int:
    checks = [check_checkpoint]
    url = os.environ.get("SR_BATCH_HEALTH_URL")
    if url:
        checks.append(lambda: check_url(url))
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        checks.append(check_allocator)
    if os.environ.get("SR_BATCH_REQUIRE_CUDA") == "1":
        checks.append(check_cuda)
    passed = []
    for check in checks:
        try:
            passed.append(check())
        except Exception as err:  # any failure is unhealthy; say which and why in one line
            print(f"unhealthy: {type(err).__name__}: {err}")
            return 1
    print("healthy: " + "; ".join(passed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
