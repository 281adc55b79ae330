"""Source assets checked before the cube is built: a missing, truncated or misdescribed COG costs its
item, not the job.

Strategy: every asset the job reads is opened once with rasterio, in a thread pool (the work is
waiting on storage), and only its header is read, never its pixels, so nothing is read twice:

- it must exist and be a raster GDAL can open;
- every block of its first band must lie inside the file (a truncated download keeps its header but
  loses the blocks at the end; checked where the file's size is known: local files);
- its shape, transform and CRS must be the ones the item states (proj:shape / proj:transform / proj
  code, on the asset or the item): stackstac places pixels by the item's metadata, so a mismatch would
  put real pixels in the wrong place without any error.

A catalogue cannot make the job read local files: an href that is a local path (or a GDAL /vsi
path) is refused unless the STAC API itself is on this machine (loopback), as the bundled sample is.
Nor can a public catalogue make the job's machines request internal addresses (a cloud's metadata
service at 169.254.169.254, a private network, this machine): an http(s) href whose host is, or
resolves to, a non-global address is refused unless the STAC API itself is at such an address.

An item with a failed asset is dropped from the search. Its solar day then has no data wherever that
item was the only cover, which is exactly the tiles it touches; other granules of the same day still
count. The failures are listed in the plan summary and in the output's attributes
(`unreadable_attributes`). When more than `stac.max_unreadable_fraction` of the items fail, the job
stops with one line: that is a storage or access problem, not a few bad scenes.

A block whose compressed bytes are corrupt cannot be seen in a header; the cube reads such a block as
no data (`cube.READ_ERRORS_AS_NODATA`) rather than failing the job, and its worker reports the read:
the job counts them in its summary and in the output's `unreadable_blocks` attribute.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from sr_batch.errors import SearchError

CHECK_THREADS = 16
TRANSFORM_TOLERANCE_M = 1e-3
REMOTE_SCHEMES = ("http", "https", "s3", "gs", "az")
UNSIGNED_DTYPES = ("uint8", "uint16")
"""Sentinel-2 L2A assets are unsigned digital numbers: a float or signed raster (NaN, negative values)
is not what the cube's uint16 read and nodata 0 assume."""


@dataclass(frozen=True)
class AssetProblem:
    """Why one asset of one item cannot be used."""

    item: str
    date: str
    asset: str
    problem: str


def check_assets(
    items: list[dict[str, Any]], asset_keys: list[str], max_unreadable_fraction: float, stac_url: str
) -> tuple[list[dict[str, Any]], list[AssetProblem]]:
    """The items whose every asset in `asset_keys` is readable and on the grid its item states, and the problems found.

    Raises SearchError when more than `max_unreadable_fraction` of the items have a problem."""
    local_allowed, internal_allowed = is_loopback(stac_url), is_internal(stac_url)
    jobs = [(item, key) for item in items for key in asset_keys]
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        found = list(pool.map(lambda job: asset_problem(*job, local_allowed=local_allowed, internal_allowed=internal_allowed), jobs))
    problems = [problem for problem in found if problem is not None]
    bad_items = {problem.item for problem in problems}
    if items and len(bad_items) / len(items) > max_unreadable_fraction:
        first = problems[0]
        raise SearchError(
            f"stac.max_unreadable_fraction: {len(bad_items)} of {len(items)} items have unreadable assets "
            f"(above {max_unreadable_fraction:.0%}; first: {first.item} {first.asset}: {first.problem}); "
            "check access to the asset storage, or raise stac.max_unreadable_fraction to skip them"
        )
    return [item for item in items if item["id"] not in bad_items], problems


def is_loopback(url: str) -> bool:
    """Whether a URL's host is this machine."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_internal(url: str) -> bool:
    """Whether a URL's host is, or resolves to, an address that is not on the public internet
    (loopback, private, link-local, reserved). A name that does not resolve is not judged here."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, UnicodeError, ValueError):
            return False
    return any(not address.is_global for address in addresses)


def href_refusal(href: str, local_allowed: bool, internal_allowed: bool | None = None) -> str | None:
    """Why an href may not be opened at all: local files only from a STAC API on this machine, and
    internal addresses only from a STAC API at an internal address (`internal_allowed`, by default
    `local_allowed`)."""
    scheme = urlsplit(href).scheme.lower()
    local = scheme in ("", "file") or href.lower().startswith("/vsi")
    if local and not local_allowed:
        return "refused: a local path from a remote STAC API (a catalogue may not make the job read this machine's files)"
    if not local and scheme not in REMOTE_SCHEMES:
        return f"refused: unsupported href scheme {scheme!r} (use one of {', '.join(REMOTE_SCHEMES)})"
    allowed = local_allowed if internal_allowed is None else internal_allowed
    if scheme in ("http", "https") and not allowed and is_internal(href):
        return "refused: an internal address from a public STAC API (a catalogue may not make the job request this machine or its networks)"
    return None


