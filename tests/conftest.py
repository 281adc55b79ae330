"""Shared fixtures: the real sample catalogue, a real STAC API on loopback, a real Dask cluster."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
from distributed import LocalCluster

from sr_batch.allocator import jemalloc_library
from sr_batch.sample import COLLECTION_ID, SampleCatalog, build_sample_catalog, open_sample_cube, sample_aoi
from sr_batch.stac_server import serve_items

from pgstac_server import apt_install

# A small untrained network: the tests check plumbing and geometry, not image quality.
SMALL_MODEL = {"checkpoint": "untrained", "frames": 8, "batch_size": 4, "architecture": {"hidden_channels": 16, "encoder_blocks": 2}}
SMALL_HALO = 18  # receptive_radius(Architecture(hidden_channels=16, encoder_blocks=2), 8) + dilate_pixels 2


@pytest.fixture(scope="session", autouse=True)
def jemalloc() -> str | None:
    """jemalloc, which a job's CPU workers start with where it is installed (sr_batch/allocator.py): the
    setup installs it where it can (root with apt-get, as in CI), so the suite runs the workers a
    deployment runs. Elsewhere the workers use glibc's settings and the tests that need jemalloc skip."""
    global _JEMALLOC_MISSING
    if jemalloc_library() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            apt_install(["libjemalloc2"])
        except RuntimeError as err:
            _JEMALLOC_MISSING = str(err)
        jemalloc_library.cache_clear()
    return jemalloc_library()


_JEMALLOC_MISSING = "jemalloc is not installed and this setup cannot install it (apt-get install libjemalloc2 as root)"


def needs_jemalloc(library: str | None) -> str:
    """The `jemalloc` fixture's library, or skip saying why it is missing."""
    if library is None:
        pytest.skip(_JEMALLOC_MISSING)
    return library


@pytest.fixture(scope="session")
def catalog() -> SampleCatalog:
    return build_sample_catalog()


@pytest.fixture(scope="session")
def source_cube() -> xr.Dataset:
    """The original netCDF the catalogue was made from: ground truth for grids and values."""
    return open_sample_cube()


@pytest.fixture(scope="session")
def stac_url(catalog: SampleCatalog) -> Iterator[str]:
    with serve_items(catalog.collection, catalog.items) as url:
        yield url


@pytest.fixture(scope="session")
def scheduler() -> Iterator[str]:
    """A real cluster of two worker processes, shared by the job tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", env={"SR_BATCH_TORCH_THREADS": "1"}) as cluster:
        yield cluster.scheduler_address


def make_job(stac_url: str, output: Path, catalog: SampleCatalog, **sections: Any) -> dict[str, Any]:
    """A job on the sample region; keyword sections replace the defaults (e.g. time={...})."""
    job = {
        "name": "test-job",
        "stac": {"url": stac_url, "collection": COLLECTION_ID},
        "aoi": {"geometry": sample_aoi(catalog)},
        "time": {"start": "2019-05-01", "end": "2019-08-31"},
        "cloud": {"max_cloud_fraction": 0.05},
        "model": copy.deepcopy(SMALL_MODEL),
        "tiling": {"tile": 48, "halo": SMALL_HALO},
        "output": {"uri": str(output)},
    }
    job.update(copy.deepcopy(sections))
    return job
