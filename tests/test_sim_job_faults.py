"""Scenario faults beyond the registry: jobs that exit, crash or hang, and raw LS files
that arrive corrupt, late, twice or never.

The scenario checks and the timeline are pure; the faults themselves are observed with
the daemons running against the real registry server, real raw files and real jobs of
the local backend (:mod:`tests.daemon_harness`), the clock injected.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from loop.conddb.client import ConditionsDB
from loop.daemon import Daemon
from loop.errors import ScenarioError
from loop.journal import JobPhase
from loop.rawformat import RawFileError, raw_path, read_raw_ls
from loop.sim import jobfaults
from loop.sim.player import Player
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import JobFaultSpec, RawFaultSpec, RunSpec, Scenario, load_scenario, timeline
from loop.witness import read_marker
from states.step import Step
from tests.conftest import CONFIG_DIR, run_cli
from tests.daemon_harness import SMALL, Harness
from tests.helpers import calibration, reference_payload, workspace
from workers.common import EXIT_BAD_INPUT

JOB_FAULTS = CONFIG_DIR / "scenarios" / "job_faults.yaml"
RUN = 9201
STEPS = ("step2", "step3", "step4")
WORKER_OF = {"reco": "step2", "alca": "step3", "harvest": "step4"}


def _scenario(*faults: JobFaultSpec | RawFaultSpec, ls: int = 4) -> Scenario:
    """One run of ``ls`` LS of the ECAL stream only, with ``faults``."""
    run = RunSpec(run_number=RUN, start=0.0, ls_seconds=1.0, ls_count=ls)
    return Scenario(
        name="faults", seed=5, detectors={"ecal": SMALL}, runs=[run], faults=list(faults)
    )


def _harness(tmp_path: Path, plan: Scenario, job_s: float | None = None) -> Harness:
    """The registry running, the player prepared with the loop's work_dir (so that it
    writes the job fault plan), no event played; ``job_s``: the jobs' time limit."""
    state = tmp_path / "registry_state.json"
    registry = RegistryServer(state).start_background()
    config = workspace(tmp_path, registry_port=registry.port, scenario=plan)
    if job_s is not None:
        timeouts = config.timeouts.model_copy(update={"job_s": job_s})
        config = config.model_copy(update={"timeouts": timeouts})
    player = Player(plan, state, config.raw_root, work_dir=config.work_dir)
    player.prepare()
    return Harness(tmp_path, registry, config, player)


@pytest.fixture
def stop() -> Iterator[list[Harness]]:
    """Harnesses to stop at the end of the test."""
    made: list[Harness] = []
    yield made
    for harness in made:
        harness.stop()


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _done(daemon: Daemon) -> bool:
    return _step(daemon).journal.run_state(RUN) == "Done"


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def _assert_payload(h: Harness, exclude: tuple[int, ...] = ()) -> None:
    """The conditions DB holds the one-shot reference of the run's LS not excluded."""
    cal = calibration(h.loop_config, "EcalPedestals")
    expected, _events = reference_payload(h.loop_config.raw_root, cal, RUN, exclude)
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN)
    np.testing.assert_allclose(conditions.payload(resolved.payload_hash).array(), expected)


def _job_fault(**options: object) -> JobFaultSpec:
    """A fault of the first job of ``RUN`` of a step (given in ``options``)."""
    return JobFaultSpec.model_validate({"target": "job", "run": RUN, "batch": 1, **options})


# ------------------------------------------------------------------ scenario checks


