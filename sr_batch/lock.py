"""One writer per output: a lock file beside the store, held under a lease.

Strategy: the lock is `.NAME.lock` next to the output, written whole under a private name and
then hard-linked into place (atomic, and refused when the lock exists, on a local or POSIX file
system), holding who took it and until when (`expires`). While the run lives, a daemon thread
renews the lease every quarter lease. A second run finds the file and is refused with one line naming
the holder. A holder that died stops renewing: once its lease has expired (or at once, when the
holder ran on this host and its process is gone) the next run breaks the lock. Breaking renames the
stale file to a unique name first, so of two runs breaking one stale lock only one succeeds, and a
run never deletes a lock it did not judge stale.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr_batch.errors import OutputError

DEFAULT_LEASE_S = 120.0
"""A crashed holder on another host blocks the output for at most this long."""


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@dataclass
class LockHolder:
    """What the lock file says: enough to tell the user who holds it and whether it is stale."""

    token: str
    host: str
    pid: int
    started: str
    expires: float

    @classmethod
    def read(cls, path: Path) -> LockHolder | None:
        try:
            data = json.loads(path.read_text())
            return cls(token=str(data["token"]), host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]), expires=float(data["expires"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # A torn or foreign file: treat it as a holder whose lease expired long ago.
            return cls(token="unreadable", host="?", pid=-1, started="?", expires=0.0)

    def is_stale(self, now: float) -> bool:
        if now > self.expires:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)

    def describe(self) -> str:
        until = dt.datetime.fromtimestamp(self.expires, dt.UTC).isoformat(timespec="seconds")
        return f"process {self.pid} on {self.host} since {self.started}, lease until {until}"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one output; `with output_lock(target):` holds it for the run."""

    def __init__(self, target: Path, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.target = target
        self.path = lock_path(target)
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _content(self) -> str:
        expires = dt.datetime.now(dt.UTC).timestamp() + self.lease_s
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "expires": expires})

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._renewer = threading.Thread(target=self._renew_until_released, name="sr-batch-lock-lease", daemon=True)
                self._renewer.start()
                return
            holder = LockHolder.read(self.path)
            if holder is None:
                continue  # released between our attempt and the read: try again
            if not holder.is_stale(dt.datetime.now(dt.UTC).timestamp()):
                raise OutputError(
                    f"output.uri: {self.target} is being written by another run ({holder.describe()}); "
                    f"wait for it to finish (a dead holder's lock expires with its lease; lock file {self.path})"
                )
            self._break_stale(holder)
        raise OutputError(f"output.uri: could not take the lock {self.path} (other runs keep taking it); try again")

    def _create(self) -> bool:
        """Write the whole lock file under a private name, then link it into place: link() fails when the
        lock exists, and a reader never sees a half-written lock (which it would judge stale)."""
        private = self.path.with_name(f"{self.path.name}.{self.token[:8]}.new")
        with open(private, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(private, self.path)
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)
        return True

    def _break_stale(self, judged: LockHolder) -> None:
        """Remove the stale lock, unless another run replaced it meanwhile (then put that one back)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = LockHolder.read(aside)
        if moved is not None and moved.token != judged.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            if not self.renew():
                self.lost = True
                return

    def renew(self) -> bool:
        """Extend the lease; False when the file is no longer ours (our lease ran out and someone took it)."""
        holder = LockHolder.read(self.path)
        if holder is None or holder.token != self.token:
            return False
        fresh = self.path.with_name(f"{self.path.name}.{self.token[:8]}.renew")
        fresh.write_text(self._content())
        os.replace(fresh, self.path)
        return True

    def check_held(self) -> None:
        """Before each write that matters: refuse to go on without the lock."""
        if self.lost:
            raise OutputError(f"output.uri: lost the lock on {self.target} (the lease expired while this run was stalled); run again to finish")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = LockHolder.read(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_lock(target: Path, lease_s: float | None = None) -> Iterator[OutputLock]:
    """Hold the output's lock for the block; raises OutputError at once when another run holds it."""
    lock = OutputLock(target, lease_s or float(os.environ.get("SR_BATCH_LOCK_LEASE_S", DEFAULT_LEASE_S)))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def holder_of(target: Path) -> dict[str, Any] | None:
    """The current lock holder's record, for messages and tests; None when unlocked."""
    holder = LockHolder.read(lock_path(target))
    return None if holder is None else holder.__dict__
