"""Where a small job's tile tasks run: the same job again and again, its tasks counted per worker.

    python bench/task_placement.py [--size 256] [--tile 128] [--dates 4] [--runs 20] [--workers 2]

A job of few tasks submits them all before any has ended. Which worker each runs on decides whether
the job takes one task's time per worker or more: 4 tasks on 2 workers run in two rounds when spread
2 and 2, and in three when one worker takes 3. Each run is a whole `run_job` on a fresh LocalCluster
of `--workers` single-threaded workers, on the sample mirrored to `--size`² px and served from the
local STAC API. Prints each run's time and its tasks per worker, then how many runs were uneven.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from sr_batch.bench import TileEvents, mirrored_catalog
from sr_batch.cluster import dask_client
from sr_batch.job import run_job
from sr_batch.sample import COLLECTION_ID, sample_aoi
from sr_batch.spec import parse_spec
from sr_batch.stac_server import serve_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="region edge in 10 m px (the sample mirrored)")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    seconds, uneven = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        catalog = mirrored_catalog(Path(tmp) / "catalog", args.size, args.dates)
        with serve_items(catalog.collection, catalog.items) as url:
            for run in range(args.runs):
                job = {
                    "name": "placement",
                    "stac": {"url": url, "collection": COLLECTION_ID},
                    "aoi": {"geometry": sample_aoi(catalog)},
                    "time": {"start": "2015-01-01", "end": "2021-12-31"},
                    "cloud": {"max_cloud_fraction": 1.0},
                    "model": {"checkpoint": "default", "batch_size": 4, "precision": "fp32"},
                    "tiling": {"tile": args.tile},
                    "output": {"uri": f"{tmp}/run-{run}.zarr"},
                }
                with dask_client(workers=args.workers, echo=lambda _: None) as client, TileEvents(client) as tiles:
                    started = time.perf_counter()
                    result = run_job(parse_spec(job), scheduler=client.scheduler.address, show_progress=False, echo=lambda _: None)
                    seconds.append(time.perf_counter() - started)
                    per_worker = Counter(event["worker"] for _, event in tiles.wait_for(result.written_windows))
                counts = sorted(per_worker.values()) + [0] * (args.workers - len(per_worker))
                uneven += max(counts) - min(counts) > 1
                print(f"run {run}: {seconds[-1]:5.1f} s, tasks per worker {sorted(counts)}", flush=True)
    print(f"{uneven} of {args.runs} runs uneven (a worker with 2 or more tasks more than another); job time mean {statistics.mean(seconds):.1f} s")


if __name__ == "__main__":
    main()
