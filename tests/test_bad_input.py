"""Nothing lost to bad input, with the daemons running: live config edits, damaged raw
files, temporary files, deleted or forged witnesses, odd LS names and rewritten files.

Real registry server, real raw files, real worker subprocesses; the clock is injected.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.conddb.client import ConditionsDB
from loop.config import dump_yaml
from loop.daemon import Daemon
from loop.jobconfig import FROZEN_CONFIG, load_frozen
from loop.journal import JobPhase
from loop.rawformat import raw_path, read_raw_ls, write_raw_ls
from loop.sim.scenario import RunSpec
from loop.witness import WITNESS_SUFFIX, read_marker
from states.step import Step
from tests.badfiles import DAMAGE
from tests.daemon_harness import Harness, harness, scenario
from tests.helpers import calibration, reference_payload

RUN = 9101
STEPS = ("step2", "step3", "step4")
ONE_LS_PER_JOB = {"step2": {"min_ls_per_job": 1, "max_ls_per_job": 1}}


def _run(number: int = RUN, ls: int = 4, **extra: object) -> RunSpec:
    return RunSpec(run_number=number, start=0.0, ls_seconds=1.0, ls_count=ls, **extra)  # type: ignore[arg-type]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    made = harness(tmp_path, scenario(_run()))
    yield made
    made.stop()


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _state(daemon: Daemon, run: int = RUN) -> str | None:
    return _step(daemon).journal.run_state(run)


def _start_all(h: Harness, name: str) -> list[Daemon]:
    return [h.start(step, name) for step in STEPS]


def _no_job_failed(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        jobs = _step(daemon).journal.jobs()
        assert jobs and all(j.state is JobPhase.SUCCEEDED for j in jobs), [
            (j.run, j.batch, j.state, j.detail) for j in jobs
        ]


def _assert_payload(h: Harness, name: str, exclude: tuple[int, ...] = ()) -> None:
    """Store and conditions DB hold the one-shot reference of the LS not excluded."""
    cal = calibration(h.loop_config, name)
    expected, _events = reference_payload(h.loop_config.raw_root, cal, RUN, exclude)
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN)
    np.testing.assert_allclose(conditions.payload(resolved.payload_hash).array(), expected)
    summary = json.loads(
        (h.loop_config.work_dir / name / f"run{RUN}/step4/summary.json").read_text()
    )
    assert summary["outcome"] == "accepted"


def _messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("sighup", [False, True], ids=["no-reload", "sighup"])
def test_yaml_broken_and_repaired_during_a_run_loses_nothing(
    h: Harness, sighup: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Jobs created while the live YAML is broken run with their frozen copy."""
    h.edit_calibration("EcalPedestals", ONE_LS_PER_JOB)
    path = h.loop_config.calibrations_dir / "EcalPedestals.yaml"
    good = path.read_text()
    daemons = _start_all(h, "EcalPedestals")
    h.play(until=2.5)  # LS 1-2
    h.run_until(lambda: _step(daemons[0]).journal.input_count(RUN) == 2)
    path.write_text(good.replace("max_ls_per_job: 1", "max_ls_per_job: [broken"))
    with caplog.at_level(logging.ERROR):
        if sighup:
            for daemon in daemons:
                daemon.request_reload()
        h.play()  # LS 3-4 and the run end arrive while the YAML is broken
        h.run_until(lambda: _step(daemons[0]).journal.input_count(RUN) == 4)
        h.run_until(lambda: len(_step(daemons[0]).journal.jobs(run=RUN)) == 4)
        for _ in range(10):
            h.cycle()
    if sighup:
        assert len(_messages(caplog, logging.ERROR, "reload rejected")) == 3
    path.write_text(good)
    if sighup:
        for daemon in daemons:
            daemon.request_reload()
    h.run_until(lambda: _state(daemons[2]) == "Done", timeout=90)
    _no_job_failed(daemons)
    _assert_payload(h, "EcalPedestals")
    for job in _step(daemons[0]).journal.jobs(run=RUN):
        frozen = load_frozen(job.job_dir / FROZEN_CONFIG, job.config_sha256)
        assert frozen.step2.max_ls_per_job == 1


