"""systemd done right: the sd_notify protocol spoken by a real daemon, the exit code that
stops restarts on a configuration error, and units that systemd-analyze accepts and
rates well. ``CI=true`` requires systemd-analyze; elsewhere those tests skip."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loop.commands.daemon_cmd import EXIT_CONFIG
from loop.commands.systemd_cmd import TARGET, step_unit, target_unit
from loop.control.notify import Notifier, socket_address, watchdog_seconds
from states import STEPS
from tests.conftest import have, require, run_cli
from tests.helpers import workspace

REPO = Path(__file__).resolve().parent.parent
WATCHDOG_S = 0.4  # WATCHDOG_USEC given to the daemon: pings at most every 0.2 s
MAX_EXPOSURE = 4.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's end: an AF_UNIX datagram socket bound to a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def _receive(sock: socket.socket, until: str, timeout: float) -> list[tuple[float, str]]:
    """(monotonic time, assignment) of every datagram until one carries ``until``."""
    received: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        lines = data.decode().split("\n")
        received.extend((time.monotonic(), line) for line in lines)
        if until in lines:
            return received
    raise AssertionError(f"no {until} within {timeout} s; received {received}")


def _pings(messages: list[tuple[float, str]]) -> list[float]:
    return [at for at, line in messages if line == "WATCHDOG=1"]


def test_daemon_speaks_sd_notify(tmp_path: Path, listener: socket.socket) -> None:
    """READY=1 after start-up, WATCHDOG=1 paced by WATCHDOG_USEC, STATUS= lines, and
    STOPPING=1 on SIGTERM, over a real socket from a real daemon process."""
    env = {
        **os.environ,
        "NOTIFY_SOCKET": listener.getsockname(),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
    }
    workspace(tmp_path)  # step 3 needs no registry: it watches step 2's outputs
    config = tmp_path / "config" / "loop.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loop.cli", "step3", "-c", "EcalPedestals", "--config", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,  # INFO lines; the log files keep them
    )
    try:
        started = _receive(listener, "READY=1", timeout=30)
        status = [line for _, line in started if line.startswith("STATUS=")]
        assert status == ["STATUS=0 runs in flight, 0 jobs running, 0 pending, 0 failed"]
        running = _receive(listener, "WATCHDOG=1", timeout=5)
        while len(_pings(running)) < 4:
            running += _receive(listener, "WATCHDOG=1", timeout=5)
        pings = _pings(running)
        # the socket timestamps jitter; the pace is WATCHDOG_USEC/2, not every 0.1 s tick
        assert min(b - a for a, b in itertools.pairwise(pings)) > WATCHDOG_S / 2 * 0.6
        proc.send_signal(signal.SIGTERM)
        _receive(listener, "STOPPING=1", timeout=10)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_abstract_socket_and_no_socket() -> None:
    """``@name`` is an abstract socket; without NOTIFY_SOCKET every call is a no-op."""
    name = f"calloop-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier(socket_address("@" + name)).send("READY=1")
        assert sock.recv(64) == b"READY=1"
    assert not Notifier(None).send("READY=1")
    assert socket_address("vsock:2:1234") is None


def test_environment_is_taken_from_the_jobs() -> None:
    """Jobs are the daemon's children: they must not inherit the notify variables."""
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "PATH": "/bin"}
    notifier = Notifier.from_environment(environ)
    assert environ == {"PATH": "/bin"}
    assert notifier.address == "\0x" and notifier.watchdog_s == 2.0


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    assert watchdog_seconds("2000000", str(os.getpid() + 1), os.getpid()) is None
    assert watchdog_seconds("2000000", str(os.getpid()), os.getpid()) == 2.0
    assert watchdog_seconds("0", None, os.getpid()) is None


def test_configuration_error_exits_78(tmp_path: Path) -> None:
    """An invalid calibration YAML or loop.yaml is one line and EX_CONFIG, which the
    units name in RestartPreventExitStatus= instead of restarting every 5 s forever."""
    config = tmp_path / "config" / "loop.yaml"
    loop_config = workspace(tmp_path)
    (loop_config.calibrations_dir / "EcalPedestals.yaml").write_text("name: [unclosed\n")
    result = run_cli("step3", "-c", "EcalPedestals", "--config", str(config))
    assert result.returncode == EXIT_CONFIG == 78
    assert result.stderr.startswith("calloop: error: ") and "EcalPedestals.yaml" in result.stderr
    config.write_text("work_dir: [\n")
    result = run_cli("step2", "-c", "SiStripBad", "--config", str(config))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.count("\n") == 1 and "loop.yaml" in result.stderr


def _install(tmp_path: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    units = tmp_path / "units"
    units.mkdir()
    workspace(tmp_path)
    config = tmp_path / "config" / "loop.yaml"
    result = run_cli(
        "systemd", "install", "--config", str(config), "--unit-dir", str(units), *extra
    )
    assert result.returncode == 0, result.stderr
    return units, result


def test_install_dry_run_lists_every_calibration(tmp_path: Path) -> None:
    units, result = _install(tmp_path, "--dry-run")
    assert list(units.iterdir()) == []
    calibrations = sorted(p.stem for p in (tmp_path / "config" / "calibrations").glob("*.yaml"))
    assert calibrations
    wants = [line for line in result.stdout.splitlines() if line.startswith("Wants=calloop-")]
    assert wants == [
        "Wants=" + " ".join(f"calloop-{step}@{name}.service" for step in STEPS)
        for name in calibrations
    ]
    for step in STEPS:
        assert f"calloop-{step}@.service" in result.stdout
    assert "--quiet" not in result.stdout and "RestartPreventExitStatus=78" in result.stdout


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    require("systemd-analyze", have("systemd-analyze"), "apt-get install systemd")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_installed_units_verify_clean(tmp_path: Path) -> None:
    """ExecStart points at this venv's calloop, so verify can check it exists."""
    units, _ = _install(tmp_path, "--prefix", sys.prefix)
    files = sorted(str(p) for p in units.iterdir())
    assert len(files) == len(STEPS) + 1
    result = _analyze("verify", *files)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("step", STEPS)
def test_units_rate_at_most_4(tmp_path: Path, step: str) -> None:
    units, _ = _install(tmp_path, "--prefix", sys.prefix)
    result = _analyze("security", "--offline=yes", str(units / f"calloop-{step}@.service"))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_repository_units_are_the_generated_ones() -> None:
    """systemd/ shows the units for the production layout; they must not drift from the
    generator (``calloop systemd install`` writes what a node really runs)."""
    prefix, config = Path("/opt/calloop/.venv"), Path("/etc/calloop/loop.yaml")
    for step in STEPS:
        text = (REPO / "systemd" / f"calloop-{step}@.service").read_text()
        assert text == step_unit(step, prefix, config, [])
    calibrations = sorted(p.stem for p in (REPO / "config" / "calibrations").glob("*.yaml"))
    assert (REPO / "systemd" / TARGET).read_text() == target_unit(calibrations, config)
