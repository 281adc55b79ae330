"""The per-tile progress count: each task counted once, other jobs' events ignored, a line per tenth."""

from __future__ import annotations

from sr_batch.progress import TileProgress


def _event(output: str, row: int, col: int, group: int, dates: int) -> tuple[float, dict]:
    return 0.0, {"output": output, "tile": [row, col], "group": group, "dates": dates, "pixels": 100, "device": "cpu", "seconds": 1.0, "worker": "w"}


def test_a_task_run_again_is_counted_once() -> None:
    lines: list[str] = []
    progress = TileProgress("out.zarr", total_tile_dates=20, echo=lines.append, bar=None)
    progress.on_event(_event("out.zarr", 0, 0, 0, 8))
    progress.on_event(_event("out.zarr", 0, 0, 0, 8))  # recomputed after its worker died
    progress.on_event(_event("other.zarr", 0, 1, 0, 8))  # another job on the same cluster
    assert progress.done == 8
    progress.on_event(_event("out.zarr", 0, 0, 1, 8))  # the same tile's next group of dates
    progress.on_event(_event("out.zarr", 1, 0, 0, 4))
    assert progress.done == 20
    assert len(lines) == 10 and lines[-1].startswith("  super-resolved 20/20 tile-dates (100%)")
