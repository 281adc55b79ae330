"""The job spec: every setting of a region job, in one validated place.

A job is a YAML file. It is validated once, here, so later stages can trust every field; any
problem becomes a one-line `SpecError` that names the field and the fix.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import shapely
import shapely.geometry
import shapely.validation
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from shapely.geometry.base import BaseGeometry

from sr_batch.errors import SpecError

BANDS = ("blue", "green", "red", "nir")
"""Model band order: Sentinel-2 B02, B03, B04, B08."""


class _Strict(BaseModel):
    """Unknown keys are refused, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Assets(_Strict):
    """Asset keys of the collection. Earth Search names by default; Planetary Computer uses B02…/SCL."""

    blue: str = "blue"
    green: str = "green"
    red: str = "red"
    nir: str = "nir"
    scl: str = "scl"

    def in_model_order(self) -> list[str]:
        """Asset keys for blue, green, red, nir, then the scene classification layer."""
        return [self.blue, self.green, self.red, self.nir, self.scl]


class Stac(_Strict):
    url: str
    collection: str
    assets: Assets = Assets()
    timeout_s: float = Field(30.0, gt=0, le=600)
    """Seconds to wait for the STAC API to accept a connection, and again for each answer."""
    retries: int = Field(4, ge=0, le=10)
    """Repeats of a request that failed (HTTP 429/5xx, timeout, dropped connection), with exponential backoff."""
    max_unreadable_fraction: float = Field(0.2, ge=0.0, le=1.0)
    """Items with a missing, truncated or misdescribed asset are skipped and reported; above this share of
    the items the job stops, since that is a storage or access problem rather than a few bad scenes."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL of a STAC API (got {url!r})")
        return url.rstrip("/")


class Aoi(_Strict):
    """Area of interest: exactly one of a lon/lat bbox, a GeoJSON geometry, or a GeoJSON file."""

    bbox: tuple[float, float, float, float] | None = None
    geometry: dict[str, Any] | None = None
    geojson: Path | None = None

    @field_validator("bbox")
    @classmethod
    def _ordered_lon_lat(cls, bbox: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if bbox is None:
            return bbox
        west, south, east, north = bbox
        if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= 90 and -90 <= north <= 90):
            raise ValueError(f"{list(bbox)} is outside lon/lat range; give [west, south, east, north] in degrees")
        if west >= east or south >= north:
            raise ValueError(f"{list(bbox)} has min >= max; give [west, south, east, north] with west < east, south < north")
        return bbox

    @field_validator("geometry")
    @classmethod
    def _valid_geometry(cls, geometry: dict[str, Any] | None) -> dict[str, Any] | None:
        if geometry is not None:
            _polygon(geometry)  # validated now, not halfway through a job
        return geometry

    @field_validator("geojson")
    @classmethod
    def _valid_geojson_file(cls, path: Path | None) -> Path | None:
        if path is not None:
            _polygon(_read_geojson(path))
        return path

    @model_validator(mode="after")
    def _exactly_one(self) -> Aoi:
        given = [k for k in ("bbox", "geometry", "geojson") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of bbox: [west, south, east, north], geometry: {...} or geojson: FILE")
        return self

    def shape(self) -> BaseGeometry:
        """The AOI as a valid, non-empty lon/lat shapely geometry."""
        if self.bbox is not None:
            return shapely.geometry.box(*self.bbox)
        return _polygon(self.geometry if self.geometry is not None else _read_geojson(self.geojson))


def _polygon(geojson: Any) -> BaseGeometry:
    """A valid lon/lat geometry with an area, from a GeoJSON geometry mapping."""
    if not isinstance(geojson, dict):
        raise ValueError("is not a GeoJSON geometry; give a Polygon or MultiPolygon mapping")
    try:
        geom = shapely.geometry.shape(geojson)
    except Exception as err:  # shapely raises several types for malformed GeoJSON
        raise ValueError(f"is not a GeoJSON geometry ({err}); give a Polygon or MultiPolygon") from None
    if geom.is_empty:
        raise ValueError("geometry is empty; give a Polygon or MultiPolygon with an area")
    if not geom.is_valid:
        raise ValueError(f"geometry is invalid ({shapely.validation.explain_validity(geom)}); fix it, e.g. with shapely make_valid")
    if geom.area == 0:
        raise ValueError("geometry has no area; give a Polygon or MultiPolygon")
    west, south, east, north = geom.bounds
    if west < -180 or east > 180 or south < -90 or north > 90:
        raise ValueError("geometry is outside lon/lat range; give coordinates in degrees (EPSG:4326)")
    return geom


def _read_geojson(path: Path) -> dict[str, Any]:
    """A geometry from a GeoJSON file holding a geometry, a Feature or a FeatureCollection."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read GeoJSON file {path} ({err.__class__.__name__}); give a readable .geojson file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a GeoJSON object; give a geometry, Feature or FeatureCollection")
    if data.get("type") == "FeatureCollection":
        geometries = [f.get("geometry") for f in data.get("features") or [] if isinstance(f, dict)]
        polygons = [_polygon(g) for g in geometries if g]
        if not polygons:
            raise ValueError(f"{path} holds no polygon geometry; give a file with at least one polygon")
        return shapely.geometry.mapping(shapely.union_all(polygons))
    geometry = data.get("geometry") if data.get("type") == "Feature" else data
    if not geometry:
        raise ValueError(f"{path} holds no polygon geometry; give a Feature with a Polygon or MultiPolygon")
    return geometry


