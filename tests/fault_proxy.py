"""A fault-injecting HTTP proxy on loopback, for putting a real STAC API behind an unreliable network.

Requests are numbered from 1 in arrival order; `schedule(n)` says what happens to request n:
"ok" forwards it to the upstream server, "503" answers Service Unavailable, "stall" waits `stall_s`
seconds and then drops the connection (the client's timeout fires first), "drop" closes the connection
without an answer. Faults are chosen by count, not by chance, so every run sees the same failures.
Links in forwarded answers point back at the proxy, so paging goes through it too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.error import HTTPError
from urllib.request import Request, urlopen

Schedule = Callable[[int], str]


class FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, schedule: Schedule, stall_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream.rstrip("/")
        self.schedule = schedule
        self.stall_s = stall_s
        self.requests = 0
        self.faults: list[tuple[int, str, str]] = []
        """(request number, fault, path) of every request that was not forwarded."""
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_fault(self, path: str) -> str:
        with self._lock:
            self.requests += 1
            fault = self.schedule(self.requests)
            if fault != "ok":
                self.faults.append((self.requests, fault, path))
            return fault


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        """Quiet: pytest shows the faults list on failure instead."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(None)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self._handle(self.rfile.read(length))

    def _handle(self, body: bytes | None) -> None:
        fault = self.server.next_fault(self.path)
        if fault == "503":
            self._answer(503, b'{"code": "Unavailable", "description": "injected fault"}', "application/json")
        elif fault == "stall":
            time.sleep(self.server.stall_s)
            self.close_connection = True
        elif fault == "drop":
            self.close_connection = True
        else:
            self._forward(body)

    def _forward(self, body: bytes | None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
        request = Request(self.server.upstream + self.path, data=body, headers=headers, method=self.command)
        try:
            with urlopen(request, timeout=30) as reply:
                status, content, kind = reply.status, reply.read(), reply.headers.get("Content-Type", "application/json")
        except HTTPError as err:
            status, content, kind = err.code, err.read(), err.headers.get("Content-Type", "application/json")
        content = content.replace(self.server.upstream.encode(), self.server.url.encode())
        self._answer(status, content, kind)

    def _answer(self, status: int, content: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


@contextlib.contextmanager
def fault_proxy(upstream: str, schedule: Schedule, stall_s: float = 3.0) -> Iterator[FaultProxy]:
    """A running proxy in front of `upstream`; closed on exit."""
    proxy = FaultProxy(upstream, schedule, stall_s)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