def _write(tmp_path: Path, *faults: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndetectors: {ecal: {}, sistrip: {}}\n"
        "runs: [{run_number: 7, start: 0, ls_count: 3}]\nfaults:\n"
        + "".join(f"  - {fault}\n" for fault in faults)
    )
    return path


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        (["{target: job, kind: crash}"], r"faults\.0\.kind \(line 5\): 'crash' is not one of"),
        (["{target: job, kind: exit, signal: SIGKILL}"], r"faults\.0 \(line 5\): signal applies"),
        (["{target: job, kind: signal, signal: SIGSTOP}"], r"faults\.0\.signal \(line 5\)"),
        (["{target: job, kind: exit, exit_code: 0}"], r"faults\.0\.exit_code \(line 5\)"),
        (
            ["{target: job, kind: hang, run: 8}"],
            r"faults\.0\.run \(line 5\): run 8 is not one of 7",
        ),
        (["{target: raw, kind: never, run: 7, ls: 3-2}"], r"faults\.0\.ls \(line 5\): '3-2' is"),
        (["{target: raw, kind: never, run: 7, ls: [2, 4]}"], r"faults\.0\.ls \(line 5\): run 7"),
        (["{target: raw, kind: late, run: 7, ls: 1}"], r"faults\.0 \(line 5\): a late file needs"),
        (["{target: raw, kind: never, run: 7, ls: 1, how: garble}"], r"how applies to kind corr"),
        (
            ["{target: raw, kind: corrupt, run: 7, ls: 1, detector: hcal}"],
            r"faults\.0\.detector \(line 5\): detector 'hcal' takes no data in run 7",
        ),
        (
            [
                "{target: raw, kind: never, run: 7, ls: 1-2}",
                "{target: raw, kind: late, run: 7, ls: 2, detector: ecal, delay: 5}",
            ],
            r"faults\.1 \(line 6\): ecal run 7 LS 2 is already hit by faults\.0",
        ),
        (["{target: disk, kind: full}"], r"faults\.0\.target \(line 5\): 'disk' is not one of"),
    ],
    ids=[
        "unknown-job-kind",
        "signal-of-an-exit",
        "signal-that-does-not-kill",
        "exit-code-zero",
        "job-of-no-run",
        "backward-ls-range",
        "ls-beyond-the-run",
        "late-without-delay",
        "how-of-a-never",
        "detector-not-in-the-run",
        "two-faults-one-file",
        "unknown-target",
    ],
)
def test_invalid_faults_are_named_by_file_key_and_line(
    tmp_path: Path, faults: list[str], message: str
) -> None:
    path = _write(tmp_path, *faults)
    with pytest.raises(ScenarioError, match=message) as raised:
        load_scenario(path)
    assert str(raised.value).startswith(str(path))


def test_player_without_work_dir_refuses_job_faults(tmp_path: Path) -> None:
    plan = _scenario(JobFaultSpec(target="job", kind="hang"))
    with pytest.raises(ScenarioError, match="has job faults"):
        Player(plan, tmp_path / "state.json", tmp_path / "raw")
    result = run_cli("sim", "play", str(JOB_FAULTS), "--speed", "1000", cwd=tmp_path)
    assert result.returncode == 2 and "--work-dir" in result.stderr, result.stderr
    assert not (tmp_path / "sim").exists()  # refused before anything was written


