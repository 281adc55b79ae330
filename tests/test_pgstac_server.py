"""The loopback pgstac API answers searches and pages like a production STAC API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pystac_client import Client

from pgstac_server import pgstac_api

COLLECTION_ID = "sentinel-2-l2a-test"
STAC_VERSION = "1.0.0"
EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
]
# Small Sentinel-2-like footprints near lon 26.0, lat 45.8 (Romania), 0.2 degree squares.
TILE_WEST = (25.8, 45.7, 26.0, 45.9)
TILE_EAST = (26.0, 45.7, 26.2, 45.9)


def _polygon(bbox: tuple[float, float, float, float]) -> dict[str, Any]:
    west, south, east, north = bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {"type": "Polygon", "coordinates": [ring]}


def _item(item_id: str, bbox: tuple[float, float, float, float], when: str, cloud: float) -> dict[str, Any]:
    """A Sentinel-2 L2A-shaped item: the fields client code filters and groups on."""
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": EXTENSIONS,
        "id": item_id,
        "collection": COLLECTION_ID,
        "geometry": _polygon(bbox),
        "bbox": list(bbox),
        "properties": {
            "datetime": when,
            "platform": "sentinel-2a",
            "constellation": "sentinel-2",
            "eo:cloud_cover": cloud,
            "proj:epsg": 32635,
            "proj:code": "EPSG:32635",
        },
        "links": [],
        "assets": {
            band: {
                "href": f"file:///tmp/{item_id}_{band}.tif",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
            }
            for band in ("B04", "B08", "SCL")
        },
    }


def _collection() -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": COLLECTION_ID,
        "description": "Tiny Sentinel-2 L2A-like collection for tests",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[25.8, 45.7, 26.2, 45.9]]},
            "temporal": {"interval": [["2024-07-01T00:00:00Z", "2024-07-31T23:59:59Z"]]},
        },
        "links": [],
    }


ITEMS = [
    _item("S2A_T35TLL_20240701", TILE_WEST, "2024-07-01T09:20:31Z", 5.0),
    _item("S2A_T35TML_20240701", TILE_EAST, "2024-07-01T09:20:35Z", 12.5),
    _item("S2A_T35TLL_20240711", TILE_WEST, "2024-07-11T09:20:31Z", 40.0),
]


@pytest.mark.pgstac
@pytest.mark.timeout(900)
def test_pgstac_api_search_and_paging(tmp_path: Path) -> None:
    with pgstac_api(_collection(), ITEMS, tmp_path) as url:
        client = Client.open(url)
        assert [c.id for c in client.get_collections()] == [COLLECTION_ID]

        early = client.search(collections=[COLLECTION_ID], bbox=[25.9, 45.75, 26.1, 45.85], datetime="2024-07-01/2024-07-05")
        found = {item["id"]: item for item in early.items_as_dicts()}
        assert set(found) == {"S2A_T35TLL_20240701", "S2A_T35TML_20240701"}
        props = found["S2A_T35TML_20240701"]["properties"]
        assert props["eo:cloud_cover"] == 12.5
        assert props["proj:code"] == "EPSG:32635"
        assert props["proj:epsg"] == 32635
        assert found["S2A_T35TML_20240701"]["assets"]["B04"]["href"] == "file:///tmp/S2A_T35TML_20240701_B04.tif"

        paged = client.search(collections=[COLLECTION_ID], limit=1)
        assert sorted(item["id"] for item in paged.items_as_dicts()) == sorted(i["id"] for i in ITEMS)
        assert len(list(paged.pages_as_dicts())) == 3
