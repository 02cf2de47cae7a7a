"""The calibration store against real HDF5 files: API, validation, transfer, crashes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import h5py
import numpy as np
import pytest

from loop.errors import StoreError
from loop.locks import FileLock, LockTimeout
from loop.store import AliasTable, CalibStore
from loop.store import journal as journal_module
from loop.store.journal import JournaledFile, journal_path, pending, recover
from loop.store.transfer import export_detector, import_file
from tests.conftest import run_cli
from tests.helpers import kill_a_writer


@pytest.fixture
def store(tmp_path: Path) -> CalibStore:
    return CalibStore(tmp_path / "calib", lock_timeout_s=2)


def test_add_get_and_default_rules(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    v1 = det.add("pedestals", np.full(8, 1.0), begin=100, metadata={"runs": [100]})
    v2 = det.add("pedestals", np.full(8, 2.0), begin=100)  # newer in the same range
    v3 = det.add("pedestals", np.full(8, 3.0), begin=200, end=210)
    assert det.get("pedestals", run=150).version == v2  # newest is default
    assert det.get("pedestals", run=205).version == v3
    assert det.get("pedestals", run=211).version == v2  # closed range ended
    det.set_default(v1)  # an expert pins the older one
    assert det.get("pedestals", run=150).version == v1
    v4 = det.add("pedestals", np.full(8, 4.0), begin=100)
    assert det.get("pedestals", run=150).version == v1  # pinned survives new versions
    det.set_default(None, ctype="pedestals", range_name="run000000100-open")
    assert det.get("pedestals", run=150).version == v4
    c = det.get("pedestals", version=v1)
    assert c.metadata == {"runs": [100]} and np.array_equal(c.array, np.full(8, 1.0))


def test_retired_versions_are_readable_but_never_default(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    old = det.add("pedestals", np.zeros(4), begin=1)
    bad = det.add("pedestals", np.ones(4), begin=50)
    det.retire(bad, "validation failed")
    assert det.get("pedestals", run=60).version == old  # withdrawn range is skipped
    assert det.get("pedestals", version=bad).retired
    with pytest.raises(StoreError, match="retired"):
        det.set_default(bad)
    failed = det.add("pedestals", np.ones(4), begin=70, retired=True)
    assert det.get("pedestals", run=70).version == old
    assert any(v.version == failed and v.retired for v in det.versions())


def test_lookup_miss_names_detector_ctype_and_nearest(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(4), begin=100, end=110)
    with pytest.raises(StoreError) as info:
        det.get("pedestals", run=5)
    message = str(info.value)
    assert "ecal-0001" in message and "pedestals" in message and "run000000100-000000110" in message
    with pytest.raises(StoreError, match="did you mean pedestals"):
        det.get("pedestal", run=105)


def test_time_lookup(store: CalibStore) -> None:
    det = store.detector("epix-0042", create=True)
    det.add("gain", np.ones(3), begin_time=1000.0, end_time=2000.0)
    det.add("gain", np.ones(3) * 2, begin=7, begin_time=1500.0)
    assert det.get("gain", time=1200.0).array[0] == 1
    assert det.get("gain", time=1600.0).array[0] == 2
    assert det.get("gain", run=9).array[0] == 2


def test_validation_refusals(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(4), begin=1)
    with pytest.raises(StoreError, match="shape/dtype"):
        det.add("pedestals", np.zeros(5), begin=2)
    with pytest.raises(StoreError, match="shape/dtype"):
        det.add("pedestals", np.zeros(4, dtype=np.float32), begin=2)
    forced = det.add("pedestals", np.zeros(5), begin=2, force=True)
    assert any(r.action == "force" and forced in r.text for r in det.history("pedestals"))
    with pytest.raises(StoreError, match="NaN/inf"):
        det.add("pedestals", np.array([1.0, np.nan, 0, 0, 0]), begin=3)
    det.add("pedestals", np.array([1.0, np.nan, 0, 0, 0]), begin=3, allow_nonfinite=True)
    with pytest.raises(StoreError, match="invalid validity"):
        det.add("pedestals", np.zeros(5), begin=10, end=5)


def test_unknown_detector_suggests_close_names(store: CalibStore) -> None:
    store.detector("ecal-0001", create=True).add("pedestals", np.zeros(2), begin=1)
    with pytest.raises(StoreError, match="did you mean ecal-0001"):
        store.detector("ecal-0002")


def test_aliases_with_validity(store: CalibStore) -> None:
    for name in ("cspad-0001", "cspad-0002"):
        store.detector(name, create=True).add("pedestals", np.zeros(2), begin=1)
    table = AliasTable(store.root, "cspad")
    table.add("CxiDs1", "cspad-0001", source="CxiDs1.0:Cspad.0", begin=0, end=1000)
    table.add("CxiDs1", "cspad-0002", begin=1000)
    assert store.detector("CxiDs1", at=500).name == "cspad-0001"
    assert store.detector("CxiDs1.0:Cspad.0", at=500).name == "cspad-0001"
    assert store.detector("CxiDs1", at=1500).name == "cspad-0002"
    with pytest.raises(StoreError, match="already maps"):
        table.add("CxiDs1", "cspad-0001", begin=2000)
    with pytest.raises(StoreError, match="did you mean CxiDs1"):
        store.detector("CxiDs2", at=500)


def test_diff_and_history(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    a = det.add("pedestals", np.array([1.0, 2.0, 3.0]), begin=1, comment="first")
    b = det.add("pedestals", np.array([1.0, 2.5, 2.0]), begin=2)
    result = det.diff("pedestals", a, b)
    assert result["changed"] == 2 and result["max_abs_diff"] == 1.0
    det.set_links(predecessor="ecal-0000", parameters={"gain_mode": "high"})
    actions = [r.action for r in det.history()]
    assert actions[0] == "create" and "predecessor" in actions and actions.count("add") == 2
    assert det.attributes()["predecessor"] == "ecal-0000"


def test_export_import_round_trip(store: CalibStore, tmp_path: Path) -> None:
    det = store.detector("ecal-0001", create=True)
    for run in (100, 200, 300):
        det.add("pedestals", np.full(4, float(run)), begin=run, end=run + 99)
        det.add("noise", np.full(4, run / 100), begin=run, end=run + 99)
    workspace = tmp_path / "workspace"
    target = export_detector(det, workspace, ctypes=["pedestals"], runs=(210, 250))
    copy = CalibStore(workspace).detector("ecal-0001")
    assert copy.ctypes() == ["pedestals"]
    assert [r.name for r in copy.ranges("pedestals")] == ["run000000200-000000299"]
    assert copy.get("pedestals", run=210).version == det.get("pedestals", run=210).version
    new = copy.add("pedestals", np.full(4, 7.0), begin=220, end=230, comment="local fix")
    report = import_file(store, target)
    assert len(report.added) == 1 and len(report.skipped) == 1
    assert det.get("pedestals", run=225).array[0] == 7.0
    assert det.get("pedestals", run=225).metadata["imported_from"].endswith(new)
    again = import_file(store, target)  # idempotent
    assert again.added == [] and len(again.skipped) == 2
    with pytest.raises(StoreError, match="exists"):
        export_detector(det, workspace)


def test_writer_lock_names_the_holder(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(2), begin=1)
    holder = FileLock(det.path.with_name(det.path.name + ".lock"))
    holder.acquire(1)
    try:
        with pytest.raises(LockTimeout, match=f"pid {os.getpid()}"):
            det.add("pedestals", np.zeros(2), begin=2)
    finally:
        holder.release()
    det.add("pedestals", np.zeros(2), begin=2)


def test_reader_in_other_process_sees_each_commit(store: CalibStore) -> None:
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(2), begin=1)
    other = CalibStore(store.root).detector("ecal-0001")
    assert other.get("pedestals", run=5).array[0] == 0
    for k in range(1, 20):  # back-to-back commits within one timestamp tick
        det.add("pedestals", np.full(2, float(k)), begin=1)
        assert other.get("pedestals", run=5).array[0] == k


def test_journal_replay_after_partial_apply(
    store: CalibStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer killed after the journal's rename but during the apply is completed."""
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(16), begin=1)
    monkeypatch.setattr(journal_module, "_apply", lambda path, pending: None)  # "killed" here
    det.add("pedestals", np.ones(16), begin=2)
    monkeypatch.undo()
    parsed = journal_module._parse(journal_path(det.path).read_bytes())
    assert parsed is not None
    with open(det.path, "r+b") as fh:  # half of the pages made it to disk
        for index, page in parsed.pages[: len(parsed.pages) // 2]:
            fh.seek(index * journal_module.PAGE)
            fh.write(page)
    assert CalibStore(store.root).detector("ecal-0001").get("pedestals", run=5).array[0] == 1
    assert not pending(det.path)


def test_torn_journal_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10000)
    jf = JournaledFile(path)
    jf.seek(5000)
    jf.write(b"y" * 100)
    assert jf.read(0) == b"" and jf.dirty_pages == 1
    jf.close()
    journal_path(path).write_bytes(b"CALJRNL1 garbage")
    assert recover(path) == "discarded"
    assert path.read_bytes() == b"x" * 10000


