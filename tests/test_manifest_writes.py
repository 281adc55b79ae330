"""The manifest of a large output: written less often as it grows, read back unchanged, and asked
about every window without scanning lists (a whole Sentinel-2 tile has 1,849 tiles of 256 px)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from sr_batch.manifest import MANIFEST_KEY, WRITE_SPACING, KnownDay, Manifest, ManifestWriter

TILES = 43  # 10,980 px in 256 px tiles


def whole_tile_manifest(days: int) -> Manifest:
    """A whole Sentinel-2 tile's record after `days` days, every window of the first half written."""
    rng = np.random.default_rng(0)
    edges = [[256 * k, 256 * (k + 1)] for k in range(TILES)]
    manifest = Manifest(model_sha256="0" * 64, settings={"tiling": {"tile": 256}}, grid={"epsg": 32634}, rows=edges, cols=edges)
    dates = [f"2024-{1 + d // 28:02d}-{1 + d % 28:02d}" for d in range(days)]
    manifest.days = [KnownDay(date, [f"S2B_MSIL2A_{date}"], rng.random((TILES, TILES)).astype(np.float32).tolist()) for date in dates]
    manifest.times = dates
    for date in dates[: days // 2]:
        for row in range(TILES):
            for col in range(TILES):
                manifest.record_done(date, row, col, [])
    return manifest


def stored_fields(manifest: Manifest) -> dict:
    return {f.name: getattr(manifest, f.name) for f in fields(manifest) if f.init}


def test_a_large_record_is_written_less_often_and_nothing_recorded_is_lost(tmp_path: Path) -> None:
    manifest = whole_tile_manifest(70)
    writer = ManifestWriter(manifest, tmp_path)
    dates = manifest.times[35:]
    writer.add(dates[0], 0, 0, [])
    assert writer.write_if_due() == 1, "the first window is written at once"
    # The next write waits WRITE_SPACING times as long as that 3.5 MB write took: adding windows takes
    # microseconds, so none of these is written yet.
    windows = [(date, row, 0) for date in dates[1:] for row in range(5)]
    due = 0
    for date, row, col in windows:
        writer.add(date, row, col, [(row, col)] if row == 0 else [])
        due += writer.write_if_due()
    assert due == 0 and writer.unwritten == len(windows)
    assert Manifest.read(tmp_path).done_count() == manifest.done_count() - len(windows)
    assert writer.write() == len(windows) and writer.write() == 0
    stored = Manifest.read(tmp_path)
    assert stored.done_count() == manifest.done_count() == 35 * TILES * TILES + 1 + len(windows)
    assert all(stored.is_done(date, row, col) for date, row, col in windows)
    assert len(stored.empty_chunks) == len(dates) - 1
    assert WRITE_SPACING >= 1


def test_the_record_reads_back_as_written(tmp_path: Path) -> None:
    manifest = whole_tile_manifest(6)
    manifest.late_days = ["2023-12-30"]
    manifest.empty_chunks = ["2024-01-01/0/3"]
    manifest.write(tmp_path)
    stored = Manifest.read(tmp_path)
    assert stored_fields(stored) == stored_fields(manifest)
    attributes = json.loads((tmp_path / MANIFEST_KEY).read_text())["attributes"]
    assert sorted(attributes) == sorted(stored_fields(manifest)), "only the stored fields, no cache"
    assert attributes["days"][2] == {"date": manifest.days[2].date, "items": manifest.days[2].items, "cloud": manifest.days[2].cloud}


def test_done_answers_follow_every_change_of_the_record() -> None:
    manifest = whole_tile_manifest(4)
    first, last = manifest.times[0], manifest.times[-1]
    assert manifest.is_done(first, 42, 42) and not manifest.is_done(last, 0, 0)
    assert last not in manifest.done, "asking adds no date to the record"
    manifest.record_done(last, 3, 4, [])
    manifest.record_done(last, 3, 4, [])
    assert manifest.done[last] == [[3, 4]] and manifest.is_done(last, 3, 4)
    manifest.done[first] = [[1, 1]]  # replaced from outside, as a reader's code may
    assert manifest.is_done(first, 1, 1) and not manifest.is_done(first, 42, 42)
    manifest.done[first].append([2, 2])
    assert manifest.is_done(first, 2, 2)
    manifest.done = {}
    assert not manifest.is_done(last, 3, 4) and manifest.done_count() == 0
