"""Malformed jobs fail fast, as one actionable line, and leave the file system as they found it.

Each case runs the real console script in a subprocess, so what is checked is exactly what a user
sees: the exit status, stderr, and the output's folder afterwards. The subprocesses of all selected
cases run concurrently (each pays several seconds of imports); each case still passes or fails alone.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import make_job

SR_BATCH = Path(sys.executable).parent / "sr-batch"
TIMEOUT_S = 120
CONCURRENT = 4

Edit = Callable[[dict[str, Any], Path], str | None]
"""Makes a valid job bad: mutates the job dict in place, or returns raw YAML text to write instead."""


@dataclass(frozen=True)
class Case:
    edit: Edit
    field: str
    """What the line must name as a word of its own: a dotted field, an option, or `{job}` for the job path."""
    also: tuple[str, ...] = ()
    """Further substrings the line must hold, e.g. a spelling suggestion."""
    args: tuple[str, ...] = ()
    command: str = "run"
    job: str = "job.yaml"
    """The job path given on the command line, relative to the case's folder."""


# --- building blocks for the edits -------------------------------------------------------------


def _node(job: dict[str, Any], dotted: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = dotted.split(".")
    node = job
    for key in parents:
        node = node.setdefault(key, {})
    return node, leaf


def put(dotted: str, value: Any) -> Edit:
    def edit(job: dict[str, Any], tmp: Path) -> None:
        node, leaf = _node(job, dotted)
        node[leaf] = value

    return edit


def drop(dotted: str) -> Edit:
    def edit(job: dict[str, Any], tmp: Path) -> None:
        node, leaf = _node(job, dotted)
        del node[leaf]

    return edit


def raw_yaml(text: str) -> Edit:
    return lambda job, tmp: text


def unchanged(job: dict[str, Any], tmp: Path) -> None:
    """The job file is valid; the command line is what is wrong."""


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unreachable_stac(job: dict[str, Any], tmp: Path) -> None:
    job["stac"]["url"] = f"http://127.0.0.1:{free_port()}"


def bow_tie(job: dict[str, Any], tmp: Path) -> None:
    """A ring that crosses itself: its two lobes cancel to zero signed area, yet it is not empty."""
    job["aoi"] = {"geometry": {"type": "Polygon", "coordinates": [[[24.0, 44.0], [25.0, 45.0], [25.0, 44.0], [24.0, 45.0], [24.0, 44.0]]]}}


def missing_geojson(job: dict[str, Any], tmp: Path) -> None:
    job["aoi"] = {"geojson": str(tmp / "missing.geojson")}


def null_geometry_geojson(job: dict[str, Any], tmp: Path) -> None:
    """GeoJSON allows a Feature whose geometry is null; such a file has no area to process."""
    path = tmp / "features.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": None}]}))
    job["aoi"] = {"geojson": str(path)}


def checkpoint_missing(job: dict[str, Any], tmp: Path) -> None:
    job["model"] = {"checkpoint": str(tmp / "missing.safetensors"), "frames": 8}


def checkpoint_not_safetensors(job: dict[str, Any], tmp: Path) -> None:
    path = tmp / "model.safetensors"
    path.write_text("these are not the weights you are looking for\n")
    job["model"] = {"checkpoint": str(path), "frames": 8}


def checkpoint_wrong_bands(job: dict[str, Any], tmp: Path) -> None:
    """A valid sr-batch checkpoint whose metadata says it was trained on B05 instead of B08."""
    from sr_batch.model import Architecture, HighResNet, ModelInfo, save_checkpoint

    arch = Architecture(hidden_channels=16, encoder_blocks=2)
    path = tmp / "red-edge.safetensors"
    save_checkpoint(path, HighResNet(arch), ModelInfo(name="red-edge", architecture=arch, bands=("B02", "B03", "B04", "B05"), frames=8))
    job["model"] = {"checkpoint": str(path), "frames": 8}


