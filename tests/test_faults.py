"""Faults with the daemons running: one bad run, bad registry records, a slow registry,
a wall-clock jump. Each test reproduces a finding of the fault campaign and shows it
fixed; real registry server, real raw files, real jobs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loop.callpolicy import CallPolicy
from loop.conddb.db import ConditionsDatabase
from loop.conddb.server import ServiceThread, create_app
from loop.daemon import Daemon
from loop.registry import RegistryClient
from loop.sim.scenario import RunSpec
from loop.witness import read_marker
from states.machine import Facts
from states.step import Step
from tests.daemon_harness import Harness, harness, scenario
from tests.helpers import calibration
from tests.infra.postgres import free_port

RUN_A, RUN_B = 9101, 9102


def _run(number: int, start: float = 0.0, ls: int = 4, ls_seconds: float = 1.0) -> RunSpec:
    return RunSpec(run_number=number, start=start, ls_seconds=ls_seconds, ls_count=ls)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _state(daemon: Daemon, run: int) -> str | None:
    return _step(daemon).journal.run_state(run)


@pytest.fixture
def two_runs(tmp_path: Path) -> Iterator[Harness]:
    made = harness(tmp_path, scenario(_run(RUN_A), _run(RUN_B, start=5)))
    yield made
    made.stop()


def test_an_exception_in_one_run_fails_that_run_only(
    two_runs: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = two_runs
    step2 = h.start("step2", "EcalPedestals")
    step = _step(step2)
    original = step.facts

    def facts(run: int, now: float) -> Facts:
        if run == RUN_A and step.journal.input_count(RUN_A) >= 2:
            raise KeyError("lumisection_number")  # a malformed record of this run only
        return original(run, now)

    monkeypatch.setattr(step, "facts", facts)
    h.play()
    with caplog.at_level(logging.ERROR):
        h.run_until(lambda: _state(step2, RUN_B) == "Done" and _state(step2, RUN_A) == "Failed")
    failure = step.journal.info(RUN_A).failure
    assert failure is not None
    assert failure["step"] == "step2" and failure["exception"] == "KeyError"
    assert "lumisection_number" in failure["message"] and failure["state"]
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and "quarantined" in r.getMessage()
    ]
    assert len(errors) == 1
    attention = step.status()["runs_needing_attention"]
    assert attention[str(RUN_A)].startswith("Failed (KeyError in ")
    assert read_marker(step.marker_path(RUN_B)).witnesses  # the other run is complete


def test_bad_registry_records_are_ignored_with_one_warning_each(
    two_runs: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = two_runs
    h.play()
    start = h.player.state.runs[str(RUN_A)]["start_time"]
    bad = {
        "huge": {"run_number": 10**30},
        "negative": {"run_number": -5},
        "text": {"run_number": "9200"},
        "lumis": {"run_number": 9201, "last_lumisection_number": 10**12},
        "time": {"run_number": 9202, "start_time": "yesterday"},
    }
    for key, fields in bad.items():
        h.player.state.runs[key] = {
            "run_number": 1,
            "start_time": start,
            "end_time": None,
            "run_type": "collisions",
            "stable_beam": True,
            "last_lumisection_number": 1,
            **fields,
        }
    h.player.state.save(h.player.state_file)
    step2 = h.start("step2", "EcalPedestals")
    with caplog.at_level(logging.WARNING):
        h.run_until(lambda: _state(step2, RUN_A) == "Done" and _state(step2, RUN_B) == "Done")
        for _ in range(3):  # more polls: the same bad records are not reported again
            _step(step2)._next_poll = 0  # type: ignore[attr-defined]
            h.run_until(lambda: not _step(step2)._poll.busy, timeout=10)  # type: ignore[attr-defined]
    warned = [r for r in caplog.records if "registry record ignored" in r.getMessage()]
    fields = sorted(str(r.msg.get("field")) for r in warned if isinstance(r.msg, dict))
    assert len(warned) == len(bad), [r.getMessage() for r in warned]
    assert any("run_number" in f for f in fields) and any("lumisection" in f for f in fields)
    assert any("start_time" in f for f in fields)


class _Trickle(BaseHTTPRequestHandler):
    """Headers at once, then one byte every 0.2 s, until the test sets ``stop``."""

    stop = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            while not self.stop.wait(0.2):
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:
            return

    def log_message(self, *_args: object) -> None:
        return


def test_a_trickling_registry_never_stalls_known_runs(tmp_path: Path) -> None:
    """Seed: a trickling reply kept the daemon in one request for minutes; now the poll
    runs on its own thread and other runs' files keep being processed meanwhile."""
    made = harness(tmp_path, scenario(_run(RUN_A, ls=6)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        step2 = made.start("step2", "EcalPedestals")
        made.play(until=3.5)  # the run is known, three LS written
        made.run_until(lambda: _step(step2).journal.input_count(RUN_A) == 3)
        slow = RegistryClient(
            f"http://127.0.0.1:{server.server_address[1]}",
            policy=CallPolicy(attempts=1, timeout_s=60, deadline_s=60),
        )
        made.run_until(lambda: not _step(step2)._poll.busy, timeout=10)  # type: ignore[attr-defined]
        _step(step2).registry = slow  # type: ignore[attr-defined]
        _step(step2)._next_poll = 0  # type: ignore[attr-defined]
        made.cycle()
        assert _step(step2)._poll.busy  # type: ignore[attr-defined]
        made.play()  # the remaining LS arrive while the registry trickles
        started = time.monotonic()
        made.run_until(lambda: _step(step2).journal.input_count(RUN_A) == 6, timeout=20)
        cycle = time.monotonic()
        made.cycle()
        assert time.monotonic() - cycle < 2.0  # a cycle never waits for the registry
        assert time.monotonic() - started < 20
        assert _step(step2)._poll.busy  # type: ignore[attr-defined]
        _Trickle.stop.set()  # the reply ends: the poll fails and the client is released
        made.run_until(lambda: not _step(step2)._poll.busy, timeout=10)  # type: ignore[attr-defined]
        slow.close()
    finally:
        _Trickle.stop.set()
        made.stop()
        server.shutdown()
        server.server_close()


def test_a_wall_clock_jump_drops_no_ls(tmp_path: Path) -> None:
    """Seed: after a +9 h jump the look-back rule closed an open run at once and LS
    7-16 were dropped. Now the run stays open while LS arrive and completes whole."""
    made = harness(tmp_path, scenario(_run(RUN_A, ls=12, ls_seconds=0.5)))
    try:
        made.edit_calibration("EcalPedestals", {"step2": {"max_wait_s": 20}})
        step2 = made.start("step2", "EcalPedestals")
        made.play(until=3.2)  # LS 1-6 written, the run is open
        made.run_until(lambda: _step(step2).journal.input_count(RUN_A) == 6)
        made.offset = 9 * 3600  # the wall clock jumps 9 h ahead
        for ls in range(7, 13):
            made.play(until=0.5 * ls + 0.1)
            made.run_until(lambda ls=ls: _step(step2).journal.input_count(RUN_A) == ls)
            assert _state(step2, RUN_A) not in ("CleanupState", "Done")
        made.play()
        made.run_until(lambda: _state(step2, RUN_A) == "Done")
        record = _step(step2).journal.info(RUN_A)
        assert not record.lookback_closed and not record.missing_ls
        marker = read_marker(_step(step2).marker_path(RUN_A))
        processed = sorted(p for w in marker.witnesses.values() for p in w.inputs)
        assert len(processed) == 12
    finally:
        made.stop()


def test_a_revoked_then_fixed_token_uploads_everything_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Seed: a 401 marked uploads refused for good and the run still ended Done. Now the
    run waits in WaitingForUpload, the ERROR is said once, and a fixed token file is
    picked up by the running daemon."""
    made = harness(tmp_path, scenario(_run(RUN_A), _run(RUN_B, start=5)))
    db = ConditionsDatabase(f"sqlite:///{tmp_path / 'conditions.sqlite'}")
    db.create_schema()
    port = free_port()
    service = ServiceThread(create_app(db), port=port).start()
    token_file = tmp_path / "conddb.token"
    revoked = db.create_token("step4", ["*"])
    db.revoke_token(int(revoked.split("_")[1]))
    token_file.write_text(revoked + "\n")
    token_file.chmod(0o600)
    made.loop_config = made.loop_config.model_copy(
        update={"conddb_url": f"http://127.0.0.1:{port}", "conddb_token_file": token_file}
    )
    try:
        daemons = [made.start(step, "EcalPedestals") for step in ("step2", "step3", "step4")]
        step4 = daemons[2]
        made.play()
        with caplog.at_level(logging.ERROR):
            made.run_until(
                lambda: {_state(step4, RUN_A), _state(step4, RUN_B)} == {"WaitingForUpload"},
                timeout=90,
            )
            for _ in range(50):  # keep cycling: still waiting, the ERROR is not repeated
                made.cycle()
                time.sleep(0.01)
        assert _state(step4, RUN_A) == "WaitingForUpload"
        refusals = [r for r in caplog.records if "refused the upload token" in r.getMessage()]
        assert len(refusals) == 1
        token_file.write_text(db.create_token("step4", ["*"]) + "\n")  # the operator's fix
        made.run_until(
            lambda: _state(step4, RUN_A) == "Done" and _state(step4, RUN_B) == "Done", timeout=60
        )
        tag = calibration(made.loop_config, "EcalPedestals").payload.destination_tag
        assert {iov.since for iov in db.iovs(tag)} == {RUN_A, RUN_B}
        summary = _step(step4).step_dir(RUN_A) / "summary.json"
        assert json.loads(summary.read_text())["upload"] == "done"
    finally:
        made.stop()
        service.stop()
