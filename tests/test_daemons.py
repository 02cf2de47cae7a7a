"""The daemons in-process: each test reproduces a defect of the seed loop and shows it fixed.

Real registry server, real raw files, real worker subprocesses; only the clock is
injected, so a test can jump past the look-back window instead of waiting 8 hours.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.callpolicy import CallPolicy
from loop.conddb.client import ConditionsDB
from loop.conddb.db import ConditionsDatabase, NotFound
from loop.conddb.server import ServiceThread, create_app
from loop.config import dump_yaml, load_loop_config
from loop.daemon import Daemon
from loop.errors import DaemonError
from loop.journal import Journal, NewInput
from loop.logs import get_logger
from loop.outbox import Outbox
from loop.rawformat import raw_path
from loop.sim.scenario import RunSpec
from loop.witness import read_marker
from states.step import Step
from tests.conftest import have, require, run_cli
from tests.daemon_harness import Harness, harness, scenario, slow_command
from tests.helpers import calibration, reference_payload, workspace
from tests.infra.postgres import free_port

RUN_A, RUN_B = 9001, 9002


def _run(number: int, start: float = 0.0, ls: int = 4, ends: bool = True) -> RunSpec:
    return RunSpec(run_number=number, start=start, ls_seconds=1.0, ls_count=ls, ends=ends)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    made = harness(tmp_path, scenario(_run(RUN_A)))
    yield made
    made.stop()


def _state(daemon: Daemon, run: int) -> str | None:
    assert daemon.step is not None
    return daemon.step.journal.run_state(run)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def test_run_end_marker_waits_for_slow_last_jobs(h: Harness) -> None:
    """Seed: runEnd was written before the last jobs finished, losing the run's tail."""
    h.edit_calibration(
        "EcalPedestals",
        {"step2": {"command": slow_command("reco", 1.0), "min_ls_per_job": 2, "max_ls_per_job": 2}},
    )
    step2 = h.start("step2", "EcalPedestals")
    marker = _step(step2).marker_path(RUN_A)

    def invariant() -> None:  # a marker may only exist once no step-2 job is open
        if marker.exists():
            open_jobs = _step(step2).journal.jobs(
                states=("pending", "retry", "submitting", "submitted", "running"), run=RUN_A
            )
            assert open_jobs == []

    h.play()  # the whole run, ended in the registry while its jobs still run
    h.run_until(lambda: _state(step2, RUN_A) == "Done", each=invariant)
    end = read_marker(marker)
    assert len(end.witnesses) == 2 and end.failed_batches == []
    assert all(Path(w).exists() for w in end.witnesses)


