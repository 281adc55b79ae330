"""How a process that runs the network on a CPU allocates memory.

A forward pass allocates and frees activations of hundreds of MB, layer after layer. With the C
library's defaults each one is a fresh mapping whose pages the kernel faults in and zeroes again on
every pass: 40 % of a pass's time on a CPU (bench/RESULTS.md), more under Dask's
MALLOC_TRIM_THRESHOLD_=65536. A CPU worker therefore starts with an allocator that keeps freed memory
for the next pass, chosen by environment variables a process reads when it starts:

- jemalloc, where the system has it (Debian/Ubuntu: `apt-get install libjemalloc2`), preloaded with
  its purging off (JEMALLOC_CONF). As fast as glibc's settings below, and it keeps far less: a 2-worker
  job of 8 tasks per worker peaked at 3.0-3.35 GB per worker against glibc's 5.8-6.1 GB, whose heap
  fragments between passes (bench/RESULTS.md). Its defaults purge large frees at once (1.8x slower).
- otherwise glibc's malloc with one heap and no trimming (GLIBC_ALLOCATOR_ENV).

`SR_BATCH_CPU_ALLOCATOR=glibc` keeps glibc where jemalloc is installed; an LD_PRELOAD already in the
environment is the user's choice and is left alone. Nothing here knows of Dask: cluster.py starts
workers in `cpu_allocator_env()`, and tiles.py decides when a worker gives its memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

from sr_batch.errors import SrBatchError

GLIBC_ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
"""glibc: every thread allocates from the one heap, and freed memory stays there for the next pass; the
cost is that the process keeps its largest pass's memory, plus what fragmentation adds. Set as well
under jemalloc (which ignores them): a process where the preload fails still allocates well."""

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,narenas:1"
"""jemalloc: keep freed pages (dirty or advised-away) until the process asks for a purge, in one arena
for every thread (as glibc's MALLOC_ARENA_MAX=1): a worker's threads (its task, Dask's event loop
receiving data) otherwise each keep their own freed pages, which no other thread can reuse. A 2-worker
job of 8 tasks per worker peaked at 2.83–2.87 GB per worker with one arena against 3.09–3.12 GB with
jemalloc's 8 on 2 cores, at the same speed (bench/RESULTS.md)."""

ALLOCATOR_SETTING = "SR_BATCH_CPU_ALLOCATOR"
"""Environment variable: `jemalloc` (the default where installed) or `glibc`."""

_MALLCTL_ARENAS_ALL = 4096
"""jemalloc's index for 'every arena' in mallctl names (MALLCTL_ARENAS_ALL)."""


def cpu_allocator_env() -> dict[str, str]:
    """The variables a process that will run the network on a CPU starts with (see the module's note)."""
    env = dict(GLIBC_ALLOCATOR_ENV)
    if wanted_allocator() == "jemalloc" and not os.environ.get("LD_PRELOAD") and (library := jemalloc_library()):
        env |= {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF}
    return env


def wanted_allocator() -> str:
    """`SR_BATCH_CPU_ALLOCATOR`, checked: 'jemalloc' unless it says 'glibc'."""
    setting = os.environ.get(ALLOCATOR_SETTING, "jemalloc").strip().lower() or "jemalloc"
    if setting not in ("jemalloc", "glibc"):
        raise SrBatchError(f"{ALLOCATOR_SETTING}={setting!r} is not an allocator; use jemalloc or glibc (or leave it unset)")
    return setting


@lru_cache(maxsize=1)
def jemalloc_library() -> str | None:
    """jemalloc's shared library as the dynamic loader finds it (e.g. 'libjemalloc.so.2'), or None."""
    return ctypes.util.find_library("jemalloc")


def allocator_in_use() -> str:
    """'jemalloc' when this process allocates with jemalloc, else 'glibc' (or another allocator the
    process was started with, which this cannot name)."""
    return "jemalloc" if _mallctl() is not None else "glibc"


def give_back_freed_memory() -> None:
    """Return this process's freed memory to the system: jemalloc purges every arena, glibc trims its heap."""
    mallctl = _mallctl()
    if mallctl is not None:
        mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def allocator_shortfall() -> str | None:
    """Why this process would fault a pass's memory in afresh on every pass, or None when it keeps it.
    jemalloc is read from jemalloc itself; glibc from the environment the process started with (Linux's
    /proc/self/environ), since settings put into os.environ later do not reach the allocator."""
    if _mallctl() is not None:
        dirty, muzzy = _jemalloc_option("opt.dirty_decay_ms"), _jemalloc_option("opt.muzzy_decay_ms")
        return None if (dirty, muzzy) == (-1, -1) else f"jemalloc purging freed memory (dirty_decay_ms {dirty}, muzzy_decay_ms {muzzy})"
    try:
        started = dict(entry.split(b"=", 1) for entry in Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in entry)
    except OSError:
        return None  # not Linux: nothing to tell
    if _preloaded(started.get(b"LD_PRELOAD", b"").decode()):
        return None  # an allocator of the user's own choice (one whose preload failed falls through to glibc)
    if any(started.get(name.encode()) != value.encode() for name, value in GLIBC_ALLOCATOR_ENV.items()):
        return "glibc's default settings"
    return None


def how_to_keep_memory() -> str:
    """The environment that fixes a shortfall, as a worker's start command would be given it."""
    glibc = " ".join(f"{name}={value}" for name, value in GLIBC_ALLOCATOR_ENV.items())
    return f"LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF={JEMALLOC_CONF} (apt-get install libjemalloc2) or, with glibc, {glibc}"


def _mallctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """jemalloc's control function when jemalloc is this process's allocator (preloaded), else None."""
    return getattr(ctypes.CDLL(None), "mallctl", None)


def _preloaded(preload: str) -> bool:
    """Whether the libraries LD_PRELOAD names are mapped into this process (the loader skips a missing one)."""
    names = {Path(entry).name for entry in preload.replace(":", " ").split()}
    if not names:
        return False
    try:
        mapped = {Path(line.split()[-1]).name for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    except OSError:
        return True  # cannot tell: trust the setting
    return names <= mapped


def _jemalloc_option(name: str) -> int:
    value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    mallctl = _mallctl()
    if mallctl is None or mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return 0
    return value.value
