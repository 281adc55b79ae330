"""Two details of resumable runs: a lock file is never seen half-written, and a known day is read
from exactly the items its windows were made from."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sr_batch.increment import split_days
from sr_batch.lock import LockHolder, OutputLock
from sr_batch.manifest import KnownDay, Manifest
from sr_batch.search import SearchResult, SolarDay


def test_lock_appears_whole_and_only_once(tmp_path: Path) -> None:
    first = OutputLock(tmp_path / "out.zarr")
    assert first._create()
    holder = LockHolder.read(first.path)
    assert holder is not None and holder.token == first.token and holder.expires > 0
    second = OutputLock(tmp_path / "out.zarr")
    assert not second._create()
    assert LockHolder.read(first.path).token == first.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name], "no private file left behind"


def _day(date: str, *ids: str) -> SolarDay:
    return SolarDay(date=dt.date.fromisoformat(date), items=tuple({"id": i} for i in ids))


def test_known_days_keep_their_recorded_items() -> None:
    manifest = Manifest(
        model_sha256="x",
        settings={},
        grid={},
        rows=[[0, 1]],
        cols=[[0, 1]],
        days=[KnownDay("2019-07-01", ["a"], [[0.0]]), KnownDay("2019-07-06", ["b", "c"], [[0.0]])],
    )
    tonight = [_day("2019-07-01", "a", "a-extra-granule"), _day("2019-07-06", "b"), _day("2019-07-11", "d")]
    days, new, late, vanished = split_days(SearchResult(days=tonight, found=5), manifest)
    assert [d.item_ids for d in days] == [["a"], [], ["d"]]  # the added granule is left out; a day missing "c" has no items
    assert [d.date.isoformat() for d in new] == ["2019-07-11"] and not late
    assert vanished == [dt.date(2019, 7, 6)]
