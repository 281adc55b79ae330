"""Search and cube on real scenes re-published the way real catalogues publish them:
with the processing-baseline 04.00 offset, as reprocessed duplicates, and split across granules."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from affine import Affine
from rasterio.windows import Window

from sr_batch.clouds import usable_reflectance, usable_reflectance_tensor
from sr_batch.cube import BANDS, SCL, choose_grid, dn_offset, load_cube
from sr_batch.job import run_job
from sr_batch.sample import ASSETS
from sr_batch.search import deduplicate, group_by_solar_day, search
from sr_batch.spec import parse_spec
from sr_batch.stac_server import serve_items

from conftest import make_job

VARIABLES = {v: k for k, v in ASSETS.items()}  # asset key → netCDF variable


def summer_items(catalog, count: int = 4) -> list[dict[str, Any]]:
    return copy.deepcopy([i for i in catalog.items if i["properties"]["datetime"].startswith("2019-07")][:count])


def rewrite_assets(item: dict[str, Any], folder: Path, source: xr.Dataset, shift: int = 0, cols: slice = slice(None)) -> dict[str, Any]:
    """Re-publish an item's scene: DN + shift in the data bands, optionally only the columns `cols`."""
    day = np.datetime64(item["properties"]["datetime"][:10])
    scene = source.sel(time=day)
    west = float(source.x[0]) - 5 + 10 * (cols.start or 0)
    transform = Affine(10, 0, west, 0, -10, float(source.y[0]) + 5)
    folder.mkdir(parents=True, exist_ok=True)
    for key, asset in item["assets"].items():
        values = scene[VARIABLES[key]].values[:, cols].astype(np.int32)
        if key != "scl":
            values = np.where(values > 0, values + shift, 0)
        path = folder / f"{key}.tif"
        profile = dict(driver="GTiff", dtype="uint16", nodata=0, width=values.shape[1], height=values.shape[0], count=1, crs="EPSG:3035", transform=transform)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(values.astype(np.uint16), 1)
        asset["href"] = path.as_uri()
    props = item["properties"]
    props["proj:transform"] = list(transform)[:6]
    props["proj:shape"] = [source.sizes["y"], values.shape[1]]
    props.pop("proj:bbox", None)
    props.pop("proj:geometry", None)
    return item


