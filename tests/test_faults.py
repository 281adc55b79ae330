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


# --- hostile data: each is skipped cleanly and said so, or handled as the data says --------------

CLEAR_DAY = "S2_L2A_RO_SAMPLE_20190706"


def summer_catalogue(catalog: SampleCatalog, folder: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    items = copy_items(catalog, folder)
    return items, {item["id"]: item for item in items}


def rewrite_cog(href: str, change: Any, dtype: str | None = None) -> None:
    """Rewrite a copied COG in place: `change(values)` gives the new values."""
    import rasterio

    path = Path(href.removeprefix("file://"))
    with rasterio.open(path) as src:
        profile, values = src.profile, src.read(1)
    values = change(values)
    profile.update(dtype=dtype or values.dtype.name, nodata=None if dtype and dtype.startswith("float") else profile["nodata"])
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)


def test_items_without_a_needed_asset_are_skipped_and_counted(catalog: SampleCatalog, tmp_path: Path) -> None:
    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")
    del by_id[CLEAR_DAY]["assets"]["nir"], by_id[MISSING]["assets"]["scl"]
    with serve_items(catalog.collection, items) as url:
        found = search(parse_spec(make_job(url, tmp_path / "sr.zarr", catalog, time=SUMMER)))
    assert sorted(found.missing_assets) == sorted([CLEAR_DAY, MISSING])
    assert CLEAR_DAY not in {i["id"] for i in found.items} and len(found.items) == len(items) - 2


def test_float_asset_with_nan_and_negative_values_is_skipped(catalog: SampleCatalog, tmp_path: Path) -> None:
    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")

    def as_float_with_nan(values: np.ndarray) -> np.ndarray:
        out = values.astype(np.float32) / 10000
        out[:10] = np.nan
        out[10:20] = -0.05
        return out

    rewrite_cog(by_id[CLEAR_DAY]["assets"]["red"]["href"], as_float_with_nan, dtype="float32")
    with serve_items(catalog.collection, items) as url:
        found = search(parse_spec(make_job(url, tmp_path / "sr.zarr", catalog, time=SUMMER)))
    assert [(p.item, p.asset) for p in found.unreadable] == [(CLEAR_DAY, "red")]
    assert "float32" in found.unreadable[0].problem
    assert CLEAR_DAY not in {i["id"] for i in found.items}


def test_all_nodata_scene_gives_no_output_date(catalog: SampleCatalog, tmp_path: Path) -> None:
    from sr_batch.plan import make_plan

    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")
    for asset in by_id[CLEAR_DAY]["assets"].values():
        rewrite_cog(asset["href"], np.zeros_like)
    with serve_items(catalog.collection, items) as url:
        plan = make_plan(parse_spec(make_job(url, tmp_path / "sr.zarr", catalog, time=SUMMER)))
    day = next(k for k, d in enumerate(plan.days) if CLEAR_DAY in d.item_ids)
    assert (plan.cloud[day] == 1.0).all()
    assert day not in plan.output_days and day not in plan.frame_days
    assert len(plan.output_days) >= 3  # the other clear days are still used


