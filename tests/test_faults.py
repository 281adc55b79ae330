"""Faults of the sources: an unreliable STAC API and broken assets, on real servers and real files.

The STAC API is the real `rustac serve` behind a fault-injecting proxy (tests/fault_proxy.py) that
answers 503, stalls past the client's timeout or drops the connection, chosen by request count. The
broken assets are a copy of the real sample catalogue with one COG deleted, one truncated and one
item whose proj:transform disagrees with its file.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from sr_batch.errors import SearchError
from sr_batch.job import run_job
from sr_batch.sample import SampleCatalog
from sr_batch.search import fetch_items, search
from sr_batch.spec import JobSpec, parse_spec
from sr_batch.stac_server import serve_items

from conftest import make_job
from fault_proxy import fault_proxy

WHOLE_SAMPLE = {"start": "2015-01-01", "end": "2021-12-31"}
PAGE_SIZE = 10
FAULTS = ("503", "stall", "drop")


def job_spec(url: str, catalog: SampleCatalog, tmp_path: Path, **stac: Any) -> JobSpec:
    job = make_job(url, tmp_path / "sr.zarr", catalog, time=WHOLE_SAMPLE)
    job["stac"].update(stac)
    return parse_spec(job)


def every_third_fails(n: int) -> str:
    """Requests 2, 5, 8, … fail, cycling through the fault kinds; the repeat after each one succeeds."""
    return FAULTS[(n // 3) % len(FAULTS)] if n % 3 == 2 else "ok"


def item_ids(spec: JobSpec) -> list[str]:
    return [item["id"] for item in fetch_items(spec, spec.aoi.shape().bounds, page_size=PAGE_SIZE)]


# --- STAC API faults ---------------------------------------------------------------------------


def test_paged_search_through_faults_is_complete(stac_url: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    clean = item_ids(job_spec(stac_url, catalog, tmp_path))
    assert len(clean) == len(catalog.items) > 5 * PAGE_SIZE  # the search really pages
    with fault_proxy(stac_url, every_third_fails, stall_s=2.0) as proxy:
        through_faults = item_ids(job_spec(proxy.url, catalog, tmp_path, timeout_s=0.5, retries=2))
    assert through_faults == clean
    kinds = {fault for _, fault, _ in proxy.faults}
    assert kinds == set(FAULTS), proxy.faults
    assert any("/search" in path for _, _, path in proxy.faults), "no page request met a fault"


@pytest.mark.parametrize("fault", FAULTS)
def test_permanent_failure_is_one_line_after_bounded_retries(fault: str, stac_url: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    retries = 2
    with fault_proxy(stac_url, lambda n: fault, stall_s=2.0) as proxy:
        spec = job_spec(proxy.url, catalog, tmp_path, timeout_s=0.3, retries=retries)
        with pytest.raises(SearchError) as raised:
            search(spec)
    message = str(raised.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("stac.url:") and proxy.url in message and "stac.retries" in message, message
    assert proxy.requests == retries + 1, proxy.faults  # the landing page, tried 1 + retries times, then given up


# --- asset faults --------------------------------------------------------------------------------

SUMMER = {"start": "2019-06-01", "end": "2019-08-31"}
MISSING, TRUNCATED, MISPLACED = "S2_L2A_RO_SAMPLE_20190701", "S2_L2A_RO_SAMPLE_20190810", "S2_L2A_RO_SAMPLE_20190820"
"""Three cloudless dates of the sample: each one changes the output if it is read at all."""


def copy_items(catalog: SampleCatalog, folder: Path) -> list[dict[str, Any]]:
    """The summer items and their COGs, copied into `folder` (hrefs rewritten to the copies)."""
    items = []
    for item in catalog.items:
        if not SUMMER["start"] <= item["properties"]["datetime"][:10] <= SUMMER["end"]:
            continue
        item = copy.deepcopy(item)
        shutil.copytree(catalog.root / "scenes" / item["id"], folder / item["id"])
        for asset in item["assets"].values():
            asset["href"] = (folder / item["id"] / Path(asset["href"]).name).as_uri()
        items.append(item)
    return items


def break_items(items: list[dict[str, Any]], folder: Path) -> None:
    """One COG deleted, one cut to half its size, one item whose proj:transform is 30 m off its files."""
    (folder / MISSING / "red.tif").unlink()
    truncated = folder / TRUNCATED / "nir.tif"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    misplaced = next(item for item in items if item["id"] == MISPLACED)
    misplaced["properties"]["proj:transform"][2] += 30.0


@pytest.fixture(scope="module")
def broken_and_reference(tmp_path_factory: pytest.TempPathFactory, catalog: SampleCatalog, scheduler: str) -> tuple[Any, Any]:
    """The same job on the broken catalogue, and on the intact one without the three broken items."""
    folder = tmp_path_factory.mktemp("broken")
    items = copy_items(catalog, folder / "scenes")
    reference_items = [item for item in copy.deepcopy(items) if item["id"] not in (MISSING, TRUNCATED, MISPLACED)]
    break_items(items, folder / "scenes")
    results = []
    for name, served in (("broken", items), ("reference", reference_items)):
        with serve_items(catalog.collection, served) as url:
            spec = parse_spec(make_job(url, folder / f"{name}.zarr", catalog, time=SUMMER))
            results.append(run_job(spec, scheduler=scheduler, show_progress=False, echo=lambda line: None))
    return tuple(results)


def open_output(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, decode_coords="all", consolidated=False)


def test_broken_assets_are_skipped_and_counted(broken_and_reference: tuple[Any, Any]) -> None:
    broken, _ = broken_and_reference
    problems = {(p.item, p.asset): p.problem for p in broken.plan.found.unreadable}
    every_band_of_misplaced = {(MISPLACED, key) for key in ("blue", "green", "red", "nir", "scl")}
    assert set(problems) == {(MISSING, "red"), (TRUNCATED, "nir"), *every_band_of_misplaced}
    assert problems[(MISSING, "red")].startswith("cannot open")
    assert problems[(TRUNCATED, "nir")].startswith("truncated")
    assert "proj:transform" in problems[(MISPLACED, "red")]
    assert "Unreadable assets: 7 in 3 items" in broken.plan.summary()
    ds = open_output(broken.output)
    assert ds.attrs["unreadable_items"] == 3
    recorded = json.loads(ds.attrs["unreadable_assets"])
    assert {(p["item"], p["asset"]) for p in recorded} == set(problems)
    assert {p["date"] for p in recorded} == {"2019-07-01", "2019-08-10", "2019-08-20"}


def test_output_equals_a_run_without_the_broken_dates(broken_and_reference: tuple[Any, Any]) -> None:
    broken, reference = (open_output(result.output).load() for result in broken_and_reference)
    assert broken.sizes["time"] >= 3
    assert not set(np.datetime_as_string(broken.time.values, unit="D")) & {"2019-07-01", "2019-08-10", "2019-08-20"}
    for name in ("sr", "cloud_fraction", "frames_used", "window_start", "source_items"):
        xr.testing.assert_identical(broken[name], reference[name])
    assert reference.attrs["unreadable_items"] == 0 and json.loads(reference.attrs["unreadable_assets"]) == []


def test_too_many_unreadable_items_stop_the_job(catalog: SampleCatalog, tmp_path: Path) -> None:
    items = copy_items(catalog, tmp_path / "scenes")
    break_items(items, tmp_path / "scenes")
    with serve_items(catalog.collection, items) as url:
        job = make_job(url, tmp_path / "sr.zarr", catalog, time=SUMMER)
        job["stac"]["max_unreadable_fraction"] = 0.1  # 3 of 15 items are broken
        with pytest.raises(SearchError) as raised:
            search(parse_spec(job))
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and message.startswith("stac.max_unreadable_fraction: 3 of 15 items"), message
