"""The daemon survives the machine: a full or failing disk, a wall-clock jump, a damaged
journal, SIGTERM in any state. Each test reproduces a finding of the fault campaign and
shows it fixed.

The full-disk tests fill a real filesystem: a tmpfs of a few MB mounted as the daemons'
work directory (root only; CI runs as root, where a missing mount is a failure).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loop.daemon import Daemon, DegradedPace
from loop.journal import JobPhase
from loop.logs import get_logger, setup_logging
from loop.rawformat import parse_raw_name
from loop.sim.scenario import RunSpec
from loop.witness import read_marker
from states.step import Step
from tests.conftest import require, run_cli
from tests.daemon_harness import Harness, harness, scenario

RUN_A = 9201
CAL = "EcalPedestals"
FAST = DegradedPace(first_s=0.2, max_s=1.0, remind_s=300.0)


def _run(ls: int = 4, ends: bool = True) -> RunSpec:
    return RunSpec(run_number=RUN_A, start=0.0, ls_seconds=0.5, ls_count=ls, ends=ends)


def _step(daemon: Daemon) -> Step:
    assert daemon.step is not None
    return daemon.step


def _state(daemon: Daemon) -> str | None:
    return _step(daemon).journal.run_state(RUN_A)


def _start(made: Harness, step: str, pace: DegradedPace = FAST) -> Daemon:
    """A daemon of the harness with its own degraded pace (the default waits seconds)."""
    daemon = Daemon(
        step, made.loop_config, CAL, clock=made.clock, monotonic=made.monotonic, pace=pace
    )
    daemon.initialize()
    made.daemons.append(daemon)
    return daemon


def _cycle_for(made: Harness, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        made.cycle()
        time.sleep(0.02)


def _integrity(journal: Path) -> str:
    """``integrity_check`` through a connection of its own, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _events(caplog: pytest.LogCaptureFixture, level: int) -> list[dict[str, Any]]:
    """The structlog event dicts logged at ``level``."""
    return [r.msg for r in caplog.records if r.levelno == level and isinstance(r.msg, dict)]


def _event(caplog: pytest.LogCaptureFixture, level: int, start: str) -> dict[str, Any]:
    [event] = [e for e in _events(caplog, level) if e["event"].startswith(start)]
    return event


# ------------------------------------------------------------------ a real small disk


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``directory``; unmounted (lazily, so a job still
    holding a file cannot leave it mounted) at the end."""
    require("tmpfs mount", os.geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)")
    directory.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    require("tmpfs mount", mounted.returncode == 0, f"mount failed: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for block in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(bytes(block))
    return filler


@contextlib.contextmanager
def daemon_logs(log_dir: Path) -> Iterator[Path]:
    """Logging as ``calloop step2 --quiet`` sets it up: every level in the files under
    ``log_dir``, CRITICAL on stderr (set up in the test body, where ``capfd`` sees it)."""
    setup_logging(log_dir, CAL, "step2", console_level=logging.CRITICAL)
    try:
        yield log_dir / CAL
    finally:
        setup_logging(None, "test", "none", console=False)  # detach the files again


def test_a_full_disk_is_waited_out_and_no_ls_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Seed: on ENOSPC every daemon exited within 6 s, its traceback on stderr only.
    Now the daemon's disk fills mid-run: it waits degraded, and completes the run whole
    once space is back."""
    with tmpfs(tmp_path / "work"), daemon_logs(tmp_path / "logs") as logs:
        made = harness(tmp_path, scenario(_run(ls=8)))
        try:
            made.edit_calibration(CAL, {"step2": {"min_ls_per_job": 2, "max_ls_per_job": 2}})
            step2 = _start(made, "step2")
            journal = _step(step2).journal
            made.play(until=2.1)  # LS 1-4
            made.run_until(lambda: len(journal.jobs(run=RUN_A, states=(JobPhase.SUCCEEDED,))) == 2)
            filler = fill(made.loop_config.work_dir)
            made.play()  # LS 5-8 and the run's end arrive on a full disk
            with caplog.at_level(logging.INFO):
                made.run_until(lambda: step2.degraded is not None, timeout=20)
                _cycle_for(made, 3.0)  # the daemon keeps cycling, degraded
                assert step2.degraded is not None and _state(step2) != "Done"
                assert _integrity(journal.path) == "ok"  # consistent after failed cycles
                filler.unlink()
                made.run_until(lambda: _state(step2) == "Done", timeout=60)
            recovered = _event(caplog, logging.INFO, "writes succeed again")
            status = json.loads((made.loop_config.work_dir / CAL / "step2.status.json").read_text())
            marker = read_marker(_step(step2).marker_path(RUN_A))
            assert _integrity(journal.path) == "ok"
        finally:
            made.stop()
    [critical] = _events(caplog, logging.CRITICAL)  # one line, however long the wait
    assert critical["event"].startswith("cannot write to disk")
    assert any(e in critical["error"] for e in ("disk is full", "No space left on device"))
    assert Path(critical["path"]).is_relative_to(made.loop_config.work_dir)
    assert critical["free"] == "0 B free of 4.0 MiB"  # the free space of that filesystem
    assert recovered["degraded_for_s"] >= 3.0
    assert status["state"] == "running"
    processed = {parse_raw_name(Path(p)) for w in marker.witnesses.values() for p in w.inputs}
    assert processed == {(RUN_A, ls) for ls in range(1, 9)}  # every LS, none twice
    assert marker.failed_batches == [] and marker.bad_inputs == {}
    assert "cannot write to disk" in (logs / "step2_CRITICAL.log").read_text()
    err = capfd.readouterr().err
    assert "CRITICAL" in err and "cannot write to disk" in err and "Traceback" not in err