def days_from_today(days: int) -> str:
    return (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days)).isoformat()


def output_is_a_plain_folder(job: dict[str, Any], tmp: Path) -> None:
    """An existing folder that happens to end in .zarr but holds the user's files: --overwrite must not delete it."""
    target = tmp / "photos.zarr"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"not a zarr store")
    job["output"]["uri"] = str(target)


def output_exists(job: dict[str, Any], tmp: Path) -> None:
    """An earlier result: it must survive untouched."""
    target = Path(job["output"]["uri"])
    target.mkdir()
    (target / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')


def output_parent_missing(job: dict[str, Any], tmp: Path) -> None:
    """The output's folder does not exist yet and the job fails late (no scenes): no folder may be left behind."""
    job["output"]["uri"] = str(tmp / "results" / "sr.zarr")
    job["time"] = {"start": "2012-01-01", "end": "2012-02-01"}


def job_as_a_list(job: dict[str, Any], tmp: Path) -> str:
    return yaml.safe_dump([job])


BAD_BBOX = {"bbox": [25.0, 44.0, 24.0, 45.0]}

CASES: dict[str, Case] = {
    "missing-output": Case(drop("output"), "output"),
    "missing-stac-url": Case(drop("stac.url"), "stac.url"),
    "bbox-west-gt-east": Case(put("aoi", BAD_BBOX), "aoi.bbox"),
    "bbox-out-of-range": Case(put("aoi", {"bbox": [24.0, 44.0, 25.0, 95.0]}), "aoi.bbox"),
    "bbox-and-geometry": Case(put("aoi.bbox", [24.0, 44.0, 25.0, 45.0]), "aoi"),
    "empty-polygon": Case(put("aoi", {"geometry": {"type": "Polygon", "coordinates": []}}), "aoi.geometry"),
    "self-intersecting-polygon": Case(bow_tie, "aoi.geometry", also=("invalid",)),
    "geojson-file-missing": Case(missing_geojson, "aoi.geojson"),
    "geojson-null-geometry": Case(null_geometry_geojson, "aoi.geojson"),
    "end-before-start": Case(put("time", {"start": "2019-08-31", "end": "2019-05-01"}), "time"),
    "top-level-key-typo": Case(put("tilling", {"tile": 64}), "tilling", also=("'tiling'",)),
    "nested-key-typo": Case(put("cloud", {"max_cloud_fractoin": 0.1}), "cloud.max_cloud_fractoin", also=("'max_cloud_fraction'",)),
    "frames-wrong-type": Case(put("model.frames", "eight"), "model.frames"),
    "frames-not-power-of-two": Case(put("model.frames", 6), "model.frames", also=("power of two",)),
    "frames-above-32": Case(put("model.frames", 64), "model.frames"),
    "tile-smaller-than-halo": Case(put("tiling", {"tile": 16, "halo": 32}), "tiling"),
    "halo-neither-auto-nor-pixels": Case(put("tiling.halo", "wide"), "tiling.halo", also=("auto",)),
    # The job's model (conftest's small one) needs a halo of 18: too wide for 16 px tiles, found once it is loaded.
    "tile-smaller-than-the-auto-halo": Case(put("tiling", {"tile": 16}), "tiling.tile", also=("18 px",)),
    "cloud-fraction-above-one": Case(put("cloud.max_cloud_fraction", 1.5), "cloud.max_cloud_fraction"),
    "unknown-asset": Case(put("stac.assets", {"red": "B04_missing"}), "stac.assets.red", also=("B04_missing",)),
    "wrong-collection": Case(put("stac.collection", "sentinel-2-l1c"), "stac.collection", also=("sentinel-2-l2a",)),
    "stac-unreachable": Case(unreachable_stac, "stac.url"),
    "no-scenes-in-time-range": Case(put("time", {"start": "2012-01-01", "end": "2012-02-01"}), "time"),
    "checkpoint-missing": Case(checkpoint_missing, "model.checkpoint"),
    "checkpoint-not-safetensors": Case(checkpoint_not_safetensors, "model.checkpoint"),
    "output-exists": Case(output_exists, "output.uri", also=("--overwrite",)),
    "output-parent-missing": Case(output_parent_missing, "time"),
    "yaml-syntax-error": Case(raw_yaml("name: test-job\ntime: start: 2019-05-01\noutput: {uri: sr.zarr}\n"), "{job}", also=("line 2",)),
    "yaml-list-not-mapping": Case(job_as_a_list, "{job}"),
    "set-without-equals": Case(unchanged, "--set", args=("--set", "model.frames")),
    "set-bad-value": Case(unchanged, "model.frames", args=("--set", "model.frames=6")),
    "set-below-a-scalar": Case(unchanged, "name", args=("--set", "name.first=x")),
    "job-file-missing": Case(unchanged, "{job}", job="no-such-job.yaml"),
    "job-path-is-a-folder": Case(unchanged, "{job}", job="."),
    "plan-bbox-west-gt-east": Case(put("aoi", BAD_BBOX), "aoi.bbox", command="plan"),
    "start-in-the-future": Case(put("time", {"start": days_from_today(30)}), "time", also=("future",)),
    "end-in-the-future": Case(put("time", {"start": "2019-05-01", "end": days_from_today(30)}), "time", also=("future",)),
    "huge-aoi-without-yes": Case(put("aoi", {"bbox": [20.0, 40.0, 24.0, 44.0]}), "aoi", also=("--yes", "km²")),
    "checkpoint-wrong-bands": Case(checkpoint_wrong_bands, "model.checkpoint", also=("B05",)),
    "history-days-negative": Case(put("time", {"start": "2019-05-01", "end": "2019-06-01", "history_days": -30}), "time.history_days"),
    "stac-retries-above-10": Case(put("stac.retries", 100), "stac.retries"),
    "stac-timeout-zero": Case(put("stac.timeout_s", 0), "stac.timeout_s"),
    "name-with-a-path": Case(put("name", "../../etc/cron.d/job"), "name"),
    "output-not-a-zarr-name": Case(put("output.uri", "."), "output.uri", also=(".zarr",)),
    "overwrite-a-plain-folder": Case(output_is_a_plain_folder, "output.uri", also=("not a Zarr store",), args=("--overwrite",)),
}


# --- running and checking ----------------------------------------------------------------------


@dataclass
class Outcome:
    command: list[str]
    folder: Path
    job: Path
    output: Path
    output_existed: bool
    before: dict[str, tuple[bool, int, int]]
    proc: subprocess.CompletedProcess[str] | None = None


def snapshot(folder: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry below `folder`: (is a folder, size, mtime) - any write shows up as a difference."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def prepare(case: Case, folder: Path, stac_url: str, catalog: Any) -> Outcome:
    """The case's job file in its own folder, which is also the output's folder and the working directory."""
    output = folder / "sr.zarr"
    job = make_job(stac_url, output, catalog)
    text = case.edit(job, folder)
    (folder / "job.yaml").write_text(text if text is not None else yaml.safe_dump(job, sort_keys=False))
    uri = job["output"].get("uri") if isinstance(job.get("output"), dict) else None
    output = Path(uri) if uri else output
    job_path = folder / case.job
    command = [str(SR_BATCH), case.command, str(job_path), *case.args]
    return Outcome(command, folder, job_path, output, output.exists(), snapshot(folder))


def launch(outcome: Outcome) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(outcome.command, cwd=outcome.folder, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:  # a hang fails its own case, not the whole table
        return subprocess.CompletedProcess(outcome.command, -9, str(err.stdout or ""), f"{err.stderr or ''}\n(killed after {TIMEOUT_S} s)")


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog: Any) -> dict[str, Outcome]:
    """Runs every selected case at once (one folder each) and keeps what each left behind."""
    test_name = "test_bad_input_is_one_line_and_writes_nothing"
    selected = [item.callspec.params["name"] for item in request.session.items if getattr(item, "originalname", None) == test_name]
    prepared = {name: prepare(CASES[name], tmp_path_factory.mktemp(name), stac_url, catalog) for name in selected}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for outcome, proc in zip(prepared.values(), pool.map(launch, prepared.values()), strict=True):
            outcome.proc = proc
    return prepared


def assert_one_line_error(proc: subprocess.CompletedProcess[str], field: str, also: tuple[str, ...] = ()) -> None:
    """Exit 2, and stderr is the single `sr-batch: error:` line that names what to fix."""
    shown = f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    assert proc.returncode == 2, shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), shown
    line = lines[0]
    assert line.startswith("sr-batch: error:"), shown
    # A word of its own: `aoi.geojson` inside a file name like `my-aoi.geojson` does not count.
    assert re.search(rf"(^|[\s']){re.escape(field)}[\s:/']", line.removeprefix("sr-batch: error:")), f"{field!r} is not named in: {line}"
    for needle in also:
        assert needle in line, f"{needle!r} not in: {line}"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name: str, outcomes: dict[str, Outcome]) -> None:
    case, outcome = CASES[name], outcomes[name]
    assert outcome.proc is not None
    assert_one_line_error(outcome.proc, case.field.format(job=outcome.job), case.also)
    assert outcome.output.exists() == outcome.output_existed, f"{outcome.output} was created"
    after = snapshot(outcome.folder)
    changed = sorted(k for k in after.keys() | outcome.before.keys() if after.get(k) != outcome.before.get(k))
    assert not changed, f"written in {outcome.folder}: {changed}"


