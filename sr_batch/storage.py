"""Where an output lives: a local folder, or a prefix in S3 object storage (`s3://bucket/path/x.zarr`).

The other modules need few things of an output's location, and this module gives each of them with the
same guarantee on both kinds:
- small files read whole, and replaced whole and atomically (the manifest): locally a temporary file,
  fsync and rename; on S3 one PUT, which is atomic per object (a reader sees the old or the new
  object, never a mix), so no temporary name is needed;
- an exclusive create and a conditional replace of one object (the lock, lock.py): locally a hard
  link and a rename; on S3 a conditional PUT, `If-None-Match: *` (fails when the key exists) and
  `If-Match: <etag>` (fails when someone replaced the object since we read it);
- the Zarr store for xarray and zarr (`zarr_args`), a listing of siblings (staging stores) and the
  removal of a whole store;
- replacing a whole store by a complete staging store (--overwrite): see `S3Location.replace_by`.

Credentials for S3 come from the environment only, read by botocore as usual: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or AWS_PROFILE, and the endpoint of an S3-compatible
server from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. The spec refuses a URI that carries credentials,
so a location's display string (`str(location)`, used in every message) is the URI itself and holds
no secret; errors name the S3 error code, never the request. Dask workers open the store themselves
from its URI, so every worker needs the same environment (a LocalCluster inherits it).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sr_batch import kill_points
from sr_batch.errors import OutputError

S3_SCHEME = "s3://"
S3_OPTIONS: dict[str, Any] = {"use_listings_cache": False}
"""Several processes write one store: a listing cached in one of them would hide the others' objects."""


def location(uri: str | Path | Location) -> Location:
    """The location an output.uri (or a path) names."""
    if isinstance(uri, Location):
        return uri
    text = str(uri)
    if text.startswith(S3_SCHEME):
        bucket, _, key = text.removeprefix(S3_SCHEME).partition("/")
        return S3Location(bucket, key.strip("/"))
    return LocalLocation(Path(text.removeprefix("file://")))


def zarr_options(uri: str) -> dict[str, Any]:
    """Keyword arguments for zarr/xarray opening the store at `uri` (a worker gets the URI as a string)."""
    return {"storage_options": dict(S3_OPTIONS)} if uri.startswith(S3_SCHEME) else {}


class Location:
    """An output store's location; `str()` is the user-facing name (the URI, without secrets)."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def native(self) -> Path | str:
        """What callers pass around: a Path for a local folder, the URI for object storage."""
        raise NotImplementedError

    def zarr_args(self) -> dict[str, Any]:
        """`store=` and any storage options, for xr.open_zarr / Dataset.to_zarr / zarr.open_*."""
        return {"store": str(self), **zarr_options(str(self))}

    def with_name(self, name: str) -> Location:
        raise NotImplementedError

    def exists(self) -> bool:
        raise NotImplementedError

    def is_file(self) -> bool:
        """A single file/object where the store should be (not a store)."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        raise NotImplementedError

    def has(self, relative: str) -> bool:
        raise NotImplementedError

    def read_text(self, relative: str) -> str | None:
        """The whole file, or None when it does not exist; OSError when unreadable."""
        raise NotImplementedError

    def write_text(self, relative: str, text: str) -> None:
        """Replace the file whole and atomically."""
        raise NotImplementedError

    def mkdir(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Remove the whole store (everything under it); no error when it is gone."""
        raise NotImplementedError

    def siblings(self, prefix: str) -> list[Location]:
        """Stores beside this one whose names start with `prefix`."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        raise NotImplementedError

    def check_writable(self) -> None:
        """OutputError in one line, naming output.uri and the fix, when the store cannot be written."""
        raise NotImplementedError

    def replace_by(self, staging: Location) -> None:
        """Make the complete store `staging` this store; the previous content is removed."""
        raise NotImplementedError

    def finish_interrupted_replace(self) -> None:
        """Complete a `replace_by` that a killed run left half done; call only while holding the lock."""

    def replace_interrupted(self) -> bool:
        """A killed run left a `replace_by` half done (only possible on S3)."""
        return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


# --- a local folder -------------------------------------------------------------------------------


class LocalLocation(Location):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def native(self) -> Path:
        return self.path

    def with_name(self, name: str) -> LocalLocation:
        return LocalLocation(self.path.with_name(name))

    def exists(self) -> bool:
        return self.path.exists()

    def is_file(self) -> bool:
        return self.path.exists() and not self.path.is_dir()

    def is_empty(self) -> bool:
        return not self.path.is_dir() or not any(self.path.iterdir())

    def has(self, relative: str) -> bool:
        return (self.path / relative).is_file()

    def read_text(self, relative: str) -> str | None:
        try:
            return (self.path / relative).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, relative: str, text: str) -> None:
        """Temporary file, fsync, rename, fsync of the folder: a crash leaves the old file or the new one."""
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def siblings(self, prefix: str) -> list[Location]:
        return [LocalLocation(p) for p in sorted(self.path.parent.glob(f"{prefix}*"))]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def check_writable(self) -> None:
        # The nearest folder that exists must be writable; missing folders are made only when writing.
        existing = next(folder for folder in (self.path.parent, *self.path.parent.parents) if folder.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"output.uri: cannot write in {existing}; choose a writable location")

    def replace_by(self, staging: Location) -> None:
        """Rename the new store in; the previous output is removed only after the swap."""
        assert isinstance(staging, LocalLocation)
        if not self.path.exists():
            staging.path.rename(self.path)
            return
        retired = self.path.with_name(f".{self.name}.replaced-{uuid.uuid4().hex[:8]}")
        self.path.rename(retired)
        staging.path.rename(self.path)
        shutil.rmtree(retired, ignore_errors=True)