class TimeRange(_Strict):
    start: dt.date
    end: dt.date | None = None
    """Empty (or "now") means now: each nightly run searches up to the present and picks up whatever is new."""
    history_days: int = Field(0, ge=0, le=366)
    """Days before `start` searched for earlier cloudless frames, which get no output of their own: the
    first dates' windows then hold the model's frames as later dates' do (0: a window reaches back to
    `start` only, so the period's first dates are super-resolved from fewer frames)."""

    @field_validator("end", mode="before")
    @classmethod
    def _empty_is_now(cls, end: Any) -> Any:
        return None if end is None or (isinstance(end, str) and end.strip().lower() in ("", "now")) else end

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}; swap them or leave end empty for 'now'")
        today = dt.datetime.now(dt.UTC).date()
        if self.start > today:
            raise ValueError(f"start {self.start} is in the future (today is {today} UTC); give a start date up to today")
        if self.end is not None and self.end > today:
            raise ValueError(f"end {self.end} is in the future (today is {today} UTC); leave end empty to mean 'up to now'")
        return self

    @property
    def search_start(self) -> dt.date:
        """The first day searched: `start`, less the history."""
        return self.start - dt.timedelta(days=self.history_days)

    def as_interval(self) -> str:
        """The STAC datetime interval searched (history included), both ends inclusive (whole days)."""
        end = f"{self.end.isoformat()}T23:59:59Z" if self.end else ".."
        return f"{self.search_start.isoformat()}T00:00:00Z/{end}"


class Cloud(_Strict):
    max_cloud_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """A tile's date is cloudless when at most this fraction of its pixels is unusable."""
    max_scene_cloud_cover: float | None = Field(None, ge=0.0, le=100.0)
    """Optional prefilter on items' eo:cloud_cover (percent), applied client-side."""
    dilate_pixels: int = Field(2, ge=0, le=20)
    """Cloud and shadow masks grow by this many 10 m pixels: their edges are under-detected."""


class Architecture(_Strict):
    """Only for `checkpoint: untrained`; a real checkpoint carries its own architecture."""

    hidden_channels: int = Field(64, ge=4, le=256)
    encoder_blocks: int = Field(8, ge=0, le=32)
    seed: int = 0


