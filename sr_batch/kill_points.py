"""Deliberate SIGKILLs at named points of a run. A TEST HOOK for the resume tests: off unless the
environment sets SR_BATCH_TEST_KILL; never set it in production.

SR_BATCH_TEST_KILL=POINT:N[,POINT:N] kills when POINT is reached for the N-th time in this process:
- `appended`: the client, after the store's time axis grew and before the manifest records it;
- `recorded`: the client, after the N-th window is recorded in the manifest;
- `replacing`: the client, after the N-th object copied while an --overwrite swaps an S3 store in;
- `written`: a worker, after it wrote a tile's chunks and before it returns them (N ignored; once per
  marker file SR_BATCH_TEST_KILL_MARKER, so the restarted worker and the others go on).
SR_BATCH_TEST_HOLD_UNTIL=FILE makes the client wait at its first `recorded` point until FILE exists
(a run caught holding the lock, for the concurrent-run test).
A client kill takes its whole process group when the client leads one (the CLI started in a new
session: client and LocalCluster workers, i.e. the whole cluster), else the client process alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

_reached: Counter[str] = Counter()


def reached(point: str) -> None:
    """Called at each kill point; does nothing unless the hook names this point."""
    hold = os.environ.get("SR_BATCH_TEST_HOLD_UNTIL")
    if hold and point == "recorded" and not _reached["held"]:
        _reached["held"] += 1
        while not Path(hold).exists():
            time.sleep(0.1)
    wanted = dict(entry.partition(":")[::2] for entry in os.environ.get("SR_BATCH_TEST_KILL", "").split(",") if entry)
    if point not in wanted:
        return
    if point == "written":
        _kill_worker_once(os.environ["SR_BATCH_TEST_KILL_MARKER"])
        return
    _reached[point] += 1
    if _reached[point] == int(wanted[point] or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL) if os.getpgrp() == os.getpid() else os.kill(os.getpid(), signal.SIGKILL)


def _kill_worker_once(marker: str) -> None:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
