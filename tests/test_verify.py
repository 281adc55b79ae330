"""`sr-batch verify`: a good output passes; each kind of damage is reported, one line per problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from pyproj import CRS

from sr_batch.job import JobResult, run_job
from sr_batch.manifest import Manifest, manifest_path
from sr_batch.spec import parse_spec
from sr_batch.verify import verify_output

from conftest import make_job

SR_BATCH = Path(sys.executable).parent / "sr-batch"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog, scheduler: str) -> JobResult:
    out = tmp_path_factory.mktemp("verify") / "good.zarr"
    job = make_job(stac_url, out, catalog, time={"start": "2019-06-01", "end": "2019-07-20"})
    return run_job(parse_spec(job), scheduler=scheduler, show_progress=False)


@pytest.fixture
def damaged(good: JobResult, tmp_path: Path) -> Path:
    """A copy of the good output to damage."""
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(good.output, copy)
    return copy


def verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SR_BATCH), "verify", str(path)], capture_output=True, text=True, timeout=120)


def edit_manifest(path: Path, edit) -> None:
    document = json.loads(manifest_path(path).read_text())
    edit(document["attributes"])
    manifest_path(path).write_text(json.dumps(document))


def recorded_chunk(path: Path) -> Path:
    """The file of a chunk of a recorded window that holds data."""
    manifest = Manifest.read(path)
    date, tiles = next(iter(manifest.done.items()))
    row, col = tiles[0]
    t = manifest.times.index(date)
    array = zarr.open_array(store=str(path), path="sr", mode="r")
    iy, ix = 4 * manifest.rows[row][0] // array.chunks[2], 4 * manifest.cols[col][0] // array.chunks[3]
    assert f"{date}/{iy}/{ix}" not in manifest.empty_chunks
    return path / "sr" / array.metadata.encode_chunk_key((t, 0, iy, ix))


def test_a_good_output_is_ok(good: JobResult) -> None:
    assert verify_output(good.output) == []
    proc = verify_cli(good.output)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = Manifest.read(good.output)
    assert proc.stdout.splitlines() == [
        f"OK {good.output}: {len(manifest.times)} dates, {manifest.done_count()} windows recorded and readable, georeferencing consistent"
    ]
    assert manifest.done_count() == good.plan.tile_dates > 0


def test_deleted_chunk_of_a_recorded_window(damaged: Path) -> None:
    chunk = recorded_chunk(damaged)
    chunk.unlink()
    proc = verify_cli(damaged)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 1 and "is missing" in proc.stdout and chunk.relative_to(damaged).as_posix() in proc.stdout, proc.stdout


def test_truncated_chunk_does_not_decode(damaged: Path) -> None:
    chunk = recorded_chunk(damaged)
    chunk.write_bytes(chunk.read_bytes()[:20])
    problems = verify_output(damaged)
    assert len(problems) == 1 and "does not decode" in problems[0], problems


def test_edited_manifest(damaged: Path, good: JobResult) -> None:
    """A window recorded where the tile was cloudy, and another model's checksum: two problems, two lines."""
    plan = good.plan
    cloudy = next(
        (plan.days[d].date.isoformat(), (r, c))
        for d in plan.output_days
        for r in range(len(plan.rows))
        for c in range(len(plan.cols))
        if plan.cloud[d, r, c] > 0.05
    )

    def edit(manifest: dict) -> None:
        manifest["done"][cloudy[0]].append(list(cloudy[1]))
        manifest["model_sha256"] = "0" * 64

    edit_manifest(damaged, edit)
    proc = verify_cli(damaged)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and len(lines) == 2, proc.stdout
    assert any("model_sha256" in line for line in lines)
    assert any(f"window {cloudy[0]} tile {cloudy[1]} is recorded but not planned" in line for line in lines)


def test_changed_crs_attribute(damaged: Path) -> None:
    meta_path = damaged / "spatial_ref" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    wgs84 = CRS.from_epsg(4326)
    meta["attributes"].update({"crs_wkt": wgs84.to_wkt(), "spatial_ref": wgs84.to_wkt()})
    meta_path.write_text(json.dumps(meta))
    problems = verify_output(damaged)
    assert problems == ["CRS is 4326, the manifest's grid is EPSG:3035"], problems


def test_missing_manifest_and_missing_folder(damaged: Path, tmp_path: Path) -> None:
    shutil.rmtree(manifest_path(damaged).parent)
    problems = verify_output(damaged)
    assert len(problems) == 1 and "no manifest" in problems[0]
    proc = verify_cli(tmp_path / "absent.zarr")
    assert proc.returncode == 2 and proc.stderr.startswith("sr-batch: error: OUT:") and len(proc.stderr.splitlines()) == 1
