"""The conditions-DB HTTP service: auth, scopes, limits and malformed input (the fuzz
test is tests/test_conddb_fuzz.py)."""

from __future__ import annotations

import base64
import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from loop.callpolicy import CallPolicy
from loop.conddb.client import ConditionsDB
from loop.conddb.db import ConditionsDatabase, ConditionsUnavailable, NotAuthorized
from loop.conddb.server import ServiceThread, create_app
from loop.errors import ConditionsError
from tests.conftest import run_cli

TAG = "EcalPedestals_v1"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, ConditionsDatabase]]:
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'c.sqlite'}")
    db.create_schema()
    db.create_tag(TAG, time_type="run", object_type="EcalPedestals", synchronization="any")
    db.create_tag("SiStrip_v1", time_type="run", object_type="SiStripBad")
    server = ServiceThread(create_app(db, max_body_bytes=64 * 1024)).start()
    yield server.url, db
    server.stop()
    db.close()


def _upload_body(tag: str = TAG, since: int = 100, array: np.ndarray | None = None) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(4.0) if array is None else array)
    return {
        "metadata": {
            "destinationTags": {tag: {}},
            "since": since,
            "inputTag": "",
            "userText": "test",
        },
        "payload_b64": base64.b64encode(buffer.getvalue()).decode(),
    }


def _post(
    url: str, body: object, token: str | None = None, path: str = "/api/v1/upload", **kwargs: object
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]


def _nothing_written(db: ConditionsDatabase) -> None:
    assert db.iovs(TAG, history=True) == []
    assert [e["action"] for e in db.taglog(TAG)] == ["create_tag"]