def test_dry_run_prints_job_and_raw_faults() -> None:
    result = run_cli("sim", "play", str(JOB_FAULTS), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "job fault exit: jobs of step reco, run 389001, batch 1: exits with code 3" in out
    assert "job fault signal: jobs of step alca, run 389001, batch 1: is killed by SIGSEGV" in out
    assert "job fault hang: jobs of step harvest, calibration EcalPedestals" in out
    assert "run 389001 LS 4 closes (raw files written; ecal corrupt (truncate))" in out
    assert "run 389001 LS 7 sistrip file written late, 150 s after its LS closed" in out
    assert "run 389002 LS 5 ecal file written again, with other events" in out
    assert "run 389002 LS 8 closes (raw files written; ecal never written)" in out


def test_timeline_places_late_and_repeated_files() -> None:
    plan = _scenario(
        RawFaultSpec(target="raw", kind="late", run=RUN, ls=1, delay=10),
        RawFaultSpec(target="raw", kind="twice", run=RUN, ls="2-3", delay=0.5),
    )
    events = timeline(plan)
    writes = [(e.at, e.ls) for e in events if e.kind == "raw_write"]
    assert writes == [(2.5, 2), (3.5, 3), (11.0, 1)]
    assert [e.kind for e in events[-2:]] == ["run_end", "raw_write"]  # LS 1 after the end


# ------------------------------------------------------------------ the player


def test_player_writes_raw_faults(tmp_path: Path) -> None:
    plan = _scenario(
        RawFaultSpec(target="raw", kind="corrupt", run=RUN, ls=1, how="garble"),
        RawFaultSpec(target="raw", kind="corrupt", run=RUN, ls=2),
        RawFaultSpec(target="raw", kind="never", run=RUN, ls=3),
        RawFaultSpec(target="raw", kind="twice", run=RUN, ls=4, identical=False),
    )
    clock = iter(range(1_000_000))
    player = Player(
        plan, tmp_path / "s.json", tmp_path, clock=lambda: float(next(clock)), sleep=lambda _: None
    )
    first: dict[int, np.ndarray] = {}
    for event in timeline(plan):
        if event.kind == "raw_write":
            first[event.ls] = read_raw_ls(raw_path(tmp_path, "ecal", RUN, event.ls)).frames
        player.apply(event)
    for ls, reason in ((1, "unreadable"), (2, "unreadable")):
        with pytest.raises(RawFileError, match=reason):
            read_raw_ls(raw_path(tmp_path, "ecal", RUN, ls))
    assert not raw_path(tmp_path, "ecal", RUN, 3).exists()
    again = read_raw_ls(raw_path(tmp_path, "ecal", RUN, 4)).frames
    assert again.shape == first[4].shape and not np.array_equal(again, first[4])
    assert player.report.raw_files == 4  # 1, 2, 4 twice
    assert not any(
        p.name.startswith(".") for p in raw_path(tmp_path, "ecal", RUN, 1).parent.iterdir()
    )


def test_plan_is_replaced_and_removed_by_later_plays(tmp_path: Path) -> None:
    work = tmp_path / "work"
    fault = JobFaultSpec(target="job", kind="exit", step="alca", run=RUN, exit_code=9)
    Player(_scenario(fault), tmp_path / "s.json", tmp_path / "raw", work_dir=work).prepare()
    assert jobfaults.read_plan(jobfaults.plan_path(work)) == [fault]
    Player(_scenario(), tmp_path / "s.json", tmp_path / "raw", work_dir=work).prepare()
    assert jobfaults.read_plan(jobfaults.plan_path(work)) is None


@pytest.mark.parametrize(
    ("batch", "attempt", "stderr_is_log", "returncode"),
    [
        (1, 1, True, -signal.SIGKILL),  # selected: killed
        (1, 2, True, EXIT_BAD_INPUT),  # a later attempt runs normally (and fails here)
        (2, 1, True, EXIT_BAD_INPUT),  # another batch
        (1, 1, False, EXIT_BAD_INPUT),  # not run as an attempt: its stderr is no job log
    ],
    ids=["selected", "later-attempt", "other-batch", "not-a-job-attempt"],
)
def test_worker_plays_the_fault_of_its_job_and_attempt(
    tmp_path: Path, batch: int, attempt: int, stderr_is_log: bool, returncode: int
) -> None:
    """A worker finds the plan from its job directory and its attempt from its log; it
    runs normally (here: fails on its unreadable configuration) when not selected."""
    work = tmp_path / "work"
    jobfaults.write_plan(work, [_job_fault(kind="signal", step="alca", signal="SIGKILL")])
    job_dir = work / "EcalPedestals" / f"run{RUN}" / "step3" / f"batch{batch:04d}"
    job_dir.mkdir(parents=True)
    (job_dir / "calibration.json").write_text("not a configuration")
    log = job_dir / f"stderr.{attempt}.log" if stderr_is_log else tmp_path / "stderr.txt"
    argv = ["--calibration", str(job_dir / "calibration.json"), "--output-dir", str(job_dir)]
    with log.open("wb") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "workers.alca", *argv, "reco.h5"], stderr=stderr, check=False
        )
    assert result.returncode == returncode, log.read_text()
    assert ("simulated job fault" in log.read_text()) == (returncode == -signal.SIGKILL)


# ------------------------------------------------------------------ with the daemons


