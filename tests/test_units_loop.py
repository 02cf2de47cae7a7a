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
from loop.config import AlgorithmConfig, ValidationConfig
from loop.journal import Journal
from loop.witness import (
    Witness,
    WitnessError,
    describe_outputs,
    read_marker,
    read_witness,
    write_marker,
    write_witness,
)
from workers.accumulators import (
    ChannelStats,
    load_accumulators,
    merge_all,
    save_accumulators,
)
from workers.algorithms import ChannelStatus, Payload, classify_channels, validate


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
    status = classify_channels(_accumulators(noise, occupancy), AlgorithmConfig())
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
    output = tmp_path / "reco.h5"
    output.write_bytes(b"x" * 100)
    witness = Witness(
        calibration="C",
        run=1,
        step="step2",
        batch=1,
        inputs=["a"],
        outputs=describe_outputs([output]),
        job_id="local:1:2",
        host="h",
        start=1.0,
        end=2.0,
        exit_code=0,
        attempts=1,
    )
    path = tmp_path / "batch0001.witness.json"
    write_witness(path, witness)
    assert read_witness(path) == witness
    output.write_bytes(b"x" * 50)
    with pytest.raises(WitnessError, match="has 50 bytes"):
        read_witness(path)
    path.write_text("{broken")
    with pytest.raises(WitnessError, match="not a valid witness"):
        read_witness(path)
    marker = write_marker(
        tmp_path / "run.end",
        calibration="C",
        run=1,
        step="step2",
        witnesses=[str(path)],
        failed_batches=[2],
        reason="ended",
    )
    assert read_marker(tmp_path / "run.end") == marker
    assert json.loads((tmp_path / "run.end").read_text())["failed_batches"] == [2]


def test_journal_batches_are_idempotent(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    assert journal.ensure_run(7, "NotRunning", 0.0)
    assert not journal.ensure_run(7, "NotRunning", 0.0)
    assert journal.add_inputs(7, ["b", "a", "c"], 1.0) == 3
    assert journal.add_inputs(7, ["a", "d"], 2.0) == 1
    groups = plan_batches([n for n, _ in journal.pending_inputs(7)], 2, 2, final=False)
    assert journal.create_batches(7, groups, final=False, now=3.0) == [1, 2]
    assert journal.create_batches(7, groups, final=False, now=3.0) == []  # replay after crash
    assert journal.inputs_of(7, 2) == ["c", "d"] and journal.pending_inputs(7) == []
    journal.add_job(7, 1, tmp_path / "b1", ["true"])
    journal.add_job(7, 1, tmp_path / "b1", ["true"])
    assert journal.batches_without_job(7) == [2]
    journal.update_job(7, 1, state="succeeded")
    assert journal.job_counts(7) == {"succeeded": 1}
    journal.set_state(7, "Done", active=False)
    assert journal.active_runs() == [] and journal.all_runs() == [(7, "Done")]
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite")
    assert reopened.run_state(7) == "Done"
    reopened.close()
