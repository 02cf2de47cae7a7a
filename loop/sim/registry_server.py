"""An OMS-style run-registry HTTP server backed by the simulator's state file.

Serves the subset of the JSON:API that :mod:`loop.registry` uses, with filters
``filter[<attr>][EQ|NEQ|LT|LE|GT|GE]=value``, ``sort=[-]attr`` and
``page[offset]/page[limit]`` paging. Faults scheduled in the state file are played for
real: ``refuse`` closes the listening socket (connection refused), ``timeout`` holds the
request open, ``http_error`` answers with the configured status, ``malformed`` sends
truncated JSON and ``bad_schema`` sends valid JSON of the wrong shape. Faults aimed at
the conditions DB are not the registry's and are ignored here.

Connections are HTTP/1.1 keep-alive (every reply has a Content-Length), as a real
registry's are: a daemon polls over one connection instead of opening one per poll. An
idle connection is closed after :data:`KEEP_ALIVE_S`, and closing the server (a
``refuse`` window, stop) closes the open ones too, so a refused registry refuses the
clients that were connected as well.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from loop.logs import get_logger
from loop.sim.faultserver import FaultServer
from loop.sim.state import StateFileCache, now

log = get_logger("calloop.sim.registry")

OPERATORS = {
    "EQ": lambda a, b: a == b,
    "NEQ": lambda a, b: a != b,
    "LT": lambda a, b: a < b,
    "LE": lambda a, b: a <= b,
    "GT": lambda a, b: a > b,
    "GE": lambda a, b: a >= b,
}
MAX_HANG_S = 30.0
DEFAULT_LIMIT = 100
KEEP_ALIVE_S = 300.0  # longer than any poll interval: an idle daemon keeps its connection


class QueryError(ValueError):
    """A request parameter the registry cannot interpret (answered with HTTP 400)."""


def _comparable(value: Any, raw: str) -> tuple[Any, Any]:
    """Coerce the attribute and the filter text to comparable values of one type."""
    if isinstance(value, bool):
        return value, raw.lower() == "true"
    if isinstance(value, int | float):
        try:
            return value, float(raw)
        except ValueError:
            raise QueryError(f"filter value {raw!r} is not a number") from None
    if isinstance(value, str) and value.endswith("Z"):
        try:
            return datetime.fromisoformat(value), datetime.fromisoformat(raw)
        except ValueError:
            raise QueryError(f"filter value {raw!r} is not an ISO time") from None
    return value, raw


def apply_query(items: list[dict[str, Any]], params: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Filter, sort and page ``items`` as the JSON:API parameters ask (pure)."""
    offset, limit, sort = 0, DEFAULT_LIMIT, None
    for key, raw in params:
        if key.startswith("filter["):
            attr, _, op = key[len("filter[") : -1].partition("][")
            if op not in OPERATORS:
                raise QueryError(f"unknown filter operator {op!r} in {key}")
            compare = OPERATORS[op]
            items = [
                item
                for item in items
                if item.get(attr) is not None and compare(*_comparable(item[attr], raw))
            ]
        elif key == "sort":
            sort = raw
        elif key in ("page[offset]", "page[limit]"):
            if not raw.isdigit():
                raise QueryError(f"{key} must be a non-negative integer, got {raw!r}")
            offset, limit = (int(raw), limit) if key == "page[offset]" else (offset, int(raw))
    if sort:
        attr = sort.lstrip("-")
        items = sorted(
            items,
            key=lambda item: _sort_key(item.get(attr)),
            reverse=sort.startswith("-"),
        )
    return items[offset : offset + limit]


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers, then text, then missing values: a registry with a record of the wrong
    type (a fault test) still answers, like a real database would."""
    if value is None:
        return 2, 0
    if isinstance(value, int | float) and not isinstance(value, bool):
        return 0, value
    return 1, str(value)


def _resources(kind: str, items: list[dict[str, Any]], id_key: str) -> list[dict[str, Any]]:
    return [{"id": str(item[id_key]), "type": kind, "attributes": item} for item in items]


class RegistryHandler(BaseHTTPRequestHandler):
    """Answers the requests of one connection from the state the server holds."""

    server: RegistryHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: replies carry Content-Length
    timeout = KEEP_ALIVE_S  # an idle keep-alive connection ends after this

    def do_GET(self) -> None:
        state = self.server.cache.get()
        fault = state.active_fault(now(), "registry")
        if fault and self._play_fault(fault):
            return
        url = urlsplit(self.path)
        params = parse_qsl(url.query, keep_blank_values=True)
        try:
            body = self._route(url.path, params, state)
        except QueryError as exc:
            self._send(400, {"errors": [{"title": str(exc)}]})
            return
        if body is None:
            self._send(404, {"errors": [{"title": f"no resource at {url.path}"}]})
        else:
            self._send(200, body)

    def _route(self, path: str, params: list[tuple[str, str]], state: Any) -> dict[str, Any] | None:
        if path == "/api/v1/runs":
            runs = apply_query(list(state.runs.values()), params)
            return {"data": _resources("runs", runs, "run_number"), "meta": {"count": len(runs)}}
        if path.startswith("/api/v1/runs/"):
            run = state.runs.get(path.rsplit("/", 1)[1])
            return None if run is None else {"data": _resources("runs", [run], "run_number")[0]}
        if path == "/api/v1/lumisections":
            every = [ls for lumis in state.lumisections.values() for ls in lumis]
            lumis = apply_query(every, params)
            return {"data": _resources("lumisections", lumis, "lumisection_number")}
        return None

    def _play_fault(self, fault: dict[str, Any]) -> bool:
        kind = fault["kind"]
        if kind == "timeout":
            time.sleep(min(MAX_HANG_S, max(0.0, fault["end"] - now())))
            return self._send_raw(504, b'{"errors": []}')
        if kind == "http_error":
            return self._send(int(fault.get("status", 503)), {"errors": [{"title": "fault"}]})
        if kind == "malformed":
            return self._send_raw(200, b'{"data": [{"id": "1", "type": "runs", "attrib')
        if kind == "bad_schema":
            return self._send(200, {"data": "this is not a list of resources"})
        return False  # "refuse" is played by the serving loop, not per request

    def _send(self, status: int, body: dict[str, Any]) -> bool:
        return self._send_raw(status, json.dumps(body).encode())

    def _send_raw(self, status: int, payload: bytes) -> bool:
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.api+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("request", detail=format % args)


class RegistryHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that carries the state cache and closes its open
    connections when it closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cache: StateFileCache) -> None:
        self.cache = cache
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.accepted = 0  # connections accepted: keep-alive clients open one
        super().__init__(address, RegistryHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and end every open connection (its handler thread then
        finishes): a refused or stopped registry answers nobody."""
        super().server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class RegistryServer(FaultServer):
    """The registry: serves the state file and plays its faults (``refuse`` by closing
    the listening socket, see :class:`~loop.sim.faultserver.FaultServer`)."""

    target = "registry"

    def new_http(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        """A registry HTTP server on ``address``."""
        return RegistryHTTPServer(address, self.cache)
