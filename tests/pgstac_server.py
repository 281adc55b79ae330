"""A real STAC API (stac-fastapi-pgstac on PostgreSQL + PostGIS) on loopback, for tests.

Mock servers drift from what production catalogues actually answer (paging links,
datetime handling, CQL2, hydration); this module runs the same stack a deployment
would, on a throw-away cluster, so client code is tested against the real thing.

Usage::

    with pgstac_api(collection, items, tmp_path) as url:
        client = pystac_client.Client.open(url)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

PG_VERSION = "15"
PG_BIN = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")
POSTGIS_CONTROL = Path(f"/usr/share/postgresql/{PG_VERSION}/extension/postgis.control")
APT_PACKAGES = ("postgresql", f"postgresql-{PG_VERSION}-postgis-3")
PIP_REQUIREMENTS = (
    "stac-fastapi-pgstac==7.2.*",
    "pypgstac[psycopg]==0.10.*",
    "uvicorn",
)
# Modules whose presence means the matching requirement is already satisfied.
REQUIRED_MODULES = ("stac_fastapi.pgstac.app", "pypgstac.load", "psycopg", "psycopg_pool", "uvicorn")

PG_SUPERUSER = "postgres"
PG_PASSWORD = "postgres"  # Ignored by the trust auth below, but the app insists on one.
PG_DATABASE = "pgstac"
APP = "stac_fastapi.pgstac.app:create_app"

INSTALL_TIMEOUT_S = 900.0
PG_START_TIMEOUT_S = 60
API_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------- install


def ensure_pgstac_installed() -> None:
    """Install PostgreSQL/PostGIS and the Python stack if missing.

    CI runs on a fresh machine where none of this exists; installing on demand keeps
    the heavy server stack out of the project's runtime dependencies.
    """
    packages = _missing_debian_packages()
    if packages:
        apt_install(packages)
        if _missing_debian_packages():
            raise RuntimeError(f"apt-get finished but {PG_BIN / 'initdb'} or {POSTGIS_CONTROL} is missing")
    if _missing_modules():
        _pip_install(PIP_REQUIREMENTS)
        importlib.invalidate_caches()
        missing = _missing_modules()
        if missing:
            raise RuntimeError(f"pip install finished but modules are still not importable: {', '.join(missing)}")


def _missing_debian_packages() -> list[str]:
    """Only what is absent, so an installed PostgreSQL is never upgraded as a side effect."""
    server, postgis = APT_PACKAGES
    missing = []
    if not (PG_BIN / "initdb").is_file():
        missing.append(server)
    if not POSTGIS_CONTROL.is_file():
        missing.append(postgis)
    return missing


def _missing_modules() -> list[str]:
    """Names from REQUIRED_MODULES that this interpreter cannot find."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # parent package absent
            found = False
        if not found:
            missing.append(name)
    return missing


def apt_install(packages: Sequence[str]) -> None:
    """apt-get install; refresh the package lists only when the first try fails (slow, often unneeded)."""
    if os.geteuid() != 0:
        raise RuntimeError(f"need root to apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "--no-upgrade", *packages]
    if _run_quiet(install, env=env).returncode == 0:
        return
    update = _run_quiet(["apt-get", "update", "-q"], env=env)
    if update.returncode != 0:
        raise RuntimeError(f"apt-get update failed: {_last_line(update.stderr)}")
    retry = _run_quiet(install, env=env)
    if retry.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(packages)} failed: {_last_line(retry.stderr)}")


def _pip_install(requirements: Sequence[str]) -> None:
    """Install into the running interpreter so the app subprocess and the loader see the same packages."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]
    result = _run_quiet(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(requirements)} failed: {_last_line(result.stderr)}")


def _run_quiet(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an installer with captured output; a hung installer becomes a failure, not a hung test."""
    try:
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{cmd[0]} could not run: {exc}") from exc


