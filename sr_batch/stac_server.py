"""A real STAC API on loopback, for the demo and the tests: `rustac serve` with its in-memory backend.

rustac answers /search with bbox and datetime (not the query extension), which is why cloud-cover
prefiltering happens client-side in the search stage.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rustac_executable() -> str:
    """The rustac CLI installed beside this interpreter (the `rustac` PyPI package)."""
    beside = Path(sys.executable).parent / "rustac"
    found = str(beside) if beside.exists() else shutil.which("rustac")
    if not found:
        raise RuntimeError("the rustac CLI is not installed; run `make install` (pip install rustac)")
    return found


@contextlib.contextmanager
def serve_items(collection: dict[str, Any], items: list[dict[str, Any]], timeout: float = 60.0) -> Iterator[str]:
    """Serve one collection and its items on 127.0.0.1; yields the API root URL."""
    with tempfile.TemporaryDirectory(prefix="sr-batch-stac-") as tmp:
        collection_file = Path(tmp) / "collection.json"
        collection_file.write_text(json.dumps(collection))
        items_file = Path(tmp) / "items.json"
        items_file.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w+")
        process = subprocess.Popen(
            [rustac_executable(), "serve", "--addr", f"127.0.0.1:{port}", str(collection_file), str(items_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_ready(url, process, log, timeout, expected_items=len(items), collection_id=collection["id"])
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def _wait_until_ready(url: str, process: subprocess.Popen, log: Any, timeout: float, expected_items: int, collection_id: str) -> None:
    """Until the API answers and has loaded every item (loading runs after the socket opens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"rustac serve exited with {process.returncode}: {log.read()[-2000:]}")
        with contextlib.suppress(URLError, ConnectionError, OSError, ValueError):
            with urlopen(f"{url}/collections/{collection_id}/items?limit=1", timeout=2) as reply:
                body = json.load(reply)
            if body.get("features") or expected_items == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"STAC API at {url} did not become ready within {timeout:.0f} s")
