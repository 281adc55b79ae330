"""One writer per output: a lock file beside the store, held under a lease.

Strategy: the lock is `.NAME.lock` next to the output, written whole under a private name and
then hard-linked into place (atomic, and refused when the lock exists, on a local or POSIX file
system), holding who took it and until when (`expires`). While the run lives, a daemon thread
renews the lease every quarter lease, and the run stops writing a quarter lease before the last lease
it wrote runs out, so it never writes once another run may judge the lock stale (this margin also
covers clocks that disagree by up to a quarter lease between hosts). A second run finds the file and
is refused with one line naming the holder. A holder that died stops renewing: once its lease has expired (or at once, when the
holder ran on this host, in this boot and PID namespace, and its process is gone) the next run
breaks the lock. Breaking renames the stale file to a unique name first, so of two runs breaking
one stale lock only one succeeds, and a run never deletes a lock it did not judge stale.

On S3 (storage.py) there is no link or rename; the same protocol runs on conditional PUTs. Taking the
lock is a PUT with `If-None-Match: *` (refused when the lock object exists). Renewing and breaking
are PUTs with `If-Match: <etag of the lock we read>`: a renewal fails when someone else took the lock,
and of two runs breaking one stale lock only the first PUT matches, so only one wins, and it holds the
lock at once. Releasing deletes the lock only if it is still the one we wrote (`If-Match`). The PID
liveness test applies only when the holder's host is this host, as locally.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr_batch.errors import OutputError
from sr_batch.storage import LocalLocation, Location, PreconditionFailed, S3Location, location

DEFAULT_LEASE_S = 120.0
"""A crashed holder on another host blocks the output for at most this long."""


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def lock_location(target: str | Path | Location) -> Path | S3Location:
    """The lock beside the store: a file path locally, an object (same bucket, parent prefix) on S3."""
    where = location(target)
    return lock_path(where.path) if isinstance(where, LocalLocation) else where.with_name(f".{where.name}.lock")


@dataclass
class LockHolder:
    """What the lock file says: enough to tell the user who holds it and whether it is stale."""

    token: str
    host: str
    pid: int
    started: str
    expires: float
    space: str | None = None
    """The holder's process space (see `process_space`); None in locks written before it was recorded."""

    @classmethod
    def read(cls, path: Path) -> LockHolder | None:
        try:
            return cls.parse(path.read_text())
        except FileNotFoundError:
            return None
        except OSError:
            return cls.parse("")

    @classmethod
    def parse(cls, text: str) -> LockHolder:
        try:
            data = json.loads(text)
            space = data.get("space")
            return cls(
                token=str(data["token"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=str(data["started"]),
                expires=float(data["expires"]),
                space=None if space is None else str(space),
            )
        except (ValueError, KeyError, TypeError):
            # A torn or foreign file: treat it as a holder whose lease expired long ago.
            return cls(token="unreadable", host="?", pid=-1, started="?", expires=0.0)

    def is_stale(self, now: float) -> bool:
        if now > self.expires:
            return True
        # A PID means something only in the PID namespace (and boot) it came from: containers may share a
        # hostname but not their processes, and a PID gone here may be alive there.
        here = self.space is not None and "?" not in self.space and self.space == process_space()
        return self.host == socket.gethostname() and here and not _process_alive(self.pid)

    def describe(self) -> str:
        until = dt.datetime.fromtimestamp(self.expires, dt.UTC).isoformat(timespec="seconds")
        return f"process {self.pid} on {self.host} since {self.started}, lease until {until}"


def process_space() -> str:
    """Where this process's PID is meaningful: the boot and the PID namespace (Linux), else the host alone."""
    parts = []
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("?")
    return " ".join(parts)


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


class LocalLockFile:
    """The lock as a file: written whole under a private name, then hard-linked into place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> LockHolder | None:
        return LockHolder.read(self.path)

    def create(self, content: str, token: str) -> bool:
        """link() fails when the lock exists, and a reader never sees a half-written lock (which it would judge stale)."""
        private = self.path.with_name(f"{self.path.name}.{token[:8]}.new")
        with open(private, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(private, self.path)
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)
        return True

    def take_over(self, judged: LockHolder, content: str, token: str) -> bool:
        """Remove the stale lock, unless another run replaced it meanwhile (then put that one back);
        False: the caller then creates its own."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = LockHolder.read(aside)
        if moved is not None and moved.token != judged.token:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def renew(self, content: str, token: str) -> bool:
        holder = self.read()
        if holder is None or holder.token != token:
            return False
        fresh = self.path.with_name(f"{self.path.name}.{token[:8]}.renew")
        fresh.write_text(content)
        os.replace(fresh, self.path)
        return True

    def release(self, token: str) -> None:
        holder = self.read()
        if holder is not None and holder.token == token:
            self.path.unlink(missing_ok=True)


class ObjectLockFile:
    """The lock as an S3 object, taken, renewed, broken and released by conditional requests."""

    def __init__(self, lock: S3Location) -> None:
        self.lock = lock
        self.etag: str | None = None
        """Of the lock object as we last wrote it."""
        self._seen: str | None = None
        """Of the lock object as we last read it (the holder judged stale)."""

    def prepare(self) -> None:
        """Nothing: S3 has no folders."""

    def read(self) -> LockHolder | None:
        found = self.lock.read_object(self.lock.key)
        self._seen = None if found is None else found[1]
        return None if found is None else LockHolder.parse(found[0])

    def create(self, content: str, token: str) -> bool:
        try:
            self.etag = self.lock.create_object(self.lock.key, content)
        except PreconditionFailed:
            return False
        return True

    def take_over(self, judged: LockHolder, content: str, token: str) -> bool:
        """Replace the stale lock we read with ours: fails if anyone changed it since (another breaker won)."""
        return self._replace_if_unchanged(self._seen, content)

    def renew(self, content: str, token: str) -> bool:
        if self._replace_if_unchanged(self.etag, content):
            return True
        # A renewal whose answer was lost on the way back (the PUT landed, we kept the old etag), or a 409
        # from a conditional write racing ours, leaves our etag behind the object's: the lock is still ours
        # while it holds our token.
        holder = self.read()
        return holder is not None and holder.token == token and self._replace_if_unchanged(self._seen, content)

    def _replace_if_unchanged(self, etag: str | None, content: str) -> bool:
        """Write `content` over the lock object only while it is still the version `etag` names."""
        if etag is None:
            return False
        try:
            self.etag = self.lock.replace_object(self.lock.key, content, etag)
        except PreconditionFailed:
            return False
        return True

    def release(self, token: str) -> None:
        if self.etag is not None:
            self.lock.delete_object(self.lock.key, self.etag)
            self.etag = None


def lock_file(target: str | Path | Location) -> LocalLockFile | ObjectLockFile:
    where = lock_location(target)
    return LocalLockFile(where) if isinstance(where, Path) else ObjectLockFile(where)


class OutputLock:
    """The lock of one output; `with output_lock(target):` holds it for the run."""

    def __init__(self, target: str | Path | Location, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.target = location(target)
        self.path = lock_location(target)
        self.file = lock_file(target)
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.lost = False
        self._valid_until = 0.0
        """time.monotonic() at which the lease we last wrote runs out."""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _lease(self) -> tuple[str, float]:
        """The lock's content, and when (time.monotonic) the lease it states runs out: measured before the
        write, since the lease runs from when its expiry was computed, not from when it landed."""
        until = time.monotonic() + self.lease_s
        expires = dt.datetime.now(dt.UTC).timestamp() + self.lease_s
        holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "space": process_space()}
        return json.dumps({**holder, "started": self.started, "expires": expires}), until

    def acquire(self) -> None:
        self.file.prepare()
        for _ in range(3):
            if self._create():
                self._start_renewing()
                return
            holder = self.file.read()
            if holder is None:
                continue  # released between our attempt and the read: try again
            if not holder.is_stale(dt.datetime.now(dt.UTC).timestamp()):
                raise OutputError(
                    f"output.uri: {self.target} is being written by another run ({holder.describe()}); "
                    f"wait for it to finish (a dead holder's lock expires with its lease; lock file {self.path})"
                )
            content, until = self._lease()
            if self.file.take_over(holder, content, self.token):
                self._valid_until = until
                self._start_renewing()
                return
        raise OutputError(f"output.uri: could not take the lock {self.path} (other runs keep taking it); try again")

    def _create(self) -> bool:
        content, until = self._lease()
        if not self.file.create(content, self.token):
            return False
        self._valid_until = until
        return True

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_until_released, name="sr-batch-lock-lease", daemon=True)
        self._renewer.start()

    def _renew_until_released(self) -> None:
        """Renew every quarter lease. A renewal that fails to reach the storage (a network error on S3) is
        retried at the next tick; once the lease we last wrote is too close to its end the lock is taken as
        lost, and no renewal is tried after it ran out (another run may hold the lock by then)."""
        while not self._stop.wait(self.lease_s / 4):
            if not self.is_held():
                self.lost = True
                return
            try:
                if not self.renew():
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a network error must not end the renewals silently
                continue

    def renew(self) -> bool:
        """Extend the lease; False when the lock is no longer ours (our lease ran out and someone took it)."""
        content, until = self._lease()
        renewed = self.file.renew(content, self.token)
        if renewed:
            self._valid_until = until
        return renewed

    def is_held(self) -> bool:
        """Ours, with at least a quarter lease left of the lease we last wrote."""
        return not self.lost and time.monotonic() < self._valid_until - self.lease_s / 4

    def check_held(self) -> None:
        """Before each write that matters: refuse to go on without the lock."""
        if not self.is_held():
            self.lost = True
            raise OutputError(
                f"output.uri: lost the lock on {self.target} (its lease could not be renewed in time: the storage was "
                "unreachable or this run stalled); run again to finish"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self.file.release(self.token)


@contextlib.contextmanager
def output_lock(target: str | Path | Location, lease_s: float | None = None) -> Iterator[OutputLock]:
    """Hold the output's lock for the block; raises OutputError at once when another run holds it."""
    lock = OutputLock(target, lease_s or float(os.environ.get("SR_BATCH_LOCK_LEASE_S", DEFAULT_LEASE_S)))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def holder_of(target: str | Path | Location) -> dict[str, Any] | None:
    """The current lock holder's record, for messages and tests; None when unlocked."""
    holder = lock_file(target).read()
    return None if holder is None else holder.__dict__