def test_log_files_on_a_full_disk_cost_lines_not_the_daemon(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Seed: a failed log write printed a logging traceback per record and handler. Now
    each file says so once on stderr, the CRITICAL line still reaches stderr, and the
    first line that gets through again says how many were lost."""
    with tmpfs(tmp_path / "logs", "1m") as log_dir:
        with daemon_logs(log_dir):
            log = get_logger("calloop.step2")
            log.info("before the disk filled")
            filler = fill(log_dir)
            for i in range(40):  # more than the slack of each file's last page
                log.info("a line the full disk refuses", i=i, padding="x" * 200)
            log.critical("the disk is full")
            err = capfd.readouterr().err
            filler.unlink()
            log.warning("space is back")
        files = {p.name: p.read_text() for p in (log_dir / CAL).iterdir()}
    assert "CRITICAL" in err and "the disk is full" in err
    notes = [line for line in err.splitlines() if "cannot write log file" in line]
    assert 1 <= len(notes) <= len(files)  # one per file at most
    assert "Traceback" not in err and "Logging error" not in err
    assert "log lines could not be written to this file" in files["step2_ALL.log"]
    assert "space is back" in files["step2_ALL.log"]
    assert all(json.loads(line) for line in files["step2.jsonl"].splitlines())


JOURNAL = "journal"  # SQLite names no file: the daemon's journal is meant


def _refused(code: int, path: str) -> tuple[BaseException, str]:
    return OSError(code, os.strerror(code), path), path  # EACCES makes a PermissionError


FAULTS: dict[str, tuple[BaseException, str]] = {  # the error, the path the CRITICAL names
    "ENOSPC": _refused(errno.ENOSPC, "/data/a.json"),
    "EIO": _refused(errno.EIO, "/data/b.witness.json"),
    "EDQUOT": _refused(errno.EDQUOT, "/data/c.h5"),
    "EROFS": _refused(errno.EROFS, "/data/d"),
    "EACCES": _refused(errno.EACCES, "/data/e"),
    "sqlite full": (sqlite3.OperationalError("database or disk is full"), JOURNAL),
    "sqlite EIO": (sqlite3.OperationalError("disk I/O error"), JOURNAL),
    "h5py": (
        OSError(errno.ENOSPC, "Unable to create file (filename = '/data/f.h5', errno = 28)"),
        "/data/f.h5",
    ),
}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    made = harness(tmp_path, scenario(_run()))
    yield made
    made.stop()


def _failing_tick(step: Step, error: BaseException) -> Callable[[bool], None]:
    """Make ``step.tick`` raise ``error`` until the returned switch turns it off."""
    failing = [True]
    tick = step.tick

    def faulty(now: float) -> None:
        if failing[0]:
            raise error
        tick(now)

    step.tick = faulty  # type: ignore[method-assign]
    return lambda on: failing.__setitem__(0, on)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_refused_write_is_one_critical_then_a_degraded_wait(
    h: Harness, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    error, named = FAULTS[fault]
    daemon = _start(h, "step3", DegradedPace(first_s=0.05, max_s=0.1, remind_s=0.5))
    step = _step(daemon)
    expected = str(step.journal.path) if named == JOURNAL else named
    switch = _failing_tick(step, error)
    status_file = h.loop_config.work_dir / CAL / "step3.status.json"
    with caplog.at_level(logging.INFO):
        _cycle_for(h, 1.3)
        degraded = json.loads(status_file.read_text())
        switch(False)
        h.run_until(lambda: daemon.degraded is None, timeout=5)
        h.cycle()
    first, *reminders = _events(caplog, logging.CRITICAL)
    assert first["event"].startswith("cannot write to disk")
    assert first["path"] == expected and " free of " in first["free"]
    assert str(error) in first["error"]
    assert 1 <= len(reminders) <= 3  # at most every remind_s, not at every retry
    assert all(r["event"].startswith("still cannot write") for r in reminders)
    assert degraded["state"] == "degraded" and expected in degraded["degraded_reason"]
    _event(caplog, logging.INFO, "writes succeed again")
    assert json.loads(status_file.read_text())["state"] == "running"


def test_status_command_shows_a_degraded_daemon(h: Harness) -> None:
    daemon = _start(h, "step3")
    _failing_tick(_step(daemon), OSError(errno.EIO, "Input/output error", "/data/x.json"))
    h.cycle()
    assert daemon.degraded is not None
    config = str(h.root / "config" / "loop.yaml")
    [row] = json.loads(run_cli("status", "--config", config, "--json").stdout)
    assert (row["state"], row["alive"]) == ("degraded", True)
    text = run_cli("status", "--config", config).stdout
    assert "degraded" in text and "DEGRADED cannot write /data/x.json" in text
    assert "Input/output error" in text


def test_a_wall_clock_jump_is_one_warning(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    _start(h, "step3")
    with caplog.at_level(logging.WARNING):
        h.cycle()
        for step_s in (3600, 0, -7200, 30):  # 30 s is a slew, not a jump
            h.offset += step_s
            h.cycle()
    jumps = [
        e["event"].split(";")[0]
        for e in _events(caplog, logging.WARNING)
        if e["event"].startswith("wall clock jumped")
    ]
    assert jumps == ["wall clock jumped by +3600 s", "wall clock jumped by -7200 s"]


def _damage(journal: Path, how: str) -> None:
    if how == "not SQLite":
        journal.write_text("this is not a database\n" * 200)
        return
    data = bytearray(journal.read_bytes())
    data[4096:] = b"\x5a" * (len(data) - 4096)  # every page but the schema page
    journal.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["not SQLite", "damaged pages"])
def test_a_damaged_journal_stops_the_start_with_one_clear_line(h: Harness, how: str) -> None:
    """Seed: "file is not a database" with a traceback and no file name. Now one line
    naming the journal and what to do; and what it says to do works."""
    daemon = _start(h, "step2")
    h.play()
    h.run_until(lambda: _state(daemon) == "Done")
    journal = _step(daemon).journal.path
    daemon.shutdown()
    h.daemons.remove(daemon)
    _damage(journal, how)
    config = str(h.root / "config" / "loop.yaml")
    result = run_cli("step2", "-c", CAL, "--config", config, "--quiet", timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"calloop: error: journal {journal} is not a valid SQLite database")
    assert "move it aside" in line and "restart the daemon" in line
    assert str(journal) in (h.root / "logs" / CAL / "step2_ERROR.log").read_text()
    for part in (journal, Path(f"{journal}-wal"), Path(f"{journal}-shm")):  # the advice
        if part.exists():
            part.rename(part.with_name(f"{part.name}.damaged"))
    again = _start(h, "step2")
    h.run_until(lambda: _state(again) == "Done")  # found again, processed again
    assert _step(again).journal.jobs(run=RUN_A, states=(JobPhase.SUCCEEDED,))


def test_a_daemon_process_survives_a_full_disk_and_stops_at_once(tmp_path: Path) -> None:
    """Seed: all six daemons exited with status 1 on ENOSPC, and took 5-8 s to exit
    after "daemon stopped". Here the work directory and the log files share a full
    disk: the process lives on, says so on stderr, and exits 0 promptly on SIGTERM."""
    with tmpfs(tmp_path / "disk") as disk:
        made = harness(tmp_path, scenario(_run(ls=8)))
        loop_yaml = tmp_path / "config" / "loop.yaml"
        settings = yaml.safe_load(loop_yaml.read_text())
        settings.update(work_dir=str(disk / "work"), log_dir=str(disk / "logs"))
        loop_yaml.write_text(yaml.safe_dump(settings))
        status = disk / "work" / CAL / "step2.status.json"
        stderr = tmp_path / "stderr.txt"
        with open(stderr, "wb") as err:
            command = [sys.executable, "-m", "loop.cli", "step2", "-c", CAL]
            proc = subprocess.Popen([*command, "--config", str(loop_yaml), "--quiet"], stderr=err)
        try:
            _wait_for(status.exists, proc, 30)
            fill(disk)
            made.play()  # LS arrive: the daemon has things to write
            _wait_for(lambda: "cannot write to disk" in stderr.read_text(), proc, 30)
            time.sleep(2.0)  # and goes on cycling, degraded
            assert proc.poll() is None, stderr.read_text()
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = proc.wait(timeout=30)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            made.stop()
    text = stderr.read_text()
    assert code == 0, text
    assert took < 5.0, f"exit took {took:.2f} s after SIGTERM"  # < 2 s measured; CI is noisy
    assert text.count("cannot write to disk") == 1
    assert "CRITICAL" in text and "free=" in text
    assert "Traceback" not in text and "Logging error" not in text


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
