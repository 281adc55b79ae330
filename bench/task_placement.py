"""Where a small job's tile tasks run: the same job again and again, its tasks counted per worker.

    python bench/task_placement.py [--size 256] [--tile 128] [--dates 4] [--runs 20] [--workers 2]

A job of few tasks submits them all before any has ended. Which worker each runs on decides whether
the job takes one task's time per worker or more: 4 tasks on 2 workers run in two rounds when spread
2 and 2, and in three when one worker takes 3. Each run is the benchmark's end-to-end job
(`sr_batch.bench.end_to_end`) on a fresh LocalCluster of `--workers` workers, on the sample mirrored
to `--size`² px and served from the local STAC API. Prints each run's time and its tasks per worker,
then how many runs were uneven.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from sr_batch.bench import end_to_end, mirrored_catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="region edge in 10 m px (the sample mirrored)")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--dates", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    seconds, uneven = [], 0
    model = {"checkpoint": "default", "batch_size": 4, "precision": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = mirrored_catalog(Path(tmp) / "catalog", args.size, args.dates)
        for run in range(args.runs):
            row = end_to_end(catalog, Path(tmp) / f"run-{run}.zarr", model, args.workers, args.tile)
            seconds.append(row["seconds"])
            counts = [0] * (args.workers - len(row["tasks_per_worker"])) + row["tasks_per_worker"]
            uneven += max(counts) - min(counts) > 1
            print(f"run {run}: {seconds[-1]:5.1f} s, tasks per worker {counts}", flush=True)
    print(f"{uneven} of {args.runs} runs uneven (a worker with 2 or more tasks more than another); job time mean {statistics.mean(seconds):.1f} s")


if __name__ == "__main__":
    main()
