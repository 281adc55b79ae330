"""The commands a user types: `sr-batch plan` and `sr-batch run` on a default LocalCluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import xarray as xr
import yaml

from conftest import make_job

SR_BATCH = str(Path(sys.executable).parent / "sr-batch")


def test_plan_then_run_from_the_command_line(tmp_path: Path, stac_url: str, catalog, scheduler: str) -> None:
    """plan on its own LocalCluster; run on an existing cluster given by --scheduler."""
    out = tmp_path / "out" / "cli.zarr"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_job(stac_url, Path("out/cli.zarr"), catalog, time={"start": "2019-07-01", "end": "2019-07-31"})))

    plan = subprocess.run([SR_BATCH, "plan", str(job), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "LocalCluster of 2 worker processes" in plan.stdout and "Windows:" in plan.stdout
    assert not out.exists(), "plan is a dry run"

    report = tmp_path / "report.html"
    command = [SR_BATCH, "run", str(job), "--scheduler", scheduler, "--performance-report", str(report)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"Dask: connected to {scheduler} (2 workers)" in run.stdout
    html = report.read_text()
    assert report.stat().st_size > 10_000 and "superresolve" in html and "_score_block" in html, "the report covers the cloud scores too"
    assert "UNTRAINED" in run.stdout and f"Output: {out}" in run.stdout  # relative output paths are taken from the job file's folder
    with xr.open_zarr(out, consolidated=False) as ds:
        assert ds.sizes["time"] >= 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging store left behind"

    # On an existing output, plan says what a run would add; after a complete run, nothing.
    again = subprocess.run([SR_BATCH, "plan", str(job), "--scheduler", scheduler], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "a run would add 0 dates and compute 0 tile-dates" in again.stdout
    longer = subprocess.run([SR_BATCH, "plan", str(job), "--scheduler", scheduler, "--set", "time.end=2019-08-31"], capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr
    added = re.search(r"a run would add (\d+) dates and compute (\d+) tile-dates", longer.stdout)
    assert added and int(added[1]) > 0 and int(added[2]) >= int(added[1])
