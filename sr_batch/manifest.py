"""The record of what an output holds: which (date, tile) windows are safely written, and with what.

Why a manifest: Zarr v3 skips all-fill chunks and a killed run leaves chunks of unfinished windows, so
which chunks exist proves nothing. The manifest is the one record a run trusts. It lives in the store
as the attributes of an empty sub-group, `sr_batch_manifest/zarr.json`, which zarr tools can read and
`xr.open_zarr` ignores. It holds:

- `model_sha256` and `settings`: what the data was made with (settings = the job spec less the fields
  that do not change a pixel: name, time.end, output, stac.url, model.device, model.batch_size);
- `grid`, `rows`, `cols`: the output grid and tiles, fixed by the first run;
- `days`: every solar day the runs have seen, in date order, with its item ids and its cloud score per
  tile (cloudy days too, so a later run needs to score only days it has not seen);
- `times`: the store's time axis as committed (the store may briefly be longer: see sink.py);
- `done`: per date, the tiles whose window is written; `empty_chunks`: chunks of done windows that
  were all fill, hence absent by design;
- `late_days`: dates that appeared after later dates were written, skipped (see increment.py).

Every update replaces the file whole (storage.py: through a temporary file, fsync and rename locally;
one PUT, atomic per object, on S3), so a reader or a killed writer sees the previous record or the
next one, never half of one. A window enters `done` only after
its chunks are written. As the record grows with the region and its history, a run writes it less
often (`ManifestWriter`): a window written but not yet recorded is only computed again by the next run.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from sr_batch.cube import Grid
from sr_batch.errors import OutputError
from sr_batch.spec import JobSpec, spec_json
from sr_batch.storage import Location, location

MANIFEST_GROUP = "sr_batch_manifest"
MANIFEST_KEY = f"{MANIFEST_GROUP}/zarr.json"
FORMAT = 1

EXECUTION_ONLY = (
    ("name",),
    ("time", "end"),
    ("output",),
    ("stac", "url"),
    ("stac", "timeout_s"),
    ("stac", "retries"),
    ("stac", "max_unreadable_fraction"),
    ("model", "device"),
    ("model", "batch_size"),
    ("model", "compile"),
)
"""Spec fields that do not change a written pixel: they may differ between runs on one output."""


def manifest_path(store: Path) -> Path:
    return store / MANIFEST_KEY


def output_settings(spec: JobSpec) -> dict[str, Any]:
    """The spec fields that decide the output's pixels; any other field added later counts by default."""
    return settings_of(json.loads(spec_json(spec)))


def settings_of(job: dict[str, Any]) -> dict[str, Any]:
    """A stored job spec (as JSON data) less its execution-only fields."""
    data = json.loads(json.dumps(job))
    for path in EXECUTION_ONLY:
        node = data
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    if not data.get("time", {}).get("history_days", 1):
        del data["time"]["history_days"]  # no history is what outputs made before the setting existed did
    return data


@dataclass
class KnownDay:
    date: str
    items: list[str]
    cloud: list[list[float]]
    """(tile row, tile col) unusable fraction; float32 values, exact through JSON."""