class ModelSettings(_Strict):
    checkpoint: str = "default"
    """'default' (the shipped model), 'untrained' (random weights, plumbing only) or a .safetensors path."""
    frames: int = Field(8, ge=1, le=32)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1, le=1024)
    """Output dates per task, and windows per forward pass (on CPU capped by memory)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 autocast on a GPU that has it (fp16 otherwise) and on a CPU with AMX (about 2x fp32's
    speed), fp32 on other CPUs (which emulate bf16, slower); an output made in fp32 stays fp32 on CPUs."""
    compile: Literal["off", "default", "max-autotune"] = "off"
    """torch.compile mode: 'max-autotune' doubles GPU throughput after minutes of compiling, once per worker."""
    architecture: Architecture | None = None

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false and `on` as true."""
        return {False: "off", True: "default"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("frames")
    @classmethod
    def _power_of_two(cls, frames: int) -> int:
        if frames & (frames - 1):
            raise ValueError(f"frames must be a power of two (1, 2, 4, 8, 16, 32), got {frames}")
        return frames

    @model_validator(mode="after")
    def _architecture_only_untrained(self) -> ModelSettings:
        if self.architecture is not None and self.checkpoint != "untrained":
            raise ValueError("architecture is only for checkpoint: untrained; a checkpoint file carries its own")
        return self


class Tiling(_Strict):
    tile: int = Field(256, ge=16, le=4096)
    """Tile edge in 10 m pixels; one Dask task handles one tile for a group of dates."""
    halo: int | Literal["auto"] = "auto"
    """Extra 10 m pixels read around each tile and cropped after. `auto`: the smallest seam-free halo for
    the job's model (its receptive field + cloud.dilate_pixels), known once the checkpoint is loaded. Every
    halo pixel is computed and thrown away, so a larger one only costs time."""

    @field_validator("halo", mode="before")
    @classmethod
    def _halo_value(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 512):
            return value
        raise ValueError(f"must be auto or a whole number of pixels from 0 to 512 (got {value!r}); auto is the seam-free halo of the model")

    @model_validator(mode="after")
    def _halo_fits(self) -> Tiling:
        if self.halo != "auto" and self.tile < self.halo:
            raise ValueError(f"tile ({self.tile}) is smaller than halo ({self.halo}); make tile >= halo")
        return self


S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class Output(_Strict):
    uri: str
    """A local folder, or `s3://bucket/path/name.zarr` (credentials and endpoint from the environment)."""
    codec: Literal["lz4", "zstd"] = "lz4"
    """How the super-resolved chunks are compressed (Blosc with byte shuffle, which every Zarr v3 reader
    decodes): lz4 writes and reads about 3x faster, zstd (level 1) is about 9 % smaller. Writing the
    output is what a GPU job's CPUs spend most of their time on (python -m sr_batch.bench). An existing
    output keeps the codec it was created with."""

    @field_validator("uri")
    @classmethod
    def _zarr_store(cls, uri: str) -> str:
        if uri.startswith("s3://"):
            return _s3_zarr(uri)
        if "://" in uri and not uri.startswith("file://"):
            # Only the scheme is shown: the rest of a URI may carry a secret.
            raise ValueError(f"only local paths and s3:// URIs are supported (got a {uri.split('://')[0]}:// URI); give a path or s3://bucket/name.zarr")
        path = uri.removeprefix("file://")
        # The store is replaced whole on --overwrite: a name that is not a .zarr (a home folder, `.`) must never be.
        if not Path(path).name.endswith(".zarr") or Path(path).name == ".zarr" or "\x00" in path:
            raise ValueError(f"must name a Zarr store, a folder whose name ends in .zarr (got {uri!r}); e.g. out/my-region.zarr")
        return path


def _s3_zarr(uri: str) -> str:
    """`s3://bucket/path/name.zarr`, normalised; never echoes a URI that carries credentials."""
    from urllib.parse import urlsplit

    netloc = uri.removeprefix("s3://").split("/", 1)[0]
    if "@" in netloc or ":" in netloc:
        raise ValueError(
            "an s3:// URI must not carry credentials (or a port); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, "
            "and AWS_ENDPOINT_URL for an S3-compatible server"
        )
    parts = urlsplit(uri)
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise ValueError("an s3:// URI takes no query or fragment; give s3://bucket/path/name.zarr")
    bucket, key = parts.netloc, parts.path.strip("/")
    if not S3_BUCKET.match(bucket):
        raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, dots, hyphens); give s3://bucket/path/name.zarr")
    segments = key.split("/")
    name = segments[-1]
    # The store is replaced whole on --overwrite: only a prefix named *.zarr may ever be.
    if not name.endswith(".zarr") or name == ".zarr" or any(part in ("", ".", "..") for part in segments) or "\x00" in key:
        raise ValueError(f"must name a Zarr store, a prefix whose name ends in .zarr (got {uri!r}); e.g. s3://{bucket}/my-region.zarr")
    return f"s3://{bucket}/{key}"


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stac: Stac
    aoi: Aoi
    time: TimeRange
    cloud: Cloud = Cloud()
    model: ModelSettings = ModelSettings()
    tiling: Tiling = Tiling()
    output: Output
    crs: int | None = None
    """EPSG code of the output grid; by default the items' dominant CRS."""


