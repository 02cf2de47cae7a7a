"""Pure logic of the loop: batching, accumulator merging, algorithms, witnesses, journal."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loop.batching import due, plan_batches, ready
from loop.config import ValidationConfig
from loop.fsutil import sha256_file
from loop.journal import JobPhase, Journal, NewInput
from loop.manifest import BadInput, ManifestError, read_manifest, write_manifest
from loop.witness import (
    Output,
    Witness,
    WitnessError,
    read_marker,
    read_witness,
    verify_witness,
    write_marker,
    write_witness,
)
from workers.accumulators import (
    ChannelStats,
    load_accumulators,
    merge_all,
    save_accumulators,
)
from workers.algorithms import (
    ChannelStatus,
    ChannelThresholds,
    Payload,
    classify_channels,
    validate,
)


def test_plan_batches() -> None:
    names = [f"f{i}" for i in range(10)]
    assert plan_batches(names, 2, 4, final=False) == [names[0:4], names[4:8], names[8:10]]
    assert plan_batches(names[:9], 2, 4, final=False) == [names[0:4], names[4:8]]
    assert plan_batches(names[:9], 2, 4, final=True) == [names[0:4], names[4:8], names[8:9]]
    assert plan_batches([], 1, 3, final=True) == []
    with pytest.raises(ValueError):
        plan_batches(names, 3, 2, final=True)
    assert ready(2, 2) and not ready(1, 2)
    assert due(1, 0.0, 10.0, True) and due(1, 11.0, 10.0, False)
    assert not due(0, 99.0, 10.0, True) and not due(1, 1.0, 10.0, False)


@settings(max_examples=40, deadline=None)
@given(
    events=st.integers(min_value=2, max_value=60),
    cuts=st.lists(st.integers(min_value=1, max_value=59), max_size=6),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_merge_equals_one_shot_in_any_grouping(events: int, cuts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.normal(200.0, 3.0, (events, 7)).round()
    bounds = sorted({0, events, *(c for c in cuts if c < events)})
    parts = [ChannelStats.from_frames(frames[a:b], 205.0) for a, b in itertools.pairwise(bounds)]
    rng.shuffle(parts)  # order must not matter either
    merged = merge_all([{"pedestal": p} for p in parts])["pedestal"]
    assert merged.count == events
    np.testing.assert_allclose(merged.mean, frames.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.variance, frames.var(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(merged.occupancy, (frames > 205.0).sum(0))
    np.testing.assert_array_equal(merged.minimum, frames.min(0))
    np.testing.assert_array_equal(merged.maximum, frames.max(0))


def test_histogram_and_round_trip(tmp_path: Path) -> None:
    frames = np.array([[0.0, 10.0], [5.0, 99.0], [9.9, 50.0]])
    stats = ChannelStats.from_frames(frames, 20.0, histogram=(10, 0.0, 100.0))
    assert stats.histogram is not None and stats.histogram.sum() == 6
    assert stats.histogram[0, 0] == 3  # channel 0: all in the first bin
    save_accumulators(tmp_path / "a.h5", {"physics": stats}, {"run": 1})
    loaded = load_accumulators(tmp_path / "a.h5")["physics"]
    np.testing.assert_array_equal(loaded.histogram, stats.histogram)
    assert loaded.count == 3 and np.array_equal(loaded.m2, stats.m2)


def _accumulators(noise: np.ndarray, occupancy: np.ndarray) -> dict[str, ChannelStats]:
    channels = noise.size
    pedestal = ChannelStats(
        1000,
        np.full(channels, 200.0),
        noise**2 * 1000,
        np.zeros(channels),
        np.zeros(channels),
        np.zeros(channels, dtype=np.int64),
    )
    physics = ChannelStats(
        1000,
        np.full(channels, 200.0),
        np.ones(channels),
        np.zeros(channels),
        np.zeros(channels),
        (occupancy * 1000).astype(np.int64),
    )
    return {"pedestal": pedestal, "physics": physics}


def test_classify_channels() -> None:
    noise = np.full(20, 3.0)
    noise[1], noise[2] = 0.0, 15.0
    occupancy = np.full(20, 0.005)
    occupancy[3] = 0.6
    status = classify_channels(_accumulators(noise, occupancy), ChannelThresholds())
    assert status[1] == ChannelStatus.DEAD and status[2] == ChannelStatus.NOISY
    assert status[3] == ChannelStatus.HOT
    assert (status == ChannelStatus.GOOD).sum() == 17


def test_validation_reasons() -> None:
    config = ValidationConfig(min_events=100, max_bad_fraction=0.1, max_mean_shift=5.0)
    good = Payload(
        np.stack([np.full(4, 200.0), np.full(4, 3.0)]), {"events": 500, "bad_fraction": 0.0}
    )
    assert validate(good, None, config, "pedestals") == []
    shifted = np.stack([np.full(4, 190.0), np.full(4, 3.0)])
    assert "pedestal shift" in validate(good, shifted, config, "pedestals")[0]
    bad = Payload(np.array([np.nan, 1.0]), {"events": 10, "bad_fraction": 0.5})
    problems = validate(bad, None, config, "pedestals")
    assert len(problems) == 3 and "min_events" in problems[0]


def test_witness_round_trip_and_checks(tmp_path: Path) -> None:
    job_dir = tmp_path / "run1" / "step2" / "batch0001"
    output = job_dir / "out" / "reco.h5"
    output.parent.mkdir(parents=True)
    output.write_bytes(b"x" * 100)
    record = Output(path=str(output), size=100, sha256=sha256_file(output))
    witness = Witness(
        calibration="C",
        run=1,
        step="step2",
        batch=1,
        inputs=["a"],
        outputs=[record],
        job_id="local:1:2",
        host="h",
        start=1.0,
        end=2.0,
        exit_code=0,
        attempts=1,
    )
    path = job_dir.with_name("batch0001.witness.json")
    write_witness(path, witness)
    assert read_witness(path) == witness
    assert verify_witness(path, witness, run=1, step="step2") == [str(output)]
    with pytest.raises(WitnessError, match="lies at run 2"):
        verify_witness(path, witness, run=2, step="step2")
    output.write_bytes(b"y" * 100)  # same size, other content
    with pytest.raises(WitnessError, match="does not match its recorded SHA-256"):
        verify_witness(path, witness, run=1, step="step2")
    outside = tmp_path / "elsewhere.h5"
    outside.write_bytes(b"z")
    escaped = witness.model_copy(
        update={"outputs": [Output(path=str(outside), size=1, sha256=sha256_file(outside))]}
    )
    with pytest.raises(WitnessError, match="outside the job directory"):
        verify_witness(path, escaped, run=1, step="step2")
    link = job_dir / "out" / "link.h5"
    link.symlink_to(outside)  # a link inside that points out is outside too
    linked = witness.model_copy(
        update={"outputs": [Output(path=str(link), size=1, sha256=sha256_file(outside))]}
    )
    with pytest.raises(WitnessError, match="outside the job directory"):
        verify_witness(path, linked, run=1, step="step2")
    path.write_text("{broken")
    with pytest.raises(WitnessError, match="not a valid witness"):
        read_witness(path)
    marker = write_marker(
        tmp_path / "run.end",
        calibration="C",
        run=1,
        step="step2",
        witnesses={str(path): witness},
        failed_batches=[2],
        bad_inputs={"run1_ls0003.h5": "no events"},
        reason="ended",
    )
    assert read_marker(tmp_path / "run.end") == marker
    assert json.loads((tmp_path / "run.end").read_text())["failed_batches"] == [2]


def test_manifest_declares_outputs_and_refuses_anything_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "reco.h5").write_bytes(b"data")
    (out / ".reco.h5.abc.tmp").write_bytes(b"half")  # a killed writer's leftover
    write_manifest(out, ["reco.h5"], [BadInput(input="x.h5", reason="no events")], "c0ffee")
    manifest = read_manifest(out)
    assert [o.name for o in manifest.outputs] == ["reco.h5"]
    assert manifest.bad_inputs[0].reason == "no events" and manifest.config_sha256 == "c0ffee"
    (out / "reco.h5").write_bytes(b"DATA")
    with pytest.raises(ManifestError, match="does not match its checksum"):
        read_manifest(out)
    (out / "manifest.json").write_text(
        json.dumps({"outputs": [{"name": "../escape", "size": 1, "sha256": "0"}]})
    )
    with pytest.raises(ManifestError, match="not a file name"):
        read_manifest(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(out)


def test_journal_batches_are_idempotent(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    assert journal.ensure_run(7, "NotRunning", 0.0)
    assert not journal.ensure_run(7, "NotRunning", 0.0)
    assert journal.add_inputs(7, [NewInput("b"), NewInput("a"), NewInput("c")], 1.0) == 3
    assert journal.add_inputs(7, [NewInput("a"), NewInput("d"), NewInput("x", bad="no")], 2) == 2
    assert journal.bad_inputs(7) == {"x": "no"}  # seen, never batched
    groups = plan_batches([n for n, _ in journal.pending_inputs(7)], 2, 2, final=False)
    assert journal.create_batches(7, groups, final=False, now=3.0) == [1, 2]
    assert journal.create_batches(7, groups, final=False, now=3.0) == []  # replay after crash
    assert journal.inputs_of(7, 2) == ["c", "d"] and journal.pending_inputs(7) == []
    journal.add_job(7, 1, tmp_path / "b1", ["true"], "c1")
    journal.add_job(7, 1, tmp_path / "b1", ["true"], "c2")
    assert journal.batches_without_job(7) == [2]
    journal.update_job(7, 1, state=JobPhase.SUCCEEDED)
    assert journal.job_counts(7) == {"succeeded": 1}
    job = journal.job(7, 1)
    assert job is not None and job.state is JobPhase.SUCCEEDED and job.config_sha256 == "c1"
    journal.update_info(7, last_ls=4, missing_ls=[3])
    assert journal.info(7).last_ls == 4 and journal.info(7).missing_ls == [3]
    with pytest.raises(TypeError, match="no field"):
        journal.update_info(7, lastls=4)  # a typo is an error, not a second spelling
    journal.set_state(7, "Done", active=False)
    assert journal.active_runs() == [] and journal.all_runs() == [(7, "Done")]
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    assert reopened.run_state(7) == "Done"
    reopened.close()


def test_journal_of_an_older_release_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE inputs (run INTEGER NOT NULL, name TEXT NOT NULL, seen REAL NOT NULL,"
        " batch INTEGER, PRIMARY KEY (run, name));"
        "INSERT INTO inputs VALUES (1, 'run1_ls0001.h5', 0, NULL);"
    )
    db.close()
    journal = Journal(path)
    assert journal.pending_inputs(1) == [("run1_ls0001.h5", 0.0)]
    assert journal.input_meta(1, "run1_ls0001.h5") == {}
    journal.mark_bad(1, "run1_ls0001.h5", "no events")
    assert journal.bad_inputs(1) == {"run1_ls0001.h5": "no events"}
    journal.close()
