"""The conditions DB, the same suite against SQLite, PostgreSQL and the HTTP service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import Conditions, ConditionsDB
from loop.conddb.db import ConditionsDatabase, InvalidRequest, NotFound
from loop.conddb.rules import RuleRefused
from loop.conddb.server import ServiceThread, create_app
from loop.errors import ConditionsError


@dataclass
class Backend:
    """A client under test plus direct admin access to the same database."""

    kind: str
    client: Conditions
    admin: ConditionsDatabase


@pytest.fixture(params=["sqlite", "postgres", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'conditions.sqlite'}"
    admin = ConditionsDatabase(url)
    admin.create_schema()
    if request.param == "http":
        service = ServiceThread(create_app(admin)).start()
        client = ConditionsDB.connect(
            service.url, admin.create_token("tester", ["*"], role="admin")
        )
        yield Backend("http", client, admin)
        client.close()
        service.stop()
    else:
        client = ConditionsDB.connect(url)
        yield Backend(request.param, client, admin)
        client.close()
    admin.close()


def _tag(
    b: Backend, name: str = "EcalPedestals_v1", sync: str = "any", time_type: str = "run"
) -> str:
    b.client.create_tag(
        name, time_type=time_type, object_type="EcalPedestals", synchronization=sync
    )
    return name


def test_tags_create_list_and_conflict(backend: Backend) -> None:
    tag = _tag(backend)
    assert _tag(backend) == tag  # identical re-creation is a no-op
    assert [t.name for t in backend.client.tags()] == [tag]
    assert backend.client.tag(tag).synchronization == "any"
    with pytest.raises(ConditionsError, match="exists with"):
        _tag(backend, sync="offline")
    with pytest.raises(NotFound):
        backend.client.tag("Nope")


def test_upload_resolve_payload_round_trip(backend: Backend) -> None:
    tag = _tag(backend)
    first = backend.client.upload(tag, 100, np.arange(8.0), user_text="first")
    second = backend.client.upload(tag, 200, np.arange(8.0) * 2)
    assert first.status == second.status == "inserted"
    resolved = backend.client.resolve(tag=tag, run=150)
    assert (resolved.since, resolved.payload_hash) == (100, first.payload_hash)
    assert backend.client.resolve(tag=tag, run=10**6).since == 200
    with pytest.raises(NotFound, match="no IOV valid"):
        backend.client.resolve(tag=tag, run=99)
    blob = backend.client.payload(second.payload_hash)
    assert np.array_equal(blob.array(), np.arange(8.0) * 2)
    assert blob.object_type == "EcalPedestals"
    raw = backend.client.upload(tag, 300, b"\x00opaque")
    assert backend.client.payload(raw.payload_hash).data == b"\x00opaque"


def test_reupload_is_idempotent(backend: Backend) -> None:
    tag = _tag(backend)
    payload = np.full(4, 3.0)
    assert backend.client.upload(tag, 100, payload).status == "inserted"
    again = backend.client.upload(tag, 100, payload)
    assert again.status == "already present"
    assert len(backend.client.iovs(tag, history=True)) == 1
    assert [e["action"] for e in backend.client.taglog(tag)].count("upload") == 1


def test_keyed_uploads_are_answered_once_and_in_harvest_order(backend: Backend) -> None:
    tag = _tag(backend)
    first = backend.client.upload(tag, 100, np.zeros(3), key="run100:h1", sequence=1)
    second = backend.client.upload(tag, 100, np.ones(3), key="run100:h2", sequence=2)
    assert first.status == second.status == "inserted"
    assert backend.client.upload(tag, 100, np.zeros(3), key="run100:h1", sequence=1) == first
    late = backend.client.upload(tag, 100, np.zeros(3), key="run100:h1-again", sequence=1)
    assert late.status == "superseded" and "older than harvest 2" in late.note
    assert backend.client.upload_result("run100:h1-again") == late
    assert backend.client.upload_result("run100:h2") == second
    assert backend.client.upload_result("never-sent") is None
    history = backend.client.iovs(tag, history=True)
    assert [i.payload_hash for i in history] == [first.payload_hash, second.payload_hash]
    assert backend.client.resolve(tag=tag, run=100).payload_hash == second.payload_hash
    unkeyed = backend.client.upload(tag, 100, np.zeros(3))  # CLI uploads: as before
    assert unkeyed.status == "inserted" and len(backend.client.iovs(tag, history=True)) == 3


def test_keyed_upload_misuse_is_refused(backend: Backend) -> None:
    tag = _tag(backend)
    backend.client.upload(tag, 100, np.zeros(3), key="k1", sequence=1)
    with pytest.raises(InvalidRequest, match="k1"):
        backend.client.upload(tag, 100, np.ones(3), key="k1", sequence=1)  # other payload
    with pytest.raises(InvalidRequest, match="idempotency"):
        backend.client.upload(tag, 100, np.ones(3), sequence=2)  # ordering needs a key
    assert len(backend.client.iovs(tag, history=True)) == 1


def test_reinsert_keeps_history_and_snapshots(backend: Backend) -> None:
    tag = _tag(backend)
    old = backend.client.upload(tag, 100, np.zeros(3))
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    new = backend.client.upload(tag, 100, np.ones(3))
    assert len(backend.client.iovs(tag, history=True)) == 2
    [current] = backend.client.iovs(tag)
    assert current.payload_hash == new.payload_hash
    [before] = backend.client.iovs(tag, snapshot=cut)
    assert before.payload_hash == old.payload_hash
    assert backend.client.resolve(tag=tag, run=100, snapshot=cut).payload_hash == old.payload_hash


def test_offline_rule(backend: Backend) -> None:
    tag = _tag(backend, "Offline_v1", sync="offline")
    backend.client.upload(tag, 100, np.zeros(2))
    with pytest.raises(RuleRefused, match="after the last one"):  # permanent, over HTTP too
        backend.client.upload(tag, 100, np.ones(2), key="offline-100", sequence=2)
    assert backend.client.upload_result("offline-100") is None
    with pytest.raises(RuleRefused, match="after the last one"):
        backend.client.upload(tag, 50, np.ones(2))
    assert backend.client.upload(tag, 101, np.ones(2)).status == "inserted"
    assert len(backend.client.iovs(tag, history=True)) == 2


def test_mc_rule(backend: Backend) -> None:
    tag = _tag(backend, "MC_v1", sync="mc")
    backend.client.upload(tag, 1, np.zeros(2))
    with pytest.raises(RuleRefused, match="single IOV"):
        backend.client.upload(tag, 5, np.ones(2))


def test_pcl_and_prompt_rules_with_fcsr(backend: Backend) -> None:
    backend.admin.set_fcsr(200)
    pcl = _tag(backend, "PCL_v1", sync="pcl")
    with pytest.raises(RuleRefused, match="first condition-safe run 200"):
        backend.client.upload(pcl, 150, np.zeros(2))
    assert backend.client.iovs(pcl) == []
    prompt = _tag(backend, "Prompt_v1", sync="prompt")
    moved = backend.client.upload(prompt, 150, np.zeros(2))
    assert moved.since == 200 and "moved up" in moved.note
    assert backend.client.upload(prompt, 150, np.zeros(2)).status == "already present"


def test_lumi_and_time_tags(backend: Backend) -> None:
    lumi = _tag(backend, "Lumi_v1", time_type="lumi")
    backend.client.upload(lumi, (386001 << 32) | 5, np.zeros(2))
    assert backend.client.resolve(tag=lumi, run=386001, ls=7).since == (386001 << 32) | 5
    with pytest.raises(NotFound):
        backend.client.resolve(tag=lumi, run=386001, ls=4)
    timed = _tag(backend, "Time_v1", time_type="time")
    backend.client.upload(timed, 1_700_000_000, np.zeros(2))
    assert backend.client.resolve(tag=timed, time_point=1_700_000_100).since == 1_700_000_000


def test_global_tag_resolution_respects_snapshot(backend: Backend) -> None:
    tag = _tag(backend)
    first = backend.client.upload(tag, 1, np.zeros(2))
    time.sleep(0.01)
    snapshot = time.time()
    time.sleep(0.01)
    backend.client.upload(tag, 1, np.ones(2))
    backend.client.create_global_tag("Prompt_GT", description="test", snapshot_time=snapshot)
    backend.client.map_global_tag("Prompt_GT", "EcalPedestalsRcd", "", tag)
    resolved = backend.client.resolve(global_tag="Prompt_GT", record="EcalPedestalsRcd", run=5)
    assert resolved.payload_hash == first.payload_hash  # IOVs after the snapshot are hidden
    assert backend.client.global_tag("Prompt_GT")["map"][0]["tag"] == tag
    assert backend.client.global_tags() == ["Prompt_GT"]
    other = _tag(backend, "Other_v1")
    with pytest.raises(ConditionsError, match="already maps"):
        backend.client.map_global_tag("Prompt_GT", "EcalPedestalsRcd", "", other)
    with pytest.raises(NotFound):
        backend.client.resolve(global_tag="Prompt_GT", record="NoSuchRcd", run=5)