def cube_for(items: list[dict[str, Any]], catalog, tmp_path: Path) -> tuple[xr.DataArray, Any]:
    with serve_items(catalog.collection, items) as url:
        spec = parse_spec(make_job(url, tmp_path / "unused.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}))
        found = search(spec)
    grid, _ = choose_grid(found.days, spec.aoi.shape())
    cube = load_cube(found.days, grid, spec.stac.assets.in_model_order(), [*BANDS, SCL], ((grid.height,), (grid.width,)))
    return cube.compute(), found


def expected_values(source: xr.Dataset, days: list[str]) -> np.ndarray:
    scenes = source.sel(time=[np.datetime64(d) for d in days])
    return np.stack([scenes[VARIABLES[b]].values for b in (*BANDS, SCL)], axis=1).astype(np.uint16)


def test_baseline_04_offset_is_removed_per_item(catalog, source_cube: xr.Dataset, tmp_path: Path) -> None:
    """Items published with DN + 1000 read back as the original DN: from raster:bands, or from the baseline alone."""
    items = summer_items(catalog)
    by_raster_bands = rewrite_assets(items[0], tmp_path / "a", source_cube, shift=1000)
    by_raster_bands["properties"]["s2:processing_baseline"] = "04.00"
    for asset in by_raster_bands["assets"].values():
        asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]
    by_baseline = rewrite_assets(items[1], tmp_path / "b", source_cube, shift=1000)
    by_baseline["properties"]["s2:processing_baseline"] = "05.09"
    for asset in by_baseline["assets"].values():
        asset.pop("raster:bands")
    old_baseline = items[2]
    old_baseline["properties"]["s2:processing_baseline"] = "02.14"
    for asset in old_baseline["assets"].values():
        asset.pop("raster:bands")
    assert [dn_offset(i, "red") for i in items[:3]] == [-1000, -1000, 0]

    cube, found = cube_for(items, catalog, tmp_path)
    days = [str(d.date) for d in found.days]
    assert len(days) == 4
    np.testing.assert_array_equal(cube.values, expected_values(source_cube, days))


def test_reprocessed_duplicates_are_dropped_keeping_the_newest(catalog, source_cube: xr.Dataset, tmp_path: Path) -> None:
    items = summer_items(catalog, 3)
    stale = []
    for item in items[:2]:
        old = rewrite_assets(copy.deepcopy(item), tmp_path / f"old-{item['id']}", source_cube, shift=500)  # wrong values
        old["id"] = item["id"] + "_OLD"
        old["properties"]["updated"] = "2019-08-01T00:00:00Z"
        item["properties"]["updated"] = "2023-01-01T00:00:00Z"
        stale.append(old)
    cube, found = cube_for(items + stale, catalog, tmp_path)
    assert sorted(found.duplicates) == sorted(i["id"] for i in stale)
    assert [d.item_ids for d in found.days] == [[i["id"]] for i in items]
    np.testing.assert_array_equal(cube.values, expected_values(source_cube, [i["properties"]["datetime"][:10] for i in items]))


def test_granules_of_one_solar_day_are_mosaicked_into_one_frame(catalog, source_cube: xr.Dataset, tmp_path: Path) -> None:
    """A day delivered as two granules (west and east halves) gives the same frame as the whole scene."""
    items = summer_items(catalog, 3)
    split = []
    for item in items[:2]:
        west = rewrite_assets(copy.deepcopy(item), tmp_path / f"w-{item['id']}", source_cube, cols=slice(0, 60))
        east = rewrite_assets(copy.deepcopy(item), tmp_path / f"e-{item['id']}", source_cube, cols=slice(40, 100))
        west["id"], east["id"] = item["id"] + "_W", item["id"] + "_E"
        west["properties"]["grid:code"], east["properties"]["grid:code"] = "WEST", "EAST"
        split += [west, east]
    cube, found = cube_for(split + items[2:], catalog, tmp_path)
    assert [len(d.items) for d in found.days] == [2, 2, 1]
    assert cube.sizes["time"] == 3
    np.testing.assert_array_equal(cube.values, expected_values(source_cube, [i["properties"]["datetime"][:10] for i in items]))


def test_deduplicate_and_group_rules() -> None:
    def item(id_: str, when: str, grid: str, **props: Any) -> dict[str, Any]:
        return {"id": id_, "bbox": [26.0, 45.0, 27.0, 46.0], "properties": {"datetime": when, "grid:code": grid, **props}, "assets": {}}

    items = [
        item("a-old", "2023-05-01T09:30:00Z", "T35TLK", **{"s2:processing_baseline": "04.00"}),
        item("a-new", "2023-05-01T09:30:00Z", "T35TLK", **{"s2:processing_baseline": "05.09"}),
        item("b", "2023-05-01T09:30:00Z", "T35TLL"),
        item("c", "2023-05-06T09:30:00Z", "T35TLK"),
    ]
    kept, dropped = deduplicate(items)
    assert dropped == ["a-old"] and [i["id"] for i in kept] == ["a-new", "b", "c"]
    days = group_by_solar_day(kept)
    assert [(str(d.date), sorted(d.item_ids)) for d in days] == [("2023-05-01", ["a-new", "b"]), ("2023-05-06", ["c"])]
    # Local solar day: 23:30 UTC at 150° E is the next morning there.
    late = item("d", "2023-05-01T23:30:00Z", "T56HLH")
    late["bbox"] = [150.0, -34.0, 151.0, -33.0]
    assert str(group_by_solar_day([late])[0].date) == "2023-05-02"


@pytest.mark.parametrize(
    ("asset", "properties", "expected"),
    [
        ({"raster:bands": [{"scale": 0.0001, "offset": -0.1}]}, {}, -1000),
        ({"raster:bands": [{"scale": 0.0001, "offset": 0.0}]}, {"s2:processing_baseline": "05.00"}, 0),
        ({}, {"s2:processing_baseline": "04.00"}, -1000),
        ({}, {"s2:processing_baseline": "03.01"}, 0),
        ({}, {}, 0),
    ],
)
def test_dn_offset_rules(asset: dict, properties: dict, expected: int) -> None:
    assert dn_offset({"assets": {"red": asset}, "properties": properties}, "red") == expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dilate", [0, 1, 2, 3, 7, 20])
def test_cloud_mask_on_the_device_equals_the_numpy_definition(source_cube: xr.Dataset, device: str, dilate: int) -> None:
    """Inference masks clouds where the network runs: on the real sample's scenes (clouds, shadows, no
    data) and with saturated and zero DNs added, the same NaN and values as `usable_reflectance`."""
    names = ("B2", "B3", "B4", "B8", "SCL")
    block = np.stack([source_cube[name].values for name in names], axis=1).astype(np.uint16)[:12]
    block[0, 1, :5, :5] = 65535
    block[1, 2, 5:9, :3] = 0
    block[0, 4, :5, :5] = block[1, 4, 5:9, :3] = 4  # SCL vegetation: only the DN make these pixels unusable
    block[2, 0, 10:14, 10:14] = 40000  # above int16's range: a DN, not a negative number
    block[3, 4, 20:22, 20:22] = 65533  # no SCL class, and negative (-3) as int16
    expected = usable_reflectance(block, dilate)
    assert 0.01 < np.isnan(expected).mean() < 0.99  # the sample has clouds and clear sky
    ours = usable_reflectance_tensor(torch.from_numpy(block.view(np.int16)).to(device), dilate).cpu().numpy()
    np.testing.assert_array_equal(ours, expected)


def test_a_job_on_days_split_across_granules_writes_what_whole_scenes_give(catalog, source_cube: xr.Dataset, tmp_path: Path, scheduler: str) -> None:
    """Mosaicking a day's granules splits the cube's time axis into a chunk per day: every tile task
    must still get all the days its windows read, not the first chunk's."""
    items = summer_items(catalog, 5)
    split = []
    for item in items[1:3]:
        west = rewrite_assets(copy.deepcopy(item), tmp_path / f"w-{item['id']}", source_cube, cols=slice(0, 60))
        east = rewrite_assets(copy.deepcopy(item), tmp_path / f"e-{item['id']}", source_cube, cols=slice(40, 100))
        west["id"], east["id"] = item["id"] + "_W", item["id"] + "_E"
        west["properties"]["grid:code"], east["properties"]["grid:code"] = "WEST", "EAST"
        split += [west, east]
    outputs = []
    for name, published in (("whole", items), ("split", [items[0], *split, *items[3:]])):
        with serve_items(catalog.collection, published) as url:
            job = make_job(url, tmp_path / f"{name}.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-31"}, cloud={"max_cloud_fraction": 1.0})
            result = run_job(parse_spec(job), scheduler=scheduler, show_progress=False, echo=lambda _: None)
        assert len(result.plan.output_days) == 5 and len(result.plan.windows) == 4
        with xr.open_zarr(result.output, consolidated=False) as ds:
            outputs.append(ds.sr.values)
    assert [len(day.items) for day in result.plan.days] == [1, 2, 2, 1, 1]
    np.testing.assert_array_equal(outputs[1], outputs[0])


