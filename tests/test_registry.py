"""The registry client on loopback: the simulated registry with its faults, and scripted
servers for what the simulator cannot say (invalid records, trickling, oversized or
never-ending replies)."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from loop.callpolicy import CallPolicy, MiB
from loop.errors import RegistryError
from loop.registry import Listing, RegistryClient, RunInfo, iso
from loop.sim.registry_server import QueryError, RegistryServer, apply_query
from loop.sim.state import RegistryState

NOW = datetime.now(UTC)
FAST = CallPolicy(attempts=2, timeout_s=2.0, deadline_s=10.0, backoff_s=0.01)


def _state(runs: int = 5, faults: list[dict[str, object]] | None = None) -> RegistryState:
    state = RegistryState()
    for i in range(runs):
        number = 1000 + i
        start = NOW - timedelta(minutes=10 * (runs - i))
        state.runs[str(number)] = {
            "run_number": number,
            "start_time": iso(start),
            "end_time": iso(start + timedelta(minutes=5)) if i < runs - 1 else None,
            "run_type": "cosmics" if i == 1 else "collisions",
            "stable_beam": i != 2,
            "last_lumisection_number": 3,
        }
        state.lumisections[str(number)] = [
            {
                "run_number": number,
                "lumisection_number": ls,
                "start_time": iso(start),
                "end_time": iso(start),
            }
            for ls in (1, 2, 3)
        ]
    state.faults = faults or []
    return state


def _client(url: str, policy: CallPolicy = FAST, **kwargs: Any) -> RegistryClient:
    return RegistryClient(url, policy=policy, **{"page_size": 2, **kwargs})


def _runs(url: str, policy: CallPolicy = FAST, **kwargs: Any) -> Listing[RunInfo]:
    """Every run of the last year, from a client opened for this call only."""
    with _client(url, policy, **kwargs) as client:
        return client.runs(NOW - timedelta(days=365))


def _save(server: RegistryServer, state: RegistryState) -> None:
    state.save(server.cache.path)


# ------------------------------------------------------------------ simulated registry


def test_lists_runs_over_all_pages(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry.url) as client:
        listing = client.runs(NOW - timedelta(hours=8))
    runs = listing.records
    assert [r.run_number for r in runs] == [1004, 1003, 1002, 1001, 1000]
    assert not runs[0].ended and runs[1].ended
    assert runs[3].run_type == "cosmics" and not runs[2].stable_beam
    assert listing.rejected == []


def test_filters_by_start_time_and_type(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry.url) as client:
        recent = client.runs(NOW - timedelta(minutes=25)).records
        assert [r.run_number for r in recent] == [1004, 1003]
        cosmics = client.runs(NOW - timedelta(hours=1), run_types=["cosmics"]).records
        assert [r.run_number for r in cosmics] == [1001]


def test_single_run_and_lumisections(registry: RegistryServer) -> None:
    _save(registry, _state())
    with _client(registry.url) as client:
        assert client.run(1002).run_number == 1002
        lumis = client.lumisections(1003).records
        assert [ls.lumisection_number for ls in lumis] == [1, 2, 3]
        with pytest.raises(RegistryError, match="HTTP 404"):
            client.run(99)


def _fault(kind: str, seconds: float = 30.0, **extra: object) -> dict[str, object]:
    return {"kind": kind, "start": time.time() - 1, "end": time.time() + seconds, **extra}


FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "503": ({"kind": "http_error", "status": 503}, "HTTP 503"),
    "500": ({"kind": "http_error", "status": 500}, "HTTP 500"),
    "malformed": ({"kind": "malformed"}, "malformed JSON"),
    "bad_schema": ({"kind": "bad_schema"}, "not a JSON:API document"),
    "refused": ({"kind": "refuse"}, "cannot connect"),
    "timeout": ({"kind": "timeout", "seconds": 3.0}, "no answer within"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_is_a_registry_error(registry: RegistryServer, name: str) -> None:
    spec, message = FAULTS[name]
    kind = str(spec["kind"])
    extra = {k: v for k, v in spec.items() if k not in ("kind", "seconds")}
    _save(registry, _state(faults=[_fault(kind, float(spec.get("seconds", 30.0)), **extra)]))
    time.sleep(0.2)  # let the serving loop notice a refuse fault
    policy = CallPolicy(attempts=2, timeout_s=0.5, deadline_s=10.0, backoff_s=0.01)
    with _client(registry.url, policy) as client:
        with pytest.raises(RegistryError, match=message) as info:
            client.runs(NOW - timedelta(hours=8))
        assert registry.url in str(info.value)
        assert "runs keep their last known state" in str(info.value)
        if name != "bad_schema":  # transport faults are retried; a wrong document is not
            assert "after 2 attempt(s)" in str(info.value)
        with pytest.raises(RegistryError):
            client.run(1004)  # the open run is never reported as ended during a fault


def test_client_recovers_after_fault_window(registry: RegistryServer) -> None:
    _save(registry, _state(faults=[_fault("refuse", seconds=0.6)]))
    time.sleep(0.2)
    with _client(registry.url) as client:
        with pytest.raises(RegistryError):
            client.runs(NOW - timedelta(hours=8))
        time.sleep(0.8)
        run = client.run(1004)
    assert run.run_number == 1004 and not run.ended


def test_server_rejects_bad_query_with_400(registry: RegistryServer) -> None:
    _save(registry, _state())
    response = requests.get(
        f"{registry.url}/api/v1/runs", params={"filter[run_number][XX]": "1"}, timeout=5
    )
    assert response.status_code == 400 and "operator" in response.text


def test_apply_query_pure() -> None:
    items = [{"n": i, "t": "x" if i % 2 else "y"} for i in range(10)]
    page = apply_query(
        items,
        [
            ("filter[n][GE]", "3"),
            ("filter[t][EQ]", "x"),
            ("sort", "-n"),
            ("page[offset]", "1"),
            ("page[limit]", "2"),
        ],
    )
    assert [item["n"] for item in page] == [7, 5]
    with pytest.raises(QueryError):
        apply_query(items, [("page[limit]", "-1")])


def test_unreachable_registry() -> None:
    policy = CallPolicy(attempts=2, timeout_s=0.5, backoff_s=0.01)
    with pytest.raises(RegistryError, match="cannot connect"):
        _runs("http://127.0.0.1:9", policy)


# ----------------------------------------------------------------- scripted servers

Respond = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        try:
            self.server.respond(self)
        except OSError:
            return  # the client gave up on the reply, as these tests want it to

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.api+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


class _Server(ThreadingHTTPServer):
    """Answers every GET with ``respond``; counts the requests."""

    daemon_threads = True

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[str] = []
        self.stopping = threading.Event()  # ends the handlers that would go on forever
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serving(respond: Respond) -> Iterator[_Server]:
    """A :class:`_Server` on a free loopback port for the ``with`` block."""
    server = _Server(respond)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


def _run(number: object, **attributes: object) -> dict[str, Any]:
    return {
        "id": str(number),
        "type": "runs",
        "attributes": {
            "run_number": number,
            "start_time": "2024-05-01T10:00:00Z",
            "end_time": None,
            "run_type": "collisions",
            "stable_beam": True,
            "last_lumisection_number": 12,
            **attributes,
        },
    }


def _pages(resources: list[Any], raw: dict[str, str] | None = None) -> Respond:
    """A JSON:API listing served in pages; ``raw`` replaces quoted placeholders with
    literal JSON the json module would not write (a 5000-digit number)."""

    def respond(handler: _Handler) -> None:
        query = dict(parse_qsl(urlsplit(handler.path).query))
        offset, limit = int(query["page[offset]"]), int(query["page[limit]"])
        body = json.dumps({"data": resources[offset : offset + limit]})
        for placeholder, literal in (raw or {}).items():
            body = body.replace(json.dumps(placeholder), literal)
        handler.send(200, body.encode())

    return respond


HUGE_DIGITS = "9" * 5000


def test_bad_records_are_reported_and_the_good_ones_listed() -> None:
    resources = [
        _run(2001),
        _run(10**30),
        _run(-1),
        _run("2002"),
        _run(2003, last_lumisection_number=10**12),
        _run(2004, start_time="yesterday"),
        _run(2005),
        _run(2006, start_time="2024-05-01T10:00:00"),  # naive: rejected, not guessed
        _run(2007, stable_beam=1),
        _run(2008, end_time=1714557600),  # a Unix time is no ISO-8601 string
        _run(2009, run_number=True),
        _run("HUGE"),
        {"id": "2010", "type": "lumisections", "attributes": {}},
        ["not", "a", "resource"],
        _run(2011, start_time="2024-05-01T12:00:00+02:00"),
    ]
    with serving(_pages(resources, {"HUGE": HUGE_DIGITS})) as server:
        listing = _runs(server.url, page_size=3)
    assert [r.run_number for r in listing.records] == [2001, 2005, 2011]
    assert listing.records[2].start_time == datetime(2024, 5, 1, 10, tzinfo=UTC)
    rejected = {(r.run, r.field) for r in listing.rejected}
    assert rejected == {
        (str(10**30), "attributes.run_number"),
        ("-1", "attributes.run_number"),
        ("2002", "attributes.run_number"),
        ("2003", "attributes.last_lumisection_number"),
        ("2004", "attributes.start_time"),
        ("2006", "attributes.start_time"),
        ("2007", "attributes.stable_beam"),
        ("2008", "attributes.end_time"),
        ("True", "attributes.run_number"),
        ("9" * 37 + "...", "attributes.run_number"),
        ("2010", "type"),
        ("?", "resource"),
    }
    assert len(listing.rejected) == len(rejected)  # one entry per bad field
    reasons = {r.run: r.reason for r in listing.rejected}
    assert "less than or equal to 2147483647" in reasons[str(10**30)]
    assert "valid integer (got '2002')" in reasons["2002"]
    assert "max_ls = 10000" in reasons["2003"]
    assert "without a time zone" in reasons["2006"]
    assert all(len(r.reason) < 200 for r in listing.rejected)  # hostile values are clipped


def test_lumisections_outside_1_to_max_ls_are_rejected() -> None:
    def lumi(ls: object) -> dict[str, Any]:
        attributes = {"run_number": 2001, "lumisection_number": ls}
        return {
            "id": str(ls),
            "type": "lumisections",
            "attributes": {**attributes, "start_time": "2024-05-01T10:00:00Z"},
        }

    lumis = [lumi(0), lumi(1), lumi(2), lumi(50), lumi(51), lumi(2.0)]
    with serving(_pages(lumis)) as server, _client(server.url, max_ls=50) as client:
        listing = client.lumisections(2001)
    assert [ls.lumisection_number for ls in listing.records] == [1, 2, 50]
    assert [(r.run, r.field) for r in listing.rejected] == [
        ("2001", "attributes.lumisection_number")
    ] * 3


def test_single_run_must_be_valid_and_the_one_asked_for() -> None:
    answers = {
        "/api/v1/runs/2001": _run(2001),
        "/api/v1/runs/2002": _run(2002, last_lumisection_number=-3),
        "/api/v1/runs/2003": _run(2004),
    }

    def respond(handler: _Handler) -> None:
        handler.send(200, json.dumps({"data": answers[handler.path]}).encode())

    with serving(respond) as server, _client(server.url) as client:
        assert client.run(2001).last_lumisection_number == 12
        with pytest.raises(RegistryError, match=r"attributes\.last_lumisection_number"):
            client.run(2002)
        with pytest.raises(RegistryError, match="answered with run 2004"):
            client.run(2003)


@pytest.mark.parametrize("document", [{"data": "not a list"}, [], {"errors": []}])
def test_a_wrong_envelope_fails_the_call_without_retry(document: object) -> None:
    with serving(lambda handler: handler.send(200, json.dumps(document).encode())) as server:
        with pytest.raises(RegistryError, match="not a JSON:API document") as info:
            _runs(server.url)
        assert len(server.requests) == 1
    assert server.url in str(info.value)


def _then_listing(failure: Callable[[_Handler], None]) -> Respond:
    """``failure`` for the first request, then a one-run listing."""

    def respond(handler: _Handler) -> None:
        if len(handler.server.requests) == 1:
            failure(handler)
        else:
            handler.send(200, json.dumps({"data": [_run(2001)]}).encode())

    return respond


@pytest.mark.parametrize(
    "failure",
    [
        lambda handler: handler.send(503, b'{"errors": []}'),
        lambda handler: handler.send(200, b'{"data": [{"id": "1", "attrib'),
    ],
    ids=["5xx", "malformed-json"],
)
def test_transient_failure_then_success_is_retried(failure: Callable[[_Handler], None]) -> None:
    slept: list[float] = []
    with serving(_then_listing(failure)) as server:
        assert [r.run_number for r in _runs(server.url, sleep=slept.append).records] == [2001]
        assert len(server.requests) == 2
    assert len(slept) == 1 and 0 <= slept[0] < FAST.backoff_s


def test_4xx_is_not_retried() -> None:
    with serving(lambda handler: handler.send(404, b'{"errors": []}')) as server:
        policy = CallPolicy(attempts=5, backoff_s=0.01)
        with pytest.raises(RegistryError, match="HTTP 404") as info:
            _runs(server.url, policy)
        assert len(server.requests) == 1
    assert f"{server.url}/api/v1/runs" in str(info.value)


def _trickle(handler: _Handler) -> None:
    """Headers, then one byte every 0.2 s until the client hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/vnd.api+json")
    handler.end_headers()
    while not handler.server.stopping.wait(0.2):
        handler.wfile.write(b" ")
        handler.wfile.flush()


