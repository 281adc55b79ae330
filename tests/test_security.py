"""Security: a job reads and writes only what it names, and runs on a TLS-secured Dask cluster.

The TLS cluster is a real LocalCluster of worker processes with a self-signed certificate made here
(distributed's Security.temporary, which needs `cryptography`); the CLI reaches it the way a user's
deployment does, through Dask's DASK_DISTRIBUTED__COMM__TLS__* environment settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xarray as xr
import yaml
from distributed import LocalCluster
from distributed.security import Security

from sr_batch.assets import check_assets, href_refusal, is_internal, is_loopback
from sr_batch.errors import SearchError, SpecError
from sr_batch.sample import SampleCatalog
from sr_batch.spec import parse_spec

from conftest import make_job

SR_BATCH = Path(sys.executable).parent / "sr-batch"
ASSET_KEYS = ["blue", "green", "red", "nir", "scl"]


# --- what a catalogue or a job can make the service touch ----------------------------------------


@pytest.mark.parametrize(
    ("stac_url", "expected"),
    [("http://127.0.0.1:8080", True), ("http://localhost/stac", True), ("http://[::1]:9000", True), ("https://earth-search.aws.element84.com/v1", False)],
)
def test_loopback_is_recognised(stac_url: str, expected: bool) -> None:
    assert is_loopback(stac_url) is expected


@pytest.mark.parametrize(
    "href", ["file:///etc/passwd", "/etc/shadow", "relative/secret.tif", "/vsicurl/http://169.254.169.254/latest/meta-data", "/vsizip//home/user/keys.zip"]
)
def test_a_remote_catalogue_cannot_point_at_local_files(href: str) -> None:
    assert href_refusal(href, local_allowed=False) is not None
    assert href_refusal("https://sentinel-cogs.s3.us-west-2.amazonaws.com/x/B04.tif", local_allowed=False) is None


def test_unsupported_href_schemes_are_refused() -> None:
    assert "ftp" in (href_refusal("ftp://example.com/B04.tif", local_allowed=True) or "")


def test_local_hrefs_from_a_remote_api_are_skipped_without_being_opened(catalog: SampleCatalog) -> None:
    """The sample's file:// items as if a remote API had returned them: none is opened, the job stops."""
    items = catalog.items[:3]
    kept, problems = check_assets(items, ASSET_KEYS, max_unreadable_fraction=1.0, stac_url="https://stac.example.com/v1")
    assert kept == [] and len(problems) == 3 * len(ASSET_KEYS)
    assert all(p.problem.startswith("refused: a local path") for p in problems)
    with pytest.raises(SearchError, match=r"^stac.max_unreadable_fraction: 3 of 3 items"):
        check_assets(items, ASSET_KEYS, max_unreadable_fraction=0.2, stac_url="https://stac.example.com/v1")
    kept, problems = check_assets(items, ASSET_KEYS, max_unreadable_fraction=0.2, stac_url="http://127.0.0.1:1")
    assert kept == items and problems == []


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "job\x00", "-rf", "x y"])
def test_job_names_cannot_carry_paths(name: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^job: name:"):
        parse_spec({**make_job("http://127.0.0.1:1", tmp_path / "sr.zarr", catalog), "name": name})


@pytest.mark.parametrize("uri", [".", "/", "~", "results", "../home/user", "file:///tmp", "sr.zarr/..", ".zarr"])
def test_output_must_name_a_zarr_store(uri: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    """--overwrite replaces the output folder whole, so it may only ever be a folder named *.zarr."""
    job = make_job("http://127.0.0.1:1", tmp_path / "sr.zarr", catalog)
    job["output"]["uri"] = uri
    with pytest.raises(SpecError, match=r"^job: output.uri: must name a Zarr store"):
        parse_spec(job)


# --- a TLS-secured cluster -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real TLS cluster, and the environment a client needs to reach it (PEM files, as a deployment has)."""
    security = Security.temporary()
    folder = tmp_path_factory.mktemp("tls")
    files = {"ca.pem": security.tls_ca_file, "client.pem": security.tls_client_cert, "client.key": security.tls_client_key}
    for name, text in files.items():
        (folder / name).write_text(text)
    env = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(folder / "ca.pem"),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(folder / "client.pem"),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(folder / "client.key"),
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
    }
    settings = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": "127.0.0.1:0", "env": {"SR_BATCH_TORCH_THREADS": "1"}}
    with LocalCluster(protocol="tls", security=security, **settings) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        yield cluster.scheduler_address, env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    return subprocess.run([str(SR_BATCH), *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=300)


def write_job(folder: Path, stac_url: str, catalog: SampleCatalog) -> Path:
    job = make_job(stac_url, folder / "sr.zarr", catalog, time={"start": "2019-07-01", "end": "2019-07-11"})
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_run_on_a_tls_scheduler(tls_cluster: tuple[str, dict[str, str]], stac_url: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    address, env = tls_cluster
    proc = run_cli(["run", str(write_job(tmp_path, stac_url, catalog)), "--scheduler", address, "--no-progress"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"connected to {address}" in proc.stdout
    with xr.open_zarr(tmp_path / "sr.zarr", consolidated=False) as ds:
        assert ds.sizes["time"] >= 1 and ds.sr.notnull().any()


def test_tls_scheduler_without_tls_settings_is_one_line(tls_cluster: tuple[str, dict[str, str]], stac_url: str, catalog: SampleCatalog, tmp_path: Path) -> None:
    address, _ = tls_cluster
    job = write_job(tmp_path, stac_url, catalog)
    proc = run_cli(["run", str(job), "--scheduler", address], {}, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sr-batch: error: --scheduler: {address} needs TLS settings"), proc.stderr
    assert "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize(
    "href",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # a cloud's metadata service
        "http://10.0.3.7:9000/bucket/B04.tif",
        "https://192.168.1.20/B04.tif",
        "http://127.0.0.1:8786/",
        "http://localhost:8787/status",
        "http://[::1]/x.tif",
        "http://[fd00::5]/x.tif",
    ],
)
def test_a_public_catalogue_cannot_point_at_internal_addresses(href: str) -> None:
    """Server-side request forgery: a public API's item may not make the workers request internal hosts;
    an API that is itself internal (a private pgstac) may, and public hosts are always fine."""
    assert "internal address" in (href_refusal(href, local_allowed=False, internal_allowed=False) or "")
    assert href_refusal(href, local_allowed=False, internal_allowed=True) is None
    assert href_refusal("http://52.92.16.10/sentinel-cogs/B04.tif", local_allowed=False, internal_allowed=False) is None


@pytest.mark.parametrize(("stac_url", "expected"), [("http://10.1.2.3/stac", True), ("http://localhost:8080", True), ("https://52.92.16.10/v1", False)])
def test_internal_stac_apis_are_recognised(stac_url: str, expected: bool) -> None:
    assert is_internal(stac_url) is expected
