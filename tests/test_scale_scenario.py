"""The scale scenario (config/scenarios/scale.yaml) and benchmarks/run_end_latency.py: the
scenario is valid and at scale; the benchmark's timestamp extraction and tables work on a
tiny scenario played through the real loop (a few LS, few channels; not the scale run)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from benchmarks.run_end_latency import (
    SCALE,
    STAGES,
    cpu_by_run,
    detail_rows,
    latency_rows,
    measure,
    rss_by_run,
    usage_rows,
)
from loop.config import dump_yaml, load_all_calibrations, load_loop_config
from loop.demo import write_workspace
from loop.sim.scenario import load_scenario, timeline
from tests.conftest import CONFIG_DIR

ECAL_CHANNELS = 75_848


def test_scale_scenario_is_valid_and_at_scale(tmp_path: Path) -> None:
    scenario = load_scenario(SCALE)
    assert scenario.detectors["ecal"].channels == ECAL_CHANNELS
    assert len(scenario.runs) >= 3
    assert all(run.ls_count >= 200 and run.ends for run in scenario.runs)
    calibrations, problems = load_all_calibrations(CONFIG_DIR / "calibrations")
    # the calibrations of the simulated streams (the demo workspace keeps only those)
    fed = [c for c in calibrations.values() if c.raw_input.stream in scenario.detectors]
    assert problems == [] and len(fed) >= 2
    for cal in fed:  # each takes data in every run
        assert all(run.run_type in cal.run_selection.run_types for run in scenario.runs)
    # each run's end is published after its last LS file
    events = timeline(scenario)
    for run in scenario.runs:
        mine = [e for e in events if e.run == run.run_number]
        last_ls, end = mine[-2:]
        assert (last_ls.kind, last_ls.ls, end.kind) == ("ls_close", run.ls_count, "run_end")
        assert last_ls.at == end.at == run.end
    # sane for 2 cores: under 4 MB of uncompressed frames per LS
    per_ls = sum(d.channels * d.events_per_ls * 2 for d in scenario.detectors.values())
    assert per_ls < 4e6
    # the workspace the benchmark builds sizes every calibration to its detector
    loop_config = load_loop_config(write_workspace(tmp_path, scenario=scenario))
    sized, problems = load_all_calibrations(loop_config.calibrations_dir)
    assert problems == []
    assert {c.raw_input.channels for c in sized.values()} == {
        scenario.detectors[c.raw_input.stream].channels for c in sized.values()
    }


def test_daemon_usage_is_summarized_per_run() -> None:
    samples = [
        (9.0, {"A-step2": 500}),  # before any run: ignored
        (10.0, {"A-step2": 100, "A-step3": 50}),
        (12.0, {"A-step2": 120}),
        (20.0, {"A-step2": 110, "A-step3": 70}),
        (25.0, {"A-step2": 90}),
    ]
    peaks = rss_by_run(samples, {2: 20.0, 1: 10.0})
    assert peaks == {"A-step2": {1: 120, 2: 110}, "A-step3": {1: 50, 2: 70}}
    cpu = [(9.0, {"A-step2": 1.0}), (10.0, {"A-step2": 1.5}), (12.0, {"A-step2": 2.0})]
    cpu += [(20.0, {"A-step2": 4.0}), (25.0, {"A-step2": 4.25})]
    assert cpu_by_run(cpu, {1: 10.0, 2: 20.0}) == {"A-step2": {1: 1.0, 2: 2.25}}
    rows = usage_rows(peaks, cpu_by_run(cpu, {1: 10.0, 2: 20.0}), [1, 2])
    assert rows[0] == ["A-step2", "0 / 1.0", "0 / 2.2", f"{(110 - 120) / 1024:.1f}"]
    assert rows[1] == ["A-step3", "0 / -", "0 / -", f"{(70 - 50) / 1024:.1f}"]


@pytest.mark.slow
def test_latency_benchmark_on_a_tiny_scenario(tmp_path: Path) -> None:
    scenario_path = tmp_path / "tiny.yaml"
    dump_yaml(
        scenario_path,
        {
            "name": "tiny",
            "seed": 7,
            "detectors": {
                "ecal": {"channels": 64, "events_per_ls": 100, "dead": 1, "noisy": 1, "hot": 0},
                "sistrip": {"channels": 96, "events_per_ls": 100, "dead": 1, "noisy": 1, "hot": 1},
            },
            "runs": [
                {"run_number": 1001, "start": 20, "ls_seconds": 10, "ls_count": 3},
                {"run_number": 1002, "start": 100, "ls_seconds": 10, "ls_count": 3},
            ],
        },
    )
    result = measure(tmp_path / "loop", scenario_path, speed=25, timeout_s=90)
    assert result.complete and result.ok, result.truth
    assert {(r.calibration, r.run) for r in result.latencies} == set(
        itertools.product(["EcalPedestals", "SiStripBad"], [1001, 1002])
    )
    for r in result.latencies:
        stage = r.stages
        assert all(stage[s] is not None for s in STAGES), r
        assert stage["registry_end"] == 0
        # the last LS file is written before the registry learns of the end; every
        # later stage waits for the one before it; the IOV is resolved after it was
        # inserted (by an earlier harvest, when that one's payload was the same)
        assert stage["last_ls"] <= 0 < stage["step2_done"] <= stage["step3_done"]  # type: ignore[operator]
        assert stage["step3_done"] <= stage["stored"] <= r.detail["s4_done"]  # type: ignore[operator]
        assert r.detail["iov_inserted"] <= stage["iov"]  # type: ignore[operator]
        assert r.detail["s2_last_finish"] <= stage["step2_done"]  # type: ignore[operator]
        assert r.detail["s3_last_finish"] <= stage["step3_done"]  # type: ignore[operator]
        assert r.detail["s4_last_finish"] <= stage["stored"]  # type: ignore[operator]
        assert r.problems == []
    rows = latency_rows(result.latencies)
    assert [row[:2] for row in rows] == [[r.calibration, r.run] for r in result.latencies]
    assert all(row[-1] == "ok" for row in rows)  # a few LS: far under the goal
    assert all(
        len(row) == 2 + len(r.detail)
        for row, r in zip(detail_rows(result.latencies), result.latencies, strict=True)
    )
    peaks = rss_by_run(result.seen.rss_kb, result.seen.run_started)
    assert len(peaks) == 6  # every daemon, sampled in both runs (kB)
    assert all(sorted(p) == [1001, 1002] and min(p.values()) > 10_000 for p in peaks.values())
