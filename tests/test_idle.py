"""Idle daemons cost nothing: they block on their events and timers instead of ticking,
keep their registry connection, touch an unchanged status instead of rewriting it, and
still react at once to files, operator commands, signals and finished service calls.

Real registry server, real files, real processes; no timing assertions: a reaction is
checked against a heartbeat and registry interval far longer than the wait allowed,
so only the event can have woken the daemon.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from loop.background import BackgroundCall
from loop.callpolicy import CallPolicy
from loop.commands.daemon_cmd import collect_status
from loop.config import dump_yaml, load_loop_config
from loop.control.notify import Notifier
from loop.control.runcontrol import DONE, CommandQueue, doorbell_path
from loop.daemon import Daemon, status_path
from loop.errors import RegistryError
from loop.journal import JobPhase, NewInput
from loop.registry import RegistryClient, iso
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import RunSpec
from loop.sim.state import RegistryState
from states.step import Step
from tests.daemon_harness import Harness, harness, scenario

RUN = 9101
SLOW = {"registry_s": 60.0, "heartbeat_s": 60.0, "tick_s": 0.2}  # only events wake


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    made = harness(
        tmp_path, scenario(RunSpec(run_number=RUN, start=0.0, ls_count=2, ls_seconds=1.0))
    )
    _set_poll(made, **SLOW)
    yield made
    made.stop()


def _set_poll(made: Harness, **poll: float) -> None:
    path = made.root / "config" / "loop.yaml"
    data = yaml.safe_load(path.read_text())
    data["poll"].update(poll)
    dump_yaml(path, data)
    made.loop_config = load_loop_config(path)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _settled_after_first_poll(h: Harness, daemon: Daemon) -> None:
    """Cycle until the first registry poll was answered and applied."""
    h.run_until(lambda: _step(daemon).status()["registry"]["reachable"] is True, timeout=20)


# ------------------------------------------------------------------ sleeping, not ticking


def test_idle_daemon_sleeps_until_its_heartbeat_not_a_tick(h: Harness) -> None:
    daemon = h.start("step2", "EcalPedestals")
    _settled_after_first_poll(h, daemon)
    h.cycle()
    wait = daemon.next_cycle_in(h.clock())
    assert SLOW["tick_s"] < wait <= SLOW["heartbeat_s"]
    assert _step(daemon).next_cycle_in(h.clock()) > SLOW["tick_s"]  # the registry poll


def test_jobs_in_flight_are_polled_each_tick_and_retries_wake_when_due(h: Harness) -> None:
    daemon = h.start("step3", "EcalPedestals")
    step = _step(daemon)
    journal = step.journal
    now = h.clock()
    journal.add_job(RUN, 1, h.root / "job1", ["true"], "")
    journal.update_job(RUN, 1, state=JobPhase.RETRY, next_attempt=now + 30)
    assert 25 < step.next_cycle_in(now) <= 30  # the retry, not a tick
    journal.add_job(RUN, 2, h.root / "job2", ["true"], "")
    journal.update_job(RUN, 2, state=JobPhase.SUBMITTED, backend_id="424242")
    assert step.next_cycle_in(now) == pytest.approx(SLOW["tick_s"])


def test_timed_decision_wakes_the_daemon_when_due(h: Harness) -> None:
    """An input waiting for a full batch is batched after max_wait_s: no event tells
    the daemon, its timer does."""
    h.edit_calibration("EcalPedestals", {"step3": {"min_files_per_job": 4, "max_wait_s": 20}})
    daemon = h.start("step3", "EcalPedestals")
    step = _step(daemon)
    assert step.track(RUN) is not None
    step.journal.add_inputs(RUN, [NewInput("w1", meta={"outputs": []})], h.clock())
    h.cycle()
    assert step.journal.run_state(RUN) == "WaitingForFiles"
    assert 15 < step.next_cycle_in(h.clock()) <= 20


# ---------------------------------------------------------------------- cheap heartbeat


def test_unchanged_status_is_touched_not_rewritten(h: Harness) -> None:
    daemon = h.start("step3", "EcalPedestals")
    path = status_path(h.loop_config, "EcalPedestals", "step3")
    daemon._heartbeat(h.clock())
    first = path.stat()
    later = h.clock() + 5
    daemon._heartbeat(later)
    touched = path.stat()
    assert touched.st_ino == first.st_ino  # not replaced: no rename woke any watcher
    assert touched.st_mtime == pytest.approx(later)
    [row] = collect_status(h.loop_config)
    assert row["heartbeat"] == pytest.approx(later) and row["state"] == "running"
    daemon._heartbeat(later + 1, "stopped")  # a changed status is replaced atomically
    assert path.stat().st_ino != first.st_ino
    assert json.loads(path.read_text())["state"] == "stopped"


def test_idle_cycles_log_nothing(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    daemon = h.start("step4", "EcalPedestals")
    h.cycle()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for _ in range(50):
            daemon._next_heartbeat = 0.0  # a heartbeat every cycle, the idle daemon's work
            h.cycle()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("calloop")] == []


# ------------------------------------------------------------------------ waking at once


def test_operator_command_rings_the_doorbell(h: Harness) -> None:
    daemon = h.start("step2", "EcalPedestals")
    watcher = _step(daemon).watcher
    watcher.drain()
    queue = CommandQueue(_step(daemon).journal.path)
    try:
        command = queue.submit(RUN, "skip", reason="beam test")
        assert doorbell_path(queue.path).read_text().strip() == str(command.id)
        assert watcher.wake.wait(10)
        h.cycle()
        settled = queue.get(command.id)
        assert settled is not None and settled.state == DONE
    finally:
        queue.close()
    assert _step(daemon).journal.run_state(RUN) == "Skipped"


def test_finished_background_call_wakes_the_loop() -> None:
    woken = threading.Event()
    call: BackgroundCall[int] = BackgroundCall("test", on_done=woken.set)
    assert call.start(lambda: 7)
    assert woken.wait(5)
    outcome = call.collect()
    assert outcome is not None and outcome.value == 7


def test_watchdog_ping_has_a_deadline(tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        clock = [100.0]
        notifier = Notifier(address, watchdog_s=20.0, monotonic=lambda: clock[0])
        assert notifier.next_ping_in() == 0.0
        notifier.alive(lambda: "idle")
        assert b"WATCHDOG=1" in listener.recv(4096)
        clock[0] += 4
        assert notifier.next_ping_in() == pytest.approx(6.0)  # half the timeout, less 4 s
    assert Notifier(address).next_ping_in() == float("inf")  # no watchdog asked for
    assert Notifier(None, watchdog_s=20.0).next_ping_in() == float("inf")


def test_idle_daemon_process_wakes_for_commands_and_sighup(h: Harness) -> None:
    """A real daemon process with a 60 s heartbeat and registry interval: a command and
    a reload are answered within 20 s, so the doorbell and the signal woke it; while
    idle, its log files do not grow."""
    config = str(h.root / "config" / "loop.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loop.cli", "step2", "-c", "EcalPedestals", "--config", config,
         "--quiet"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        status = status_path(h.loop_config, "EcalPedestals", "step2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if status.exists() and json.loads(status.read_text()).get("pid") == proc.pid:
                break
            time.sleep(0.05)
        log = h.loop_config.log_dir / "EcalPedestals" / "step2_ALL.log"
        size = log.stat().st_size
        time.sleep(1.0)
        assert log.stat().st_size == size  # idle: no line per cycle
        skip = subprocess.run(
            [sys.executable, "-m", "loop.cli", "runs", "skip", "-c", "EcalPedestals",
             str(RUN), "--reason", "beam test", "--config", config, "--wait", "20"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert skip.returncode == 0, skip.stdout + skip.stderr
        assert "skipped" in skip.stdout
        h.edit_calibration("EcalPedestals", {"step2": {"max_wait_s": 99}})
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "configuration reloaded" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "configuration reloaded" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


# ------------------------------------------------------------------ registry keep-alive


def test_registry_polls_reuse_one_connection(registry: RegistryServer) -> None:
    now = datetime.now(UTC)
    state = RegistryState()
    state.runs["1"] = {
        "run_number": 1,
        "start_time": iso(now),
        "end_time": None,
        "run_type": "collisions",
        "stable_beam": True,
        "last_lumisection_number": 0,
    }
    state.save(registry.cache.path)
    with RegistryClient(registry.url, policy=CallPolicy(attempts=1, timeout_s=5)) as client:
        for _ in range(5):
            assert [r.run_number for r in client.runs(now - timedelta(hours=1)).records] == [1]
    assert registry._http is not None and registry._http.accepted == 1


def test_refused_registry_closes_kept_connections(registry: RegistryServer) -> None:
    """A refuse fault must refuse the client that is already connected, too."""
    policy = CallPolicy(attempts=1, timeout_s=2, deadline_s=5)
    with RegistryClient(registry.url, policy=policy) as client:
        since = datetime.now(UTC) - timedelta(hours=1)
        assert client.runs(since).records == []  # connected, kept alive
        state = RegistryState()
        state.faults = [{"kind": "refuse", "start": time.time() - 1, "end": time.time() + 30}]
        state.save(registry.cache.path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.runs(since)
            except RegistryError as exc:
                assert "cannot connect" in str(exc) or "broken off" in str(exc)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the kept connection was still answered during the refuse window")
