"""The production-grade path: the same job through stac-fastapi-pgstac on PostgreSQL + PostGIS
gives the same output as through the in-memory rustac server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from sr_batch.job import run_job
from sr_batch.spec import parse_spec

from conftest import make_job
from pgstac_server import pgstac_api


@pytest.mark.pgstac
@pytest.mark.timeout(1200)
def test_job_through_pgstac_equals_job_through_rustac(tmp_path: Path, catalog, stac_url: str, scheduler: str) -> None:
    window = {"start": "2019-06-01", "end": "2019-08-31"}
    reference = run_job(parse_spec(make_job(stac_url, tmp_path / "rustac.zarr", catalog, time=window)), scheduler=scheduler, show_progress=False)
    with pgstac_api(catalog.collection, catalog.items, tmp_path / "pgstac") as url:
        result = run_job(parse_spec(make_job(url, tmp_path / "pgstac.zarr", catalog, time=window)), scheduler=scheduler, show_progress=False)
    assert [d.item_ids for d in result.plan.days] == [d.item_ids for d in reference.plan.days]
    with xr.open_zarr(reference.output, consolidated=False) as a, xr.open_zarr(result.output, consolidated=False) as b:
        assert a.sizes["time"] > 0
        np.testing.assert_array_equal(a.time.values, b.time.values)
        np.testing.assert_array_equal(a.sr.values, b.sr.values)
