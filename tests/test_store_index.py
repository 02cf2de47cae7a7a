"""The in-file lookup index: kept in step with the log, read lazily, migrated from
format 1 files written by an older calloop, and crash-safe."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from loop.store import CalibStore, Detector
from loop.store import index as index_module
from loop.store import journal as journal_module
from loop.store.index import FileIndex, build, fences, is_current, log_rows
from loop.store.journal import journal_path, pending, recover
from loop.store.lookup import (
    AXES,
    ROW_DTYPE,
    RangeEntry,
    Validity,
    entry_of,
    on_axis,
    row_values,
    select,
)
from tests.conftest import REPO
from tests.helpers import kill_a_writer
from tests.test_store import _verify_store

V1_STORE = REPO / "tests" / "data" / "store_v1"  # written by tests/data/make_store_v1.py


def _brute_force(entries: list[RangeEntry], run: int | None, time: float | None) -> str | None:
    """The lookup rule, spelled out over every range (no order, no blocks)."""

    def key(entry: RangeEntry) -> tuple[float, float, str]:
        v = entry.validity
        begin, end = (v.begin_run, v.end_run) if run is not None else (v.begin_time, v.end_time)
        assert begin is not None
        return float(begin), -(np.inf if end is None else end - begin), entry.name

    hits = [
        e
        for e in entries
        if e.default is not None
        and (e.validity.contains_run(run) if run is not None else e.validity.contains_time(time))  # type: ignore[arg-type]
    ]
    return max(hits, key=key).default if hits else None


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Structured arrays equal field by field (NaN, meaning "no time", equal to NaN)."""
    return a.dtype == b.dtype and all(
        np.array_equal(a[name], b[name], equal_nan=a.dtype[name].kind == "f")
        for name in a.dtype.names or ()
    )


def _random_history(det: Detector, rng: random.Random, operations: int) -> None:
    """Adds (single and batched, runs and times, open and closed, out of order), retires,
    pins and unpins at random."""
    added: list[str] = []
    for _ in range(operations):
        choice = rng.random()
        if choice < 0.55 or not added:
            with det.batch() as batch:
                for _ in range(rng.choice([1, 1, 3])):
                    begin = rng.randrange(60)
                    end = rng.choice([None, begin + rng.randrange(8)])
                    # a range's name comes from its runs: its times must follow from them
                    when = {"begin_time": float(begin * 10)} if begin % 3 == 0 else {}
                    added.append(batch.add("p", np.zeros(2), begin=begin, end=end, **when))  # type: ignore[arg-type]
            if rng.random() < 0.1:
                added.append(det.add("p", np.zeros(2), begin_time=float(rng.randrange(600))))
        elif choice < 0.75:
            det.retire(rng.choice(added))
        elif choice < 0.9:
            live = [v.version for v in det.versions("p") if not v.retired]
            if live:
                det.set_default(rng.choice(live))
        else:
            entry = rng.choice(det.ranges("p"))
            det.set_default(None, ctype="p", range_name=entry.name)


def test_tables_stay_equal_to_a_rebuild_and_lookups_follow_the_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "BLOCK", 4)  # many blocks: fences, moves across them
    det = CalibStore(tmp_path).detector("ecal-0001", create=True)
    _random_history(det, random.Random(7), 70)
    _check_tables_and_lookups(det)