def test_failed_jobs_are_retried_then_reported(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Seed: failed jobs were silently dropped."""
    h.edit_calibration(
        "EcalPedestals",
        {
            "step2": {
                "command": slow_command("reco", 0, 2),
                "min_ls_per_job": 2,
                "max_ls_per_job": 2,
            }
        },
    )
    step2 = h.start("step2", "EcalPedestals")
    h.play()
    with caplog.at_level(logging.INFO):
        h.run_until(lambda: _state(step2, RUN_A) == "Done")
    job = _step(step2).journal.job(RUN_A, 2)
    assert job is not None and job.state == "given_up" and job.attempts == 3
    assert job.exit_code == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "run" in message and "run9001_ls0003.h5" in message and "stderr.3.log" in message
    assert read_marker(_step(step2).marker_path(RUN_A)).failed_batches == [2]
    assert _step(step2).status()["jobs_failed"] == 1


def test_one_run_does_not_block_the_next(tmp_path: Path) -> None:
    """Seed: one run blocked the next. Run A waits for an LS file that is late; run B,
    taken after it, is processed to the end meanwhile."""
    made = harness(tmp_path, scenario(_run(RUN_A), _run(RUN_B, start=5)))
    try:
        made.edit_calibration("EcalPedestals", {"step2": {"max_wait_s": 3600}})
        made.play()
        raw_path(made.loop_config.raw_root, "ecal", RUN_A, 3).unlink()  # LS 3 is late
        step2 = made.start("step2", "EcalPedestals")
        made.run_until(lambda: _state(step2, RUN_B) == "Done")
        assert _state(step2, RUN_A) in ("WaitingForLS", "CheckingLSForProcess")
        assert not _step(step2).marker_path(RUN_A).exists()
    finally:
        made.stop()


def test_registry_outage_is_never_a_run_end(h: Harness) -> None:
    """An unreachable or garbage registry keeps the run open; it ends when truly ended."""
    step2 = h.start("step2", "EcalPedestals")
    h.play(until=4.5)  # the run is open, all LS written
    now = time.time()
    for kind in ("refuse", "http_error", "malformed", "bad_schema"):
        h.player.state.faults = [{"kind": kind, "start": now - 1, "end": now + 60, "status": 503}]
        h.player.state.save(h.player.state_file)
        time.sleep(0.1)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            _step(step2)._next_poll = 0  # poll the faulty registry every cycle
            h.cycle()
            time.sleep(0.05)
        assert not _step(step2).marker_path(RUN_A).exists(), kind
        assert _state(step2, RUN_A) != "Done"
    h.player.state.faults = []
    h.player.state.save(h.player.state_file)
    h.play()
    h.run_until(lambda: _state(step2, RUN_A) == "Done")


def test_run_that_never_ends_is_closed_after_lookback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = harness(tmp_path, scenario(_run(RUN_A, ends=False)))
    try:
        step2 = made.start("step2", "EcalPedestals")
        made.play()
        made.run_until(lambda: _step(step2).journal.input_count(RUN_A) == 4)
        # 8 h pass (both clocks): past the look-back window, and no LS for max_wait_s
        made.offset = made.monotonic_offset = 8 * 3600 + 60
        with caplog.at_level(logging.WARNING):
            made.run_until(lambda: _state(step2, RUN_A) == "Done")
        assert any("never ended" in r.getMessage() for r in caplog.records)
        end = read_marker(_step(step2).marker_path(RUN_A))
        assert "look-back" in end.reason and len(end.witnesses) >= 1
    finally:
        made.stop()


def test_missing_ls_file_closes_with_warning(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.edit_calibration("EcalPedestals", {"step2": {"max_wait_s": 1.0}})
    h.play()
    raw_path(h.loop_config.raw_root, "ecal", RUN_A, 3).unlink()  # LS 3 never arrives
    step2 = h.start("step2", "EcalPedestals")
    with caplog.at_level(logging.WARNING):
        h.run_until(lambda: _state(step2, RUN_A) == "Done")
    assert any(
        "never arrived" in r.getMessage() and "[3]" in r.getMessage() for r in caplog.records
    )


def test_full_chain_harvests_only_what_is_new(h: Harness) -> None:
    """Seed: step 4 re-harvested every file each time. Here harvest k reads the state of
    harvest k-1 plus only its new ALCA outputs; the final payload equals the one-shot
    reference and lands in the store and the conditions DB."""
    h.edit_calibration(
        "EcalPedestals",
        {"step2": {"min_ls_per_job": 1, "max_ls_per_job": 1}, "step4": {"harvest_every_files": 2}},
    )
    daemons = [h.start(step, "EcalPedestals") for step in ("step2", "step3", "step4")]
    h.play()
    h.run_until(lambda: _state(daemons[2], RUN_A) == "Done", timeout=90)
    harvests = _step(daemons[2]).journal.jobs(run=RUN_A)
    assert len(harvests) >= 2
    for earlier, later in itertools.pairwise(harvests):
        assert "--previous-state" in later.argv
        earlier_inputs = {a for a in earlier.argv if a.endswith("alca.h5")}
        assert not earlier_inputs & {a for a in later.argv if a.endswith("alca.h5")}
    cal = calibration(h.loop_config, "EcalPedestals")
    expected, _ = reference_payload(h.loop_config.raw_root, cal, RUN_A)
    step4 = _step(daemons[2])
    store_array = step4.store.detector(cal.detector).get("pedestals", run=RUN_A).array  # type: ignore[attr-defined]
    np.testing.assert_allclose(store_array, expected, rtol=1e-9)
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN_A)
    np.testing.assert_allclose(
        conditions.payload(resolved.payload_hash).array(), expected, rtol=1e-9
    )


def test_conddb_outage_delays_but_never_loses_or_duplicates(tmp_path: Path) -> None:
    """Seed: an upload failure lost the payload; parallel harvests could land out of order."""
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'c.sqlite'}")
    db.create_schema()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = db.create_token("step4", ["*"])
    journal = Journal(tmp_path / "step4.journal.sqlite")
    cal = calibration(workspace(tmp_path / "ws"), "EcalPedestals")
    log = get_logger("test")
    outbox = Outbox(
        journal,
        lambda: ConditionsDB.connect(url, token, policy=CallPolicy(attempts=1, timeout_s=1)),
        lambda: cal,
        log,
        backoff_s=0.01,
    )
    for seq, value in ((1, 1.0), (2, 2.0)):  # two harvests of one run queue up while down
        payload = tmp_path / f"p{seq}.npy"
        np.save(payload, np.full(4, value))
        journal.ensure_run(RUN_A, "Uploading", 0)
        journal.add_upload(
            RUN_A,
            seq,
            tag=cal.payload.destination_tag,
            since=RUN_A,
            payload=payload,
            version=f"v{seq}",
            now=0,
        )
    deadline = time.monotonic() + 10
    while not any(row.attempts for row in journal.uploads(states=("pending",))):
        assert time.monotonic() < deadline, "the first upload attempt never settled"
        outbox.flush(time.time())  # the call runs in the background: settle it
        time.sleep(0.02)
    [waiting] = journal.uploads(states=("pending",))  # the DB is down: kept, retried later
    assert (waiting.seq, waiting.attempts) == (2, 1)  # the older harvest is superseded
    service = ServiceThread(create_app(db), port=port).start()
    try:
        deadline = time.monotonic() + 10
        while outbox.pending() and time.monotonic() < deadline:
            outbox.flush(time.time())
            time.sleep(0.05)
        outbox.flush(time.time())
    finally:
        service.stop()
    states = {row.seq: row.state for row in journal.uploads(states=("done", "superseded"))}
    assert states == {1: "superseded", 2: "done"}  # the older harvest never lands after
    history = db.iovs(cal.payload.destination_tag, history=True)
    assert len(history) == 1  # uploaded exactly once
    assert np.array_equal(db.payload(history[0].payload_hash).array(), np.full(4, 2.0))


def test_second_instance_refuses_to_start(h: Harness) -> None:
    h.start("step3", "SiStripBad")
    with pytest.raises(DaemonError, match=r"another step3 daemon runs for SiStripBad.*pid"):
        Daemon("step3", h.loop_config, "SiStripBad").initialize()


def test_reload_keeps_running_config_on_invalid_edit(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = h.start("step2", "EcalPedestals")
    path = h.loop_config.calibrations_dir / "EcalPedestals.yaml"
    original = path.read_text()
    path.write_text(original.replace("max_ls_per_job: 8", "max_ls_per_job: eight"))
    with caplog.at_level(logging.ERROR):
        daemon.request_reload()
        h.cycle()
    assert any("reload rejected" in r.getMessage() for r in caplog.records)
    assert _step(daemon).calibration.step2.max_ls_per_job == 8
    path.write_text(original.replace("max_ls_per_job: 8", "max_ls_per_job: 6"))
    daemon.request_reload()
    h.cycle()
    assert _step(daemon).calibration.step2.max_ls_per_job == 6


def test_new_file_wakes_the_loop(h: Harness) -> None:
    """Seed: loops slept 60 s between checks. Here a file's arrival wakes the daemon."""
    daemon = h.start("step2", "EcalPedestals")
    watcher = _step(daemon).watcher
    watcher.drain()
    h.play(until=1.5)  # run start + LS 1 written by atomic rename
    assert watcher.wake.wait(5.0)
    assert any(p.name == f"run{RUN_A}_ls0001.h5" for p in watcher.drain())


def test_steady_state_cycles_do_not_rescan(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed: every cycle re-listed all files. Here listings happen only at start-up and
    when the registry reports LS the watcher has not delivered."""
    daemon = h.start("step2", "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(daemon, RUN_A) == "Done")
    scans: list[Path] = []
    original = _step(daemon).watcher.scan
    monkeypatch.setattr(
        _step(daemon).watcher, "scan", lambda d, p: scans.append(d) or original(d, p)
    )
    for _ in range(50):
        h.cycle()
    assert scans == []


def test_sigterm_stops_the_daemon_promptly(h: Harness) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loop.cli",
            "step3",
            "-c",
            "EcalPedestals",
            "--config",
            str(h.root / "config" / "loop.yaml"),
            "--quiet",
        ]
    )
    status = h.loop_config.work_dir / "EcalPedestals" / "step3.status.json"
    deadline = time.monotonic() + 20
    while not status.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert json.loads(status.read_text())["state"] == "stopped"


def test_dead_watcher_is_restarted_and_catches_up(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A watcher thread that dies must not silently stop the daemon seeing files."""
    step3 = h.start("step3", "EcalPedestals")
    _step(step3).watcher.stop()  # the observer thread is gone
    step2 = h.start("step2", "EcalPedestals")
    h.play()
    with caplog.at_level(logging.ERROR):
        h.run_until(lambda: _state(step3, RUN_A) == "Done")
    assert any("file watcher died" in r.getMessage() for r in caplog.records)
    assert _state(step2, RUN_A) == "Done"


def test_failed_validation_is_stored_retired_and_not_uploaded(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.edit_calibration("SiStripBad", {"validation": {"max_bad_fraction": 0.0}})  # too strict
    daemons = [h.start(step, "SiStripBad") for step in ("step2", "step3", "step4")]
    h.play()
    with caplog.at_level(logging.ERROR):
        h.run_until(lambda: _state(daemons[2], RUN_A) == "Rejected", timeout=90)
    assert any("failed validation" in r.getMessage() for r in caplog.records)
    summary = json.loads((_step(daemons[2]).step_dir(RUN_A) / "summary.json").read_text())
    assert summary["outcome"] == "rejected" and summary["uploaded_version"] is None
    assert "bad-channel fraction" in summary["validation_problems"][0]
    assert _step(daemons[2]).status()["runs_needing_attention"] == {str(RUN_A): "Rejected"}
    cal = calibration(h.loop_config, "SiStripBad")
    detector = _step(daemons[2]).store.detector(cal.detector)  # type: ignore[attr-defined]
    versions = detector.versions(cal.payload.ctype)
    assert versions and all(v.retired for v in versions)
    assert "bad-channel fraction" in versions[0].metadata["validation_problems"][0]
    assert _step(daemons[2]).journal.uploads(states=("pending", "done")) == []
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    with pytest.raises(NotFound, match=r"unknown tag|no IOV"):
        conditions.resolve(tag=cal.payload.destination_tag, run=RUN_A)


def test_polling_observer_for_network_filesystems(tmp_path: Path) -> None:
    made = harness(tmp_path, scenario(_run(RUN_A)))
    try:
        data = yaml.safe_load((tmp_path / "config" / "loop.yaml").read_text())
        data["poll"].update(observer="polling", polling_interval_s=0.1)
        dump_yaml(tmp_path / "config" / "loop.yaml", data)
        made.loop_config = load_loop_config(tmp_path / "config" / "loop.yaml")
        step2 = made.start("step2", "EcalPedestals")
        assert _step(step2).watcher.polling
        made.play()
        made.run_until(lambda: _state(step2, RUN_A) == "Done")
    finally:
        made.stop()


def test_status_command_shows_each_daemon(h: Harness) -> None:
    step2 = h.start("step2", "EcalPedestals")
    h.play()
    h.run_until(lambda: _state(step2, RUN_A) == "Done")
    h.cycle()
    step2._heartbeat(h.clock(), "running")
    result = run_cli("status", "--config", str(h.root / "config" / "loop.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    assert (row["calibration"], row["step"], row["alive"]) == ("EcalPedestals", "step2", True)
    assert row["jobs_succeeded"] == 1 and row["heartbeat_age_s"] < 30
    text = run_cli("status", "--config", str(h.root / "config" / "loop.yaml"))
    assert "EcalPedestals" in text.stdout and "running" in text.stdout


@pytest.mark.parametrize("suffix", [".md", ".svg", ".png"])
def test_graph_command_draws_each_step(tmp_path: Path, suffix: str) -> None:
    if suffix != ".md":
        require("graphviz", have("dot"), "apt-get install graphviz (tests/run.sh does it)")
    for step in ("step2", "step3", "step4"):
        out = tmp_path / f"{step}{suffix}"
        result = run_cli("graph", step, "--out", str(out))
        assert result.returncode == 0, result.stderr
        content = out.read_bytes()
        if suffix == ".md":
            assert b"stateDiagram" in content and b"WaitingFor" in content
        elif suffix == ".svg":
            assert (b"<svg" in content and b"CleanupState" in content) or step != "step2"
        else:
            assert content.startswith(b"\x89PNG")


def test_batches_left_without_jobs_by_a_crash_are_recovered(h: Harness) -> None:
    """A SIGKILL after a batch is committed but before its job exists leaves the run in
    Checking with nothing pending: the batch must still get its job before the run ends."""
    h.play()
    journal = Journal(h.loop_config.work_dir / "EcalPedestals" / "step2.journal.sqlite")
    names = [f"run{RUN_A}_ls{ls:04d}.h5" for ls in range(1, 5)]
    journal.ensure_run(RUN_A, "CheckingLSForProcess", time.time())
    journal.add_inputs(RUN_A, [NewInput(n, ls=i + 1) for i, n in enumerate(names)], time.time())
    journal.create_batches(RUN_A, [names[:2], names[2:]], final=True, now=time.time())
    journal.close()
    step2 = h.start("step2", "EcalPedestals")
    h.run_until(lambda: _state(step2, RUN_A) == "Done")
    jobs = _step(step2).journal.jobs(run=RUN_A)
    assert [(j.batch, j.state) for j in jobs] == [(1, "succeeded"), (2, "succeeded")]
    assert len(read_marker(_step(step2).marker_path(RUN_A)).witnesses) == 2
    assert _step(step2).journal.active_runs() == []  # Done runs are not restored again


def test_run_unknown_to_the_registry_is_skipped_after_lookback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = harness(tmp_path, scenario(_run(RUN_A)))
    try:
        made.play()
        made.player.state.runs.clear()  # the registry never heard of this run
        made.player.state.save(made.player.state_file)
        step2 = made.start("step2", "EcalPedestals")
        _step(step2).track(RUN_A)
        _step(step2).startup_scan()
        made.run_until(lambda: _step(step2).journal.input_count(RUN_A) == 4)
        made.cycle()
        assert _state(step2, RUN_A) == "NotRunning"  # waits for the registry at first
        made.offset = made.monotonic_offset = 8 * 3600 + 60  # 8 h pass (both clocks)
        with caplog.at_level(logging.INFO):
            made.run_until(lambda: _state(step2, RUN_A) == "Skipped")
        skips = [r.getMessage() for r in caplog.records if "run skipped" in r.getMessage()]
        assert len(skips) == 1 and "never listed" in skips[0]
    finally:
        made.stop()