def test_write_needs_a_token(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    response = _post(url, _upload_body())
    assert response.status_code == 401 and "bearer token" in response.json()["detail"]
    assert _post(url, _upload_body(), token="cdb_1_forged").status_code == 401
    assert _post(url, _upload_body(), token="garbage").status_code == 401
    _nothing_written(db)


def test_token_scope_is_enforced(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    strip_only = db.create_token("tracker", ["SiStrip*"])
    response = _post(url, _upload_body(), token=strip_only)
    assert response.status_code == 403 and TAG in response.json()["detail"]
    mixed = _upload_body()
    mixed["metadata"]["destinationTags"]["SiStrip_v1"] = {}
    assert _post(url, mixed, token=strip_only).status_code == 403  # all tags or nothing
    _nothing_written(db)
    assert db.iovs("SiStrip_v1") == []
    assert _post(url, _upload_body("SiStrip_v1"), token=strip_only).status_code == 200


def test_client_reports_token_refusals_as_not_authorized(
    service: tuple[str, ConditionsDatabase],
) -> None:
    url, db = service
    for token in ("cdb_1_forged", db.create_token("tracker", ["SiStrip*"])):  # 401, 403
        client = ConditionsDB.connect(url, token)
        with pytest.raises(NotAuthorized, match=r"HTTP 40[13]"):
            client.upload(TAG, 1, np.zeros(2), key="k1", sequence=1)
        client.close()
    _nothing_written(db)


def test_upload_outcome_endpoint(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    token = db.create_token("alice", ["Ecal*"])
    body = _upload_body()
    body["metadata"].update(idempotencyKey="calloop:Ecal:run100:harvest1", harvestSequence=1)
    posted = _post(url, body, token=token).json()[0]
    outcome = requests.get(f"{url}/api/v1/uploads/calloop:Ecal:run100:harvest1", timeout=10)
    assert outcome.status_code == 200 and outcome.json() == posted
    unknown = requests.get(f"{url}/api/v1/uploads/never-sent", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    for bad in ("with space", "é", "x" * 201):
        assert requests.get(f"{url}/api/v1/uploads/{bad}", timeout=10).status_code == 422


@pytest.mark.parametrize(
    "metadata",
    [
        {"harvestSequence": 1},
        {"idempotencyKey": "k", "destinationTags": {TAG: {}, "SiStrip_v1": {}}},
        {"idempotencyKey": "bad key"},
        {"idempotencyKey": "k", "harvestSequence": -1},
    ],
    ids=["sequence-without-key", "key-with-two-tags", "bad-key", "negative-sequence"],
)
def test_malformed_keyed_uploads_are_422(
    service: tuple[str, ConditionsDatabase], metadata: dict[str, object]
) -> None:
    url, db = service
    body = _upload_body()
    body["metadata"].update(metadata)
    response = _post(url, body, token=db.create_token("alice", ["*"]))
    assert response.status_code == 422, response.text
    _nothing_written(db)


def test_database_outage_is_503_and_transient(
    service: tuple[str, ConditionsDatabase], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, db = service

    def down(**_page: int) -> None:
        raise ConditionsUnavailable("database is locked")

    monkeypatch.setattr(db, "tags", down)
    response = requests.get(f"{url}/api/v1/tags", timeout=10)
    assert response.status_code == 503 and response.json()["error"] == "unavailable"
    client = ConditionsDB.connect(url, policy=CallPolicy(attempts=2, backoff_s=0.01))
    with pytest.raises(ConditionsUnavailable, match=r"HTTP 503.*after 2 attempt"):
        client.tags()


def test_oversized_reply_is_not_read_nor_retried(service: tuple[str, ConditionsDatabase]) -> None:
    url, _ = service
    client = ConditionsDB.connect(url, policy=CallPolicy(max_bytes=64))
    with pytest.raises(ConditionsError, match="byte cap") as raised:
        client.tags()
    assert not isinstance(raised.value, ConditionsUnavailable)


def test_revoked_token_is_refused(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    token = db.create_token("alice", ["Ecal*"])
    assert _post(url, _upload_body(since=1), token=token).status_code == 200
    token_id = int(token.split("_")[1])
    db.revoke_token(token_id)
    assert _post(url, _upload_body(since=2), token=token).status_code == 401
    assert [i.since for i in db.iovs(TAG)] == [1]


def test_writes_are_logged_with_the_user(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    token = db.create_token("alice", ["Ecal*"])
    assert _post(url, _upload_body(), token=token).status_code == 200
    entry = db.taglog(TAG)[-1]
    assert entry["action"] == "upload" and entry["user"] == "alice"
    assert entry["host"] == "127.0.0.1" and "test" in entry["text"]


def test_oversized_request_is_413(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    token = db.create_token("alice", ["*"])
    response = _post(url, _upload_body(array=np.zeros(100_000)), token=token)
    assert response.status_code == 413
    _nothing_written(db)


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda b: b.update(payload_b64="***not base64***"), 400),
        (lambda b: b.update(payload_b64=base64.b64encode(pickle.dumps(object)).decode()), 400),
        (lambda b: b["metadata"].update(since=-1), 422),
        (lambda b: b["metadata"].update(since=2**64), 422),
        (lambda b: b["metadata"].update(destinationTags={}), 422),
        (lambda b: b["metadata"].update(destinationTags={"bad name!": {}}), 422),
        (lambda b: b.update(extra="field"), 422),
    ],
    ids=["base64", "pickle", "negative-since", "huge-since", "no-tags", "bad-tag", "extra"],
)
def test_malformed_uploads_are_4xx(service: tuple[str, ConditionsDatabase], mutate, status) -> None:  # type: ignore[no-untyped-def]
    url, db = service
    token = db.create_token("alice", ["*"])
    body = _upload_body()
    mutate(body)
    response = _post(url, body, token=token)
    assert response.status_code == status, response.text
    _nothing_written(db)


def test_not_json_and_unknown_tag(service: tuple[str, ConditionsDatabase]) -> None:
    url, db = service
    token = db.create_token("alice", ["*"])
    response = requests.post(
        f"{url}/api/v1/upload",
        data=b"{not json",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 422
    assert _post(url, _upload_body("Unknown_v1"), token=token).status_code == 404
    assert (
        requests.get(
            f"{url}/api/v1/resolve", params={"tag": TAG, "time": "nan"}, timeout=10
        ).status_code
        == 422
    )


def test_read_token_option(tmp_path: Path) -> None:
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'c.sqlite'}")
    db.create_schema()
    server = ServiceThread(create_app(db, read_token_required=True)).start()
    try:
        assert requests.get(f"{server.url}/api/v1/tags", timeout=10).status_code == 401
        assert requests.get(f"{server.url}/api/v1/uploads/k", timeout=10).status_code == 401
        reader = ConditionsDB.connect(server.url, db.create_token("bob", ["none"]))
        assert reader.tags() == []
        with pytest.raises(ConditionsError, match="403"):
            reader.create_tag("X_v1", time_type="run", object_type="X")
    finally:
        server.stop()


def test_client_retries_then_reports_unreachable() -> None:
    policy = CallPolicy(attempts=2, timeout_s=0.5, deadline_s=5, backoff_s=0.01)
    client = ConditionsDB.connect("http://127.0.0.1:9", policy=policy)
    with pytest.raises(ConditionsUnavailable, match=r"cannot connect .*after 2 attempt"):
        client.tags()


def test_openapi_spec_is_served(service: tuple[str, ConditionsDatabase]) -> None:
    url, _ = service
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert "/api/v1/upload" in spec["paths"] and "/api/v1/resolve" in spec["paths"]


def test_cli_conddb_round_trip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    assert run_cli("conddb", "init", url).returncode == 0
    made = run_cli(
        "conddb",
        "--db",
        url,
        "create-tag",
        "T_v1",
        "--object-type",
        "X",
        "--synchronization",
        "offline",
    )
    assert made.returncode == 0, made.stderr
    array = tmp_path / "a.npy"
    np.save(array, np.arange(3.0))
    up = run_cli("conddb", "--db", url, "upload", "T_v1", str(array), "--since", "5")
    assert up.returncode == 0 and up.stdout.startswith("inserted"), up.stderr
    refused = run_cli("conddb", "--db", url, "upload", "T_v1", str(array), "--since", "4")
    assert refused.returncode == 2 and "after the last one" in refused.stderr
    resolved = run_cli("conddb", "--db", url, "resolve", "--tag", "T_v1", "--run", "9", "--json")
    assert '"since": 5' in resolved.stdout
    token = run_cli("conddb", "--db", url, "token", "create", "--user", "u", "--tags", "T*")
    assert token.stdout.startswith("cdb_")


def test_cli_bulk_upload_over_http(service: tuple[str, ConditionsDatabase], tmp_path: Path) -> None:
    url, db = service
    token = db.create_token("ecal", ["Ecal*"])
    files = []
    for n in (1, 2):
        files.append(tmp_path / f"p{n}.npy")
        np.save(files[-1], np.arange(4.0) * n)
    argv = ("conddb", "--db", url, "--token", token, "upload-bulk", TAG, "--key", "cli-1")
    first = run_cli(*argv, f"10={files[0]}", f"20={files[1]}", "--json")
    assert first.returncode == 0, first.stderr
    assert [(r["since"], r["status"]) for r in json.loads(first.stdout)] == [
        (10, "inserted"),
        (20, "inserted"),
    ]
    again = run_cli(*argv, f"10={files[0]}", f"20={files[1]}", "--json")
    assert json.loads(again.stdout) == json.loads(first.stdout)  # answered from its key
    assert len(db.iovs(TAG, history=True)) == 2
    bad = run_cli(*argv, f"ten={files[0]}")
    assert bad.returncode == 2 and "expected SINCE=FILE" in bad.stderr
