"""What an operator does on shift, with the daemons running: retry a failed run, skip
one, and read a status that tells the truth (exit status included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import ConditionsDB
from loop.daemon import Daemon
from loop.errors import StoreError
from loop.sim.scenario import RunSpec
from states.step import Step
from tests.conftest import run_cli
from tests.daemon_harness import Harness, harness, scenario
from tests.helpers import calibration, reference_payload
from tests.infra.postgres import free_port

RUN_A, RUN_B = 9301, 9302
CAL = "EcalPedestals"


def _run(number: int, start: float = 0.0) -> RunSpec:
    return RunSpec(run_number=number, start=start, ls_seconds=1.0, ls_count=4)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _state(daemon: Daemon, run: int) -> str | None:
    return _step(daemon).journal.run_state(run)


def _cli(h: Harness, *args: str) -> tuple[int, str]:
    result = run_cli(*args, "--config", str(h.root / "config" / "loop.yaml"))
    return result.returncode, result.stdout + result.stderr


def test_a_failed_run_is_retried_and_gives_the_clean_payload_and_skip_closes_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, scenario(_run(RUN_A), _run(RUN_B, start=5)))
    try:
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        step3 = _step(daemons[1])
        original = step3.make_batches

        def broken(run: int, *, final: bool) -> list[int]:
            if run == RUN_A:
                raise ValueError("corrupt reco output (simulated bad input)")
            return original(run, final=final)

        monkeypatch.setattr(step3, "make_batches", broken)
        # run B is skipped on purpose before its data arrives: no step processes it
        code, out = _cli(
            h, "runs", "skip", "-c", CAL, str(RUN_B), "--reason", "test", "--wait", "0"
        )
        assert code == 0 and "queued" in out
        h.cycle()
        assert [_state(d, RUN_B) for d in daemons] == ["Skipped"] * 3
        h.play()
        h.run_until(lambda: _state(daemons[1], RUN_A) == "Failed")
        assert not any(_step(d).journal.jobs(run=RUN_B) for d in daemons)
        code, out = _cli(h, "runs", "list", "-c", CAL, "--json")
        rows = {row["run"]: row for row in json.loads(out)}
        assert rows[RUN_A]["states"]["step3"] == "Failed"
        assert "corrupt reco output" in rows[RUN_A]["failure"]["message"]
        assert rows[RUN_B]["states"]["step2"] == "Skipped"

        monkeypatch.undo()  # the cause is fixed
        code, out = _cli(
            h, "runs", "retry", "-c", CAL, str(RUN_A), "--reason", "reco fixed", "--wait", "0"
        )
        assert code == 0 and "step3" in out, out
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Done", timeout=90)
        cal = calibration(h.loop_config, CAL)
        expected, _ = reference_payload(h.loop_config.raw_root, cal, RUN_A)
        stored = _step(daemons[2]).store.detector(cal.detector).get("pedestals", run=RUN_A)  # type: ignore[attr-defined]
        np.testing.assert_allclose(stored.array, expected, rtol=1e-9)

        code, out = _cli(h, "runs", "show", "-c", CAL, str(RUN_A), "--json")
        shown = json.loads(out)["steps"]["step3"]
        states = [entry["state"] for entry in shown["history"]]
        assert "Failed" in states and states[-1] == "Done"
        [command] = shown["commands"]
        assert (command["action"], command["state"], command["reason"]) == (
            "retry",
            "done",
            "reco fixed",
        )
        code, out = _cli(h, "runs", "retry", "-c", CAL, str(RUN_A), "--reason", "x", "--wait", "0")
        assert code != 0 and "not Failed" in out  # nothing to retry any more: one line
        assert "Traceback" not in out
    finally:
        h.stop()


def test_status_json_reports_failed_runs_pending_uploads_and_unreachable_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness(tmp_path, scenario(_run(RUN_A), _run(RUN_B, start=5)))
    dead = f"http://127.0.0.1:{free_port()}"  # a conditions-DB service that is down
    h.loop_config = h.loop_config.model_copy(update={"conddb_url": dead})
    try:
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        step3 = _step(daemons[1])
        original = step3.make_batches

        def broken(run: int, *, final: bool) -> list[int]:
            if run == RUN_B:
                raise ValueError("corrupt reco output")
            return original(run, final=final)

        monkeypatch.setattr(step3, "make_batches", broken)
        h.play()
        h.run_until(
            lambda: (
                _state(daemons[1], RUN_B) == "Failed"
                and _state(daemons[2], RUN_A) == "WaitingForUpload"
                and _step(daemons[2]).status()["conditions_db"]["reachable"] is False
            ),
            timeout=90,
        )
        for daemon in daemons:
            daemon._heartbeat(h.clock())
        result = run_cli("status", "--config", str(h.root / "config" / "loop.yaml"), "--json")
        assert result.returncode == 1  # something needs an operator
        rows = {row["step"]: row for row in json.loads(result.stdout)}
        assert rows["step3"]["runs_needing_attention"][str(RUN_B)].startswith("Failed (")
        assert rows["step4"]["uploads_waiting"][0]["run"] == RUN_A
        assert rows["step4"]["conditions_db"]["reachable"] is False
        assert "Connection refused" in rows["step4"]["conditions_db"]["last_error"]
        assert rows["step2"]["registry"]["reachable"] is True
        assert rows["step4"]["config"]["config_sha256"]
        text = run_cli("status", "--config", str(h.root / "config" / "loop.yaml"))
        assert "CONDITIONS_DB UNREACHABLE" in text.stdout and "upload(s) waiting" in text.stdout
    finally:
        h.stop()


def test_a_run_failed_while_publishing_is_published_on_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A harvest that succeeded but whose publication failed is published when the run
    is retried (it used to wait in WaitingForFiles forever)."""
    h = harness(tmp_path, scenario(_run(RUN_A)))
    try:
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]

        def store_down(run: int) -> None:
            raise StoreError(f"store lock not acquired for run {run}")

        monkeypatch.setattr(_step(daemons[2]), "publish", store_down)
        h.play()
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Failed", timeout=90)
        monkeypatch.undo()
        code, out = _cli(h, "runs", "retry", "-c", CAL, str(RUN_A), "--reason", "ok", "--wait", "0")
        assert code == 0, out
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Done", timeout=60)
        summary = json.loads((_step(daemons[2]).step_dir(RUN_A) / "summary.json").read_text())
        assert (summary["outcome"], summary["upload"]) == ("accepted", "done")
    finally:
        h.stop()


