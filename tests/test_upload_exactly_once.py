"""Exactly-once, ordered conditions-DB uploads when the service stalls.

The fault campaign's case: the service stalled during uploads and one run got four IOVs
(harvests A, B, A, B). Here, two harvests of one run, A (sequence 1) and B (sequence 2):

* every order in which a stalled service can receive them, each delivered once or
  twice (the original and a re-send), on SQLite and PostgreSQL;
* the same requests racing from threads (the database's serialization);
* over HTTP, a request stalled in transit by the fault proxy, the client timing out
  while the service applies it later, and the client's recovery by key.

Every test asserts on what the database holds.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fastapi import Request, Response
from sqlalchemy import select

from loop.callpolicy import CallPolicy
from loop.conddb.client import HttpConditions
from loop.conddb.db import ConditionsDatabase, ConditionsUnavailable, UploadResult
from loop.conddb.server import ServiceThread, create_app
from loop.sim.conddb_proxy import ConddbProxy
from loop.sim.state import RegistryState

RUN = 386001
FCSR = RUN + 10  # the prompt tags' since moves up to it; ordering is by the requested since


@dataclass(frozen=True)
class Harvest:
    """One harvest of the run, as the outbox sends it."""

    name: str
    sequence: int
    value: float

    def key(self, tag: str) -> str:
        """As the outbox builds it: one key per (calibration, tag, run, harvest)."""
        return f"calloop:EcalPedestals:{tag}:run{RUN}:harvest{self.sequence}"

    @property
    def payload(self) -> np.ndarray:
        return np.full(8, self.value)


A, B = Harvest("A", 1, 1.0), Harvest("B", 2, 2.0)
HARVESTS = {"A": A, "B": B}


def deliver(conditions: ConditionsDatabase | HttpConditions, tag: str, h: Harvest) -> UploadResult:
    return conditions.upload(tag, RUN, h.payload, key=h.key(tag), sequence=h.sequence)


def delivery_orders() -> list[tuple[str, ...]]:
    """Every distinct order in which the service can receive A and B when each arrives
    once or twice (the original and a re-send, identical requests)."""
    orders: set[tuple[str, ...]] = set()
    for copies_a, copies_b in itertools.product((1, 2), repeat=2):
        orders.update(itertools.permutations("A" * copies_a + "B" * copies_b))
    return sorted(orders)


def check_exactly_once_in_order(
    db: ConditionsDatabase, tag: str, order: tuple[str, ...], results: list[UploadResult]
) -> None:
    """One IOV per applied harvest, A's never after B's, B resolves, repeats answered
    with the original result."""
    what = f"{tag}: deliveries {''.join(order)}"
    first = {name: results[order.index(name)] for name in HARVESTS}
    a_applied = order.index("A") < order.index("B")
    assert first["A"].status == ("inserted" if a_applied else "superseded"), what
    assert first["B"].status == "inserted", what
    for name, result in zip(order, results, strict=True):
        assert result == first[name], f"{what}: a repeat of {name} got {result}"
        assert db.upload_result(HARVESTS[name].key(tag)) == first[name], what
    expected = [first["A"].payload_hash] if a_applied else []
    expected.append(first["B"].payload_hash)
    history = db.iovs(tag, history=True)  # ordered by insertion within the since
    assert [i.payload_hash for i in history] == expected, what
    assert [e["action"] for e in db.taglog(tag)].count("upload") == len(expected), what
    resolved = db.resolve(tag=tag, run=FCSR + 1)
    assert resolved.payload_hash == first["B"].payload_hash, what
    assert np.array_equal(db.payload(resolved.payload_hash).array(), B.payload), what


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ConditionsDatabase]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'conditions.sqlite'}"
    db = ConditionsDatabase(url)
    db.create_schema()
    db.set_fcsr(FCSR)
    yield db
    db.close()


def test_every_delivery_order_of_a_stalled_service(database: ConditionsDatabase) -> None:
    orders = delivery_orders()
    assert len(orders) == 14  # 2 + 3 + 3 + 6 orders for 1/2 copies of A and B
    for synchronization in ("any", "prompt"):
        for number, order in enumerate(orders):
            tag = f"Ecal_{synchronization}_{number}"
            database.create_tag(
                tag, time_type="run", object_type="EcalPedestals", synchronization=synchronization
            )
            results = [deliver(database, tag, HARVESTS[name]) for name in order]
            check_exactly_once_in_order(database, tag, order, results)
            if synchronization == "prompt":
                assert results[order.index("B")].since == FCSR  # moved, still ordered


def test_racing_deliveries_are_serialized(database: ConditionsDatabase) -> None:
    """Four copies of A and four of B from threads at once: the database's lock
    (SQLite: BEGIN IMMEDIATE, PostgreSQL: the tag row) makes every check atomic."""
    tag = "Ecal_race"
    database.create_tag(tag, time_type="run", object_type="EcalPedestals")
    order = ("A", "B") * 4
    barrier = threading.Barrier(len(order))
    results: dict[int, UploadResult] = {}

    def send(index: int, name: str) -> None:
        barrier.wait()
        results[index] = deliver(database, tag, HARVESTS[name])

    threads = [threading.Thread(target=send, args=item) for item in enumerate(order)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(order)
    by_name = {name: {results[i] for i, n in enumerate(order) if n == name} for name in HARVESTS}
    assert all(len(answers) == 1 for answers in by_name.values()), by_name  # one answer per key
    [a], [b] = by_name["A"], by_name["B"]
    history = [i.payload_hash for i in database.iovs(tag, history=True)]
    assert history == ([a.payload_hash] if a.status == "inserted" else []) + [b.payload_hash]
    assert a.status in ("inserted", "superseded") and b.status == "inserted"
    assert database.resolve(tag=tag, run=RUN).payload_hash == b.payload_hash


def test_sqlite_write_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    """What the upload's checks rely on with SQLite (which ignores FOR UPDATE): the
    write engine's BEGIN IMMEDIATE, so no writer can slip in after the first read."""
    path = tmp_path / "conditions.sqlite"
    db = ConditionsDatabase(f"sqlite:///{path}")
    db.create_schema()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with db._session(write=True) as session:
            session.execute(select(1))  # a read only, nothing written yet
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again once the transaction ended
        other.execute("ROLLBACK")
    finally:
        other.close()
        db.close()


