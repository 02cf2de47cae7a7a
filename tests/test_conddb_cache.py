"""HTTP caching of conditions-DB reads: validators, conditional requests (ETag/304) and
a real nginx running the shipped cache config (nginx/calloop-conddb.conf) in front of
the real service.

Reads at a settled snapshot need IOVs older than the snapshot: the tests age the rows
with one SQL statement, as if they had been uploaded an hour ago.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from loop.conddb.db import SETTLED_S, ConditionsDatabase
from loop.conddb.server import IMMUTABLE_MAX_AGE, ServiceThread, create_app, listen
from tests.conftest import require
from tests.infra.nginx import NginxCache, nginx_binary

TAG, RECORD = "EcalPedestals_v1", "EcalPedestalsRcd"
IMMUTABLE = f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"
SETTLED = "global_tag=GT_settled&record=EcalPedestalsRcd&run=150"
LATEST = "global_tag=GT_latest&record=EcalPedestalsRcd&run=150"


def _database(path: Path) -> ConditionsDatabase:
    """A tag with IOVs at 1 and 100 uploaded an hour ago, a global tag read at a settled
    snapshot (half an hour ago) and one that follows the latest IOVs."""
    db = ConditionsDatabase(f"sqlite:///{path}")
    db.create_schema()
    db.create_tag(TAG, time_type="run", object_type="EcalPedestals")
    db.upload(TAG, 1, np.arange(4.0))
    db.upload(TAG, 100, np.arange(4.0) + 1)
    with db._write.begin() as conn:  # as if uploaded an hour ago
        conn.exec_driver_sql("UPDATE iov SET insertion_time = insertion_time - 3600")
    db.create_global_tag("GT_settled", snapshot_time=time.time() - 1800)
    db.create_global_tag("GT_latest")
    for gt in ("GT_settled", "GT_latest"):
        db.map_global_tag(gt, RECORD, "", TAG)
    return db


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[ServiceThread, ConditionsDatabase]]:
    db = _database(tmp_path / "c.sqlite")
    server = ServiceThread(create_app(db)).start()
    yield server, db
    server.stop()
    db.close()


@pytest.fixture
def service(
    running: tuple[ServiceThread, ConditionsDatabase],
) -> tuple[str, ConditionsDatabase]:
    server, db = running
    return server.url, db


@pytest.fixture
def private_service(tmp_path: Path) -> Iterator[tuple[str, ConditionsDatabase]]:
    db = _database(tmp_path / "c.sqlite")
    server = ServiceThread(create_app(db, read_token_required=True)).start()
    yield server.url, db
    server.stop()
    db.close()


def _get(url: str, etag: str | None = None, token: str | None = None) -> requests.Response:
    headers = {"If-None-Match": etag} if etag else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(url, headers=headers, timeout=10)


# ------------------------------------------------------------ conditional requests


def test_resolve_of_the_latest_revalidates_until_an_upload_changes_it(
    service: tuple[str, ConditionsDatabase],
) -> None:
    url, db = service
    first = _get(f"{url}/api/v1/resolve?{LATEST}")
    assert first.status_code == 200 and first.json()["since"] == 100
    assert first.headers["Cache-Control"] == "public, no-cache"
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = _get(f"{url}/api/v1/resolve?{LATEST}", etag)
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == etag
    # weak and listed forms of If-None-Match match too (RFC 9110 weak comparison)
    assert _get(f"{url}/api/v1/resolve?{LATEST}", f'"other", W/{etag}').status_code == 304
    db.upload(TAG, 120, np.arange(4.0) + 2)
    changed = _get(f"{url}/api/v1/resolve?{LATEST}", etag)
    assert changed.status_code == 200 and changed.json()["since"] == 120
    assert changed.headers["ETag"] != etag


def test_settled_reads_and_payloads_are_immutable(
    service: tuple[str, ConditionsDatabase],
) -> None:
    url, db = service
    settled = _get(f"{url}/api/v1/resolve?{SETTLED}")
    assert settled.status_code == 200 and settled.headers["Cache-Control"] == IMMUTABLE
    db.upload(TAG, 120, np.arange(4.0) + 2)  # after the snapshot: invisible to it
    assert _get(f"{url}/api/v1/resolve?{SETTLED}").json() == settled.json()
    # a tag read at an explicit settled snapshot is immutable; a recent one is not
    old = time.time() - 2 * SETTLED_S
    at_old = _get(f"{url}/api/v1/resolve?tag={TAG}&run=150&snapshot={old}")
    assert at_old.headers["Cache-Control"] == IMMUTABLE and at_old.json()["since"] == 100
    recent = _get(f"{url}/api/v1/resolve?tag={TAG}&run=150&snapshot={time.time()}")
    assert recent.headers["Cache-Control"] == "public, no-cache"
    iovs = _get(f"{url}/api/v1/tags/{TAG}/iovs?snapshot={old}")
    assert iovs.headers["Cache-Control"] == IMMUTABLE and len(iovs.json()) == 2

    digest = settled.json()["payload_hash"]
    payload = _get(f"{url}/api/v1/payloads/{digest}")
    assert payload.status_code == 200 and payload.headers["Cache-Control"] == IMMUTABLE
    assert payload.headers["ETag"] == f'"{digest}"'
    assert payload.content == db.payload(digest).data
    held = _get(f"{url}/api/v1/payloads/{digest}", f'"{digest}"')
    assert held.status_code == 304 and held.content == b""
    unknown = "0" * 64  # a client cannot make an unknown payload exist by naming it
    assert _get(f"{url}/api/v1/payloads/{unknown}", f'"{unknown}"').status_code == 404


def test_every_read_has_a_validator_and_errors_are_never_stored(
    service: tuple[str, ConditionsDatabase],
) -> None:
    url, _db = service
    for path in (
        "/api/v1/tags",
        f"/api/v1/tags/{TAG}",
        f"/api/v1/tags/{TAG}/iovs",
        f"/api/v1/tags/{TAG}/log",
        "/api/v1/globaltags",
        "/api/v1/globaltags/GT_latest",
        "/api/v1/globaltags/GT_latest/log",
    ):
        response = _get(f"{url}{path}")
        assert response.status_code == 200, path
        assert response.headers["Cache-Control"] == "public, no-cache", path
        assert _get(f"{url}{path}", response.headers["ETag"]).status_code == 304, path
    missing = _get(f"{url}/api/v1/resolve?global_tag=GT_latest&record=Other&run=5")
    assert missing.status_code == 404 and missing.headers["Cache-Control"] == "no-store"
    assert "ETag" not in missing.headers


def test_reads_behind_a_token_are_private(
    private_service: tuple[str, ConditionsDatabase],
) -> None:
    url, db = private_service
    token = db.create_token("reader", ["Nothing*"])
    assert _get(f"{url}/api/v1/resolve?{SETTLED}").status_code == 401
    settled = _get(f"{url}/api/v1/resolve?{SETTLED}", token=token)
    assert settled.status_code == 200
    assert settled.headers["Cache-Control"] == f"private, max-age={IMMUTABLE_MAX_AGE}, immutable"
    etag = settled.headers["ETag"]
    assert _get(f"{url}/api/v1/resolve?{SETTLED}", etag, token).status_code == 304
    # the token is checked before the validator: naming an ETag proves nothing
    assert _get(f"{url}/api/v1/resolve?{SETTLED}", etag).status_code == 401


# ------------------------------------------------------------------ through nginx


@pytest.fixture
def nginx() -> Iterator[type[NginxCache]]:
    require("nginx", nginx_binary() is not None, "apt-get install nginx-light (tests/run.sh)")
    yield NginxCache


def test_nginx_serves_settled_reads_from_its_cache(
    running: tuple[ServiceThread, ConditionsDatabase], nginx: type[NginxCache]
) -> None:
    server, db = running
    stop = server.stop
    with nginx(server.url.removeprefix("http://")) as cache:
        first = _get(f"{cache.url}/api/v1/resolve?{SETTLED}")
        assert first.status_code == 200, cache.log_tail()
        assert first.headers["X-Cache-Status"] == "MISS"
        digest = first.json()["payload_hash"]
        assert _get(f"{cache.url}/api/v1/payloads/{digest}").headers["X-Cache-Status"] == "MISS"
        latest = _get(f"{cache.url}/api/v1/resolve?{LATEST}")
        assert latest.json()["since"] == 100

        second = _get(f"{cache.url}/api/v1/resolve?{SETTLED}")
        assert second.headers["X-Cache-Status"] == "HIT" and second.json() == first.json()
        # a client holding the answer gets a 304 from the cache itself
        held = _get(f"{cache.url}/api/v1/resolve?{SETTLED}", first.headers["ETag"])
        assert held.status_code == 304 and held.headers["X-Cache-Status"] == "HIT"
        # the latest is never kept: an upload shows at once through the cache
        db.upload(TAG, 120, np.arange(4.0) + 2)
        moved = _get(f"{cache.url}/api/v1/resolve?{LATEST}")
        assert moved.headers["X-Cache-Status"] != "HIT" and moved.json()["since"] == 120
        # nor an error: a record mapped after a 404 resolves at once
        absent = "global_tag=GT_latest&record=Later&run=150"
        assert _get(f"{cache.url}/api/v1/resolve?{absent}").status_code == 404
        db.map_global_tag("GT_latest", "Later", "", TAG)
        assert _get(f"{cache.url}/api/v1/resolve?{absent}").status_code == 200

        # with the service stopped, the cache still answers what it holds
        stop()
        assert _get(f"{cache.url}/api/v1/resolve?{LATEST}").status_code == 502
        cached = _get(f"{cache.url}/api/v1/resolve?{SETTLED}")
        assert cached.status_code == 200 and cached.headers["X-Cache-Status"] == "HIT"
        payload = _get(f"{cache.url}/api/v1/payloads/{digest}")
        assert payload.headers["X-Cache-Status"] == "HIT"
        assert payload.content == db.payload(digest).data


def test_nginx_never_serves_an_authorized_read_to_anyone_else(
    private_service: tuple[str, ConditionsDatabase], nginx: type[NginxCache]
) -> None:
    url, db = private_service
    token = db.create_token("reader", ["Nothing*"])
    with nginx(url.removeprefix("http://")) as cache:
        for _ in range(3):
            authorized = _get(f"{cache.url}/api/v1/resolve?{SETTLED}", token=token)
            assert authorized.status_code == 200, cache.log_tail()
            assert authorized.headers["X-Cache-Status"] != "HIT"
            anonymous = _get(f"{cache.url}/api/v1/resolve?{SETTLED}")
            assert anonymous.status_code == 401 and anonymous.headers["X-Cache-Status"] != "HIT"
        digest = authorized.json()["payload_hash"]
        assert _get(f"{cache.url}/api/v1/payloads/{digest}", token=token).status_code == 200
        assert _get(f"{cache.url}/api/v1/payloads/{digest}").status_code == 401


def test_service_listener_sends_answers_without_waiting_for_acks() -> None:
    """``calloop conddb serve`` binds its own socket: its connections must carry
    TCP_NODELAY (asyncio sets it only when the socket says TCP), or each answer, sent
    as headers then body, waits for the client's delayed ACK."""
    listener = listen("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2], timeout=5):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
