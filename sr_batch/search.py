"""Stage 1, search: the job's Sentinel-2 items from a STAC API, de-duplicated and grouped per solar day.

Only bbox + datetime + collection go to the server: they are what every STAC API implements.
Everything else (the exact AOI geometry, scene cloud cover, required assets) is filtered here, so a
server that ignores the query extension cannot silently widen the job.

Every request (the landing page, the collections, each page of results) goes through one HTTP session
with explicit timeouts and a bounded urllib3 Retry: HTTP 429/5xx, timeouts and dropped connections are
repeated with exponential backoff, so a flaky API costs seconds, not the job, and paging stays
complete (each page is retried on its own). When the retries are spent the job stops with one line
that names stac.url and what to try. Items whose assets cannot be read are dropped by
`sr_batch.assets.check_assets` at the end of the search.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import shapely.geometry
from urllib3.util.retry import Retry

from sr_batch.assets import AssetProblem, check_assets
from sr_batch.errors import SearchError
from sr_batch.spec import JobSpec, Stac


@dataclass(frozen=True)
class SolarDay:
    """All items of one local solar day: they are mosaicked into one frame."""

    date: dt.date
    items: tuple[dict[str, Any], ...]

    @property
    def item_ids(self) -> list[str]:
        return [item["id"] for item in self.items]


@dataclass
class SearchResult:
    days: list[SolarDay]
    found: int
    """Items the API returned before any client-side filtering."""
    duplicates: list[str] = field(default_factory=list)
    outside_aoi: int = 0
    too_cloudy: int = 0
    missing_assets: list[str] = field(default_factory=list)
    unreadable: list[AssetProblem] = field(default_factory=list)
    """Assets that are missing, truncated or not on their item's grid: their items were skipped."""

    @property
    def items(self) -> list[dict[str, Any]]:
        return [item for day in self.days for item in day.items]


def search(spec: JobSpec) -> SearchResult:
    """Run the search and every client-side filter; raises SearchError when nothing usable is found."""
    aoi = spec.aoi.shape()
    raw = fetch_items(spec, aoi.bounds)
    found = len(raw)
    if not raw:
        raise SearchError(
            f"time/aoi: no {spec.stac.collection} items at {spec.stac.url} for {spec.time.as_interval()} "
            f"in bbox {[round(v, 5) for v in aoi.bounds]}; widen time or check aoi and stac.collection"
        )
    result = SearchResult(days=[], found=found)
    items = [item for item in raw if _footprint(item).intersects(aoi)]
    result.outside_aoi = found - len(items)
    items = _prefilter_cloud_cover(items, spec.cloud.max_scene_cloud_cover, result)
    items = _require_assets(items, spec, result)
    items, result.duplicates = deduplicate(items)
    items, result.unreadable = check_assets(items, spec.stac.assets.in_model_order(), spec.stac.max_unreadable_fraction, spec.stac.url)
    result.days = group_by_solar_day(items)
    if not result.days and result.unreadable:
        raise SearchError(f"stac.assets: every remaining item has unreadable assets ({result.unreadable[0].problem}); check access to the asset storage")
    if not result.days:
        raise SearchError(f"cloud.max_scene_cloud_cover: all {found} items were filtered out; raise it or widen time")
    return result


PAGE_SIZE = 250
RETRY_STATUSES = (429, 500, 502, 503, 504)
BACKOFF_FACTOR_S = 0.5
"""urllib3 sleeps 0, 1, 2, 4 … s between repeats (0 before the first), capped at BACKOFF_MAX_S."""
BACKOFF_MAX_S = 8.0


def retry_policy(stac: Stac) -> Retry:
    """Bounded retries for every request; POST searches are repeated too (a search has no side effects)."""
    return Retry(
        total=stac.retries,
        connect=stac.retries,
        read=stac.retries,
        status=stac.retries,
        other=stac.retries,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,
        backoff_factor=BACKOFF_FACTOR_S,
        backoff_max=BACKOFF_MAX_S,
        raise_on_status=True,
    )


def open_client(stac: Stac) -> Any:
    """A pystac-client Client whose session retries and times out as the job says."""
    import pystac_client
    from pystac_client.stac_api_io import StacApiIO

    io = StacApiIO(max_retries=retry_policy(stac), timeout=stac.timeout_s)
    return pystac_client.Client.open(stac.url, stac_io=io, timeout=stac.timeout_s)


