"""Outputs in S3 object storage: the same job, the nightly append, resume after a kill, the lock and
--overwrite, with the guarantees of a local output.

The cloud provider is the one part that cannot run here, so moto's S3 server stands in for it: a real
HTTP server speaking the S3 API (conditional writes included), started on loopback by the fixture
below. Everything else is real: the STAC API, a Dask cluster of processes whose workers write their
chunks to the server themselves, zarr and s3fs over HTTP, the CLI in its own process. Credentials are
fake and reach the job only through the environment, as in production; the last test looks for them
in every object written and every output captured.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import LocalCluster
from moto.server import ThreadedMotoServer
from test_nightly import PERIOD, SPLIT, SR_BATCH, cli_run, item_date, nightly_job, write_job

from sr_batch.errors import OutputError
from sr_batch.job import JobResult, run_job
from sr_batch.lock import OutputLock, holder_of, lock_file, lock_location
from sr_batch.manifest import Manifest, written_mask
from sr_batch.output import inspect_output, open_output
from sr_batch.spec import parse_spec
from sr_batch.storage import location, s3_filesystem
from sr_batch.verify import verify_output

from conftest import make_job

BUCKET = "sr-batch-test"
KEY_ID = f"AKIATEST{uuid.uuid4().hex[:12].upper()}"
SECRET = f"sr-batch-secret-{uuid.uuid4().hex}"
CAPTURED: list[str] = []
"""Everything the runs of this module printed, searched for the credentials at the end."""
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port, its endpoint and fake credentials in the environment, one bucket."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        # No instance-metadata look-up (an address off this machine) and no credentials from files.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    saved = {name: os.environ.pop(name, None) for name in {*AWS_VARIABLES, *env}}
    os.environ.update(env)
    s3_filesystem.cache_clear()
    s3_filesystem().mkdir(BUCKET)
    try:
        yield env
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        s3_filesystem.cache_clear()
        server.stop()


@pytest.fixture(scope="module")
def s3_scheduler(s3_env: dict[str, str]) -> Iterator[str]:
    """Two worker processes with the credentials in their environment (as a deployment must give them)."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0", env={"SR_BATCH_TORCH_THREADS": "1", **s3_env}
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def early_url(catalog) -> Iterator[str]:
    from sr_batch.stac_server import serve_items

    with serve_items(catalog.collection, [i for i in catalog.items if item_date(i) <= SPLIT]) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, stac_url: str, catalog, s3_scheduler: str) -> JobResult:
    """The same job, uninterrupted, to a local folder."""
    out = tmp_path_factory.mktemp("s3-reference") / "reference.zarr"
    return run_job(parse_spec(nightly_job(stac_url, out, catalog)), scheduler=s3_scheduler, show_progress=False)


def objects(uri: str) -> dict[str, str]:
    """key → etag of every object of the store."""
    where = location(uri)
    return {key: str(info["ETag"]) for key, info in s3_filesystem().find(f"{where.bucket}/{where.key}/", detail=True).items()}


