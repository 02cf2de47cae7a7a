"""A fault-injecting reverse proxy in front of the conditions-DB service (simulator).

Step 4 talks to the proxy and the proxy forwards to the real service, except while a
fault aimed at ``conddb`` is active in the registry state file the scenario player
writes (``calloop sim conddb-proxy --upstream URL --state FILE``):

==========  ===========================================================================
refuse      connection refused: the listening socket is closed for the window
http_error  answered with the fault's status (e.g. 503), not forwarded
auth        writes answered 401 as for a revoked token, not forwarded; reads, open at
            the service, pass
timeout     held until the window ends, then answered 504, never forwarded (lost)
hang        held until the window ends, then forwarded: the service applies the write
            after its client gave up (a stalled service, e.g. under SIGSTOP)
==========  ===========================================================================

Forwarded requests reach the service one at a time in arrival order, so requests that
come behind a held one wait for it, as behind a stopped process's accept backlog: a
client's look-up sent after its upload timed out sees that upload's effect.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loop.conddb import DEFAULT_MAX_BODY
from loop.logs import get_logger
from loop.sim.faultserver import FaultServer
from loop.sim.state import now

log = get_logger("calloop.sim.conddb_proxy")

MAX_HOLD_S = 60.0  # longest a held request waits for its fault window to end
MAX_QUEUE_S = 120.0  # longest a request waits for the ones before it (a stuck forward)
FORWARD_TIMEOUT_S = 60.0
# not forwarded in either direction: they describe one connection, not the message
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "server",
        "date",
    }
)

Reply = tuple[int, list[tuple[str, str]], bytes]


class ArrivalOrder:
    """Lets requests through one at a time, in the order they took their place."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._next = 0
        self._done: set[int] = set()

    @contextmanager
    def place(self) -> Iterator[Callable[[], None]]:
        """Take the next place now; the yielded function waits for its turn, which ends
        (letting the next place go) when the block exits."""
        with self._cond:
            ticket = self._issued
            self._issued += 1

        def wait_turn() -> None:
            with self._cond:
                self._cond.wait_for(lambda: self._next >= ticket, timeout=MAX_QUEUE_S)

        try:
            yield wait_turn
        finally:
            with self._cond:
                self._done.add(ticket)
                while self._next in self._done:
                    self._done.remove(self._next)
                    self._next += 1
                self._cond.notify_all()


class ProxyHandler(BaseHTTPRequestHandler):
    """Plays the active conditions-DB fault on one request, or forwards it."""

    server: ProxyHTTPServer

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > DEFAULT_MAX_BODY:  # as the service's limit
            self._reply(_json_reply(413, f"request body over {DEFAULT_MAX_BODY} bytes"))
            return
        body = self.rfile.read(int(length))  # read at once: a held request is in the proxy
        proxy = self.server.proxy
        fault = proxy.cache.get().active_fault(now(), ConddbProxy.target)
        if fault is not None and self._answered(fault):
            return
        with proxy.order.place() as wait_turn:
            if fault is not None and fault["kind"] == "hang":
                self._hold(fault)
            wait_turn()
            reply = self._forward(body)
        self._reply(reply)

    def _answered(self, fault: dict[str, Any]) -> bool:
        """Play a fault that answers without forwarding; False for the others."""
        kind = fault["kind"]
        if kind == "http_error":
            status = int(fault.get("status", 503))
            self._reply(_json_reply(status, f"HTTP {status} (simulated fault)"))
        elif kind == "auth" and self.command != "GET":
            self._reply(
                _json_reply(
                    401,
                    "invalid or revoked token (simulated fault)",
                    [("WWW-Authenticate", "Bearer")],
                )
            )
        elif kind == "timeout":
            self._hold(fault)
            self._reply(_json_reply(504, "request timed out in the proxy (simulated fault)"))
        else:  # refuse is played by the serving loop, hang forwards late, auth passes reads
            return False
        log.info("conddb fault played", kind=kind, method=self.command, path=self.path)
        return True

    def _hold(self, fault: dict[str, Any]) -> None:
        log.info(
            "conddb fault: holding request",
            kind=fault["kind"],
            method=self.command,
            path=self.path,
        )
        time.sleep(min(MAX_HOLD_S, max(0.0, fault["end"] - now())))

    def _forward(self, body: bytes) -> Reply:
        upstream = self.server.proxy.upstream
        conn = http.client.HTTPConnection(
            upstream.hostname or "127.0.0.1", upstream.port, timeout=FORWARD_TIMEOUT_S
        )
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        except (OSError, http.client.HTTPException) as exc:
            log.warning("conditions DB unreachable behind the proxy", error=str(exc))
            return _json_reply(502, f"conditions DB behind the proxy unreachable: {exc}")
        finally:
            conn.close()

    def _reply(self, reply: Reply) -> None:
        status, headers, payload = reply
        try:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (the point of hang and timeout faults)
            log.debug("client gone before the reply", method=self.command, path=self.path)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("request", detail=format % args)


def _json_reply(status: int, detail: str, headers: list[tuple[str, str]] | None = None) -> Reply:
    return (
        status,
        [("Content-Type", "application/json"), *(headers or [])],
        json.dumps({"detail": detail}).encode(),
    )


class ProxyHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries its proxy (state cache, upstream, order)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], proxy: ConddbProxy) -> None:
        self.proxy = proxy
        super().__init__(address, ProxyHandler)


class ConddbProxy(FaultServer):
    """The fault proxy in front of the conditions-DB service at ``upstream``."""

    target = "conddb"

    def __init__(
        self, upstream: str, state_file: Path, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = urlsplit(upstream)
        if self.upstream.scheme != "http" or not self.upstream.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.order = ArrivalOrder()
        super().__init__(state_file, host, port)

    def new_http(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        """A proxy HTTP server on ``address``."""
        return ProxyHTTPServer(address, self)