def test_a_window_is_read_with_a_bounded_block_cache(catalog, tmp_path: Path, monkeypatch) -> None:
    """GDAL keeps decoded blocks of open datasets up to 5 % of the machine's memory by default, and a
    worker's memory then grew with what it had read: every read runs with cube.READ_CACHE_BYTES instead
    (rasterio takes it in bytes)."""
    import rasterio
    from stackstac.rio_reader import SelfCleaningDatasetReader

    from sr_batch.cube import READ_CACHE_BYTES

    seen: list[str | None] = []
    original = SelfCleaningDatasetReader.read

    def read(self, *args: Any, **kwargs: Any) -> np.ndarray:
        seen.append(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfCleaningDatasetReader, "read", read)
    cube, found = cube_for(summer_items(catalog)[:2], catalog, tmp_path)
    assert cube.shape[0] == 2 and len(seen) == 2 * 5
    assert set(seen) == {READ_CACHE_BYTES}


def write_asset(path: Path, values: np.ndarray, transform: Affine, epsg: int = 3035) -> str:
    """A COG (512 px blocks, deflate) of one uint16 band, nodata 0, as a catalogue serves an asset."""
    profile = dict(driver="COG", dtype="uint16", nodata=0, width=values.shape[1], height=values.shape[0], count=1, crs=f"EPSG:{epsg}", transform=transform)
    with rasterio.open(path, "w", compress="deflate", **profile) as dst:
        dst.write(values.astype(np.uint16), 1)
    return path.as_uri()