def test_trickling_reply_ends_within_the_deadline() -> None:
    policy = CallPolicy(attempts=5, timeout_s=1.0, deadline_s=2.0, backoff_s=0.05)
    with serving(_trickle) as server:
        started = time.monotonic()
        with pytest.raises(RegistryError, match="not complete within") as info:
            _runs(server.url, policy)
        elapsed = time.monotonic() - started
    assert elapsed < 3 * policy.deadline_s, elapsed
    assert 2 <= len(server.requests) <= 3  # retried (time-outs are transient) within it
    assert "runs keep their last known state" in str(info.value)


def _silent(handler: _Handler) -> None:
    handler.server.stopping.wait(30)


def test_deadline_holds_against_a_server_that_never_answers() -> None:
    policy = CallPolicy(attempts=20, timeout_s=0.5, deadline_s=1.5, backoff_s=0.05)
    with serving(_silent) as server:
        started = time.monotonic()
        with pytest.raises(RegistryError, match="deadline") as info:
            _runs(server.url, policy)
        elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 3 * policy.deadline_s, elapsed
    assert 2 <= len(server.requests) <= 4
    assert "no answer within" in str(info.value)


CHUNK = b"x" * (64 * 1024)


def _stream(declare_length: bool) -> Respond:
    """50 MiB of body, with or without announcing it."""

    def respond(handler: _Handler) -> None:
        handler.send_response(200)
        if declare_length:
            handler.send_header("Content-Length", str(50 * MiB))
        handler.end_headers()
        for _ in range(50 * MiB // len(CHUNK)):
            if handler.server.stopping.is_set():
                return
            handler.wfile.write(CHUNK)

    return respond


@pytest.mark.parametrize("declare_length", [False, True], ids=["streamed", "declared"])
def test_oversized_reply_is_cut_at_the_cap(declare_length: bool) -> None:
    policy = CallPolicy(attempts=3, timeout_s=10.0, max_bytes=1 * MiB, backoff_s=0.01)
    with serving(_stream(declare_length)) as server, _client(server.url, policy) as client:
        tracemalloc.start()
        try:
            with pytest.raises(RegistryError, match=f"{MiB} byte cap"):
                client.runs(NOW)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(server.requests) == 1  # the same request would get the same reply
    assert peak < 8 * MiB, peak  # the reply is 50 MiB
