"""End to end through real processes: the demo's scenario with the daemons of its six
calibrations, and the quickstart with every daemon SIGKILLed at random moments (at least
20 kills)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import ConditionsDB
from loop.conddb.db import NotFound
from loop.config import CalibrationConfig, LoopConfig, load_all_calibrations, load_loop_config
from loop.demo import (
    ProcessGroup,
    format_table,
    is_complete,
    run_demo,
    set_registry_url,
    start_daemons,
    start_registry,
    wait_running,
    write_workspace,
)
from loop.journal import Journal
from loop.sim.scenario import Scenario, load_scenario
from loop.store import CalibStore
from loop.witness import read_marker
from tests.conftest import CONFIG_DIR, run_cli
from tests.helpers import reference_payload

QUICKSTART = CONFIG_DIR / "scenarios" / "quickstart.yaml"
DEMO = CONFIG_DIR / "scenarios" / "demo.yaml"


def _per_run(cal: CalibrationConfig) -> bool:
    """A payload per run of a built-in kind :func:`reference_payload` recomputes."""
    return (
        cal.kind in ("pedestals", "bad_channels")
        and cal.payload.time_type == "run"
        and not cal.statistics.across_runs
    )


def check_against_reference(loop_config: LoopConfig, scenario: Scenario) -> None:
    """No LS was lost or processed twice and no upload was duplicated; store and
    conditions DB hold the one-shot reference of every processed run (of each
    calibration with a payload per run, which it recomputes)."""
    calibrations, _ = load_all_calibrations(loop_config.calibrations_dir)
    store = CalibStore(loop_config.store_root)
    conditions = ConditionsDB.connect(loop_config.conddb_url)
    for name, cal in calibrations.items():
        step2 = Journal(loop_config.work_dir / name / "step2.journal.sqlite")
        try:
            history = conditions.iovs(cal.payload.destination_tag, history=True)
        except NotFound:  # nothing uploaded yet (e.g. flagged PMT scans wait for an expert)
            history = []
        duplicates = Counter((i.since, i.payload_hash) for i in history)
        assert not history or max(duplicates.values()) == 1, f"{name}: duplicates {duplicates}"
        for spec in scenario.runs:
            if step2.run_state(spec.run_number) != "Done":
                continue
            run = spec.run_number
            jobs = step2.jobs(run=run)
            assert {j.state for j in jobs} == {"succeeded"}, (name, run, jobs)
            processed = sorted(n for j in jobs for n in step2.inputs_of(run, j.batch))
            assert processed == [f"run{run}_ls{ls:04d}.h5" for ls in range(1, spec.ls_count + 1)]
            step3_end = read_marker(
                loop_config.work_dir / name / f"run{run}" / "step3" / "step3.done"
            )
            assert step3_end.failed_batches == []
            if not _per_run(cal):
                continue
            expected, events = reference_payload(loop_config.raw_root, cal, run)
            final = store.detector(cal.detector).get(cal.payload.ctype, run=run)
            assert final.metadata["quality"]["events"] == events  # none lost, none twice
            resolved = conditions.resolve(tag=cal.payload.destination_tag, run=run)
            uploaded = conditions.payload(resolved.payload_hash).array()
            if cal.kind == "pedestals":
                np.testing.assert_allclose(final.array, expected, rtol=1e-9)
                np.testing.assert_allclose(uploaded, expected, rtol=1e-9)
            else:
                np.testing.assert_array_equal(final.array, expected)
                np.testing.assert_array_equal(uploaded, expected)
        step2.close()
    conditions.close()
    store.close()


def check_standalone_matches_daemons(loop_config: LoopConfig, out: Path) -> None:
    """``calloop calibrations run`` derives the final payload the daemons stored for
    every run they finished with one (Rejected ones included), from the same runs:
    ``--runs`` for payloads of one run, ``--files`` with the raw files of every run a
    multi-run payload used; to the rounding of merging in another grouping."""
    calibrations, _ = load_all_calibrations(loop_config.calibrations_dir)
    store = CalibStore(loop_config.store_root)
    loop_yaml = str(loop_config.calibrations_dir.parent / "loop.yaml")

    def derive(name: str, target: Path, *source: str) -> None:
        done = run_cli(
            "calibrations", "run", name, *source, "--out", str(target), "--config", loop_yaml
        )
        assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: fails validation

    compared = 0
    for name, cal in calibrations.items():
        finals = {}  # the daemons' final version per (first run, runs used)
        for path in (loop_config.work_dir / name).glob("run*/step4/summary.json"):
            summary = json.loads(path.read_text())
            if summary["final_version"] is not None:  # None: e.g. statistics carried on
                finals[tuple(summary["source_runs"])] = summary["final_version"]
        single = sorted(runs[0] for runs in finals if len(runs) == 1)
        if single:
            derive(name, out / name, "--runs", ",".join(map(str, single)))
        for runs in finals:
            if len(runs) > 1:
                stream = loop_config.raw_root / cal.raw_input.stream
                raw = [str(p) for run in runs for p in sorted((stream / f"run{run}").glob("*.h5"))]
                derive(name, out / name / f"range{runs[0]}", "--files", *raw)
        for runs, version in finals.items():
            where = out / name / (f"run{runs[0]}" if len(runs) == 1 else f"range{runs[0]}")
            final = store.detector(cal.detector).get(cal.payload.ctype, version=version)
            derived = np.load(where / "payload.npy")
            np.testing.assert_allclose(derived, final.array, rtol=1e-12, atol=0)
            compared += 1
    assert compared >= len(calibrations)
    store.close()


@pytest.mark.slow
def test_the_demo_through_the_daemons_of_six_calibrations(tmp_path: Path) -> None:
    """``calloop demo``'s scenario: four detectors, six calibrations (one depending on
    another, one per LS group, one accumulating runs, one whose flagged scans wait for
    an expert), every run right against the truth and the one-shot references, and
    ``calibrations run`` gives the daemons' payloads."""
    rows, ok, _seconds = run_demo(tmp_path, DEMO, speed=50, timeout_s=200)
    assert ok, format_table(rows)
    loop_config = load_loop_config(tmp_path / "config" / "loop.yaml")
    calibrations, _ = load_all_calibrations(loop_config.calibrations_dir)
    assert len(calibrations) >= 4 and any(c.depends_on for c in calibrations.values())
    assert {r.calibration for r in rows} == set(calibrations)
    check_against_reference(loop_config, load_scenario(DEMO))
    check_standalone_matches_daemons(loop_config, tmp_path / "standalone")


