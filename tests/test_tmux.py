"""``calloop tmux``: real tmux on a private server socket, real daemon processes."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loop.config import LoopConfig
from loop.control.tmux import WARNINGS, Launch, TmuxSession
from loop.sim.registry_server import RegistryServer
from states import STEPS
from tests.conftest import have, require, run_cli
from tests.helpers import workspace
from workers.backends import procfs

CAL = "EcalPedestals"


def _alive(pid: int) -> bool:
    """Not exited (a zombie has: the tmux server may reap it late)."""
    proc = procfs.stat(pid)
    return proc is not None and not proc.zombie


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout:g} s: {what}")
        time.sleep(0.1)


def _tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=10, check=False
    )


@pytest.fixture
def socket() -> Iterator[str]:
    """A tmux server socket of this test alone; whatever the test leaves is stopped."""
    require("tmux", have("tmux"), "apt-get install tmux")
    name = f"calloop-test-{uuid.uuid4().hex[:12]}"
    yield name
    # SIGTERM first: killing the server hangs the panes up, and a daemon reloads on SIGHUP
    listing = _tmux(name, "list-panes", "-a", "-F", "#{pane_pid}")
    pids = [int(pid) for pid in listing.stdout.split()] if listing.returncode == 0 else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: not any(_alive(pid) for pid in pids), "leftover panes exited")
    assert _tmux(name, "kill-server").returncode in (0, 1)  # 1: no server left to kill


def _statuses(loop_config: LoopConfig) -> dict[str, dict[str, object]]:
    statuses = {}
    for step in STEPS:
        path = loop_config.work_dir / CAL / f"{step}.status.json"
        with contextlib.suppress(OSError, ValueError):  # not written yet, or being replaced
            statuses[step] = json.loads(path.read_text())
    return statuses


def _running_pids(loop_config: LoopConfig) -> dict[str, int]:
    """The pid of each step whose status says running with a live process."""
    return {
        step: int(str(status["pid"]))
        for step, status in _statuses(loop_config).items()
        if status["state"] == "running" and _alive(int(str(status["pid"])))
    }


def _dead_panes(session: TmuxSession) -> set[str]:
    return {pane.pane_id for pane in session.panes() if pane.dead}


def _pane_shows(session: TmuxSession, pane_id: str, text: str) -> Callable[[], bool]:
    return lambda: text in session.capture(pane_id)


def test_up_runs_each_step_once_in_its_pane_and_down_stops_them(
    tmp_path: Path, registry: RegistryServer, socket: str
) -> None:
    loop_config = workspace(tmp_path, registry_port=registry.port)
    up = ["tmux", "up", "-c", CAL, "--config", str(tmp_path / "config" / "loop.yaml")]
    started = run_cli(*up, "--socket", socket, timeout=30)
    assert started.returncode == 0, started.stderr
    assert started.stdout.count(": started in pane") == len(STEPS), started.stdout
    _wait_for(lambda: len(_running_pids(loop_config)) == len(STEPS), "three daemons running")
    pids = _running_pids(loop_config)

    session = TmuxSession("calloop", socket)
    panes = {pane.role: pane for pane in session.panes(session.windows()[CAL])}
    assert list(panes) == [*STEPS, WARNINGS]  # in reading order
    assert not panes[WARNINGS].dead
    for step in STEPS:
        assert panes[step].pid == pids[step]  # the pane's process is the daemon itself
        shown = f"{CAL}/{step}: daemon started"
        _wait_for(_pane_shows(session, panes[step].pane_id, shown), f"{shown!r} in its pane")

    again = run_cli(*up, "--socket", socket, timeout=30)
    assert again.returncode == 0, again.stderr
    for step in STEPS:
        assert f"{CAL} {step}: skipped, already runs (pid {pids[step]})" in again.stdout
    assert session.panes() == list(panes.values())  # nothing added, nothing restarted
    assert _running_pids(loop_config) == pids

    os.kill(pids["step3"], signal.SIGTERM)  # an operator stopped one: its pane remains
    _wait_for(lambda: "step3" not in _running_pids(loop_config), "step3 stopped")
    _wait_for(lambda: panes["step3"].pane_id in _dead_panes(session), "step3's pane dead")
    restarted = run_cli(*up, "--socket", socket, timeout=30)
    assert f"{CAL} step3: started again in pane {panes['step3'].pane_id}" in restarted.stdout
    _wait_for(lambda: "step3" in _running_pids(loop_config), "step3 running again")
    pids = _running_pids(loop_config)

    stopped = run_cli("tmux", "down", "--socket", socket, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count(": stopped") == len(STEPS), stopped.stdout
    assert not any(_alive(pid) for pid in pids.values())
    assert {status["state"] for status in _statuses(loop_config).values()} == {"stopped"}
    assert not session.exists()


def test_up_refuses_an_unknown_calibration_in_one_line(tmp_path: Path, socket: str) -> None:
    workspace(tmp_path)
    config = str(tmp_path / "config" / "loop.yaml")
    done = run_cli("tmux", "up", "-c", "Nope", "--config", config, "--socket", socket)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"calloop: error: {tmp_path / 'config' / 'calibrations' / 'Nope.yaml'}: file not found"
    ]
    assert not TmuxSession("calloop", socket).exists()


def test_down_without_a_session_has_nothing_to_stop(socket: str) -> None:
    done = run_cli("tmux", "down", "--socket", socket)
    assert done.returncode == 0, done.stderr
    assert "nothing to stop" in done.stdout


def test_attach_without_a_terminal_is_one_line() -> None:
    done = run_cli("tmux", "attach", "--socket", f"calloop-test-{uuid.uuid4().hex[:12]}")
    assert done.returncode == 2
    assert done.stderr == "calloop: error: tmux attach needs a terminal and stdout is not one\n"


def test_the_pane_command_keeps_every_argument_whole(tmp_path: Path) -> None:
    config_path = tmp_path / "odd dir 'quoted'" / "loop.yaml"
    launch = Launch(workspace(tmp_path), config_path)
    argv = launch.argv("step3", CAL)
    assert argv[-2:] == ["--config", str(config_path)]
    assert shlex.split(launch.command("step3", CAL)) == ["exec", *argv]