def fetch_items(spec: JobSpec, bbox: tuple[float, float, float, float], page_size: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """Items as plain dicts (stackstac 0.5.1 needs the original proj:epsg that pystac would rewrite)."""
    from pystac_client.exceptions import APIError

    url = spec.stac.url
    try:
        client = open_client(spec.stac)
        _check_collection(client, spec.stac.collection)
        found = client.search(collections=[spec.stac.collection], bbox=bbox, datetime=spec.time.as_interval(), limit=page_size)
        return list(found.items_as_dicts())
    except SearchError:
        raise
    except Exception as err:  # pystac-client wraps the requests/urllib3 errors in APIError
        network = _network_error(err)
        if isinstance(err, APIError) and network is None:
            raise SearchError(f"stac.url: the STAC API at {url} refused the search ({_first_line(err)}); check stac.url and stac.collection") from None
        raise SearchError(
            f"stac.url: no answer from a STAC API at {url} after {spec.stac.retries + 1} attempts ({_reason(network or err)}); "
            f"check the URL and that the server is up, or raise stac.retries / stac.timeout_s (now {spec.stac.timeout_s:g} s)"
        ) from None


def _network_error(err: BaseException) -> BaseException | None:
    """The requests error behind `err`, if the request never got a usable answer (retries spent)."""
    import requests

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, requests.RequestException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(err: BaseException) -> str:
    """The innermost cause in a few words: requests wraps urllib3's MaxRetryError around the real one."""
    reason: Any = err.args[0] if err.args else None
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason
    cause = reason if isinstance(reason, BaseException) else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _check_collection(client: Any, collection: str) -> None:
    """Name the collections on offer when the job's is not among them."""
    try:
        available = [c.id for c in client.get_collections()]
    except Exception:  # noqa: BLE001 - listing collections is a courtesy; the search itself decides
        return
    if available and collection not in available:
        raise SearchError(f"stac.collection: {collection!r} is not in this STAC API; it has: {', '.join(sorted(available)[:10])}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _footprint(item: dict[str, Any]) -> Any:
    if item.get("geometry"):
        return shapely.geometry.shape(item["geometry"])
    return shapely.geometry.box(*item["bbox"])


def _prefilter_cloud_cover(items: list[dict[str, Any]], limit: float | None, result: SearchResult) -> list[dict[str, Any]]:
    """Scene-level eo:cloud_cover; items without it are kept (the per-tile SCL score decides)."""
    if limit is None:
        return items
    kept = [item for item in items if item["properties"].get("eo:cloud_cover", 0.0) <= limit]
    result.too_cloudy = len(items) - len(kept)
    return kept


def _require_assets(items: list[dict[str, Any]], spec: JobSpec, result: SearchResult) -> list[dict[str, Any]]:
    """Drop items that lack a needed asset; if none has it, the asset name is wrong."""
    names = dict(zip(("blue", "green", "red", "nir", "scl"), spec.stac.assets.in_model_order()))
    for role, key in names.items():
        if items and not any(key in item.get("assets", {}) for item in items):
            offered = sorted({k for item in items for k in item.get("assets", {})})
            raise SearchError(f"stac.assets.{role}: no item has an asset named {key!r}; the items offer: {', '.join(offered[:20])}")
    kept = [item for item in items if all(key in item.get("assets", {}) for key in names.values())]
    result.missing_assets = [item["id"] for item in items if item not in kept]
    return kept


def tile_key(item: dict[str, Any]) -> str:
    """Which granule an item is: reprocessed copies of one granule share it."""
    props = item["properties"]
    for key in ("grid:code", "s2:mgrs_tile"):
        if props.get(key):
            return str(props[key])
    if props.get("mgrs:utm_zone"):
        return f"{props['mgrs:utm_zone']}{props.get('mgrs:latitude_band', '')}{props.get('mgrs:grid_square', '')}"
    transform = props.get("proj:transform") or []
    return f"{props.get('proj:epsg') or props.get('proj:code')}:{[round(v) for v in transform[:6]]}"


def solar_day(item: dict[str, Any]) -> dt.date:
    """The local solar date at the item's centre: acquisitions near midnight UTC stay on their own day."""
    when = dt.datetime.fromisoformat(item["properties"]["datetime"].replace("Z", "+00:00"))
    bbox = item["bbox"]
    longitude = (bbox[0] + bbox[len(bbox) // 2]) / 2  # 2D or 3D bbox
    return (when + dt.timedelta(hours=longitude / 15.0)).date()


def _freshness(item: dict[str, Any]) -> tuple[str, str, str]:
    """Newer processing wins: baseline first, then when it was produced, then the id as a tie-break."""
    props = item["properties"]
    baseline = str(props.get("s2:processing_baseline", ""))
    produced = str(props.get("s2:generation_time") or props.get("updated") or props.get("created") or props.get("published") or "")
    return baseline, produced, item["id"]


def deduplicate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One item per granule and solar day; the others (older reprocessings, repeated ids) are dropped."""
    best: dict[tuple[str, dt.date], dict[str, Any]] = {}
    for item in items:
        key = (tile_key(item), solar_day(item))
        if key not in best or _freshness(item) > _freshness(best[key]):
            best[key] = item
    kept_ids = {id(item) for item in best.values()}
    dropped = [item["id"] for item in items if id(item) not in kept_ids]
    return [item for item in items if id(item) in kept_ids], dropped


def group_by_solar_day(items: list[dict[str, Any]]) -> list[SolarDay]:
    """Days in time order; within a day, the clearest item last (a mosaic puts the last on top)."""
    by_day: dict[dt.date, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        by_day[solar_day(item)].append(item)
    return [SolarDay(day, tuple(sorted(group, key=lambda i: -float(i["properties"].get("eo:cloud_cover", 0.0))))) for day, group in sorted(by_day.items())]
