"""What a job's client costs at the scale of a whole Sentinel-2 tile, without computing a pixel.

    python bench/whole_tile_client.py [--size 10980] [--tile 256] [--days 70]

A job's client plans, lays out the output store and appends its dates, builds the task graph,
submits the tasks one at a time and records each finished window in the manifest. At a whole tile
(10,980² px: 1,849 tiles of 256 px) those costs grow with the tiles and the days, and until the
first task is submitted the cluster has nothing to do.
This measures them on a catalogue of that size served from the local STAC API: sparse GeoTIFFs (a
header, no pixel block) that the search's asset checks open like any other. Clouds are not scored
(sparse files read as nodata); every day counts as cloudless in every tile, the most windows the
days allow. Tasks are submitted to a scheduler without workers, so what is timed is the client's
(and the in-process scheduler's) work only. Prints a table and writes its numbers as JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import rasterio
from affine import Affine
from distributed import Client, LocalCluster
from pyproj import Transformer

from sr_batch.increment import plan_increment
from sr_batch.job import checked_model, dates_per_task, keep_annotations, model_ref, write_tasks
from sr_batch.manifest import MANIFEST_KEY, WRITE_SPACING, KnownDay, Manifest, grid_record
from sr_batch.model import receptive_radius
from sr_batch.sample import ASSETS, COLLECTION_ID, build_sample_catalog
from sr_batch.search import search
from sr_batch.sink import append_dates, create_store
from sr_batch.spec import parse_spec
from sr_batch.stac_server import serve_items
from sr_batch.storage import location

CRS = 3035
SUBMITTED = 300
"""Tasks submitted for the per-task figure (each unit's reads with its first task, as a job does)."""


def sparse_catalog(root: Path, size: int, days: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The sample's first `days` items, each asset a sparse size x size GeoTIFF; (collection, items, AOI)."""
    sample = build_sample_catalog()
    west, north = 5271980.0, 2533000.0
    transform = Affine(10.0, 0.0, west, 0.0, -10.0, north)
    east, south = west + 10 * size, north - 10 * size
    profile = dict(driver="GTiff", dtype="uint16", nodata=0, count=1, crs=f"EPSG:{CRS}", transform=transform, width=size, height=size)
    profile |= dict(tiled=True, blockxsize=512, blockysize=512, sparse_ok=True)
    to_lonlat = Transformer.from_crs(CRS, 4326, always_xy=True)
    corners = [(west, south), (east, south), (east, north), (west, north), (west, south)]
    ring = [list(to_lonlat.transform(x, y)) for x, y in corners]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    items = []
    for original in sample.items[:days]:
        item = copy.deepcopy(original)
        folder = root / item["id"]
        folder.mkdir(parents=True)
        for key in ASSETS.values():
            path = folder / f"{key}.tif"
            with rasterio.open(path, "w", **profile):
                pass  # a header only: every block reads as nodata
            item["assets"][key]["href"] = path.resolve().as_uri()
        properties = item["properties"]
        properties["proj:shape"] = [size, size]
        properties["proj:transform"] = list(transform)[:6] + [0.0, 0.0, 1.0]
        properties["proj:bbox"] = [west, south, east, north]
        properties["proj:geometry"] = {"type": "Polygon", "coordinates": [[list(c) for c in corners]]}
        item["geometry"] = {"type": "Polygon", "coordinates": [ring]}
        item["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
        items.append(item)
    collection = copy.deepcopy(sample.collection)
    collection["extent"]["spatial"]["bbox"] = [[min(lons), min(lats), max(lons), max(lats)]]
    inset = [list(to_lonlat.transform(x, y)) for x, y in [(west + 50, south + 50), (east - 50, south + 50), (east - 50, north - 50), (west + 50, north - 50)]]
    return collection, items, {"type": "Polygon", "coordinates": [[*inset, inset[0]]]}


def timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def submission_ms(tasks: Any, count: int) -> tuple[float, float]:
    """Time per task to submit `count` tasks in a job's order, each unit's reads with its first task, until the
    scheduler (in the client's process, as in a job's LocalCluster) holds them all; and the CPU time
    of that process per task (what the submissions take from the client's and scheduler's core)."""
    units = sorted(tasks.per_unit)
    flat = [(unit, task) for unit in units for task in tasks.per_unit[unit]][:count]
    with (
        LocalCluster(n_workers=0, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
        keep_annotations(False),
    ):
        held: dict[Any, Any] = {}
        futures = []
        started, started_cpu = time.perf_counter(), time.process_time()
        for position, (unit, task) in enumerate(flat):
            if unit not in held:  # a unit's reads, with its first task (job._compute)
                held[unit] = client.compute(tasks.reads[unit], priority=-position)
            (future,) = client.compute([task], priority=-position)
            futures.append(future)
        keys = [future.key for future in futures]
        while not client.run_on_scheduler(holds_all, keys=keys):
            time.sleep(0.05)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    return 1e3 * seconds / len(flat), 1e3 * cpu_seconds / len(flat)


def holds_all(dask_scheduler: Any, keys: list[Any]) -> bool:
    return all(key in dask_scheduler.tasks for key in keys)


def manifest_costs(plan: Any, store: Path) -> dict[str, float]:
    """The record once every window of the plan is written: its size and one write of it."""
    manifest = Manifest(model_sha256="0" * 64, settings={}, grid=grid_record(plan.grid), rows=[list(r) for r in plan.rows], cols=[list(c) for c in plan.cols])
    manifest.days = [KnownDay(day.date.isoformat(), day.item_ids, plan.cloud[d].tolist()) for d, day in enumerate(plan.days)]
    manifest.times = [plan.days[d].date.isoformat() for d in plan.output_days]
    for tile, windows in plan.windows.items():
        for window in windows:
            manifest.record_done(plan.days[window.target].date.isoformat(), *tile, [])
    _, seconds = timed(manifest.write, store)
    size = (store / MANIFEST_KEY).stat().st_size
    return {"manifest_mb": size / 1e6, "manifest_write_s": seconds, "windows": manifest.done_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10980, help="region edge in 10 m pixels (a Sentinel-2 tile: 10980)")
    parser.add_argument("--tile", type=int, default=256, help="tiling.tile")
    parser.add_argument("--days", type=int, default=70, help="solar days (at most the sample's 140)")
    parser.add_argument("--out", type=Path, default=Path("bench/whole-tile.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sr-batch-whole-tile-") as tmp:
        collection, items, aoi = sparse_catalog(Path(tmp) / "scenes", args.size, args.days)
        with serve_items(collection, items) as url:
            job = {"name": "whole-tile", "stac": {"url": url, "collection": COLLECTION_ID}, "aoi": {"geometry": aoi}}
            job |= {"time": {"start": "2015-01-01", "end": "2021-12-31"}, "tiling": {"tile": args.tile}, "output": {"uri": f"{tmp}/out.zarr"}}
            spec = parse_spec(job)
            found, search_s = timed(search, spec)
        loaded = checked_model(spec)
        radius = receptive_radius(loaded.info.architecture, spec.model.frames)
        increment, plan_s = timed(plan_increment, spec, found, None, radius, score_new=False)
        plan = increment.plan
        per_task = dates_per_task(plan, spec.model.batch_size, 1)
        manifest = Manifest(model_sha256="-", settings={}, grid={}, rows=[], cols=[], times=[plan.days[d].date.isoformat() for d in plan.output_days])
        tasks, graph_s = timed(write_tasks, location(f"{tmp}/out.zarr"), plan, manifest, model_ref(spec), False, per_task)
        count = sum(len(per_tile) for per_tile in tasks.per_unit.values())
        per_task_ms, per_task_cpu_ms = submission_ms(tasks, min(SUBMITTED, count))
        store = Path(tmp) / "record.zarr"
        store.mkdir()
        record = manifest_costs(plan, store)
        output = location(f"{tmp}/layout.zarr")
        output.mkdir()
        _, layout_s = timed(create_store, output, plan, loaded)
        _, append_s = timed(append_dates, output, plan, plan.output_days, loaded)
    row = {"size": args.size, "tile": args.tile, "days": len(plan.days), "tiles": len(plan.rows) * len(plan.cols), "tasks": count, "dates_per_task": per_task}
    row |= {"search_s": search_s, "plan_s": plan_s, "graph_s": graph_s, "submission_ms_per_task": per_task_ms, "submission_cpu_ms_per_task": per_task_cpu_ms}
    row |= record | {"store_layout_s": layout_s, "append_dates_s": append_s}
    row["submission_s_all_tasks"] = per_task_ms * count / 1e3
    print(f"{args.size}² px in {row['tiles']} tiles of {args.tile} px, {row['days']} days, {count} tasks of {per_task} dates (every day cloudless)")
    print(f"  search (with the asset checks)   {search_s:8.1f} s")
    print(f"  plan, without cloud scores       {plan_s:8.1f} s")
    print(f"  store layout, then its dates     {layout_s:8.1f} s + {append_s:.1f} s")
    print(f"  task graph                       {graph_s:8.1f} s   (before the first task can start)")
    print(
        f"  submission                       {per_task_ms:8.1f} ms a task ({per_task_cpu_ms:.1f} ms of the process's CPU), "
        f"{row['submission_s_all_tasks']:.0f} s for all, spread over the run"
    )
    print(
        f"  manifest at the end              {record['manifest_mb']:8.2f} MB, {record['manifest_write_s']:.2f} s a write "
        f"(so written at most every {WRITE_SPACING * record['manifest_write_s']:.1f} s; {record['windows']} windows)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