# ------------------------------------------------------------------------ over HTTP


@dataclass
class Stack:
    """The real service behind the fault proxy; ``arrivals`` lists the requests that
    reached the service, with their time."""

    db: ConditionsDatabase
    proxy: ConddbProxy
    state_file: Path
    token: str
    arrivals: list[tuple[float, str]] = field(default_factory=list)

    tag = "EcalPedestals_prompt_v1"

    def client(self, policy: CallPolicy) -> HttpConditions:
        return HttpConditions(self.proxy.url, self.token, policy=policy)

    def fault(self, kind: str, seconds: float) -> float:
        """Start a conditions-DB fault now; returns its end (Unix time)."""
        start = time.time()
        fault = {"target": "conddb", "kind": kind, "start": start, "end": start + seconds}
        RegistryState(faults=[fault]).save(self.state_file)
        return start + seconds

    def reached(self, request: str) -> list[float]:
        """When requests starting with ``request`` reached the service."""
        return [at for at, seen in self.arrivals if seen.startswith(request)]

    def history(self) -> list[str]:
        return [i.payload_hash for i in self.db.iovs(self.tag, history=True)]


@contextmanager
def serve_behind_proxy(tmp_path: Path) -> Iterator[Stack]:
    """The conditions DB service on loopback, the fault proxy in front of it."""
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'conditions.sqlite'}")
    db.create_schema()
    db.create_tag(Stack.tag, time_type="run", object_type="EcalPedestals", synchronization="prompt")
    app = create_app(db)
    arrivals: list[tuple[float, str]] = []

    @app.middleware("http")
    async def record(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        arrivals.append((time.monotonic(), f"{request.method} {request.url.path}"))
        return await call_next(request)

    service = ServiceThread(app).start()
    state_file = tmp_path / "registry_state.json"
    proxy = ConddbProxy(service.url, state_file).start_background()
    try:
        yield Stack(db, proxy, state_file, db.create_token("calloop", ["*"]), arrivals)
    finally:
        proxy.stop()
        service.stop()
        db.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with serve_behind_proxy(tmp_path) as served:
        yield served


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds (an assertion error after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_stalled_upload_is_recovered_from_its_key(stack: Stack) -> None:
    """The POST is held past the client's timeout and applied late; the client asks
    for the key's outcome instead of re-sending, and gets the original result."""
    stack.fault("hang", 1.5)
    client = stack.client(CallPolicy(attempts=4, timeout_s=0.4, deadline_s=10, backoff_s=0.05))
    started = time.monotonic()
    a = deliver(client, stack.tag, A)
    [post] = stack.reached("POST /api/v1/upload")  # sent once, never re-sent
    assert post - started > 0.4  # it reached the service after the client had timed out
    assert stack.reached("GET /api/v1/uploads/")  # the client asked for the outcome
    assert a.status == "inserted" and stack.db.upload_result(A.key(stack.tag)) == a
    # then the campaign's sequence: B, and both again (re-sent with their keys)
    b = deliver(client, stack.tag, B)
    assert deliver(client, stack.tag, A) == a
    assert deliver(client, stack.tag, B) == b
    assert stack.history() == [a.payload_hash, b.payload_hash]  # one IOV each, in order
    resolved = client.resolve(tag=stack.tag, run=RUN)
    assert resolved.payload_hash == b.payload_hash
    assert np.array_equal(client.payload(resolved.payload_hash).array(), B.payload)


def test_client_that_gave_up_is_answered_by_key_after_the_write_lands(stack: Stack) -> None:
    """The client's whole deadline passes inside the stall: the outcome is unknown (no
    re-send); the write lands later; B follows; the retry of A gets A's result."""
    end = stack.fault("hang", 2.0)
    client = stack.client(CallPolicy(attempts=3, timeout_s=0.3, deadline_s=1.0, backoff_s=0.05))
    with pytest.raises(ConditionsUnavailable, match="outcome is unknown"):
        deliver(client, stack.tag, A)
    key = A.key(stack.tag)
    assert time.time() < end and stack.db.upload_result(key) is None  # still held
    wait_for(lambda: stack.db.upload_result(key) is not None)  # lands after give-up
    a = stack.db.upload_result(key)
    assert a is not None and a.status == "inserted"
    assert len(stack.reached("POST /api/v1/upload")) == 1
    b = deliver(client, stack.tag, B)
    assert deliver(client, stack.tag, A) == a  # the outbox's retry: answered by key
    assert stack.history() == [a.payload_hash, b.payload_hash]
    assert client.resolve(tag=stack.tag, run=RUN).payload_hash == b.payload_hash


def test_lost_upload_is_sent_again_only_after_the_service_denies_knowing_it(
    stack: Stack,
) -> None:
    """A request lost in transit (held, then answered 504, never forwarded): the key's
    look-up answers 404 once the service is reachable, and only then is it re-sent."""
    stack.fault("timeout", 1.0)
    client = stack.client(CallPolicy(attempts=4, timeout_s=0.3, deadline_s=10, backoff_s=0.05))
    a = deliver(client, stack.tag, A)
    assert a.status == "inserted"
    [post] = stack.reached("POST /api/v1/upload")  # the re-send: the original was lost
    lookups = stack.reached("GET /api/v1/uploads/")
    assert lookups and min(lookups) < post  # asked (404) before sending again
    assert stack.history() == [a.payload_hash]


def test_upload_without_key_is_never_re_sent(stack: Stack) -> None:
    """Without a key the client cannot ask: one POST, a failure, and the stalled
    request still lands once."""
    end = stack.fault("hang", 1.0)
    client = stack.client(CallPolicy(attempts=4, timeout_s=0.3, deadline_s=5, backoff_s=0.05))
    with pytest.raises(ConditionsUnavailable, match="not re-sent"):
        client.upload(stack.tag, RUN, A.payload)
    wait_for(lambda: len(stack.history()) == 1)
    time.sleep(max(0.0, end - time.time()) + 0.5)  # anything else would have arrived
    assert len(stack.reached("POST /api/v1/upload")) == 1
    assert not stack.reached("GET /api/v1/uploads/")