@dataclass
class Manifest:
    model_sha256: str
    settings: dict[str, Any]
    grid: dict[str, Any]
    rows: list[list[int]]
    cols: list[list[int]]
    days: list[KnownDay] = field(default_factory=list)
    times: list[str] = field(default_factory=list)
    done: dict[str, list[list[int]]] = field(default_factory=dict)
    empty_chunks: list[str] = field(default_factory=list)
    late_days: list[str] = field(default_factory=list)
    updated: str = ""
    format: int = FORMAT
    _done_tiles: dict[str, tuple[list[list[int]], set[tuple[int, int]]]] = field(default_factory=dict, init=False, repr=False, compare=False)
    """`done` per date as a set, with the list it was made from (not stored): a run asks for every
    window of the output, and a list scan per window would take minutes for a whole Sentinel-2 tile of
    several years."""

    # --- reading and writing ------------------------------------------------------------------

    @classmethod
    def read(cls, store: str | Path | Location) -> Manifest | None:
        """The store's manifest; None when it has none; OutputError when it is unreadable."""
        store = location(store)
        path = f"{store}/{MANIFEST_KEY}"
        try:
            text = store.read_text(MANIFEST_KEY)
            if text is None:
                return None
            raw = json.loads(text)
        except (OSError, ValueError) as err:
            raise OutputError(
                f"output.uri: the manifest {path} is unreadable ({type(err).__name__}); run `sr-batch verify`, or pass --overwrite to recompute"
            ) from None
        try:
            data = dict(raw["attributes"])
            data["days"] = [KnownDay(**day) for day in data["days"]]
            manifest = cls(**data)
        except (KeyError, TypeError, ValueError) as err:
            raise OutputError(f"output.uri: the manifest {path} is malformed ({err}); run `sr-batch verify`, or pass --overwrite to recompute") from None
        if manifest.format != FORMAT:
            raise OutputError(f"output.uri: manifest format {manifest.format} is not {FORMAT}; pass --overwrite to recompute with this version")
        return manifest

    def write(self, store: str | Path | Location) -> None:
        """Replace the record atomically (storage.py: temporary file, fsync and rename locally; one PUT on S3)."""
        self.updated = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        document = {"zarr_format": 3, "node_type": "group", "attributes": self._attributes()}
        location(store).write_text(MANIFEST_KEY, json.dumps(document, separators=(",", ":")))

    def _attributes(self) -> dict[str, Any]:
        """The stored fields as JSON data. Not `dataclasses.asdict`: its deep copy took 1.1 of the 1.3 s a
        write of a whole Sentinel-2 tile's record over a year takes (3.5 MB); json.dumps copies nothing."""
        stored = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        stored["days"] = [{"date": day.date, "items": day.items, "cloud": day.cloud} for day in self.days]
        return stored

    # --- queries --------------------------------------------------------------------------------

    def known_dates(self) -> list[dt.date]:
        return [dt.date.fromisoformat(day.date) for day in self.days]

    def cloud(self) -> np.ndarray:
        """(known day, tile row, tile col) float32, bit-identical to the scores first computed."""
        if not self.days:
            return np.zeros((0, len(self.rows), len(self.cols)), np.float32)
        return np.array([day.cloud for day in self.days], np.float32)

    def is_done(self, date: str, row: int, col: int) -> bool:
        return date in self.done and (row, col) in self._done_set(date)

    def _done_set(self, date: str) -> set[tuple[int, int]]:
        """The set of `done[date]`, made again whenever that list was replaced or changed elsewhere."""
        tiles = self.done[date]
        made_from, found = self._done_tiles.get(date, (None, set()))
        if made_from is not tiles or len(found) != len(tiles):
            found = {(row, col) for row, col in tiles}
            self._done_tiles[date] = (tiles, found)
        return found

    def done_count(self) -> int:
        return sum(len(tiles) for tiles in self.done.values())

    def record_done(self, date: str, row: int, col: int, empty_chunks: list[tuple[int, int]]) -> None:
        tiles = self.done.setdefault(date, [])
        found = self._done_set(date)
        if (row, col) not in found:
            tiles.append([row, col])
            found.add((row, col))
        self.empty_chunks.extend(f"{date}/{iy}/{ix}" for iy, ix in empty_chunks)

    def the_grid(self) -> Grid:
        return Grid(**self.grid)


WRITE_SPACING = 9.0
"""After a write that took t seconds, the next waits 9 t: writing the record takes at most a tenth of a
run's time."""