def _last_line(text: str | None) -> str:
    """Installers put the useful reason last; RuntimeError messages stay one line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------- postgres


def _free_port() -> int:
    """Ask the kernel for an unused loopback port (tiny race, acceptable for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(args: Sequence[str], cwd: Path, timeout: float = 120.0) -> None:
    """PostgreSQL refuses to run as root, so its tools run as the postgres user."""
    cmd = ["runuser", "-u", PG_SUPERUSER, "--", *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): {detail}")


def _postgres_can_write(path: Path) -> bool:
    """A root-only ancestor (pytest's /tmp/pytest-of-root is 0700) hides the directory from postgres."""
    probe = subprocess.run(["runuser", "-u", PG_SUPERUSER, "--", "test", "-w", str(path)], capture_output=True)
    return probe.returncode == 0


@contextlib.contextmanager
def _postgres_home(workdir: Path) -> Iterator[Path]:
    """A postgres-owned directory for the cluster: under workdir when postgres can reach it, else under /tmp."""
    candidate = Path(tempfile.mkdtemp(prefix="pg-", dir=workdir))
    shutil.chown(candidate, PG_SUPERUSER, PG_SUPERUSER)
    if _postgres_can_write(candidate):
        home = candidate
    else:
        candidate.rmdir()
        home = Path(tempfile.mkdtemp(prefix="pgstac-pg-"))
        shutil.chown(home, PG_SUPERUSER, PG_SUPERUSER)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _init_cluster(home: Path) -> Path:
    """initdb a throw-away cluster with trust auth: it only ever listens on loopback."""
    data = home / "data"
    _as_postgres(
        [str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"],
        cwd=home,
    )
    return data


@contextlib.contextmanager
def _running_postgres(home: Path, data: Path, port: int) -> Iterator[None]:
    """pg_ctl start/stop; durability settings are off because the data is disposable."""
    sockets = home / "sock"
    sockets.mkdir()
    shutil.chown(sockets, PG_SUPERUSER, PG_SUPERUSER)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    pg_ctl = str(PG_BIN / "pg_ctl")
    start = [pg_ctl, "start", "-D", str(data), "-l", str(home / "postgres.log"), "-w", "-t", str(PG_START_TIMEOUT_S)]
    try:
        _as_postgres([*start, "-o", options], cwd=home, timeout=PG_START_TIMEOUT_S + 30)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{_tail(home / 'postgres.log')}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            _as_postgres([pg_ctl, "stop", "-D", str(data), "-m", "fast", "-w"], cwd=home, timeout=60)


def _dsn(port: int, database: str) -> str:
    return f"postgresql://{PG_SUPERUSER}:{PG_PASSWORD}@127.0.0.1:{port}/{database}"


def _create_database(port: int) -> None:
    """pgstac wants its own database with PostGIS enabled before migrating."""
    import psycopg

    with psycopg.connect(_dsn(port, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')
    with psycopg.connect(_dsn(port, PG_DATABASE), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")


def _migrate_and_load(port: int, collection: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """Install the pgstac schema and load data with pypgstac's own loader (what production ingest uses).

    The pool is ours so it is closed here; PgstacDB.disconnect() would drop it still open.
    """
    from psycopg_pool import ConnectionPool
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods
    from pypgstac.migrate import Migrate

    with ConnectionPool(_dsn(port, PG_DATABASE), min_size=1, max_size=2, open=True) as pool:
        db = PgstacDB(pool=pool)
        try:
            Migrate(db).run_migration()
            loader = Loader(db)
            loader.load_collections(iter([collection]), insert_mode=Methods.insert)
            if items:
                loader.load_items(iter(items), insert_mode=Methods.insert)
        finally:
            db.disconnect()


# --------------------------------------------------------------------------- API


def _app_env(port: int) -> dict[str, str]:
    """Connection settings under every name stac-fastapi-pgstac has used (7.x reads PG*, older POSTGRES_*)."""
    env = dict(os.environ)
    pg = {
        "PGUSER": PG_SUPERUSER,
        "PGPASSWORD": PG_PASSWORD,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(port),
        "PGDATABASE": PG_DATABASE,
    }
    legacy = {
        "POSTGRES_USER": PG_SUPERUSER,
        "POSTGRES_PASS": PG_PASSWORD,
        "POSTGRES_HOST_READER": "127.0.0.1",
        "POSTGRES_HOST_WRITER": "127.0.0.1",
        "POSTGRES_PORT": str(port),
        "POSTGRES_DBNAME": PG_DATABASE,
    }
    env.update(pg)
    env.update(legacy)
    # Named, so the app does not warn about default landing-page values on every start.
    env.update(
        {
            "STAC_FASTAPI_TITLE": "test STAC API",
            "STAC_FASTAPI_DESCRIPTION": "loopback pgstac for tests",
            "STAC_FASTAPI_LANDING_ID": "test-stac-api",
            "STAC_FASTAPI_VERSION": "0.0.0",
        }
    )
    for stray in ("ENABLED_EXTENSIONS", "ROOT_PATH", "PREFIX_PATH", "UVICORN_ROOT_PATH"):
        env.pop(stray, None)  # keep the API at its default shape whatever the caller's shell has
    return env


@contextlib.contextmanager
def _running_api(workdir: Path, db_port: int) -> Iterator[str]:
    """Run uvicorn in a subprocess (cwd=workdir so no stray .env is read) and wait for GET /."""
    api_port = _free_port()
    log_path = workdir / "stac-api.log"
    cmd = [
        sys.executable, "-m", "uvicorn", APP, "--factory",
        "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=_app_env(db_port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{api_port}"
            _wait_for_api(url, proc, log_path)
            yield url
        finally:
            _stop_process(proc, log)


def _wait_for_api(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll the landing page; fail fast with the server's output if it exits or never answers."""
    deadline = time.monotonic() + API_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"STAC API exited with {proc.returncode} before answering:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"STAC API did not answer GET {url}/ within {API_START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")


def _stop_process(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Terminate, then kill if it ignores SIGTERM, so a test run never leaves a server behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    log.flush()


def _tail(path: Path, lines: int = 40) -> str:
    """The end of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------- public


@contextlib.contextmanager
def pgstac_api(collection: dict, items: list[dict], workdir: Path) -> Iterator[str]:
    """Serve `collection` and `items` from a real stac-fastapi-pgstac; yield the API root URL.

    Starts a temporary PostgreSQL + PostGIS cluster under `workdir`, migrates pgstac,
    loads the data and runs the API on a free loopback port. Everything is stopped and
    the cluster removed on exit, also when the body raises.
    """
    ensure_pgstac_installed()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_port = _free_port()
    with _postgres_home(workdir) as home:
        data = _init_cluster(home)
        with _running_postgres(home, data, db_port):
            _create_database(db_port)
            _migrate_and_load(db_port, collection, items)
            with _running_api(workdir, db_port) as url:
                yield url