def test_reload_applies_live_keys_and_refuses_others_by_name(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    loop_yaml = h.root / "config" / "loop.yaml"
    daemon = Daemon(
        "step2", h.loop_config, "EcalPedestals", clock=h.clock, loop_config_path=loop_yaml
    )
    daemon.initialize()
    h.daemons.append(daemon)
    h.edit_calibration("EcalPedestals", {"step2": {"max_ls_per_job": 6}})  # live
    daemon.request_reload()
    h.cycle()
    assert _step(daemon).calibration.step2.max_ls_per_job == 6
    h.edit_calibration("EcalPedestals", {"raw_input": {"stream": "other"}, "label": "new"})
    data = yaml.safe_load(loop_yaml.read_text())
    data["poll"]["observer"] = "polling"
    dump_yaml(loop_yaml, data)
    with caplog.at_level(logging.ERROR):
        daemon.request_reload()
        h.cycle()
    [refused] = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert "raw_input.stream" in refused.getMessage()
    assert "loop.poll.observer" in refused.getMessage()
    assert "label" not in refused.getMessage().split("keys")[1]  # only the blocking keys
    assert _step(daemon).calibration.raw_input.stream == "ecal"
    assert _step(daemon).calibration.label != "new"  # all or nothing


# --------------------------------------------------------------------- raw files


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, "EcalPedestals") for kind in DAMAGE] + [("nan", "SiStripBad")],
)
def test_bad_raw_file_drops_only_its_ls(
    h: Harness, kind: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    h.edit_calibration(name, {"step2": {"min_ls_per_job": 4, "max_ls_per_job": 4}})
    h.play()
    stream = calibration(h.loop_config, name).raw_input.stream
    bad = raw_path(h.loop_config.raw_root, stream, RUN, 2)
    damage, reason = DAMAGE[kind]
    damage(bad)
    daemons = _start_all(h, name)
    with caplog.at_level(logging.ERROR):
        h.run_until(lambda: _state(daemons[2]) == "Done", timeout=90)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(bad) in errors[0] and reason in errors[0], errors
    _no_job_failed(daemons)  # one batch of 4 LS: its job succeeded with 3 of them
    _assert_payload(h, name, exclude=(2,))
    end = read_marker(_step(daemons[0]).marker_path(RUN))
    assert list(end.bad_inputs) == [bad.name] and reason in end.bad_inputs[bad.name]
    summary = json.loads((_step(daemons[2]).step_dir(RUN) / "summary.json").read_text())
    assert list(summary["bad_inputs"]) == [bad.name]


def test_ls_file_names_are_canonical(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """``ls00001`` is a second name for LS 1: warned once, never processed twice."""
    h.play()
    first = raw_path(h.loop_config.raw_root, "ecal", RUN, 1)
    shutil.copy(first, first.with_name(f"run{RUN}_ls00001.h5"))
    shutil.copy(first, first.with_name(f"run{RUN}_ls0000.h5"))  # there is no LS 0
    with caplog.at_level(logging.WARNING):
        step2 = h.start("step2", "EcalPedestals")
        h.run_until(lambda: _state(step2) == "Done")
    assert _step(step2).journal.input_count(RUN) == 4
    warned = _messages(caplog, logging.WARNING, "not a canonical LS file name")
    assert len(warned) == 2 and any("ls00001" in w for w in warned)
    processed = [
        Path(i).name
        for witness in read_marker(_step(step2).marker_path(RUN)).witnesses.values()
        for i in witness.inputs
    ]
    assert sorted(processed) == [raw_path(Path(), "ecal", RUN, ls).name for ls in range(1, 5)]


def test_completeness_is_the_set_of_ls_numbers(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An extra LS 6 must not hide a missing LS 3 (counts would match: 4 files, last 4)."""
    h.edit_calibration("EcalPedestals", {"step2": {"max_wait_s": 1.0}})
    h.play()
    ls3 = raw_path(h.loop_config.raw_root, "ecal", RUN, 3)
    shutil.move(ls3, ls3.with_name(f"run{RUN}_ls0006.h5"))
    with caplog.at_level(logging.WARNING):
        step2 = h.start("step2", "EcalPedestals")
        h.run_until(lambda: _state(step2) == "Done")
    [missing] = _messages(caplog, logging.WARNING, "LS files never arrived")
    assert "[3]" in missing
    end = read_marker(_step(step2).marker_path(RUN))
    assert "LS never arrived: [3]" in end.reason
    assert "header says run 9101 LS 3" in end.bad_inputs[f"run{RUN}_ls0006.h5"]  # renamed LS 3


def test_skip_is_logged_once_with_its_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = harness(tmp_path, scenario(_run(run_type="cosmics")))
    try:
        with caplog.at_level(logging.DEBUG):
            step2 = made.start("step2", "SiStripBad")  # selects collisions only
            made.play(until=2.5)
            made.run_until(lambda: _state(step2) == "Skipped")
            made.play()  # later LS files of the skipped run
            for _ in range(20):
                made.cycle()
        skipped = _messages(caplog, logging.INFO, "run skipped")
        assert len(skipped) == 1 and "run type 'cosmics'" in skipped[0]
        assert _messages(caplog, logging.WARNING, "after the run was closed") == []
        assert _step(step2).journal.info(RUN).skip_reason is not None
    finally:
        made.stop()


def test_ls_file_rewritten_after_processing_is_reported_and_kept_out(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.play()
    step2 = h.start("step2", "EcalPedestals")
    h.run_until(lambda: _state(step2) == "Done")
    path = raw_path(h.loop_config.raw_root, "ecal", RUN, 2)
    jobs_before = len(_step(step2).journal.jobs(run=RUN))
    content = read_raw_ls(path)
    with caplog.at_level(logging.WARNING):
        write_raw_ls(path, content.__class__(**{**content.__dict__, "frames": content.frames[:5]}))
        h.run_until(lambda: bool(_messages(caplog, logging.WARNING, "rewritten")))
        for _ in range(10):
            h.cycle()
    [warning] = _messages(caplog, logging.WARNING, "rewritten")
    assert str(path) in warning
    assert _step(step2).journal.info(RUN).rewritten == [path.name]
    assert len(_step(step2).journal.jobs(run=RUN)) == jobs_before  # nothing re-run silently


# ------------------------------------------------------------ outputs and witnesses


def test_stale_temp_file_in_out_is_not_an_output(h: Harness) -> None:
    litter = [
        sys.executable,
        str(Path(__file__).with_name("litter_worker.py")),
        "reco",
        "--calibration",
        "{calibration}",
        "--output-dir",
        "{output_dir}",
        "{inputs}",
    ]
    h.edit_calibration("EcalPedestals", {"step2": {**ONE_LS_PER_JOB["step2"], "command": litter}})
    daemons = _start_all(h, "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(daemons[2]) == "Done", timeout=90)
    for witness in read_marker(_step(daemons[0]).marker_path(RUN)).witnesses.values():
        assert [Path(o.path).name for o in witness.outputs] == ["reco.h5"]
        assert any(Path(o.path).parent.glob(".*.tmp") for o in witness.outputs)
    _no_job_failed(daemons)
    _assert_payload(h, "EcalPedestals")


def test_deleted_witness_does_not_fail_the_run(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.edit_calibration("EcalPedestals", ONE_LS_PER_JOB)
    step2 = h.start("step2", "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(step2) == "Done")
    witness = _step(step2).witness_path(RUN, 2)
    witness.unlink()  # before step 3 saw it
    assert str(witness) in _step(step2).witnesses_of(RUN)  # the writer regenerates it...
    assert witness.exists()
    witness.unlink()  # ...and the reader copes without it
    with caplog.at_level(logging.WARNING):
        step3, step4 = h.start("step3", "EcalPedestals"), h.start("step4", "EcalPedestals")
        h.run_until(lambda: _state(step4) == "Done", timeout=90)
    assert _messages(caplog, logging.WARNING, "taken from the upstream marker")
    _no_job_failed([step2, step3, step4])
    _assert_payload(h, "EcalPedestals")


def test_forged_witnesses_are_refused(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A wrong checksum or an output outside the job directory: that input is bad."""
    h.edit_calibration("EcalPedestals", ONE_LS_PER_JOB)
    step2 = h.start("step2", "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(step2) == "Done")
    forged = {}
    for batch, how in ((2, "checksum"), (3, "outside")):
        path = _step(step2).witness_path(RUN, batch)
        data = json.loads(path.read_text())
        if how == "checksum":
            data["outputs"][0]["sha256"] = "0" * 64
        else:
            outside = h.root / "elsewhere" / "reco.h5"
            outside.parent.mkdir(exist_ok=True)
            shutil.copy(data["outputs"][0]["path"], outside)
            data["outputs"][0]["path"] = str(outside)
        path.write_text(json.dumps(data))
        forged[str(path)] = how
    with caplog.at_level(logging.ERROR):
        step3, step4 = h.start("step3", "EcalPedestals"), h.start("step4", "EcalPedestals")
        h.run_until(lambda: _state(step4) == "Done", timeout=90)
    refused = _messages(caplog, logging.ERROR, "upstream witness refused")
    assert len(refused) == 2
    assert any("SHA-256" in r for r in refused) and any("outside the job" in r for r in refused)
    assert set(_step(step3).journal.bad_inputs(RUN)) == set(forged)
    summary = json.loads((_step(step4).step_dir(RUN) / "summary.json").read_text())
    assert set(forged) <= set(summary["bad_inputs"])
    _assert_payload(h, "EcalPedestals", exclude=(2, 3))
    assert all(p.endswith(WITNESS_SUFFIX) for p in forged)


def test_only_the_final_harvest_is_uploaded_when_intermediates_are_off(h: Harness) -> None:
    h.edit_calibration(
        "EcalPedestals",
        {**ONE_LS_PER_JOB, "step4": {"harvest_every_files": 1, "upload_intermediate": False}},
    )
    daemons = _start_all(h, "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(daemons[2]) == "Done", timeout=90)
    cal = calibration(h.loop_config, "EcalPedestals")
    versions = _step(daemons[2]).store.detector(cal.detector).versions(cal.payload.ctype)  # type: ignore[attr-defined]
    assert len(versions) >= 2  # intermediates stored
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    assert len(conditions.iovs(cal.payload.destination_tag, history=True)) == 1
    _assert_payload(h, "EcalPedestals")
