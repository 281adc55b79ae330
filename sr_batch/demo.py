"""`make demo`: a real job on the bundled sample region, through a local STAC API and a LocalCluster.

The sample (real Sentinel-2 L2A over Romania) is turned into COGs and STAC items, served by
`rustac serve` on 127.0.0.1, and a job file pointing at that server is written and run exactly as a
user's job is run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from sr_batch.job import JobResult, run_job
from sr_batch.model import DEFAULT_CHECKPOINT
from sr_batch.quicklook import quicklook_store
from sr_batch.sample import COLLECTION_ID, build_sample_catalog, sample_aoi
from sr_batch.spec import load_spec
from sr_batch.stac_server import serve_items


def demo_job(stac_url: str, output: Path, start: str = "2018-01-01", end: str = "2020-12-31") -> dict:
    """The sample job: the whole sample footprint, with the shipped model (random weights if none ships)."""
    return {
        "name": "romania-sample",
        "stac": {"url": stac_url, "collection": COLLECTION_ID},
        "aoi": {"geometry": sample_aoi(build_sample_catalog())},
        "time": {"start": start, "end": end},
        "cloud": {"max_cloud_fraction": 0.05},
        "model": {"checkpoint": "default" if DEFAULT_CHECKPOINT.exists() else "untrained", "frames": 8, "batch_size": 4},
        "tiling": {"tile": 256},
        "output": {"uri": str(output)},
    }


def run_demo(out_dir: Path = Path("out/demo"), start: str = "2018-01-01", end: str = "2020-12-31") -> JobResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    print("Preparing the sample region (real Sentinel-2 L2A, Romania; fetched once from PyPI: nrt==0.2.1) …")
    catalog = build_sample_catalog()
    with serve_items(catalog.collection, catalog.items) as url:
        print(f"STAC API (rustac, in-memory) serving {len(catalog.items)} items at {url}")
        job_file = out_dir / "job.yaml"
        job_file.write_text(yaml.safe_dump(demo_job(url, (out_dir / "romania-sample.zarr").resolve(), start, end), sort_keys=False))
        print(f"Job file: {job_file}")
        result = run_job(load_spec(job_file), overwrite=True)
        picture = demo_quicklook(result, out_dir / "quicklook.png")
    print(f"\nDemo output written to {result.output}")
    if picture:
        print(f"Quicklook (10 m input vs 2.5 m output, latest date): {picture}")
    print(f'Read it with: sr_batch.open_output("{result.output}"); describe it with: sr-batch inspect {result.output}')
    return result


def demo_quicklook(result: JobResult, path: Path) -> Path | None:
    """The latest output date next to its 10 m input, made the way `sr-batch quicklook` makes it (while the demo's STAC API is up)."""
    if not result.plan.output_days:
        return None
    return quicklook_store(result.output, path)