GRID_WEST, GRID_NORTH = 5_000_000.0, 3_000_000.0
"""The job grid of the lattice tests: 80 x 90 pixels of 10 m from this corner, in EPSG:3035."""


@pytest.mark.parametrize(
    "case, metres, west_px, north_px, rows, cols, epsg, on_lattice",
    [
        ("10 m, larger than the grid", 10, -7, -5, 140, 130, 3035, True),
        ("10 m, covering part of the grid", 10, 31, 44, 140, 130, 3035, True),
        ("10 m, inside the grid", 10, 23, 17, 41, 29, 3035, True),
        ("20 m (SCL), even offset", 20, -10, -4, 140, 130, 3035, True),
        ("20 m (SCL), odd offset", 20, 13, -9, 140, 130, 3035, True),
        ("20 m, inside the grid, odd offset", 20, 23, 17, 42, 30, 3035, True),
        ("60 m, odd offset", 60, -17, 7, 140, 130, 3035, True),
        ("10 m, shifted half a pixel", 10, -7.5, -5, 140, 130, 3035, False),
        ("20 m, shifted a quarter pixel", 20, -10.25, -4, 140, 130, 3035, False),
        ("another CRS (UTM 34N)", 10, -7, -5, 140, 130, 32634, False),
    ],
)
def test_an_asset_on_the_grids_lattice_is_read_from_its_file_as_warping_reads_it(
    source_cube: xr.Dataset, tmp_path: Path, case: str, metres: int, west_px: float, north_px: float, rows: int, cols: int, epsg: int, on_lattice: bool
) -> None:
    """stackstac warps (GDAL's WarpedVRT, nearest) any asset not exactly on the job's grid: every real
    read, as a job's grid is the AOI's block of a scene. An asset whose pixels are whole blocks of the
    grid's is read from its file instead: every window (inside, across the asset's edges, outside it)
    must give what stackstac's warped read gives, pixel for pixel; any other asset is still warped."""
    from rasterio.enums import Resampling
    from stackstac.raster_spec import RasterSpec
    from stackstac.rio_reader import AutoParallelRioReader

    from sr_batch.cube import AssetReader, OnLattice

    factor = metres // 10
    scene = source_cube.SCL if factor > 1 else source_cube.B4
    values = np.nan_to_num(scene.values[7])[::factor, ::factor]  # real DN: a forest, a river, clouds
    values = np.tile(values, (2, 2))[: rows // factor, : cols // factor]  # rows x cols grid pixels
    values[3:6, 4:9] = 0  # some nodata inside the asset
    west, north = GRID_WEST + 10 * west_px, GRID_NORTH - 10 * north_px
    if epsg != 3035:  # the same corner in the other CRS, so that the asset covers the grid
        from pyproj import Transformer

        west, north = Transformer.from_crs(3035, epsg, always_xy=True).transform(west, north)
    transform = Affine(metres, 0, west, 0, -metres, north)
    url = write_asset(tmp_path / "asset.tif", values, transform, epsg)
    spec = RasterSpec(epsg=3035, bounds=(GRID_WEST, GRID_NORTH - 900, GRID_WEST + 800, GRID_NORTH), resolutions_xy=(10.0, 10.0))
    options = dict(url=url, spec=spec, resampling=Resampling.nearest, dtype=np.dtype("uint16"), fill_value=np.uint16(0), scale_offset=(1, 0))
    ours, warped = AssetReader(**options), AutoParallelRioReader(**options)

    windows = [Window(0, 0, 80, 90), Window(3, 5, 24, 21), Window(37, 41, 43, 49), Window(50, 60, 30, 30), Window(1, 2, 1, 1), Window(79, 89, 1, 1)]
    windows += [Window(col, row, min(17, 80 - col), min(13, 90 - row)) for row in range(0, 90, 11) for col in range(0, 80, 9)]  # a tiling, with its halos
    for window in windows:
        np.testing.assert_array_equal(ours.read(window), warped.read(window), err_msg=f"{case}: window {window}")
    assert isinstance(ours.dataset, OnLattice) is on_lattice
    assert (ours.read(Window(0, 0, 80, 90)) > 0).any()


def test_scenes_served_as_real_sentinel2_are_read_on_their_lattice(tmp_path: Path, monkeypatch) -> None:
    """A real catalogue's scenes are wider than a job's region, and their SCL is 20 m: stackstac would
    warp every asset. The cube reads each straight from its file (none is warped), and holds the scenes'
    10 m pixels and each 20 m SCL pixel repeated over its 2 x 2 block of the grid."""
    from stackstac.rio_reader import AutoParallelRioReader

    from sr_batch.bench import mirrored_catalog
    from sr_batch.cube import OnLattice

    catalog = mirrored_catalog(tmp_path / "catalog", 96, 2)
    opened: list[Any] = []
    original = AutoParallelRioReader.dataset.fget

    def dataset(self: AutoParallelRioReader) -> Any:
        opened.append(result := original(self))
        return result

    monkeypatch.setattr(AutoParallelRioReader, "dataset", property(dataset))
    with serve_items(catalog.collection, catalog.items) as url:
        spec = parse_spec(make_job(url, tmp_path / "unused.zarr", catalog, time={"start": "2000-01-01", "end": "2025-12-31"}))
        found = search(spec)
    grid, _ = choose_grid(found.days, spec.aoi.shape())
    assert (grid.height, grid.width) == (96, 96)
    cube = load_cube(found.days, grid, spec.stac.assets.in_model_order(), [*BANDS, SCL], ((48, 48), (96,))).compute()

    assert opened and all(isinstance(dataset, OnLattice) for dataset in opened)
    margin = catalog.margin
    for day, item in enumerate(sorted(catalog.items, key=lambda item: item["properties"]["datetime"])):
        for band, key in enumerate(spec.stac.assets.in_model_order()):
            with rasterio.open(item["assets"][key]["href"]) as source:
                scene = source.read(1)
            if key == "scl":
                assert scene.shape == (96 // 2 + margin, 96 // 2 + margin)
                scene = scene.repeat(2, axis=0).repeat(2, axis=1)
            expected = scene[margin : margin + 96, margin : margin + 96]
            np.testing.assert_array_equal(cube.values[day, band], expected, err_msg=f"day {day}, {key}")
    assert (cube.values > 0).all()


def test_assets_stay_open_for_the_next_windows_within_bounds(source_cube: xr.Dataset, tmp_path: Path, monkeypatch) -> None:
    """stackstac makes each read task's readers afresh, which opened every file again for every window
    (half a read's time at 256 px tiles). An asset stays open in the process for the next reader, read
    on the lattice or warped: opened once for several windows, yet at most `capacity` files at once (the
    oldest are closed) and none longer than `seconds` (a remote file replaced in place is opened again;
    a local one is as soon as it changes, next test). A driver without a dataset per reading thread is
    not shared: closed while a reader held it, it would fail that reader's next read."""
    from rasterio.enums import Resampling
    from stackstac.raster_spec import RasterSpec
    from stackstac.rio_reader import SelfCleaningDatasetReader

    import sr_batch.cube as cube

    kept = cube.KeptDatasets(capacity=2, seconds=3600.0)
    monkeypatch.setattr(cube, "KEPT_DATASETS", kept)
    opened: list[str] = []
    original = SelfCleaningDatasetReader.__init__

    def counting(self: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        opened.append(str(path))
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(SelfCleaningDatasetReader, "__init__", counting)
    spec = RasterSpec(epsg=3035, bounds=(GRID_WEST, GRID_NORTH - 900, GRID_WEST + 800, GRID_NORTH), resolutions_xy=(10.0, 10.0))
    transform = Affine(10, 0, GRID_WEST - 70, 0, -10, GRID_NORTH + 50)
    urls = [write_asset(tmp_path / f"asset-{k}.tif", np.nan_to_num(source_cube.B4.values[7 + k]), transform) for k in range(3)]

    options = dict(spec=spec, resampling=Resampling.nearest, dtype=np.dtype("uint16"), fill_value=np.uint16(0), scale_offset=(1, 0))

    def read(url: str, window: Window) -> np.ndarray:
        reader = cube.AssetReader(url=url, **options)
        values = reader.read(window)
        reader.close()  # as stackstac's reader is let go after its task
        return values

    first, second = Window(0, 0, 40, 40), Window(30, 30, 40, 40)
    expected = read(urls[0], first)
    assert read(urls[0], second)[:10, :10].tolist() == expected[30:, 30:].tolist() and len(opened) == 1, "one open for two windows"
    read(urls[1], first)
    read(urls[0], first)
    assert len(opened) == 2, "both files kept"
    read(urls[2], first)  # a third: the least recently used (asset-1) is closed
    read(urls[0], first)
    assert len(opened) == 3
    read(urls[1], first)
    assert len(opened) == 4 and opened[-1].endswith("asset-1.tif")

    kept.seconds = 0.0  # kept past its time: opened again
    np.testing.assert_array_equal(read(urls[1], first), read(urls[1], first))
    assert len(opened) == 6

    # A warped asset (another UTM zone) is kept too, with its VRT: opened twice (a look at its grid, then
    # stackstac's) for its first window, not again for the next.
    from pyproj import Transformer
    from stackstac.rio_reader import AutoParallelRioReader

    kept.seconds = 3600.0
    west, north = Transformer.from_crs(3035, 32634, always_xy=True).transform(GRID_WEST - 70, GRID_NORTH + 50)
    warped_url = write_asset(tmp_path / "utm34.tif", np.nan_to_num(source_cube.B4.values[7]), Affine(10, 0, west, 0, -10, north), epsg=32634)
    read(warped_url, first)
    assert len(opened) == 8
    np.testing.assert_array_equal(read(warped_url, second), AutoParallelRioReader(url=warped_url, **options).read(second))
    assert len(opened) == 9, "the second window's read reused the warped asset (only stackstac's own reader opened it)"

    # A driver GDAL cannot read from several threads gets one dataset, which is not shared: opened per reader.
    image = tmp_path / "asset.img"
    with rasterio.open(image, "w", driver="HFA", dtype="uint16", width=130, height=140, count=1, crs="EPSG:3035", transform=transform) as dst:
        dst.write(np.nan_to_num(source_cube.B4.values[7:8]).repeat(2, axis=1).repeat(2, axis=2)[:, :140, :130].astype(np.uint16))
    np.testing.assert_array_equal(read(image.as_uri(), first), read(image.as_uri(), first))
    assert len(opened) == 11 and opened[-1].endswith("asset.img")


@pytest.mark.parametrize("how", ["rewritten", "renamed over"])
def test_a_kept_local_file_replaced_in_place_is_read_anew(source_cube: xr.Dataset, tmp_path: Path, monkeypatch, how: str) -> None:
    """A local asset kept open is read from its new content as soon as it is rewritten in place or
    replaced by a rename (as a mirror updates a reprocessed scene), not after the kept time; the old
    version's dataset is closed, and an unchanged file is not opened again."""
    from rasterio.enums import Resampling
    from stackstac.raster_spec import RasterSpec

    import sr_batch.cube as cube

    kept = cube.KeptDatasets(capacity=8, seconds=3600.0)
    monkeypatch.setattr(cube, "KEPT_DATASETS", kept)
    spec = RasterSpec(epsg=3035, bounds=(GRID_WEST, GRID_NORTH - 900, GRID_WEST + 800, GRID_NORTH), resolutions_xy=(10.0, 10.0))
    transform = Affine(10, 0, GRID_WEST - 70, 0, -10, GRID_NORTH + 50)
    options = dict(spec=spec, resampling=Resampling.nearest, dtype=np.dtype("uint16"), fill_value=np.uint16(0), scale_offset=(1, 0))
    window = Window(0, 0, 40, 40)

    def read(url: str) -> np.ndarray:
        reader = cube.AssetReader(url=url, **options)
        values = reader.read(window)
        reader.close()
        return values

    path = tmp_path / "asset.tif"
    old, new = (np.nan_to_num(source_cube.B4.values[day]) for day in (7, 8))
    url = write_asset(path, old, transform)
    before = read(url)
    assert read(url).tolist() == before.tolist() and len(kept._open) == 1
    first_dataset = next(iter(kept._open.values()))[1]
    # A reader that lives on (in its slab's reader table) and has read the old file: the new one is shifted
    # 2 columns, so a read on the old file's lattice would misplace it.
    living = cube.AssetReader(url=url, **options)
    assert living.read(window).tolist() == before.tolist()
    shifted = transform * Affine.translation(2, 0)
    time.sleep(0.05)  # file times tick in milliseconds: a rewrite in the same tick, same size and inode, would look unchanged
    if how == "rewritten":
        write_asset(path, new, shifted)
    else:
        write_asset(tmp_path / "new.tif", new, shifted)
        os.replace(tmp_path / "new.tif", path)
    np.testing.assert_array_equal(before, old[5:45, 7:47].astype(np.uint16))  # the grid starts 5 rows, 7 columns into the asset
    expected = new[5:45, 5 : 47 - 2].astype(np.uint16)  # now 5 columns into it
    np.testing.assert_array_equal(living.read(window), expected, err_msg="the living reader read the old file, or on its lattice")
    np.testing.assert_array_equal(read(url), expected, err_msg="the kept dataset of the old file was read")
    assert len(kept._open) == 1 and next(iter(kept._open.values()))[1] is not first_dataset, "the old version stays kept"
    # Evicted by another asset (capacity 1), the kept dataset is closed: the living reader opens its asset again, kept.
    kept.capacity = 1
    other = write_asset(tmp_path / "other.tif", old, transform)
    read(other)
    np.testing.assert_array_equal(living.read(window), expected)
    assert kept.holds(living.dataset)
    living.close()


def test_a_reading_process_raises_its_open_file_limit_within_the_hard_one(tmp_path: Path) -> None:
    """Kept assets take a file per reading thread: a process starting with a soft limit of 256 open
    files (within a hard limit of 2048) is allowed the hard limit once it keeps a dataset; a higher
    soft limit is never lowered. Where the hard limit is low, fewer assets are kept: half the limit
    for a file per reading thread (outside a Dask worker, one per core)."""
    import subprocess
    import sys

    script = """
import resource, sys
import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from stackstac.raster_spec import RasterSpec
import rasterio
from sr_batch.cube import AssetReader

soft, hard = (int(value) for value in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
path = sys.argv[3]
with rasterio.open(path, "w", driver="GTiff", dtype="uint16", width=16, height=16, count=1, crs="EPSG:3035", transform=Affine(10, 0, 0, 0, -10, 160)) as dst:
    dst.write(np.ones((16, 16), np.uint16), 1)
spec = RasterSpec(epsg=3035, bounds=(0, 0, 160, 160), resolutions_xy=(10.0, 10.0))
reader = AssetReader(url=path, spec=spec, resampling=Resampling.nearest, dtype=np.dtype("uint16"), fill_value=np.uint16(0), scale_offset=(1, 0))
assert reader.read(Window(0, 0, 16, 16)).all()
from sr_batch.cube import KEPT_DATASETS
print(*resource.getrlimit(resource.RLIMIT_NOFILE), KEPT_DATASETS.capacity)
"""
    import resource

    cores = os.cpu_count() or 1
    cases = [(256, 2048, 2048), (100, 100, 100)]  # a process may always lower its hard limit
    hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_now == resource.RLIM_INFINITY or hard_now >= 20000:
        cases += [(4000, 20000, 8192), (16000, 20000, 16000)]
    for soft, hard, expected in cases:
        done = subprocess.run([sys.executable, "-c", script, str(soft), str(hard), str(tmp_path / f"{soft}.tif")], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        kept = min(128, max(8, expected // 2 // cores))  # 128 at 2048 files and up to 8 cores; 50 / cores (at least 8) at 100
        assert done.stdout.split() == [str(expected), str(hard), str(kept)], (soft, hard, done.stdout)