def test_ranges_added_in_order_append_to_their_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual case, each range beginning after the last, takes the append path of the
    table update: rows, fences (a new one whenever a block starts) and lookups stay as a
    rebuild makes them, and so do they when the last range gets a new default."""
    monkeypatch.setattr(index_module, "BLOCK", 4)
    det = CalibStore(tmp_path).detector("ecal-0001", create=True)
    for begin in range(1, 14):
        det.add("p", np.zeros(2), begin=begin, begin_time=float(begin * 10))
    det.add("p", np.ones(2), begin=13, begin_time=130.0)  # the last row, replaced
    _check_tables_and_lookups(det)


def _check_tables_and_lookups(det: Detector) -> None:
    """The file's lookup tables equal a rebuild from its log, and every lookup through
    them follows the rule."""
    det.close()
    with h5py.File(det.path, "r") as h5:
        assert is_current(h5)
        tables, versions = build(log_rows(h5))  # from scratch, as a migration would
        ranges = h5["_lookup/ranges/p"]
        assert sorted(ranges) == sorted(axis for _, axis in tables)
        for (_, axis), rows in tables.items():
            assert _same_rows(ranges[axis][()], rows), axis
            assert np.array_equal(ranges[axis].attrs["fences"], fences(rows, axis))
        assert np.array_equal(h5["_lookup/versions"][()], versions)
        index = FileIndex(h5)
        entries = index.entries("p")
        for run in range(-1, 75):
            table = index.table("p", "run")
            assert table is not None
            found = select(table, float(run), "run")
            assert (found and found.default) == _brute_force(entries, run, None), run
        for moment in np.arange(-5.0, 700.0, 2.5):
            table = index.table("p", "time")
            assert table is not None
            found = select(table, float(moment), "time")
            assert (found and found.default) == _brute_force(entries, None, moment), moment
    assert len(det.versions("p")) == len(versions)


def _answers(det: Detector) -> dict[str, object]:
    """Everything a reader can ask of the format-1 fixture."""
    get = {
        f"run {run}": det.get("pedestals", run=run).version for run in (1, 5, 15, 35, 45, 55, 70)
    }
    get |= {f"time {t}": det.get("gain", time=t).version for t in (1000.0, 1200.0, 1600.0, 9e9)}
    get["gain run 9"] = det.get("gain", run=9).version
    return {
        "get": get,
        "arrays": {
            v.version: det.get(v.ctype, version=v.version).array.tolist() for v in det.versions()
        },
        "versions": [(v.version, v.range, v.retired, v.is_default) for v in det.versions()],
        "ranges": [det.ranges(ctype) for ctype in det.ctypes()],
        "history": [(r.action, r.where) for r in det.history()],
        "attributes": det.attributes(),
    }


def test_a_format1_file_reads_as_before_and_migrates_on_its_first_write(tmp_path: Path) -> None:
    shutil.copytree(V1_STORE, tmp_path / "calib")
    det = CalibStore(tmp_path / "calib").detector("ecal-0001")
    with h5py.File(det.path, "r") as h5:
        assert "_lookup" not in h5 and h5.attrs["format_version"] == 1
    before = det.path.read_bytes()
    answers = _answers(det)
    assert det.path.read_bytes() == before  # reading never migrates: readers do not write
    assert answers["get"] == {
        "run 1": "v000001",  # pinned over the newer v000002
        "run 5": "v000001",
        "run 15": "v000003",
        "run 35": "v000001",  # its range's only version is retired: withdrawn
        "run 45": "v000001",  # added retired
        "run 55": "v000006",
        "run 70": "v000001",
        "time 1000.0": "v000007",
        "time 1200.0": "v000007",
        "time 1600.0": "v000008",
        "time 9000000000.0": "v000008",
        "gain run 9": "v000008",
    }
    new = det.add("pedestals", np.full(64, 9.0), begin=1000)  # the first write migrates
    with h5py.File(det.path, "r") as h5:
        assert is_current(h5) and h5.attrs["format_version"] == index_module.FORMAT
    fresh = CalibStore(tmp_path / "calib").detector("ecal-0001")
    migrated = _answers(fresh)
    assert migrated["versions"] == [*answers["versions"], (new, "run000001000-open", False, True)]  # type: ignore[misc]
    for key in ("get", "attributes"):
        assert migrated[key] == answers[key], key
    gain, pedestals = answers["ranges"]  # type: ignore[misc]
    added = RangeEntry("run000001000-open", Validity(begin_run=1000), new)
    assert migrated["ranges"] == [gain, [*pedestals, added]]
    assert migrated["arrays"] == {**answers["arrays"], new: [9.0] * 64}  # type: ignore[dict-item]
    assert fresh.get("pedestals", run=1000).version == new


def test_a_log_written_by_an_older_calloop_after_migration_is_not_missed(
    tmp_path: Path,
) -> None:
    """An older calloop appends to the log only: readers replay it, a write rebuilds."""
    shutil.copytree(V1_STORE, tmp_path / "calib")
    det = CalibStore(tmp_path / "calib").detector("ecal-0001")
    det.add("pedestals", np.full(64, 9.0), begin=1000)
    assert det.get("pedestals", run=55).version == "v000006"
    with h5py.File(det.path, "r+") as h5:  # what format-1 code does to retire v000006
        group = h5["pedestals/run000000050-000000060"]
        group["v000006"].attrs["retired"] = True
        group.attrs["default_version"] = ""
        row = h5["_index"][-1:].copy()
        row["op"], row["ctype"], row["range"], row["version"] = 2, b"pedestals", b"", b"v000006"
        row["begin_run"], row["end_run"] = 50, 60
        row["begin_time"], row["end_time"] = np.nan, np.nan
        row["range"] = b"run000000050-000000060"
        h5["_index"].resize((h5["_index"].shape[0] + 1,))
        h5["_index"][-1:] = row
        assert not is_current(h5)
    reader = CalibStore(tmp_path / "calib").detector("ecal-0001")
    assert reader.get("pedestals", run=55).version == "v000001"  # the retire is seen
    det.add("gain", np.ones(3), begin_time=5000.0)  # the next write rebuilds the tables
    with h5py.File(det.path, "r") as h5:
        assert is_current(h5)
    assert CalibStore(tmp_path / "calib").detector("ecal-0001").get(
        "pedestals", run=55
    ).version == ("v000001")


def _capture_journals(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every journal a commit applies."""
    blobs: list[bytes] = []
    apply = journal_module._apply

    def recording(path: Path, pending: journal_module._Pending) -> None:
        blobs.append(pending.encode())
        apply(path, pending)

    monkeypatch.setattr(journal_module, "_apply", recording)
    return blobs