# --- a prefix in S3 ---------------------------------------------------------------------------------


@functools.cache
def s3_filesystem() -> Any:
    """One s3fs file system per process, configured from the environment only."""
    import s3fs

    return s3fs.S3FileSystem(**S3_OPTIONS)


CONNECTION_ERRORS = ("HTTPClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ProxyConnectionError")
"""botocore's failures to reach an endpoint at all (all HTTPClientError or below)."""


class PreconditionFailed(Exception):
    """A conditional S3 write lost: the object exists (If-None-Match) or changed (If-Match)."""


def s3_error_code(err: BaseException) -> str:
    """The S3 or botocore error behind an s3fs exception: 'NoSuchBucket', 'NoCredentialsError', …"""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ClientError):
            return str(seen.response.get("Error", {}).get("Code", "ClientError"))
        if isinstance(seen, BotoCoreError):
            return type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return type(err).__name__


class S3Location(Location):
    """The store is every object under `bucket/key/`; objects beside it share `key`'s parent prefix."""

    def __init__(self, bucket: str, key: str) -> None:
        self.bucket = bucket
        self.key = key

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def native(self) -> str:
        return str(self)

    @property
    def _parent_key(self) -> str:
        return self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""

    def with_name(self, name: str) -> S3Location:
        return S3Location(self.bucket, self._parent_key + name)

    def _call(self, method: str, **kwargs: Any) -> Any:
        return s3_filesystem().call_s3(method, Bucket=self.bucket, **kwargs)

    def _keys(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with `prefix`, all pages."""
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=prefix, **token)
            for entry in page.get("Contents", []):
                yield entry["Key"], int(entry.get("Size", 0))
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def exists(self) -> bool:
        return self.is_file() or not self.is_empty()

    def is_file(self) -> bool:
        return self._object_exists(self.key)

    def is_empty(self) -> bool:
        return not self._call("list_objects_v2", Prefix=f"{self.key}/", MaxKeys=1).get("KeyCount", 0)

    def _object_exists(self, key: str) -> bool:
        try:
            self._call("head_object", Key=key)
        except FileNotFoundError:
            return False
        return True

    def has(self, relative: str) -> bool:
        return self._object_exists(f"{self.key}/{relative}")

    def read_text(self, relative: str) -> str | None:
        found = self.read_object(f"{self.key}/{relative}")
        return None if found is None else found[0]

    def write_text(self, relative: str, text: str) -> None:
        """One PUT: atomic per object on S3."""
        self._call("put_object", Key=f"{self.key}/{relative}", Body=text.encode())

    def mkdir(self) -> None:
        """Nothing to make: S3 has no folders."""

    def remove(self) -> None:
        self._delete_keys([key for key, _ in self._keys(f"{self.key}/")])

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            failed = self._call("delete_objects", Delete={"Objects": batch, "Quiet": True}).get("Errors", [])
            if failed:  # a multi-object delete reports failures in its answer, not as an error
                code = failed[0].get("Code")
                raise OutputError(f"output.uri: S3 did not delete {len(failed)} objects under {self} ({code}); check the bucket's permissions and run again")

    def siblings(self, prefix: str) -> list[Location]:
        page = self._call("list_objects_v2", Prefix=self._parent_key + prefix, Delimiter="/")
        return [S3Location(self.bucket, entry["Prefix"].rstrip("/")) for entry in page.get("CommonPrefixes", [])]

    def size_bytes(self) -> int:
        return sum(size for _, size in self._keys(f"{self.key}/"))

    def check_writable(self) -> None:
        """The bucket exists and takes a write: a probe object beside the store, put and deleted
        (beside, so a run killed in between leaves nothing inside the store)."""
        probe = f"{self._parent_key}.{self.name}.probe-{uuid.uuid4().hex[:8]}"
        try:
            self._call("put_object", Key=probe, Body=b"")
            self._call("delete_object", Key=probe)
        except Exception as err:  # noqa: BLE001 - every failure here is reported as one line
            raise OutputError(self._access_problem(s3_error_code(err))) from None

    def _access_problem(self, code: str) -> str:
        where = _shown_endpoint(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")
        if code == "NoSuchBucket":
            return f"output.uri: the bucket {self.bucket!r} does not exist at {where}; create it, or fix the bucket name in output.uri"
        if code in ("NoCredentialsError", "PartialCredentialsError"):
            return (
                f"output.uri: no S3 credentials to write {self}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment (and AWS_ENDPOINT_URL for an S3-compatible server)"
            )
        if code in CONNECTION_ERRORS:
            return f"output.uri: cannot reach the S3 endpoint {where} to write {self}; check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) and the network"
        return (
            f"output.uri: S3 refused a test write to {self} ({code}); check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE) and the bucket's permissions"
        )

    # --- single objects, with conditions (the lock) ---------------------------------------------

    def read_object(self, key: str) -> tuple[str, str] | None:
        """(text, etag) of the object, or None when it does not exist."""
        from fsspec.asyn import sync

        fs = s3_filesystem()
        try:
            data, etag = sync(fs.loop, _get_object, fs, self.bucket, key)
        except FileNotFoundError:
            return None
        return data.decode(errors="replace"), etag

    def create_object(self, key: str, text: str) -> str:
        """PUT only when the key does not exist (If-None-Match: *); the new etag, or PreconditionFailed."""
        return self._conditional_put(key, text, IfNoneMatch="*")

    def replace_object(self, key: str, text: str, etag: str) -> str:
        """PUT only over the object we read (If-Match: etag); the new etag, or PreconditionFailed."""
        return self._conditional_put(key, text, IfMatch=etag)

    def _conditional_put(self, key: str, text: str, **condition: str) -> str:
        try:
            answer = self._call("put_object", Key=key, Body=text.encode(), **condition)
        except Exception as err:
            if s3_error_code(err) in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict", "404"):
                raise PreconditionFailed(key) from None
            raise
        return str(answer["ETag"])

    def delete_object(self, key: str, etag: str) -> bool:
        """Delete the object only if it is still the one we read; False when it changed or is gone."""
        try:
            self._call("delete_object", Key=key, IfMatch=etag)
        except FileNotFoundError:
            return False
        except Exception as err:
            if s3_error_code(err) in ("PreconditionFailed", "NoSuchKey"):
                return False
            if s3_error_code(err) not in ("NotImplemented", "InvalidArgument"):
                raise
            # A server without conditional deletes: check, then delete (a narrow race, as before such deletes existed).
            found = self.read_object(key)
            if found is None or found[1] != etag:
                return False
            self._call("delete_object", Key=key)
        return True

    # --- --overwrite: no rename on S3 -------------------------------------------------------------

    @property
    def _replace_marker(self) -> str:
        return f"{self._parent_key}.{self.name}.replacing"

    def replace_by(self, staging: Location) -> None:
        """S3 cannot rename a prefix, so the complete staging store is copied over the target, in an
        order that makes a kill at any point harmless:
        1. a marker beside the store names the staging store (from here on the replacement is decided);
        2. the target's manifest is deleted first: a half-replaced store has none, so no run trusts it;
        3. every other object of the target is deleted (old chunks must not show through the new
           store's absent all-fill chunks);
        4. the staging store's objects are copied in (server-side), its manifest last;
        5. the marker is deleted, then the staging store.
        A run killed in steps 2-4 leaves the marker: the next run, under the lock, repeats steps 2-5
        from the untouched staging store (`finish_interrupted_replace`) before anything else."""
        assert isinstance(staging, S3Location)
        self._call("put_object", Key=self._replace_marker, Body=json.dumps({"staging": staging.key}).encode())
        self._copy_over(staging)

    def replace_interrupted(self) -> bool:
        return self._object_exists(self._replace_marker)

    def finish_interrupted_replace(self) -> None:
        found = self.read_object(self._replace_marker)
        if found is None:
            return
        staging = S3Location(self.bucket, json.loads(found[0])["staging"])
        self._copy_over(staging)

    def _copy_over(self, staging: S3Location) -> None:
        from sr_batch.manifest import MANIFEST_KEY

        manifest = f"{self.key}/{MANIFEST_KEY}"
        self._delete_keys([manifest])
        self.remove()
        sources = [key for key, _ in staging._keys(f"{staging.key}/")]
        for source in sorted(sources, key=lambda key: key == f"{staging.key}/{MANIFEST_KEY}"):
            target = f"{self.key}/{source.removeprefix(staging.key + '/')}"
            self._call("copy_object", Key=target, CopySource={"Bucket": self.bucket, "Key": source})
            kill_points.reached("replacing")
        self._call("delete_object", Key=self._replace_marker)
        staging.remove()


def _shown_endpoint(url: str) -> str:
    """The endpoint without any user:password part, for messages."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "") + parts.path


async def _get_object(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """Body and etag of one GET, so the etag is the one of the bytes read (s3fs runs aiobotocore on its own loop)."""
    answer = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with answer["Body"] as stream:
        return await stream.read(), str(answer["ETag"])