def asset_problem(item: dict[str, Any], key: str, local_allowed: bool = True, internal_allowed: bool | None = None) -> AssetProblem | None:
    """None when the asset opens and agrees with its item; otherwise what is wrong, in a few words."""
    import rasterio
    from rasterio.errors import RasterioError

    def problem(text: str) -> AssetProblem:
        return AssetProblem(item=item["id"], date=str(item["properties"].get("datetime", ""))[:10], asset=key, problem=text)

    asset = item.get("assets", {}).get(key)
    if not asset or not asset.get("href"):
        return problem("no href")
    href = asset["href"]
    refusal = href_refusal(href, local_allowed, internal_allowed)
    if refusal:
        return problem(refusal)
    try:
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(href) as dataset:
            text = _dtype_problem(dataset) or _truncation(dataset, href) or _grid_mismatch(dataset, item, asset)
    except (RasterioError, OSError) as err:
        lines = str(err).strip().splitlines()
        return problem(f"cannot open ({type(err).__name__}: {lines[0][:160] if lines else ''})")
    return problem(text) if text else None


def _dtype_problem(dataset: Any) -> str | None:
    dtype = dataset.dtypes[0]
    return None if dtype in UNSIGNED_DTYPES else f"data type {dtype}, not Sentinel-2 L2A digital numbers ({' or '.join(UNSIGNED_DTYPES)})"


def _local_path(href: str) -> str | None:
    parts = urlsplit(href)
    if parts.scheme == "file":
        return unquote(parts.path)
    return href if parts.scheme == "" else None


def _truncation(dataset: Any, href: str) -> str | None:
    """Blocks that start or end past the end of a local file: the file was cut short."""
    path = _local_path(href)
    if path is None:
        return None
    size = os.path.getsize(path)
    end = 0
    for (row, col), _window in dataset.block_windows(1):
        offset = dataset.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)
        length = dataset.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)
        if offset is None or length is None:
            return None  # not a TIFF: nothing to compare
        end = max(end, int(offset) + int(length))
    return f"truncated: its blocks need {end} bytes, the file has {size}" if end > size else None


def _grid_mismatch(dataset: Any, item: dict[str, Any], asset: dict[str, Any]) -> str | None:
    """The file's grid against the one the item states (asset-level fields first, then item-level)."""
    from sr_batch.cube import item_epsg

    props = item["properties"]
    shape = asset.get("proj:shape") or props.get("proj:shape")
    transform = asset.get("proj:transform") or props.get("proj:transform")
    if shape and tuple(int(v) for v in shape) != (dataset.height, dataset.width):
        return f"its grid is {dataset.height} x {dataset.width} px, the item says proj:shape {list(shape)}"
    if transform:
        stated = [float(v) for v in transform[:6]]
        actual = list(dataset.transform)[:6]
        if any(abs(a - b) > TRANSFORM_TOLERANCE_M for a, b in zip(actual, stated)):
            return f"its transform is {[round(v, 3) for v in actual]}, the item says proj:transform {stated}"
    epsg = item_epsg(item)
    if epsg is not None and dataset.crs is not None and dataset.crs.to_epsg() not in (epsg, None):
        return f"its CRS is EPSG:{dataset.crs.to_epsg()}, the item says EPSG:{epsg}"
    return None


def unreadable_attributes(problems: list[AssetProblem]) -> dict[str, Any]:
    """Output attributes that record which items were skipped and why (the sink writes these)."""
    return {
        "unreadable_items": len({p.item for p in problems}),
        "unreadable_assets": json.dumps([asdict(p) for p in problems]),
    }


def describe_problems(problems: list[AssetProblem], limit: int = 5) -> str:
    """Lines for the plan summary: one per problem, up to `limit`."""
    items = len({p.item for p in problems})
    lines = [f"Unreadable assets: {len(problems)} in {items} items, skipped (their dates are no data where they were the only cover)"]
    lines += [f"  {p.date} {p.item} {p.asset}: {p.problem}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  … and {len(problems) - limit} more (listed in the output's unreadable_assets attribute)")
    return "\n".join(lines)