def test_a_resurfacing_applied_journal_replays_harmlessly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emptying the journal is not synced: a crash may bring the last one back."""
    blobs = _capture_journals(monkeypatch)
    det = CalibStore(tmp_path).detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(16), begin=1)
    det.add("pedestals", np.ones(16), begin=2)
    assert not pending(det.path)
    applied = det.path.read_bytes()
    journal_path(det.path).write_bytes(blobs[-1])  # the crash undid the emptying
    assert pending(det.path)
    reader = CalibStore(tmp_path).detector("ecal-0001")
    assert reader.get("pedestals", run=5).array[0] == 1  # recovered before reading
    assert not pending(det.path) and det.path.read_bytes() == applied


def test_a_journal_torn_while_rewritten_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while a commit rewrites the journal in place leaves old and new bytes
    mixed: the checksum fails, and the file, not yet touched, keeps the old state."""
    blobs = _capture_journals(monkeypatch)
    det = CalibStore(tmp_path).detector("ecal-0001", create=True)
    det.add("pedestals", np.zeros(16), begin=1)
    det.add("pedestals", np.ones(16), begin=2)
    det.add("pedestals", np.full(16, 2.0), begin=3)
    old, new = blobs[-2], blobs[-1]
    state = det.path.read_bytes()
    for cut in (len(new) // 3, len(new) // 2, len(new) - 1):
        journal_path(det.path).write_bytes(new[:cut] + old[cut:])
        assert recover(det.path) == "discarded"
        assert det.path.read_bytes() == state and not pending(det.path)
    assert CalibStore(tmp_path).detector("ecal-0001").get("pedestals", run=5).array[0] == 2


def test_sigkill_during_the_migrating_first_writes_of_a_format1_file(tmp_path: Path) -> None:
    """Kill writers of a format-1 file at random moments of their first transactions:
    the file keeps every old version and every reported commit."""
    root = tmp_path / "calib"
    shutil.copytree(V1_STORE, root)
    expected = _answers(CalibStore(root).detector("ecal-0001"))["arrays"]
    rng = random.Random(99)
    committed: dict[int, str] = {}
    retired: set[str] = set()
    start = 1000
    for _ in range(6):  # the first transaction migrates
        start = kill_a_writer(root, start, rng.random() * 0.1, committed, retired)
        det = CalibStore(root).detector("ecal-0001")
        for vid, array in expected.items():  # type: ignore[attr-defined]
            assert (
                det.get("pedestals" if len(array) == 64 else "gain", version=vid).array.tolist()
                == array
            )
        det.close()
        _verify_store(root, committed, retired)
    writer = CalibStore(root).detector("ecal-0001")
    writer.add("pedestals", np.full(64, -1.0), begin=start)
    with h5py.File(writer.path, "r") as h5:
        assert is_current(h5)


def test_validity_round_trips_through_rows() -> None:
    for validity in (
        Validity(begin_run=3),
        Validity(begin_run=3, end_run=9, begin_time=1.5),
        Validity(begin_time=2.0, end_time=3.0),
    ):
        entry = RangeEntry(validity.name(), validity, "v000007")
        rows = np.array([row_values(entry)], dtype=ROW_DTYPE)
        assert entry_of(rows[0]) == entry
        assert [axis for axis in AXES if on_axis(rows, axis).size] == [
            axis for axis in AXES if getattr(validity, f"begin_{axis}") is not None
        ]
