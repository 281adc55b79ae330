"""Progress of a running job, per tile: each super-resolution task reports itself on a Dask event topic
(tiles.TILE_TOPIC) and the client counts tile-dates as they finish.

On a terminal this is a rich progress bar; in logs (cron, Kubernetes) it is one line per tenth of the
work, so a nightly run's log shows its pace without flooding. The Dask dashboard link is printed when
the cluster connects (cluster.py), for the task-level view.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from distributed import Client

from sr_batch.tiles import TILE_TOPIC

Echo = Callable[[str], None]


class TileProgress:
    """Counts finished tile-dates from task events, each task once: a task Dask runs again (its worker
    died, or its result was lost before the write) reports itself again."""

    def __init__(self, output: str, total_tile_dates: int, echo: Echo, bar: Any | None) -> None:
        self.output = output
        self.total = total_tile_dates
        self.done = 0
        self._seen: set[tuple[int, int, int]] = set()
        self._echo = echo
        self._bar = bar
        self._task = bar.add_task("super-resolving tile-dates", total=total_tile_dates) if bar else None
        self._next_tenth = 1
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        if message.get("output") != self.output:
            return  # another job on the same cluster
        task = (*message["tile"], message.get("group", 0))
        with self._lock:
            if task in self._seen:
                return
            self._seen.add(task)
            self.done += int(message["dates"])
            if self._bar is not None:
                self._bar.update(self._task, completed=self.done)
                return
            while self.total and self.done * 10 >= self._next_tenth * self.total and self._next_tenth <= 10:
                seconds = time.monotonic() - self._started
                self._echo(f"  super-resolved {self.done}/{self.total} tile-dates ({10 * self._next_tenth}%) in {seconds:.0f} s")
                self._next_tenth += 1


@contextmanager
def tile_progress(client: Client, output: str, total_tile_dates: int, show_bar: bool, echo: Echo) -> Iterator[TileProgress]:
    """Follow the job's tile events while the block runs; a bar on a terminal, log lines otherwise."""
    bar = None
    if show_bar and sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    tracker = TileProgress(output, total_tile_dates, echo, bar)
    client.subscribe_topic(TILE_TOPIC, tracker.on_event)
    try:
        if bar is not None:
            with bar:
                yield tracker
        else:
            yield tracker
    finally:
        client.unsubscribe_topic(TILE_TOPIC)