MAX_AREA_KM2_UNCONFIRMED = 2500.0
"""Above this AOI area `sr-batch run` wants --yes: about 25 M px at 10 m and 3 GB of output per date."""


def aoi_area_km2(aoi: Aoi) -> float:
    """The AOI's area on the WGS84 ellipsoid."""
    from pyproj import Geod

    area, _ = Geod(ellps="WGS84").geometry_area_perimeter(aoi.shape())
    return abs(area) / 1e6


def confirm_size(spec: JobSpec, confirmed: bool) -> None:
    """Refuse a very large AOI unless the user said --yes: a typo in a bbox should not start a continent."""
    area = aoi_area_km2(spec.aoi)
    if area > MAX_AREA_KM2_UNCONFIRMED and not confirmed:
        raise SpecError(
            f"aoi: covers {area:,.0f} km², more than {MAX_AREA_KM2_UNCONFIRMED:,.0f} km² ({area * 1e-2:,.0f} M px at 10 m per date); "
            "check the work size with `sr-batch plan`, then pass --yes to run it, or split the AOI"
        )


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job file; relative paths in it are taken from the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job file; give the path of a job YAML") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not a readable job file ({type(err).__name__}); give the path of a job YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} is not valid YAML; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job must be a YAML mapping with name, stac, aoi, time and output")
    raw = _resolve_paths(raw, path.parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "job") -> JobSpec:
    """Validate a job given as a mapping; the error names the first bad field."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: {_describe(err.errors()[0], raw)}") from None


def spec_json(spec: JobSpec) -> str:
    """The spec as stored in outputs; URLs lose any credentials or query tokens."""
    data = spec.model_dump(mode="json")
    data["stac"]["url"] = _strip_credentials(data["stac"]["url"])
    return json.dumps(data, sort_keys=True)


def _strip_credentials(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    aoi = raw.get("aoi")
    if isinstance(aoi, dict) and isinstance(aoi.get("geojson"), str):
        aoi["geojson"] = str((base / aoi["geojson"]).resolve())
    model = raw.get("model")
    ckpt = model.get("checkpoint") if isinstance(model, dict) else None
    if isinstance(ckpt, str) and ckpt not in ("default", "untrained"):
        model["checkpoint"] = str((base / ckpt).resolve())
    out = raw.get("output")
    if isinstance(out, dict) and isinstance(out.get("uri"), str) and "://" not in out["uri"]:
        out["uri"] = str((base / out["uri"]).resolve())
    return raw


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            section = ".".join(parents[: depth + 1])
            raise SpecError(f"--set {dotted}: {section} is a value, not a section; set {section}=VALUE instead")
    node[leaf] = value


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One line: the dotted field, what is wrong, and how to fix it."""
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "tagged-union"))]
    field = ".".join(loc) or "job"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{field}: unknown key{_suggestion(loc, raw)}; remove it or fix its spelling"
    if kind == "missing":
        return f"{field}: missing; add it (see README: the job spec)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind.startswith(("int_", "float_", "string_", "date_", "bool_", "tuple_", "list_", "dict_", "literal_", "greater", "less")):
        return f"{field}: {message} (got {error.get('input')!r})"
    return f"{field}: {message}"


def _suggestion(loc: list[str], raw: dict[str, Any]) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