def test_journaled_file_truncate_and_extend(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 40)
    jf = JournaledFile(path)
    jf.truncate(5000)
    jf.seek(9000)
    jf.write(b"end")
    jf.seek(0)
    data = jf.read(9003)
    assert data[:5000] == (bytes(range(256)) * 40)[:5000]
    assert data[5000:9000] == bytes(4000) and data[9000:] == b"end"
    jf.commit()
    jf.close()
    assert path.read_bytes() == data


def test_journaled_file_commits_runs_of_pages(tmp_path: Path) -> None:
    """Consecutive dirty pages are applied as one write each run, separate ones apart,
    and the last page is cut at the file's new length: the file ends up byte for byte
    as written."""
    path = tmp_path / "f.bin"
    page = journal_module.PAGE
    path.write_bytes(bytes(range(256)) * (12 * page // 256))
    expected = bytearray(path.read_bytes())
    jf = JournaledFile(path)
    for offset, data in ((page - 10, b"a" * (2 * page + 20)), (7 * page + 5, b"b" * 3)):
        jf.seek(offset)
        jf.write(data)
        expected[offset : offset + len(data)] = data
    jf.seek(13 * page + 100)  # past the end: the gap reads as zeros
    jf.write(b"end")
    expected += bytes(13 * page + 100 - len(expected)) + b"end"
    assert jf.dirty_pages == 6  # pages 0-3 (one run), 7, 13
    jf.commit()
    jf.close()
    assert path.read_bytes() == bytes(expected)
    assert not pending(path)


def _verify_store(root: Path, committed: dict[int, str], retired: set[str]) -> None:
    """Every reported commit is intact; the file opens natively; every dataset reads."""
    det = CalibStore(root).detector("ecal-0001")
    assert len(det.versions("pedestals")) >= len(committed)
    for k, vid in committed.items():
        constants = det.get("pedestals", version=vid)
        assert np.array_equal(constants.array, np.full(64, float(k))), (k, vid)
        assert constants.metadata == {"k": k}
        if vid in retired:  # a retire may also commit just before the kill, unreported
            assert constants.retired
    det.close()
    with h5py.File(det.path, "r") as h5:
        h5.visititems(lambda _n, o: o[()] if isinstance(o, h5py.Dataset) else None)


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts(tmp_path: Path) -> None:
    """Kill a writing process many times; every reported commit must survive intact."""
    root = tmp_path / "calib"
    rng = random.Random(1234)
    committed: dict[int, str] = {}
    retired: set[str] = set()
    kills, start = 30, 1
    for _ in range(kills):
        before = start
        start = kill_a_writer(root, start, rng.random() * 0.3, committed, retired)
        fresh = [k for k in committed if k >= before]
        sample = fresh + rng.sample(sorted(committed), min(20, len(committed)))
        if committed:  # a kill before the first commit may leave no detector file yet
            _verify_store(root, {k: committed[k] for k in sample}, retired)
    assert len(committed) > kills  # the writer made progress between kills
    _verify_store(root, committed, retired)
    survivor = CalibStore(root).detector("ecal-0001")
    survivor.add("pedestals", np.full(64, float(start)), begin=start)
    assert survivor.get("pedestals", run=start).array[0] == start


@pytest.mark.slow
def test_a_writer_keeping_its_file_open_survives_writers_killed_beside_it(
    tmp_path: Path,
) -> None:
    """A long-lived writer keeps its file open between transactions; other writers are
    killed at random moments between its adds (leaving journals it or a reader must
    replay). Each of its adds must land on the file as they left it, never on its own
    stale view: every version, theirs and its own, stays intact."""
    root = tmp_path / "calib"
    rng = random.Random(4321)
    committed: dict[int, str] = {}
    retired: set[str] = set()
    survivor = CalibStore(root).detector("ecal-0001", create=True)
    start = 1
    for kill in range(12):
        start = kill_a_writer(root, start, rng.random() * 0.3, committed, retired)
        if kill % 2:  # a reader may be the one that finds the dead writer's journal
            CalibStore(root).detector("ecal-0001").versions()
        committed[start] = survivor.add(
            "pedestals", np.full(64, float(start)), begin=start, metadata={"k": start}
        )
        start += 1
    survivor.close()
    assert len({vid for vid in committed.values()}) == len(committed)
    _verify_store(root, committed, retired)


def test_a_refused_transaction_leaves_nothing_in_the_kept_write_handle(
    store: CalibStore,
) -> None:
    """The writer keeps its file open between transactions: a refused one, whose writes
    HDF5 already holds in memory, must not reach the file with the next commit."""
    det = store.detector("ecal-0001", create=True)
    first = det.add("pedestals", np.zeros(4), begin=1, end=9)
    with pytest.raises(RuntimeError, match="operator abort"), det.batch() as batch:
        batch.add("pedestals", np.ones(4), begin=20)
        raise RuntimeError("operator abort")
    with pytest.raises(StoreError, match="exists with validity"):  # refused mid-add
        det.add("pedestals", np.ones(4), begin=1, end=9, begin_time=5.0)
    second = det.add("noise", np.ones(4), begin=30)
    assert (first, second) == ("v000001", "v000002")  # no number taken by the refusals
    det.close()
    reader = CalibStore(store.root).detector("ecal-0001")
    assert [v.version for v in reader.versions()] == [first, second]
    assert [r.name for r in reader.ranges("pedestals")] == ["run000000001-000000009"]


def test_a_kept_write_handle_follows_other_writers(store: CalibStore) -> None:
    """Two writers of one file, each keeping it open, alternate: each sees the other's
    commits (the generation moves). A file replaced behind a writer's back, with no
    generation moved, is reopened too (its identity changed)."""
    one = store.detector("ecal-0001", create=True)
    two = CalibStore(store.root).detector("ecal-0001", create=True)
    made = [one.add("pedestals", np.full(4, 0.0), begin=1)]
    for k in range(1, 7):
        writer = two if k % 2 else one
        made.append(writer.add("pedestals", np.full(4, float(k)), begin=1 + k))
    assert made == [f"v{n:06d}" for n in range(1, 8)]
    copy = one.path.with_name("copy.h5")
    copy.write_bytes(one.path.read_bytes())
    one.add("pedestals", np.full(4, 7.0), begin=8)  # then the file goes back a step,
    os.replace(copy, one.path)  # as an operator restoring it would do
    assert one.add("pedestals", np.full(4, 8.0), begin=9) == "v000008"
    for det in (one, two):
        det.close()
    reader = CalibStore(store.root).detector("ecal-0001")
    got = [reader.get("pedestals", run=r).array[0] for r in range(1, 10)]
    assert got == [0, 1, 2, 3, 4, 5, 6, 6, 8]


def test_a_replay_moves_the_generation(store: CalibStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal left by a writer that died before moving the generation (as calloop
    before 16.2 did, after applying): the replay moves it, so a reader's cached view and
    a writer's kept handle do not stay on the file as it was before the replay."""
    det = store.detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(4), begin=1)
    reader = CalibStore(store.root).detector("ecal-0001")
    assert reader.get("pedestals", run=5).array[0] == 0  # its view is cached
    rlock = det.path.with_name(det.path.name + ".rlock")
    generation = rlock.read_bytes()
    monkeypatch.setattr(journal_module, "_apply", lambda path, pending: None)  # "killed"
    CalibStore(store.root).detector("ecal-0001").add("pedestals", np.ones(4), begin=2)
    monkeypatch.undo()
    rlock.write_bytes(generation)  # the dead writer had not moved it
    assert pending(det.path)
    assert reader.get("pedestals", run=5).array[0] == 1  # replayed, then reopened
    assert det.add("pedestals", np.full(4, 2.0), begin=3) == "v000003"
    assert CalibStore(store.root).detector("ecal-0001").get("pedestals", run=2).array[0] == 1


def test_store_cli(tmp_path: Path) -> None:
    root = tmp_path / "calib"
    array = tmp_path / "ped.npy"
    np.save(array, np.arange(6, dtype=np.float64))
    added = run_cli(
        "store",
        "--root",
        str(root),
        "add",
        "ecal-0001",
        "pedestals",
        str(array),
        "--begin",
        "10",
        "--comment",
        "from CLI",
    )
    assert added.returncode == 0, added.stderr
    shown = run_cli(
        "store", "--root", str(root), "show", "ecal-0001", "pedestals", "--run", "12", "--json"
    )
    data = json.loads(shown.stdout)
    assert data["version"] == "v000001" and data["summary"]["max"] == 5.0
    out = tmp_path / "out.txt"
    got = run_cli(
        "store",
        "--root",
        str(root),
        "get",
        "ecal-0001",
        "pedestals",
        "--version",
        "1",
        "--out",
        str(out),
    )
    assert got.returncode == 0 and np.array_equal(np.loadtxt(out), np.arange(6))
    listing = run_cli("store", "--root", str(root), "ls", "ecal-0001", "--json")
    assert json.loads(listing.stdout)[0]["is_default"] is True
    missing = run_cli("store", "--root", str(root), "show", "ecal-0001", "pedestals", "--run", "1")
    assert missing.returncode == 2 and "no valid pedestals constants cover run 1" in missing.stderr
    assert "Traceback" not in missing.stderr
    history = run_cli("store", "--root", str(root), "history", "ecal-0001", "--json")
    assert any(r["text"] == "from CLI" for r in json.loads(history.stdout))
    alias = run_cli(
        "store", "--root", str(root), "alias", "add", "EcalBarrel", "ecal-0001", "--begin", "0"
    )
    assert alias.returncode == 0, alias.stderr
    via_alias = run_cli(
        "store", "--root", str(root), "show", "EcalBarrel", "pedestals", "--run", "10", "--json"
    )
    assert json.loads(via_alias.stdout)["version"] == "v000001"