# --- not an error: an AOI across UTM zones ----------------------------------------------------------


def granule(item_id: str, day: str, epsg: int, west: float, north: float) -> dict[str, Any]:
    """A Sentinel-2 item as Earth Search publishes it: a 109.8 km granule on its zone's 10 m lattice."""
    return {
        "id": item_id,
        "bbox": [22.0, 43.0, 26.0, 46.0],
        "properties": {"datetime": f"{day}T09:30:00Z", "proj:epsg": epsg, "proj:transform": [10.0, 0.0, west, 0.0, -10.0, north]},
        "assets": {},
    }


def test_aoi_across_utm_zones_takes_one_crs_and_says_so() -> None:
    """Zones 34 and 35 meet at 24°E. The grid takes the CRS most items use (ties: the AOI centre's zone) and covers the AOI."""
    import shapely
    import shapely.geometry
    from pyproj import Transformer

    from sr_batch.cube import choose_grid
    from sr_batch.search import group_by_solar_day

    aoi = shapely.geometry.box(23.95, 44.0, 24.05, 44.05)
    west34 = granule("S2A_34TGK_20190706", "2019-07-06", 32634, 699960.0, 5000040.0)
    east35 = granule("S2A_35TKK_20190706", "2019-07-06", 32635, 199980.0, 5000040.0)
    west34_later = granule("S2A_34TGK_20190711", "2019-07-11", 32634, 699960.0, 5000040.0)

    grid, note = choose_grid(group_by_solar_day([west34, east35, west34_later]), aoi)
    assert grid.epsg == 32634 and "EPSG:32634 x2, EPSG:32635 x1" in note and "set crs:" in note
    assert grid.west % 10 == 699960.0 % 10  # on the chosen zone's own pixel lattice
    projected = shapely.transform(aoi.segmentize(0.001), Transformer.from_crs(4326, grid.epsg, always_xy=True).transform, interleaved=False)
    assert shapely.geometry.box(*grid.bounds).contains(projected)

    for order in ([west34, east35], [east35, west34]):  # a tie: the AOI's centre (24.0°E) lies in zone 35
        assert choose_grid(group_by_solar_day(order), aoi)[0].epsg == 32635
    assert choose_grid(group_by_solar_day([west34, east35, west34_later]), aoi, epsg=32635)[0].epsg == 32635