@pytest.mark.slow
def test_sigkill_every_daemon_at_random_moments(tmp_path: Path) -> None:
    """SIGKILL daemons at random moments while the scenario plays, restart each one at
    once; the results must equal the undisturbed reference exactly."""
    scenario = load_scenario(QUICKSTART)
    loop_yaml = write_workspace(tmp_path, scenario=scenario)
    group = ProcessGroup(tmp_path / "processes")
    rng = random.Random(2026)
    kills = 0
    try:
        set_registry_url(loop_yaml, start_registry(group, tmp_path))
        loop_config = load_loop_config(loop_yaml)
        calibrations = sorted(load_all_calibrations(loop_config.calibrations_dir)[0])
        start_daemons(group, loop_yaml, calibrations)
        player = group.start(
            "player",
            "sim",
            "play",
            str(QUICKSTART),
            "--speed",
            "20",
            "--state",
            str(tmp_path / "registry_state.json"),
            "--raw-root",
            str(loop_config.raw_root),
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = player.poll() is not None and is_complete(loop_config, scenario, calibrations)
            if done and kills >= 20:
                break
            time.sleep(rng.uniform(0.2, 0.8))
            if done:
                continue
            name = rng.choice([n for n in group.procs if n not in ("registry", "player")])
            victim = group.procs[name]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            calibration, step = name.rsplit("-", 1)
            group.start(name, step, "-c", calibration, "--config", str(loop_yaml), "--quiet")
        assert is_complete(loop_config, scenario, calibrations), "scenario did not complete"
        wait_running(group, loop_config)  # a daemon restarted last must be up to stop cleanly
    finally:
        codes = group.stop_all()
    assert kills >= 20
    assert all(code == 0 for name, code in codes.items() if name != "player"), codes
    check_against_reference(loop_config, scenario)
