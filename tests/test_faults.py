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
from collections.abc import Iterator
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