def test_a_finished_run_is_recalibrated_with_the_current_configuration(tmp_path: Path) -> None:
    """``runs rerun``: step 4 harvests the finished run again from all its inputs (not
    merged with the earlier harvests) with the edited configuration: a new version,
    equal to the reference, uploaded; the run finishes again; a run not finished is
    refused in one line."""
    h = harness(tmp_path, scenario(_run(RUN_A)))
    try:
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        step4 = _step(daemons[2])
        code, out = _cli(h, "runs", "rerun", "-c", CAL, str(RUN_A), "--reason", "x", "--wait", "0")
        assert code != 0 and "not seen in step4" in out and "Traceback" not in out
        h.play()
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Done", timeout=90)
        first = step4.journal.info(RUN_A)
        harvests = step4.journal.batch_count(RUN_A)

        h.edit_calibration(CAL, {"validation": {"min_events": 60}})  # a new threshold
        daemons[2].request_reload()
        code, out = _cli(
            h, "runs", "rerun", "-c", CAL, str(RUN_A), "--reason", "new thresholds", "--wait", "0"
        )
        assert code == 0 and "step4" in out, out
        h.run_until(
            lambda: (
                _state(daemons[2], RUN_A) == "Done"
                and step4.journal.info(RUN_A).accepted_version not in (None, first.accepted_version)
            ),
            timeout=90,
        )
        again = step4.journal.info(RUN_A)
        assert step4.journal.batch_count(RUN_A) == harvests + 1
        assert again.last_config_sha256 != first.last_config_sha256
        cal = calibration(h.loop_config, CAL)
        expected, _ = reference_payload(h.loop_config.raw_root, cal, RUN_A)
        detector = step4.store.detector(cal.detector)
        stored = detector.get("pedestals", version=again.accepted_version)
        np.testing.assert_allclose(stored.array, expected, rtol=1e-9)  # every input, once
        assert stored.metadata["harvest_key"].endswith(f"harvest{harvests + 1}")
        summary = json.loads((step4.step_dir(RUN_A) / "summary.json").read_text())
        assert (summary["uploaded_version"], summary["upload"]) == (again.accepted_version, "done")

        code, out = _cli(h, "runs", "show", "-c", CAL, str(RUN_A), "--json")
        shown = json.loads(out)["steps"]["step4"]
        [command] = shown["commands"]
        assert (command["action"], command["state"]) == ("rerun", "done")
        assert [entry["state"] for entry in shown["history"]].count("Done") == 2
    finally:
        h.stop()


def test_an_expert_approves_a_rejected_payload_which_is_then_uploaded(tmp_path: Path) -> None:
    """``runs approve``: a Rejected run's payload (stored retired, not uploaded) is stored
    again as an accepted version naming the approval and the overridden problems, is
    uploaded, and the run ends Done; a run that is not Rejected is refused in one line."""
    h = harness(tmp_path, scenario(_run(RUN_A)))
    try:
        h.edit_calibration(CAL, {"validation": {"min_events": 10**6}})  # every payload fails
        daemons = [h.start(step, CAL) for step in ("step2", "step3", "step4")]
        step4 = _step(daemons[2])
        code, out = _cli(h, "runs", "approve", "-c", CAL, str(RUN_A), "--reason", "x")
        assert code != 0 and "only a Rejected run" in out and "Traceback" not in out
        h.play()
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Rejected", timeout=90)
        rejected = step4.journal.info(RUN_A).last_version
        assert step4.journal.uploads(states=("pending", "done")) == []

        code, out = _cli(
            h, "runs", "approve", "-c", CAL, str(RUN_A), "--reason", "low stats ok", "--wait", "0"
        )
        assert code == 0 and "step4" in out, out
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Done", timeout=60)
        record = step4.journal.info(RUN_A)
        cal = calibration(h.loop_config, CAL)
        detector = step4.store.detector(cal.detector)
        approved = detector.get(cal.payload.ctype, version=record.accepted_version)
        original = detector.get(cal.payload.ctype, version=rejected)
        assert record.accepted_version != rejected and original.retired and not approved.retired
        np.testing.assert_array_equal(approved.array, original.array)
        approval = approved.metadata["approved"]
        assert approval["version"] == rejected and approval["reason"] == "low stats ok"
        assert "validation.min_events" in approval["overridden_problems"][0]
        summary = json.loads((step4.step_dir(RUN_A) / "summary.json").read_text())
        assert (summary["outcome"], summary["upload"]) == ("accepted", "done")
        assert summary["uploaded_version"] == record.accepted_version
        conditions = ConditionsDB.connect(h.loop_config.conddb_url)
        resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN_A)
        np.testing.assert_array_equal(
            conditions.payload(resolved.payload_hash).array(), original.array
        )
    finally:
        h.stop()