def stored_arrays(uri: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(**location(uri).zarr_args(), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def assert_same_store(uri: str, expected: Path) -> None:
    """Bit for bit: every stored array, and the same windows recorded in the manifests."""
    got, want = stored_arrays(uri), stored_arrays(expected)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), f"{name} differs"
    a, b = Manifest.read(uri), Manifest.read(expected)
    assert a is not None and b is not None
    assert a.times == b.times and sorted(a.empty_chunks) == sorted(b.empty_chunks)
    assert {d: sorted(t) for d, t in a.done.items()} == {d: sorted(t) for d, t in b.done.items()}


def capture(run: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    CAPTURED.append(run.stdout + run.stderr)
    return run


# --- runs --------------------------------------------------------------------------------------------


def test_killed_first_run_resumed_then_nightly_append_equal_one_local_run(
    reference: JobResult, tmp_path: Path, early_url: str, stac_url: str, catalog, s3_scheduler: str, capsys
) -> None:
    """The first night's run is SIGKILLed mid-way (its lock stays behind: a dead process on this host, broken
    at once) and run again; the next night adds only the new dates. The result is the local run's, bit for bit."""
    uri = f"s3://{BUCKET}/nightly/region.zarr"
    job = write_job(tmp_path, nightly_job(early_url, uri, catalog))
    killed = capture(cli_run(job, "--scheduler", s3_scheduler, kill="recorded:3"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    recorded = Manifest.read(uri).done_count()
    early_windows = sum(1 for ws in reference.plan.windows.values() for w in ws if reference.plan.days[w.target].date <= SPLIT)
    assert 3 <= recorded < early_windows
    assert holder_of(uri) is not None, "the killed run's lock should be left behind"

    resumed = capture(cli_run(job, "--scheduler", s3_scheduler))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"wrote {early_windows - recorded} tile-dates" in resumed.stdout
    old_chunks = {key: etag for key, etag in objects(uri).items() if "/sr/c/" in key}
    assert old_chunks, "the workers wrote no chunk to the bucket"

    second = run_job(parse_spec(nightly_job(stac_url, uri, catalog)), scheduler=s3_scheduler, show_progress=False)
    assert second.output == uri and second.added_dates == [d for d in reference.added_dates if d > SPLIT]
    assert second.written_windows == reference.written_windows - early_windows > 0
    after = objects(uri)
    assert all(after[key] == etag for key, etag in old_chunks.items()), "an earlier chunk was rewritten"
    assert_same_store(uri, reference.output)
    with open_output(uri) as got, open_output(reference.output) as want:
        xr.testing.assert_allclose(got, want)
        assert got.rio.crs == want.rio.crs
    assert verify_output(uri) == []
    assert holder_of(uri) is None, "the lock was released"
    found = inspect_output(uri)
    assert found.path == uri and found.bytes_on_disk == sum(s3_filesystem().du(f"{BUCKET}/nightly/region.zarr", total=False).values()) > 0
    assert found.text().startswith(f"Output: {uri}\n")

    third = run_job(parse_spec(nightly_job(stac_url, uri, catalog)), scheduler=s3_scheduler, show_progress=False)
    assert third.written_windows == 0 and third.added_dates == []
    assert objects(uri) == after, "a run with nothing new wrote something"
    CAPTURED.append("".join(capsys.readouterr()))


def lock_record(token: str, host: str, expires_in: float) -> str:
    return json.dumps({"token": token, "host": host, "pid": 1, "started": "then", "expires": dt.datetime.now(dt.UTC).timestamp() + expires_in})


def plant_lock(uri: str, host: str, expires_in: float, token: str = "planted") -> None:
    where = lock_location(uri)
    s3_filesystem().pipe_file(f"{where.bucket}/{where.key}", lock_record(token, host, expires_in).encode())


def test_lock_refuses_a_second_writer_and_a_stale_lock_is_broken_once(s3_env: dict[str, str]) -> None:
    uri = f"s3://{BUCKET}/locked.zarr"
    first = OutputLock(uri)
    first.acquire()
    try:
        refusal = rf"output.uri: {re.escape(uri)} is being written by another run \(process {os.getpid()} on .*; wait for it to finish.*lock file {re.escape(f's3://{BUCKET}/.locked.zarr.lock')}\)"
        with pytest.raises(OutputError, match=refusal):
            OutputLock(uri).acquire()
        assert first.renew() and holder_of(uri)["token"] == first.token
    finally:
        first.release()
    assert holder_of(uri) is None

    plant_lock(uri, "elsewhere.example", expires_in=600)  # another host, lease valid: refused, and left alone
    with pytest.raises(OutputError, match="being written by another run"):
        OutputLock(uri).acquire()
    assert holder_of(uri)["token"] == "planted"

    plant_lock(uri, "elsewhere.example", expires_in=-1)  # its holder died: two runs judge it stale, one wins
    breakers = [lock_file(uri), lock_file(uri)]
    judged = [breaker.read() for breaker in breakers]
    assert all(holder is not None and holder.is_stale(dt.datetime.now(dt.UTC).timestamp()) for holder in judged)
    won = [breaker.take_over(holder, lock_record(name, "here", 600), name) for breaker, holder, name in zip(breakers, judged, ("a", "b"))]
    assert won == [True, False]
    assert holder_of(uri)["token"] == "a"

    plant_lock(uri, "elsewhere.example", expires_in=-1)
    taker = OutputLock(uri)
    taker.acquire()
    assert holder_of(uri)["token"] == taker.token
    # A renewal that landed but whose answer was lost: the object changed under our etag, still ours.
    s3_filesystem().pipe_file(f"{BUCKET}/.locked.zarr.lock", lock_record(taker.token, "here", 600).encode())
    assert taker.renew() and holder_of(uri)["token"] == taker.token
    assert taker.renew(), "the etag of the adopted lock is the one renewed next"
    plant_lock(uri, "elsewhere.example", expires_in=600, token="intruder")  # someone took it over: our renewal fails
    assert not taker.renew()
    taker.release()
    assert holder_of(uri)["token"] == "intruder", "a release must not delete someone else's lock"


def copy_store(local: Path, uri: str) -> None:
    where = location(uri)
    for path in local.rglob("*"):
        if path.is_file():
            s3_filesystem().pipe_file(f"{where.bucket}/{where.key}/{path.relative_to(local)}", path.read_bytes())


def test_overwrite_killed_anywhere_never_leaves_a_trusted_mix(reference: JobResult, tmp_path: Path, stac_url: str, catalog, s3_scheduler: str) -> None:
    uri = f"s3://{BUCKET}/kept.zarr"
    copy_store(reference.output, uri)
    before = objects(uri)
    # Other settings (a shorter period keeps the test short): only --overwrite may replace the output.
    changed = nightly_job(stac_url, uri, catalog, cloud={"max_cloud_fraction": 0.1})
    changed["time"] = {"start": "2019-07-01", "end": PERIOD["end"]}
    job = write_job(tmp_path, changed)

    killed = capture(cli_run(job, "--overwrite", "--scheduler", s3_scheduler, kill="recorded:2"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert objects(uri) == before, "a killed --overwrite touched the previous output"
    assert location(uri).siblings(".kept.zarr.incomplete-"), "the staging store should be left behind"

    # Killed while copying the new store over the old one: no manifest, so nothing trusts the mix.
    swapping = capture(cli_run(job, "--overwrite", "--scheduler", s3_scheduler, kill="replacing:3"))
    assert swapping.returncode == -9, swapping.stderr[-2000:]
    assert Manifest.read(uri) is None
    assert any("no manifest" in problem for problem in verify_output(uri))
    with pytest.raises(OutputError, match="has no manifest"):
        written_mask(uri)

    # The next run finishes the replacement under the lock, then finds nothing left to do.
    finished = capture(cli_run(job, "--scheduler", s3_scheduler))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Nothing new" in finished.stdout
    assert not location(uri).siblings(".kept.zarr.") and not location(uri).replace_interrupted()
    manifest = Manifest.read(uri)
    assert manifest.settings["cloud"]["max_cloud_fraction"] == 0.1
    assert verify_output(uri) == []
    # Every chunk in the store belongs to a recorded window of the new output: no old chunk shows through.
    empty = set(manifest.empty_chunks)
    chunk_y, chunk_x = zarr.open_array(**location(uri).zarr_args(), path="sr", mode="r").chunks[2:]
    for key in objects(uri):
        if "/sr/c/" in key:
            t, _, iy, ix = (int(part) for part in key.rsplit("/sr/c/", 1)[1].split("/"))
            row = next(r for r, (top, bottom) in enumerate(manifest.rows) if 4 * top <= iy * chunk_y < 4 * bottom)
            col = next(c for c, (left, right) in enumerate(manifest.cols) if 4 * left <= ix * chunk_x < 4 * right)
            date = manifest.times[t]
            assert [row, col] in manifest.done.get(date, []) and f"{date}/{iy}/{ix}" not in empty, key


# --- refusals, secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param(case, expected, id=case)
        for case, expected in (
            ("missing-bucket", "the bucket 'no-such-bucket' does not exist"),
            ("no-credentials", "no S3 credentials"),
            ("credentials-in-uri", "must not carry credentials"),
            ("bad-bucket-name", "is not a valid S3 bucket name"),
            ("unreachable-endpoint", "cannot reach the S3 endpoint http://127.0.0.1:1 "),
        )
    ],
)
def test_bad_s3_output_is_refused_in_one_line(case: str, expected: str, tmp_path: Path, stac_url: str, catalog, s3_env: dict[str, str]) -> None:
    uri = {
        "missing-bucket": "s3://no-such-bucket/out.zarr",
        "no-credentials": f"s3://{BUCKET}/no-credentials.zarr",
        "credentials-in-uri": f"s3://{KEY_ID}:{SECRET}@{BUCKET}/out.zarr",
        "bad-bucket-name": "s3://Bad_Bucket/out.zarr",
        "unreachable-endpoint": f"s3://{BUCKET}/out.zarr",
    }[case]
    env = {**os.environ}
    if case == "unreachable-endpoint":  # nothing listens on port 1; the user:password part must not be shown
        env["AWS_ENDPOINT_URL"] = f"http://{KEY_ID}:{SECRET}@127.0.0.1:1"
    if case == "no-credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(name, None)
    job = write_job(tmp_path, make_job(stac_url, uri, catalog, time=PERIOD))
    run = capture(subprocess.run([str(SR_BATCH), "run", str(job), "--no-progress"], env=env, capture_output=True, text=True, timeout=300))
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert run.stderr.startswith("sr-batch: error: ") and "output.uri" in run.stderr and expected in run.stderr, run.stderr
    assert not objects(f"s3://{BUCKET}/no-credentials.zarr") and not objects(f"s3://{BUCKET}/out.zarr"), "a refused run wrote something"


def test_no_credential_in_any_object_or_output(s3_env: dict[str, str]) -> None:
    """Runs above printed their messages and wrote their stores (manifest, attributes, lock): none holds a credential."""
    keys = s3_filesystem().find(BUCKET)
    assert keys and CAPTURED, "run the whole module: this test checks what the others wrote and printed"
    for key in keys:
        data = s3_filesystem().cat_file(key)
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, key
    for text in CAPTURED:
        assert SECRET not in text and KEY_ID not in text
