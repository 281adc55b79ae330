"""What a run on an output must still do: the plan over every day, and the windows not yet written.

A run searches the whole period, as a fresh run would. Days already in the manifest keep the cloud
scores recorded there (so the plan of old days is exactly what the first run computed); only days
the manifest has not seen are scored. Windows are causal, so a day newer than every known day adds
windows for itself and never changes an older date's window: those are appended along `time`.

A day that turns up OLDER than the newest known day (a late-arriving scene) would change the
windows of the dates after it, which are already written. It is skipped, with a warning naming it,
and recorded as late; `--overwrite` recomputes the output with it. Skipping keeps every written
date and every future date computed from one consistent set of days.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np

from sr_batch.cube import choose_grid
from sr_batch.errors import SearchError
from sr_batch.manifest import Manifest
from sr_batch.plan import Plan, Window, causal_windows, first_output_day, score_clouds, tile_grid
from sr_batch.search import SearchResult, SolarDay
from sr_batch.spec import JobSpec


@dataclass
class Increment:
    plan: Plan
    """Every day used (known, then new), cloud scores and windows over all of them."""
    new_days: list[int]
    """Indices into plan.days of days the manifest had not seen: their cloud scores are computed now."""
    late: list[SolarDay]
    """Days found older than the newest known day, skipped."""
    vanished: list[dt.date]
    """Known days the search no longer returns (outside time.end, or removed from the API)."""

    def pending(self, manifest: Manifest | None) -> dict[tuple[int, int], list[Window]]:
        """Per tile, the windows not recorded as written."""
        days = self.plan.days
        return {
            tile: [w for w in windows if manifest is None or not manifest.is_done(days[w.target].date.isoformat(), *tile)]
            for tile, windows in self.plan.windows.items()
        }


def split_days(found: SearchResult, manifest: Manifest | None) -> tuple[list[SolarDay], list[SolarDay], list[SolarDay], list[dt.date]]:
    """(days in the plan, of which new, late days skipped, known days not found)."""
    if manifest is None or not manifest.days:
        return found.days, found.days, [], []
    known = manifest.known_dates()
    newest = max(known)
    by_date = {day.date: day for day in found.days}
    ids = {dt.date.fromisoformat(day.date): day.items for day in manifest.days}
    # A known day is read from exactly the items recorded for it (its cloud scores and windows were made
    # from them): a granule added since is left out. A known day the search no longer returns whole
    # keeps its place (its windows are written) without items; a window needing its pixels fails loudly.
    kept = [_as_recorded(by_date.get(date), date, ids[date]) for date in known]
    new = [day for day in found.days if day.date > newest]
    late = [day for day in found.days if day.date < newest and day.date not in ids]
    vanished = [day.date for day in kept if not day.items]
    return kept + new, new, late, vanished


def _as_recorded(found: SolarDay | None, date: dt.date, recorded: list[str]) -> SolarDay:
    """The day with the recorded items only; no items when any recorded item is missing tonight."""
    if found is None:
        return SolarDay(date=date, items=())
    items = tuple(item for item in found.items if item["id"] in set(recorded))
    if {item["id"] for item in items} != set(recorded):
        return SolarDay(date=date, items=())
    return SolarDay(date=date, items=items)


def plan_increment(spec: JobSpec, found: SearchResult, manifest: Manifest | None, radius: int, score_new: bool = True) -> Increment:
    """The increment; scores the new days' clouds on the active Dask client when `score_new`."""
    days, new, late, vanished = split_days(found, manifest)
    if manifest is not None:
        grid, note = manifest.the_grid(), f"EPSG:{manifest.grid['epsg']} (as recorded in the output)"
        rows = [tuple(r) for r in manifest.rows]
        cols = [tuple(c) for c in manifest.cols]
    else:
        grid, note = choose_grid(days, spec.aoi.shape(), spec.crs)
        rows, cols = tile_grid(grid, spec, radius)
    known_cloud = manifest.cloud() if manifest is not None else np.zeros((0, len(rows), len(cols)), np.float32)
    used = replace(found, days=days)
    plan = Plan(spec=spec, found=used, grid=grid, crs_note=note, rows=rows, cols=cols, cloud=known_cloud, radius=radius)
    new_cloud = np.zeros((len(new), len(rows), len(cols)), np.float32)
    if new and score_new:
        new_cloud = score_clouds(replace(plan, found=replace(found, days=new)))
    plan.cloud = np.concatenate([known_cloud, new_cloud.astype(np.float32)])
    plan.windows = causal_windows(plan.cloud, spec.cloud.max_cloud_fraction, spec.model.frames, first_output_day(days, spec))
    first_new = len(days) - len(new)
    return Increment(plan=plan, new_days=list(range(first_new, len(days))), late=late, vanished=vanished)


def check_frames_available(plan: Plan, pending: dict[tuple[int, int], list[Window]]) -> None:
    """A pending window whose frames include a day the API no longer returns cannot be computed."""
    missing = sorted({plan.days[f].date for windows in pending.values() for w in windows for f in w.frames if not plan.days[f].items})
    if missing:
        shown = ", ".join(str(d) for d in missing[:5])
        raise SearchError(
            f"time: dates already used by this output are no longer returned by {plan.spec.stac.url} ({shown}); "
            "restore them in the STAC API or pass --overwrite to recompute without them"
        )