class ManifestWriter:
    """Records finished windows in a manifest, and writes it to the store at once while that is cheap,
    less often as the record grows. Each write replaces the whole record, whose size follows the region
    and its history: a whole Sentinel-2 tile over a year in 256 px tiles holds 3.5 MB and takes 0.2 s
    to write, and a write after each of its 16,000 tasks would keep the run's client from sending the
    cluster its next tasks. A window written but not yet recorded when a run dies is computed again by
    the next run, never half-claimed."""

    def __init__(self, manifest: Manifest, store: str | Path | Location, before_write: Callable[[], None] = lambda: None) -> None:
        self.manifest = manifest
        self.store = store
        self.before_write = before_write
        self.unwritten = 0
        """Windows recorded in memory since the last write."""
        self._next_write = 0.0

    def add(self, date: str, row: int, col: int, empty_chunks: list[tuple[int, int]]) -> None:
        self.manifest.record_done(date, row, col, empty_chunks)
        self.unwritten += 1

    def write_if_due(self) -> int:
        """Write when the last write is long enough ago; the number of windows the write recorded (0: none)."""
        return self.write() if time.monotonic() >= self._next_write else 0

    def write(self) -> int:
        """Write what was added since the last write, if anything; the number of windows it recorded."""
        if not self.unwritten:
            return 0
        self.before_write()
        started = time.monotonic()
        self.manifest.write(self.store)
        ended = time.monotonic()
        self._next_write = ended + WRITE_SPACING * (ended - started)
        written, self.unwritten = self.unwritten, 0
        return written


def grid_record(grid: Grid) -> dict[str, Any]:
    return {"epsg": grid.epsg, "west": grid.west, "north": grid.north, "width": grid.width, "height": grid.height}


def differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: old → new' for each setting that differs, dotted like the spec."""
    found = []
    for key in sorted(stored.keys() | wanted.keys()):
        old, new = stored.get(key), wanted.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            found.extend(differences(old, new, f"{name}."))
        elif old != new:
            found.append(f"{name}: {json.dumps(old)} → {json.dumps(new)}")
    return found


def with_precision(settings: dict[str, Any], precision: str) -> dict[str, Any]:
    """The settings with `model.precision: auto` replaced by what it resolved to on the cluster."""
    resolved = json.loads(json.dumps(settings))
    resolved.setdefault("model", {})["precision"] = precision
    return resolved


def setting_changes(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The differences that make two settings incompatible. A precision one side of which is `auto` is
    left out: the run compares it once it knows what auto means on its workers (job.py), and outputs
    written before precisions were resolved stored `auto`."""
    precisions = (stored.get("model", {}).get("precision"), wanted.get("model", {}).get("precision"))
    if "auto" in precisions:
        stored, wanted = with_precision(stored, "auto"), with_precision(wanted, "auto")
    return differences(stored, wanted)


def check_compatible(manifest: Manifest, target: Path | Location, model_sha256: str, settings: dict[str, Any]) -> None:
    """Refuse to extend an output made with another model or other settings."""
    if manifest.model_sha256 != model_sha256:
        raise OutputError(
            f"output.uri: {target} was made with model sha256 {manifest.model_sha256[:12]}…, this job's model is {model_sha256[:12]}…; "
            "pass --overwrite to recompute it with this model, or write to another output.uri"
        )
    changed = setting_changes(manifest.settings, settings)
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise OutputError(
            f"output.uri: {target} was made with other settings ({shown}); pass --overwrite to recompute it with these, or write to another output.uri"
        )


def written_mask(store: str | Path | Location) -> Any:
    """For readers: (time, tile_row, tile_col) True where the window is recorded as written.

    The store's time axis may run ahead of the record during a run; those dates are all False."""
    import xarray as xr

    store = location(store)
    manifest = Manifest.read(store)
    if manifest is None:
        raise OutputError(f"output.uri: {store} has no manifest; not an sr-batch output")
    with xr.open_zarr(**store.zarr_args(), consolidated=False) as ds:
        dates = [str(t)[:10] for t in ds.time.values]
        mask = np.zeros((len(dates), ds.sizes["tile_row"], ds.sizes["tile_col"]), bool)
        for k, date in enumerate(dates):
            for row, col in manifest.done.get(date, []) if k < len(manifest.times) else []:
                mask[k, row, col] = True
        return xr.DataArray(mask, dims=("time", "tile_row", "tile_col"), coords={"time": ds.time.values}, name="written")