def test_saturated_values_are_unusable_after_harmonisation(catalog: SampleCatalog, tmp_path: Path) -> None:
    """DN 65535 is saturation: it stays 65535 through the baseline-04.00 offset and is never fed to the network."""
    from sr_batch.clouds import usable_reflectance
    from sr_batch.cube import BANDS, SCL, choose_grid, load_cube

    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")
    item = by_id[CLEAR_DAY]

    def saturate(values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values[:5, :5] = 65535
        return values

    rewrite_cog(item["assets"]["red"]["href"], saturate)
    for asset in item["assets"].values():
        if asset["roles"] == ["data"]:
            asset["raster:bands"][0]["offset"] = -0.1  # baseline 04.00: DN = reflectance x 10000 + 1000
    with serve_items(catalog.collection, items) as url:
        spec = parse_spec(make_job(url, tmp_path / "sr.zarr", catalog, time={"start": "2019-07-06", "end": "2019-07-06"}))
        found = search(spec)
    grid, _ = choose_grid(found.days, spec.aoi.shape())
    cube = load_cube(found.days, grid, spec.stac.assets.in_model_order(), [*BANDS, SCL], ((grid.height,), (grid.width,))).values
    assert (cube[0, 2, :5, :5] == 65535).all()
    reflectance = usable_reflectance(cube, dilate_pixels=0)
    assert np.isnan(reflectance[0, :, :5, :5]).all()
    assert np.isfinite(reflectance[0, :, 50:, 50:]).mean() > 0.9


def test_one_date_series_with_a_tile_that_has_no_cloudless_date(catalog: SampleCatalog, tmp_path: Path, scheduler: str) -> None:
    """One date only: tiles where it is clear get a one-frame output; the clouded tile is a clean skip (no data, frames_used 0)."""
    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")

    def cloud_top_left(values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values[:48, :48] = 9  # SCL high-probability cloud over the first 48 x 48 px tile
        return values

    rewrite_cog(by_id[CLEAR_DAY]["assets"]["scl"]["href"], cloud_top_left)
    with serve_items(catalog.collection, items) as url:
        spec = parse_spec(make_job(url, tmp_path / "one.zarr", catalog, time={"start": "2019-07-06", "end": "2019-07-06"}))
        result = run_job(spec, scheduler=scheduler, show_progress=False, echo=lambda line: None)
    ds = open_output(result.output).load()
    assert ds.sizes["time"] == 1 and ds.frames_used.shape[1:] == (2, 2)
    assert ds.frames_used[0, 0, 0] == 0 and np.isnan(ds.sr[0, :, : 4 * 48, : 4 * 48]).all()
    others = [(r, c) for r in range(2) for c in range(2) if (r, c) != (0, 0)]
    assert all(ds.frames_used[0, r, c] == 1 for r, c in others)
    assert np.isfinite(ds.sr[0, :, 4 * 48 :, 4 * 48 :]).mean() > 0.9


def zero_first_block(path: Path) -> None:
    """Zero a COG's first compressed block in place: its header stays sound, its pixels cannot be decoded."""
    import rasterio

    with rasterio.open(path) as dataset:
        offset = int(dataset.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        length = int(dataset.get_tag_item("BLOCK_SIZE_0_0", "TIFF", bidx=1))
    content = bytearray(path.read_bytes())
    content[offset : offset + length] = bytes(length)
    path.write_bytes(bytes(content))


def test_corrupt_block_behind_a_sound_header_reads_as_no_data(catalog: SampleCatalog, tmp_path: Path) -> None:
    """Compressed bytes zeroed in place: the header check passes, the read fails, and the cube holds no data there instead of failing."""
    from sr_batch.cube import BANDS, SCL, choose_grid, load_cube

    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")
    path = Path(by_id[CLEAR_DAY]["assets"]["red"]["href"].removeprefix("file://"))
    zero_first_block(path)
    with serve_items(catalog.collection, items) as url:
        spec = parse_spec(make_job(url, tmp_path / "sr.zarr", catalog, time={"start": "2019-07-06", "end": "2019-07-06"}))
        found = search(spec)
    assert found.unreadable == []  # nothing in the header gives it away
    grid, _ = choose_grid(found.days, spec.aoi.shape())
    with pytest.warns(UserWarning, match="red.tif"):
        cube = load_cube(found.days, grid, spec.stac.assets.in_model_order(), [*BANDS, SCL], ((grid.height,), (grid.width,))).values
    assert (cube[0, 2] == 0).all()  # red: no data
    assert (cube[0, 0] > 0).mean() > 0.9  # blue of the same date is intact


def test_corrupt_blocks_read_by_a_job_are_counted_and_recorded(catalog: SampleCatalog, tmp_path: Path, scheduler: str) -> None:
    """The same corrupt block read by a job's workers: the job completes, says how many reads became no
    data and of which asset, and the output's attributes list it (kept when the next run appends)."""
    items, by_id = summer_catalogue(catalog, tmp_path / "scenes")
    href = by_id[CLEAR_DAY]["assets"]["red"]["href"]
    path = Path(href.removeprefix("file://"))
    zero_first_block(path)
    lines: list[str] = []
    with serve_items(catalog.collection, items) as url:
        job = make_job(url, tmp_path / "sr.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-10"})
        result = run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lines.append)
        assert [(e.url, e.reads > 0) for e in result.read_errors] == [(href, True)]
        assert any(line.startswith("Read as no data: ") and "red.tif" in line for text in lines for line in text.splitlines())
        recorded = json.loads(xr.open_zarr(result.output, consolidated=False).attrs["unreadable_blocks"])
        assert [entry["url"] for entry in recorded] == [href] and recorded[0]["reads"] == result.read_errors[0].reads
        job["time"]["end"] = "2019-07-31"  # the next night appends: the record stays
        run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lines.append)
        after = json.loads(xr.open_zarr(result.output, consolidated=False).attrs["unreadable_blocks"])
        assert [entry["url"] for entry in after] == [href] and after[0]["reads"] >= recorded[0]["reads"]
