"""``depends_on`` at run time: B's step 4 waits until A's step 4 has finished the run,
harvests with A's payload, names A's version in its provenance, and follows its
``step4.on_dependency_missing`` policy when A has no payload for the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.config import DependencyPolicy, dump_yaml
from loop.daemon import Daemon
from loop.journal import Journal
from loop.sim.scenario import RunSpec
from loop.store import CalibStore
from states import STEPS
from states.dependencies import (
    DependencyError,
    DependencyInput,
    DependencyState,
    awaited,
    dependency_state,
    resolve,
)
from states.step import Step
from tests.daemon_harness import Harness, harness, scenario
from tests.helpers import calibration, workspace

A, B = "EcalPedestals", "EcalPedestalsB"
A_DETECTOR, A_CTYPE = "ecal-0001", "pedestals"
R1, R2 = 9401, 9402


# ------------------------------------------------------------------------- helpers


def _run(number: int, start: float = 0.0) -> RunSpec:
    return RunSpec(run_number=number, start=start, ls_seconds=1.0, ls_count=3)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _state(daemon: Daemon, run: int) -> str | None:
    return _step(daemon).journal.run_state(run)


def add_dependent(h: Harness, policy: str) -> None:
    """B: a copy of A with its own name, ctype and tag that depends on A."""
    data = yaml.safe_load((h.loop_config.calibrations_dir / f"{A}.yaml").read_text())
    data.update(name=B, label="ECAL pedestals, second pass", depends_on=[A])
    data["payload"].update(ctype="pedestals_b", destination_tag="EcalPedestalsB_prompt_v1")
    data["step4"]["on_dependency_missing"] = policy
    dump_yaml(h.loop_config.calibrations_dir / f"{B}.yaml", data)


def _journal(work_dir: Path, name: str, step: str, run: int, state: str, **info: object) -> None:
    journal = Journal(work_dir / name / f"{step}.journal.sqlite")
    try:
        journal.ensure_run(run, state, 0.0)
        journal.set_state(run, state)
        if info:
            journal.update_info(run, **info)
    finally:
        journal.close()


# ------------------------------------------------------------ reading A's journals


def test_a_missing_journal_or_run_is_not_seen_yet(tmp_path: Path) -> None:
    assert dependency_state(tmp_path, A, R1) == DependencyState(A, None, None)
    assert not (tmp_path / A).exists()  # read-only: no journal created
    _journal(tmp_path, A, "step2", R2, "WaitingForLS")
    state = dependency_state(tmp_path, A, R1)
    assert not state.finished and state.describe() == f"{A}: run not seen yet"
    _journal(tmp_path, A, "step3", R2, "WaitingForFiles")
    upstream = dependency_state(tmp_path, A, R2)
    assert not upstream.finished and upstream.describe() == f"{A}: WaitingForFiles in step3"


def test_step4_states_decide_and_done_carries_the_accepted_version(tmp_path: Path) -> None:
    _journal(tmp_path, A, "step2", R1, "Done")
    _journal(tmp_path, A, "step4", R1, "WaitingForHarvest")
    running = dependency_state(tmp_path, A, R1)
    assert (running.step, running.finished) == ("step4", False)
    _journal(tmp_path, A, "step4", R1, "Done", accepted_version="v0003")
    done = dependency_state(tmp_path, A, R1)
    assert done.finished and done.accepted and done.accepted_version == "v0003"
    assert done.describe() == f"{A}: Done, version v0003"


def test_a_run_stopped_upstream_is_finished_without_a_payload(tmp_path: Path) -> None:
    _journal(tmp_path, A, "step2", R1, "Skipped")
    state = dependency_state(tmp_path, A, R1)
    assert state.finished and not state.accepted
    assert state.describe() == f"{A}: Skipped in step2"
    _journal(tmp_path, A, "step2", R2, "Done")
    passed_on = dependency_state(tmp_path, A, R2)
    assert not passed_on.finished and passed_on.describe() == f"{A}: Done in step2"
    _journal(tmp_path, A, "step3", R2, "Failed")
    assert dependency_state(tmp_path, A, R2).describe() == f"{A}: Failed in step3"


@pytest.mark.parametrize(
    ("state", "policy", "waits"),
    [
        (DependencyState(A, None, None), "use_previous", True),
        (DependencyState(A, "step4", "Uploading"), "fail", True),
        (DependencyState(A, "step4", "Done", "v0001"), "wait", False),
        (DependencyState(A, "step4", "Failed"), "use_previous", False),
        (DependencyState(A, "step4", "Failed"), "fail", False),
        (DependencyState(A, "step4", "Failed"), "wait", True),
        (DependencyState(A, "step4", "Done"), "wait", True),  # done without a payload
        (DependencyState(A, "step2", "Skipped"), "wait", True),
    ],
)
def test_what_a_run_waits_for_under_each_policy(
    state: DependencyState, policy: DependencyPolicy, waits: bool
) -> None:
    assert awaited([state], policy) == ((state.describe(),) if waits else ())


def test_resolve_takes_the_final_version_or_the_previous_one_or_refuses(tmp_path: Path) -> None:
    store = CalibStore(tmp_path / "calib")
    earlier = store.detector(A_DETECTOR, create=True).add(A_CTYPE, np.arange(4.0), begin=R1)
    configs = {A: calibration(workspace(tmp_path / "ws"), A)}
    final = resolve(R2, [DependencyState(A, "step4", "Done", "v0009")], configs, store, "wait")
    assert final == [DependencyInput(A, A_DETECTOR, A_CTYPE, "v0009", "final")]
    failed = [DependencyState(A, "step4", "Failed")]
    previous = resolve(R2, failed, configs, store, "use_previous")
    assert previous == [DependencyInput(A, A_DETECTOR, A_CTYPE, earlier, "previous")]
    with pytest.raises(
        DependencyError, match=r"Failed in step4 \(step4.on_dependency_missing: fail"
    ):
        resolve(R2, failed, configs, store, "fail")
    with pytest.raises(DependencyError, match="no earlier payload"):
        resolve(R1 - 1, failed, configs, store, "use_previous")


# ------------------------------------------------------------- with the daemons


def test_b_waits_for_a_then_names_its_version_and_uses_the_previous_when_a_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, scenario(_run(R1), _run(R2, start=5), streams=("ecal",)))
    try:
        add_dependent(h, "use_previous")
        for step in ("step2", "step3"):
            h.start(step, A)
        b4 = [h.start(step, B) for step in STEPS][-1]
        h.play(until=4)  # run 1 only
        h.run_until(lambda: _step(b4).journal.info(R1).upstream_complete, timeout=90)
        h.cycle()
        # everything of B's step 3 is in; with no step 4 of A, B's step 4 waits
        assert _state(b4, R1) == "WaitingForDependencies"
        assert not _step(b4).journal.jobs()
        status = _step(b4).status()
        waits_for = status["runs_waiting_for_dependencies"][str(R1)]
        assert re.fullmatch(rf"{A}: \w+ in step[23]", waits_for), waits_for
        assert status["runs_in_flight"][str(R1)] == f"WaitingForDependencies ({waits_for})"

        a4 = h.start("step4", A)
        publish = _step(a4).publish

        def broken(run: int) -> None:
            if run == R2:
                raise ValueError("simulated: A's harvest of run 2 is unusable")
            publish(run)

        monkeypatch.setattr(_step(a4), "publish", broken)
        h.run_until(lambda: _state(a4, R1) == _state(b4, R1) == "Done", timeout=90)
        h.play()  # run 2: A fails it, B takes A's payload of run 1
        h.run_until(lambda: _state(a4, R2) == "Failed" and _state(b4, R2) == "Done", timeout=90)
        a_version = _step(a4).journal.info(R1).accepted_version
        assert a_version is not None
        store = CalibStore(h.loop_config.store_root)
        b_detector = store.detector(A_DETECTOR)
        for run, source in ((R1, "final"), (R2, "previous")):
            expected = [
                {
                    "calibration": A,
                    "detector": A_DETECTOR,
                    "ctype": A_CTYPE,
                    "version": a_version,
                    "source": source,
                }
            ]
            version = _step(b4).journal.info(run).accepted_version
            assert version is not None
            metadata = b_detector.get("pedestals_b", version=version).metadata
            assert metadata["inputs"] == expected, run
            summary = json.loads((_step(b4).step_dir(run) / "summary.json").read_text())
            assert summary["inputs"] == expected
            [job, *_] = _step(b4).journal.jobs(run=run)
            staged = job.argv[job.argv.index("--dependency") + 1]
            assert staged.startswith(f"{A}=")
            np.testing.assert_array_equal(
                np.load(staged.split("=", 1)[1]),
                store.detector(A_DETECTOR).get(A_CTYPE, version=a_version).array,
            )
    finally:
        h.stop()


def test_policy_fail_sends_b_to_failed_when_a_skipped_the_run(tmp_path: Path) -> None:
    h = harness(tmp_path, scenario(_run(R1), streams=("ecal",)))
    try:
        add_dependent(h, "fail")
        h.edit_calibration(A, {"run_selection": {"run_types": ["cosmics"]}})  # not this run
        a2 = h.start("step2", A)
        b4 = [h.start(step, B) for step in STEPS][-1]
        h.play()
        h.run_until(lambda: _state(b4, R1) == "Failed", timeout=90)
        assert _state(a2, R1) == "Skipped"
        failure = _step(b4).journal.info(R1).failure
        assert failure is not None and failure["state"] == "WaitingForDependencies"
        assert f"{A}: Skipped in step2" in failure["message"]
        assert "on_dependency_missing: fail" in failure["message"]
        assert not _step(b4).journal.jobs()  # nothing harvested
    finally:
        h.stop()
