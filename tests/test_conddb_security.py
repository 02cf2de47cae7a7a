"""The review's findings, replayed as attacks through the public interfaces.

The attacker holds one valid token scoped to ``Ecal*``. Each attack is now refused with
a 4xx (HTTP) or a one-line error (CLI, library); each test checks that nothing was
written (database contents, audit logs) and nothing leaked (messages, logs, output).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import sqlalchemy

from loop.conddb.client import ConditionsDB
from loop.conddb.db import ConditionsDatabase, ConditionsUnavailable, InvalidRequest
from loop.conddb.server import MAX_PAGE, ServiceThread, create_app
from loop.errors import ConditionsError
from loop.redact import redact, redact_url
from tests.conftest import run_cli

GT = "Prompt_GT_v1"
STRIP, ECAL = "SiStripBadChannel_v1", "EcalPedestals_v1"
RECORD = "SiStripBadChannelRcd"
PASSWORD = "pg-S3cret-pw"


@dataclass
class Site:
    """A served database with the official global tag and three tokens."""

    url: str
    db: ConditionsDatabase
    ecal: str  # the attacker: an uploader scoped to Ecal*
    strip: str  # the rightful owner of the SiStrip tags
    admin: str

    def post(self, path: str, body: object, token: str | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(f"{self.url}{path}", json=body, headers=headers, timeout=10)

    def get(self, path: str, **params: object) -> requests.Response:
        return requests.get(f"{self.url}{path}", params=params, timeout=10)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'c.sqlite'}")
    db.create_schema()
    db.create_tag(STRIP, time_type="run", object_type="SiStripBad")
    db.create_tag(ECAL, time_type="run", object_type="EcalPedestals")
    db.upload(STRIP, 1, np.zeros(3))
    db.upload(ECAL, 1, np.ones(3))
    db.create_global_tag(GT, description="official", snapshot_time=1e11)
    server = ServiceThread(create_app(db, max_body_bytes=256 * 1024)).start()
    yield Site(
        server.url,
        db,
        db.create_token("mallory", ["Ecal*"]),
        db.create_token("tracker", ["SiStrip*"]),
        db.create_token("gt-manager", ["*"], role="admin"),
    )
    server.stop()
    db.close()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _upload(tags: list[str], since: int, data: bytes) -> dict[str, object]:
    return {
        "metadata": {"destinationTags": {t: {} for t in tags}, "since": since},
        "payload_b64": base64.b64encode(data).decode(),
    }


# ----------------------------------------------------------------------- global tags


def test_scoped_token_cannot_remap_a_record_of_the_official_global_tag(site: Site) -> None:
    entry = {"record": RECORD, "label": "", "tag": ECAL}
    refused = site.post(f"/api/v1/globaltags/{GT}/map", entry, site.ecal)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert site.db.global_tag(GT)["map"] == []
    owner = site.post(f"/api/v1/globaltags/{GT}/map", {**entry, "tag": STRIP}, site.strip)
    assert owner.status_code == 403  # an uploader edits no global tag, its own tags or not
    assert site.post(f"/api/v1/globaltags/{GT}/map", {**entry, "tag": STRIP}, site.admin).ok
    again = site.post(f"/api/v1/globaltags/{GT}/map", entry, site.admin)
    assert again.status_code == 409 and STRIP in again.json()["detail"]  # never remapped
    resolved = site.get("/api/v1/resolve", global_tag=GT, record=RECORD, run=5).json()
    assert resolved["tag"] == STRIP
    log = site.db.global_tag_log(GT)
    assert [(e["action"], e["user"]) for e in log] == [
        ("create_gt", site.db.user),
        ("map", "gt-manager"),
    ]
    assert log[1]["after"] == f"{RECORD}/ -> {STRIP}"


def test_global_tag_names_cannot_be_squatted(site: Site) -> None:
    squat = {"name": "Prompt_GT_v2", "snapshot_time": 1}
    assert site.post("/api/v1/globaltags", squat, site.ecal).status_code == 403
    assert site.db.global_tags() == [GT]
    official = {"name": "Prompt_GT_v2", "description": "next", "snapshot_time": 2e9}
    assert site.post("/api/v1/globaltags", official, site.admin).status_code == 201
    assert site.post("/api/v1/globaltags", official, site.admin).status_code == 201  # no-op
    clash = site.post("/api/v1/globaltags", {**official, "snapshot_time": 1}, site.admin)
    assert clash.status_code == 409 and clash.json()["error"] == "conflict"
    assert "exists with description='next'" in clash.json()["detail"]
    assert site.db.global_tag("Prompt_GT_v2")["snapshot_time"] == 2e9
    assert len(site.db.global_tag_log("Prompt_GT_v2")) == 1


def test_global_tag_writes_stay_out_of_tag_logs(site: Site) -> None:
    same_name = {"name": STRIP, "description": "a global tag named like a tag"}
    assert site.post("/api/v1/globaltags", same_name, site.admin).status_code == 201
    assert [e["action"] for e in site.db.taglog(STRIP)] == ["create_tag", "upload"]
    assert [e["action"] for e in site.db.global_tag_log(STRIP)] == ["create_gt"]


def test_tag_redefinition_is_a_conflict_naming_what_exists(site: Site) -> None:
    body = {"name": "EcalGain_v1", "time_type": "run", "object_type": "EcalGain"}
    assert site.post("/api/v1/tags", body, site.ecal).status_code == 201
    assert site.post("/api/v1/tags", body, site.ecal).status_code == 201  # outbox reconnects
    clash = site.post("/api/v1/tags", {**body, "time_type": "lumi"}, site.ecal)
    assert clash.status_code == 409 and "exists with time_type=run" in clash.json()["detail"]
    assert site.post("/api/v1/tags", {**body, "name": "SiStripX_v1"}, site.ecal).status_code == 403
    assert [e["action"] for e in site.db.taglog("EcalGain_v1")] == ["create_tag"]
    assert [t.name for t in site.db.tags()] == ["EcalGain_v1", ECAL, STRIP]


# ------------------------------------------------------------------- inputs, no 5xx


@pytest.mark.parametrize(
    "token",
    [
        "cdb_\u00b2_x",
        "cdb_\u0661\u0662_x",
        "cdb_" + "9" * 40 + "_x",
        "cdb_1_" + "x" * 5000,
        "cdb__",
    ],
    ids=["superscript-digit", "arabic-digits", "huge-id", "huge-secret", "empty"],
)
def test_malformed_token_ids_are_401(site: Site, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}".encode()}
    response = requests.post(f"{site.url}/api/v1/tags", json={}, headers=headers, timeout=10)
    assert response.status_code == 401


@pytest.mark.parametrize(
    "params",
    [
        {"run": 2**31},
        {"run": 2**31 - 1, "ls": 2**32},
        {"run": 0},
        {"run": 10**30},
        {"time": 1e300},
        {"run": 5, "ls": 0},
    ],
)
def test_out_of_range_points_are_422(site: Site, params: dict[str, int]) -> None:
    assert site.get("/api/v1/resolve", tag=STRIP, **params).status_code == 422


def test_largest_lumi_point_resolves_without_overflow(site: Site) -> None:
    site.db.create_tag("SiStripLumi_v1", time_type="lumi", object_type="SiStripBad")
    response = site.get("/api/v1/resolve", tag="SiStripLumi_v1", run=2**31 - 1, ls=2**32 - 1)
    assert response.status_code == 404 and "no IOV valid" in response.json()["detail"]
    with pytest.raises(InvalidRequest, match="run in 1"):
        site.db.resolve(tag="SiStripLumi_v1", run=2**31, ls=1)


def _crafted_npy(shape: str, data: bytes) -> bytes:
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header = header.ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_crafted_npy("(10**15,)", b"x" * 8), "syntax|not a .npy"),
        (_crafted_npy("(1000000000000,)", b"x" * 8), "announces 8000000000000 data bytes"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b" " * 60000, "not a .npy"),
        (b"PK\x03\x04" + b"\x00" * 40, "not a .npy"),
    ],
    ids=["expression-shape", "huge-shape", "huge-header", "npz"],
)
def test_crafted_npy_payloads_are_400_before_allocation(
    site: Site, payload: bytes, why: str
) -> None:
    response = site.post("/api/v1/upload", _upload([ECAL], 50, payload), site.ecal)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert [i.since for i in site.db.iovs(ECAL)] == [1]


def test_npz_is_refused_by_the_cli(tmp_path: Path, site: Site) -> None:
    archive = tmp_path / "pedestals.npz"
    np.savez(archive, a=np.zeros(3))
    url = site.db.url
    result = run_cli("conddb", "--db", url, "upload", ECAL, str(archive), "--since", "9")
    assert result.returncode == 2 and "not a .npy array" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [i.since for i in site.db.iovs(ECAL)] == [1]


def test_multi_tag_upload_is_all_or_nothing(site: Site) -> None:
    site.db.create_tag(
        "EcalOffline_v1", time_type="run", object_type="EcalPedestals", synchronization="offline"
    )
    site.db.upload("EcalOffline_v1", 100, np.ones(3))
    wide = site.db.create_token("ecal-expert", ["Ecal*"])
    # the first tag takes since 50; the offline tag refuses it (not after its last, 100)
    body = _upload([ECAL, "EcalOffline_v1"], 50, _npy(np.full(3, 7.0)))
    response = site.post("/api/v1/upload", body, wide)
    assert response.status_code == 409 and response.json()["error"] == "rule_refused"
    assert [i.since for i in site.db.iovs(ECAL)] == [1]
    assert [e["action"] for e in site.db.taglog(ECAL)] == ["create_tag", "upload"]
    both = site.post(
        "/api/v1/upload", _upload([ECAL, "EcalOffline_v1"], 200, _npy(np.ones(2))), wide
    )
    assert both.status_code == 200 and [r["status"] for r in both.json()] == ["inserted"] * 2


def test_listings_are_paged(site: Site) -> None:
    site.db.import_iovs(ECAL, [(since, b"p%d" % (since % 7)) for since in range(2, 2502)])
    site.db.upload(ECAL, 2, np.arange(2.0))  # a second row at since 2: history differs
    first = site.get(f"/api/v1/tags/{ECAL}/iovs")
    assert first.status_code == 200 and len(first.json()) == 1000
    assert site.get(f"/api/v1/tags/{ECAL}/iovs", limit=MAX_PAGE + 1).status_code == 422
    assert site.get(f"/api/v1/tags/{ECAL}/iovs", limit=0).status_code == 422
    last = site.get(f"/api/v1/tags/{ECAL}/iovs", limit=1000, offset=2000).json()
    assert [r["since"] for r in last] == list(range(2001, 2502))
    client = ConditionsDB.connect(site.url)
    assert [i.since for i in client.iovs(ECAL)] == list(range(1, 2502))
    assert len(client.iovs(ECAL, history=True)) == 2502
    assert client.iovs(ECAL)[1] == site.db.iovs(ECAL, history=True)[2]  # since 2's latest
    assert [i.since for i in client.iovs(ECAL, limit=2, offset=1)] == [2, 3]
    assert [t.name for t in client.tags(limit=1, offset=1)] == [STRIP]
    client.close()


# --------------------------------------------------------------------------- secrets


def test_redaction_helpers() -> None:
    url = f"postgresql+psycopg://cal:{PASSWORD}@db.cern.ch:5432/conditions"
    assert redact_url(url) == "postgresql+psycopg://cal:***@db.cern.ch:5432/conditions"
    assert redact_url("sqlite:////var/c.sqlite") == "sqlite:////var/c.sqlite"
    assert redact_url("postgresql://cal@db/c") == "postgresql://cal@db/c"
    text = f"failed: {url} with token cdb_17_AbC-dEf_123 (cdb_17 refused)"
    assert redact(text) == (
        "failed: postgresql+psycopg://cal:***@db.cern.ch:5432/conditions with token "
        "cdb_17_*** (cdb_17 refused)"
    )


@pytest.mark.postgres
def test_database_password_never_leaks(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with_password = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@")  # trust auth
    missing = with_password.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(ConditionsUnavailable) as outage:  # what the outbox logs and journals
        ConditionsDB.connect(missing, create=False).tags()
    assert PASSWORD not in str(outage.value) and "***" in str(outage.value)
    db = ConditionsDatabase(with_password)
    assert PASSWORD not in db.url
    db.create_schema()
    with pytest.raises(ConditionsError) as refused:
        db.create_tag("X_v1", time_type="run", object_type="X", synchronization="nope")
    assert PASSWORD not in str(refused.value)
    outputs = [
        run_cli("conddb", "init", with_password),
        run_cli("conddb", "--db", missing, "tags"),
        run_cli("conddb", "--db", with_password, "log", "--tag", "X_v1"),
        run_cli("conddb", "--db", with_password.replace("postgresql+psycopg", "mysql"), "tags"),
    ]
    assert outputs[0].returncode == 0 and "***" in outputs[0].stdout
    assert outputs[1].returncode != 0
    for result in outputs:
        assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD not in caplog.text
    db.close()


def test_service_url_credentials_never_leak() -> None:
    client = ConditionsDB.connect(f"http://user:{PASSWORD}@127.0.0.1:9", create=False)
    with pytest.raises(ConditionsUnavailable) as failed:
        client.tags()
    assert PASSWORD not in str(failed.value)


# ------------------------------------------------------------------ audit and roles


def test_cli_roles_and_audit_logs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    assert run_cli("conddb", "init", url).returncode == 0
    made = run_cli(
        "conddb", "--db", url, "token", "create", "--user", "boss", "--tags", "*", "--role", "admin"
    )
    admin = made.stdout.strip()
    assert (
        run_cli(
            "conddb",
            "--db",
            url,
            "token",
            "create",
            "--user",
            "u",
            "--tags",
            "X*",
            "--role",
            "root",
        ).returncode
        == 2
    )
    db = ConditionsDatabase(url)
    assert [(t["user"], t["role"]) for t in db.tokens()] == [("boss", "admin")]
    db.create_tag("X_v1", time_type="run", object_type="X")
    server = ServiceThread(create_app(db)).start()
    try:
        env = {"CALLOOP_CONDDB_TOKEN": admin}
        for argv in (["gt", "create", "GT1"], ["gt", "map", "GT1", "XRcd", "X_v1"]):
            assert run_cli("conddb", "--db", server.url, *argv, env=env).returncode == 0
        gt_log = run_cli("conddb", "--db", server.url, "log", "--global-tag", "GT1", "--json")
        tag_log = run_cli("conddb", "--db", url, "log", "--tag", "X_v1")
    finally:
        server.stop()
    assert '"user": "boss"' in gt_log.stdout and "XRcd/ -> X_v1" in gt_log.stdout
    assert "create_tag" in tag_log.stdout and "after: time_type=run" in tag_log.stdout
    assert admin.split("_")[2] not in gt_log.stdout + tag_log.stdout
    db.close()


OLD_SCHEMA = (  # token and tag_log as the previous release made them
    'CREATE TABLE token (id INTEGER PRIMARY KEY, "user" VARCHAR(100), tag_patterns TEXT,'
    " secret_hash VARCHAR(64), created FLOAT, revoked BOOLEAN)",
    "CREATE TABLE tag_log (id INTEGER PRIMARY KEY, tag_name VARCHAR(100), time FLOAT,"
    ' action VARCHAR(32), "user" VARCHAR(100), host VARCHAR(255), text TEXT)',
    "INSERT INTO tag_log VALUES (1, 'X_v1', 1.0, 'create_tag', 'old', 'h', 'run/any')",
    f"INSERT INTO token VALUES (1, 'old', 'X*', '{hashlib.sha256(b'old').hexdigest()}', 1.0,"
    " false)",
)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_old_schema_gets_roles_and_audit_columns(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        for statement in OLD_SCHEMA:
            conn.exec_driver_sql(statement)
    engine.dispose()
    db = ConditionsDatabase(url)
    db.create_schema()
    db.create_schema()  # idempotent
    assert db.taglog("X_v1")[0]["before"] == ""
    identity = db.authenticate("cdb_1_old")
    assert identity is not None and (identity.user, identity.role) == ("old", "uploader")
    db.close()