@pytest.mark.parametrize(
    ("fault", "first_exit"),
    [
        (_job_fault(kind="exit", step="reco", exit_code=7, attempts=2), 7),
        (_job_fault(kind="signal", step="alca", signal="SIGSEGV"), -11),
        (_job_fault(kind="hang", step="harvest", calibration="EcalPedestals"), 124),
    ],
    ids=["exit", "signal", "hang"],
)
def test_job_fault_fails_attempts_then_the_retry_succeeds(
    tmp_path: Path,
    stop: list[Harness],
    caplog: pytest.LogCaptureFixture,
    fault: JobFaultSpec,
    first_exit: int,
) -> None:
    """The first ``attempts`` attempts of the job fail as the fault says (the wrapper
    records the exit code, the signal as a negative code, or the time-out); the daemon
    retries and the next attempt succeeds; the payload is the one without faults."""
    timed_out = fault.kind == "hang"
    plan = _scenario(fault)
    h = _harness(tmp_path, plan, job_s=2.0 if timed_out else None)
    stop.append(h)
    h.edit_calibration("EcalPedestals", {"step2": {"min_ls_per_job": 4, "max_ls_per_job": 4}})
    daemons = {step: h.start(step, "EcalPedestals") for step in STEPS}
    h.play()
    with caplog.at_level(logging.WARNING):
        h.run_until(lambda: _done(daemons["step4"]), timeout=90)
    assert fault.step is not None
    faulted = _step(daemons[WORKER_OF[fault.step]])
    job = faulted.journal.jobs(run=RUN)[0]
    assert job.state is JobPhase.SUCCEEDED and job.attempts == fault.attempts + 1
    for attempt in range(1, fault.attempts + 1):
        status = json.loads((job.job_dir / f"exit_status.{attempt}.json").read_text())
        assert (status["exit_code"], status["timed_out"]) == (first_exit, timed_out)
        log = (job.job_dir / f"stderr.{attempt}.log").read_text()
        assert f"simulated job fault (scenario plan, attempt {attempt})" in log
    last = json.loads((job.job_dir / f"exit_status.{job.attempts}.json").read_text())
    assert last["exit_code"] == 0
    retried = _messages(caplog, "job failed; retrying")
    assert len(retried) == fault.attempts
    reason = "timeout" if timed_out else f"exit code {first_exit}"
    assert all(reason in r for r in retried), retried
    for step, daemon in daemons.items():  # the other steps' jobs never failed
        if step != faulted.name:
            assert all(j.attempts == 1 for j in _step(daemon).journal.jobs(run=RUN))
    _assert_payload(h)


def test_raw_faults_bad_missing_late_and_duplicate(
    tmp_path: Path, stop: list[Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """LS 2 corrupt: reported bad with its reason; LS 3 never written: reported missing;
    LS 4 late, after the run's end: processed; LS 5 written again after its job read
    it: processed once, the rewrite reported and kept out."""
    plan = _scenario(
        RawFaultSpec(target="raw", kind="corrupt", run=RUN, ls=2),
        RawFaultSpec(target="raw", kind="never", run=RUN, ls=3),
        RawFaultSpec(target="raw", kind="late", run=RUN, ls=4, delay=10),
        RawFaultSpec(target="raw", kind="twice", run=RUN, ls=5, delay=0.5),
        ls=6,
    )
    h = _harness(tmp_path, plan)
    stop.append(h)
    h.edit_calibration(
        "EcalPedestals", {"step2": {"min_ls_per_job": 1, "max_ls_per_job": 1, "max_wait_s": 2}}
    )
    daemons = {step: h.start(step, "EcalPedestals") for step in STEPS}
    step2 = _step(daemons["step2"])
    ls5 = raw_path(h.loop_config.raw_root, "ecal", RUN, 5)
    with caplog.at_level(logging.WARNING):
        h.play(until=5.0)
        h.run_until(lambda: step2.journal.input_batch(RUN, ls5.name) is not None)
        h.play(until=5.5)  # LS 5 again
        h.run_until(lambda: step2.journal.info(RUN).rewritten == [ls5.name])
        h.play(until=6.0)  # LS 6 and the run's end
        h.run_until(lambda: step2.journal.info(RUN).ended)
        assert step2.journal.run_state(RUN) != "Done"  # waiting for LS 3 and 4
        h.play()  # LS 4, late
        h.run_until(lambda: _done(daemons["step4"]), timeout=90)
    ls2 = raw_path(h.loop_config.raw_root, "ecal", RUN, 2)
    end = read_marker(step2.marker_path(RUN))
    assert list(end.bad_inputs) == [ls2.name] and "unreadable" in end.bad_inputs[ls2.name]
    assert "LS never arrived: [3]" in end.reason
    assert f"rewritten after processing, kept out: ['{ls5.name}']" in end.reason
    [missing] = _messages(caplog, "LS files never arrived")
    assert "[3]" in missing
    processed = sorted(Path(i).name for witness in end.witnesses.values() for i in witness.inputs)
    names = [raw_path(Path(), "ecal", RUN, ls).name for ls in (1, 2, 4, 5, 6)]
    assert processed == names  # the late LS 4 included, LS 5 once
    assert len(step2.journal.jobs(run=RUN)) == 5
    assert len(_messages(caplog, "rewritten after it was processed")) == 1
    _assert_payload(h, exclude=(2, 3))  # LS 5 was written again identical
