"""Run the daemons in tmux, as the seed's operators do on shift.

One session (default ``calloop``) on a dedicated tmux server (``tmux -L <socket>``, so
tests and the loop never touch an operator's own tmux), a window per calibration and in
it a pane per step running the daemon in the foreground, plus a pane following the
calibration's ``<step>_WARNING.log`` files. Windows and panes carry tmux user options
naming their calibration and role, so a later ``up`` or ``down`` finds them whatever the
operator renamed or rearranged.

``up`` only adds what is missing and never starts a second daemon for a (calibration,
step): the daemon's lock file decides whether one runs (the kernel drops the lock with
its holder, so a stale file never counts). ``down`` sends SIGTERM to the daemons of the
panes, waits until each has exited and only then closes their windows: closing a pane
first would hang up a daemon that is still shutting down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loop.config import LoopConfig
from loop.errors import CalloopError
from loop.locks import FileLock, LockTimeout
from states import STEPS
from workers.backends import procfs
from workers.backends.procfs import ProcStat

WARNINGS = "warnings"  # the role of the pane following the WARNING logs
ROLE_OPTION = "@calloop_role"
CALIBRATION_OPTION = "@calloop_calibration"
TMUX_TIMEOUT_S = 10.0  # a local tmux command answers in milliseconds; more is a hung server
STOP_TIMEOUT_S = 30.0  # a daemon finishes its cycle and exits in < 2 s; service calls may lag
POLL_S = 0.1


class TmuxError(CalloopError):
    """tmux is missing, failed or hung, or the session is not in the state asked for."""


@dataclass(frozen=True)
class Pane:
    """A pane of a calibration window: its tmux id, role (a step, ``warnings`` or empty
    for a pane the operator opened), its process and whether that process has exited."""

    pane_id: str
    role: str
    pid: int
    dead: bool


@dataclass(frozen=True)
class Launch:
    """What the panes run: the daemons of ``loop_config``, named by its absolute path."""

    loop_config: LoopConfig
    config_path: Path

    def argv(self, role: str, calibration: str) -> list[str]:
        """The daemon of step ``role``, or ``tail -F`` on the calibration's WARNING logs."""
        if role == WARNINGS:
            logs = self.loop_config.log_dir / calibration
            return ["tail", "-F", *(str(logs / f"{step}_WARNING.log") for step in STEPS)]
        return [
            sys.executable,
            "-m",
            "loop.cli",
            role,
            "-c",
            calibration,
            "--config",
            str(self.config_path),
        ]

    def command(self, role: str, calibration: str) -> str:
        """The pane's shell command. ``exec`` makes the pane's process the daemon itself,
        so ``down`` signals the daemon and not a shell that would die and leave it behind."""
        return "exec " + shlex.join(self.argv(role, calibration))


def running_daemon(loop_config: LoopConfig, calibration: str, step: str) -> str | None:
    """``pid N`` of the daemon running (calibration, step), None when none runs.

    The lock decides; the status file names the pid. The lock is taken without recording
    us in its file, which names the daemon holding it."""
    work_dir = loop_config.work_dir / calibration
    lock_path = work_dir / f"{step}.lock"
    if not lock_path.exists():
        return None
    lock = FileLock(lock_path, record=False, what=f"{step} of {calibration}")
    try:
        lock.acquire(0)
    except LockTimeout:
        return f"pid {_status_pid(work_dir / f'{step}.status.json')}"
    lock.release()
    return None


def _status_pid(path: Path) -> str:
    try:
        return str(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # starting: no status file yet
        return "unknown"


class TmuxSession:
    """One session on a dedicated tmux server; every call has a deadline and a checked
    exit code. Windows and panes are addressed by their ids (``@3``, ``%7``), which stay
    valid whatever the operator renames, and the session by its exact name (``=name``:
    tmux would otherwise take any session whose name starts with it)."""

    def __init__(self, name: str, socket: str, timeout_s: float = TMUX_TIMEOUT_S) -> None:
        self.name = name
        self.socket = socket
        self.timeout_s = timeout_s

    def _call(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["tmux", "-L", self.socket, *args]
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout_s, check=False
            )
        except FileNotFoundError:
            raise TmuxError("tmux is not installed; install it (apt-get install tmux)") from None
        except subprocess.TimeoutExpired:
            raise TmuxError(
                f"tmux {args[0]} on socket {self.socket!r} did not answer within "
                f"{self.timeout_s:g} s; is its server hung? (tmux -L {self.socket} kill-server)"
            ) from None

    def _run(self, *args: str) -> str:
        done = self._call(*args)
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1:] or ["no message"]
            raise TmuxError(
                f"tmux {args[0]} failed (exit {done.returncode}) on socket "
                f"{self.socket!r}: {reason[0]}"
            )
        return done.stdout

    @property
    def target(self) -> str:
        """The session as a tmux target."""
        return f"={self.name}"

    def exists(self) -> bool:
        """True when the session runs (has-session answers 1 for no session or no server)."""
        done = self._call("has-session", "-t", self.target)
        if done.returncode not in (0, 1):
            raise TmuxError(f"tmux has-session failed (exit {done.returncode}): {done.stderr}")
        return done.returncode == 0

    def windows(self) -> dict[str, str]:
        """Window id of each calibration window (none when the session does not run)."""
        if not self.exists():
            return {}
        listing = self._run(
            "list-windows", "-t", self.target, "-F", f"#{{window_id}}\t#{{{CALIBRATION_OPTION}}}"
        )
        rows = (line.split("\t") for line in listing.splitlines())
        return {calibration: window for window, calibration in rows if calibration}

    def panes(self, window: str | None = None) -> list[Pane]:
        """The panes of a window, or of the whole session (none when it does not run)."""
        if window is None and not self.exists():
            return []
        where = ["-s", "-t", self.target] if window is None else ["-t", window]
        fields = f"#{{pane_id}}\t#{{{ROLE_OPTION}}}\t#{{pane_pid}}\t#{{pane_dead}}"
        listing = self._run("list-panes", *where, "-F", fields)
        panes = []
        for line in listing.splitlines():
            pane_id, role, pid, dead = line.split("\t")
            panes.append(Pane(pane_id, role, int(pid), dead == "1"))
        return panes

    def new_window(self, calibration: str, role: str, command: str) -> tuple[str, str]:
        """A calibration window (and the session, when it does not run yet) whose first
        pane runs ``command`` in role ``role``; returns (window id, pane id). Its panes
        remain when their process exits, so a daemon that could not start shows why."""
        created = [
            "-d",
            "-n",
            calibration,
            "-c",
            os.getcwd(),
            "-P",
            "-F",
            "#{window_id}\t#{pane_id}",
        ]
        if self.exists():
            out = self._run("new-window", "-t", f"{self.target}:", *created, command)
        else:  # detached sessions are 80x24 by default: too small for four panes of logs
            out = self._run(
                "new-session", "-s", self.name, "-x", "200", "-y", "50", *created, command
            )
        window, pane = out.strip().split("\t")
        self._run("set-option", "-w", "-t", window, CALIBRATION_OPTION, calibration)
        self._run("set-option", "-w", "-t", window, "remain-on-exit", "on")
        self._run("set-option", "-p", "-t", pane, ROLE_OPTION, role)
        return window, pane

    def split(self, target: str, role: str, command: str, *, before: bool) -> str:
        """A pane in role ``role`` running ``command``, next to (or ``before``) the pane
        or window ``target``; returns its id. The window is tiled again at once so that
        the next split still finds room."""
        place = ["-b"] if before else []
        pane = self._run(
            "split-window",
            "-d",
            *place,
            "-t",
            target,
            "-c",
            os.getcwd(),
            "-P",
            "-F",
            "#{pane_id}",
            command,
        ).strip()
        self._run("set-option", "-p", "-t", pane, ROLE_OPTION, role)
        self._run("select-layout", "-t", target, "tiled")
        return pane

    def respawn(self, pane: str, command: str) -> None:
        """Run ``command`` again in a pane whose process exited (tmux refuses a live one)."""
        self._run("respawn-pane", "-t", pane, command)

    def capture(self, pane: str) -> str:
        """The pane's text, history included, wrapped lines joined."""
        return self._run("capture-pane", "-p", "-J", "-S", "-", "-t", pane)

    def kill_window(self, window: str) -> None:
        """Close a window and its panes."""
        self._run("kill-window", "-t", window)

    def kill(self) -> None:
        """Close the session."""
        self._run("kill-session", "-t", self.target)

    def attach_argv(self) -> list[str]:
        """The command that attaches the operator's terminal to the session."""
        return ["tmux", "-L", self.socket, "attach-session", "-t", self.target]


def up(session: TmuxSession, launch: Launch, calibrations: list[str]) -> list[str]:
    """Start every missing daemon and pane of ``calibrations``; one report line each."""
    return [line for calibration in calibrations for line in _up_one(session, launch, calibration)]


def _up_one(session: TmuxSession, launch: Launch, calibration: str) -> list[str]:
    window = session.windows().get(calibration)
    if window is None:
        # the log pane opens the window: tail never exits at once, so remain-on-exit is
        # set before any daemon in it could fail and take its pane (and the window) along
        window, _pane = session.new_window(
            calibration, WARNINGS, launch.command(WARNINGS, calibration)
        )
    panes = {pane.role: pane for pane in session.panes(window)}
    lines = []
    for step in STEPS:
        outcome = _up_step(session, launch, calibration, step, window=window, panes=panes)
        lines.append(f"{calibration} {step}: {outcome}")
    if WARNINGS not in panes:
        session.split(window, WARNINGS, launch.command(WARNINGS, calibration), before=False)
    return lines


def _up_step(
    session: TmuxSession,
    launch: Launch,
    calibration: str,
    step: str,
    *,
    window: str,
    panes: dict[str, Pane],
) -> str:
    """Start the daemon of ``step`` unless it runs or its pane is starting it; says which."""
    holder = running_daemon(launch.loop_config, calibration, step)
    if holder is not None:
        return f"skipped, already runs ({holder})"
    command = launch.command(step, calibration)
    pane = panes.get(step)
    if pane is not None and not pane.dead:  # started, not yet holding its lock
        return f"skipped, starting in pane {pane.pane_id} (pid {pane.pid})"
    if pane is not None:
        session.respawn(pane.pane_id, command)
        return f"started again in pane {pane.pane_id}"
    # before the log pane, so each window reads step2, step3, step4, warnings
    logs = panes.get(WARNINGS)
    target = window if logs is None else logs.pane_id
    return f"started in pane {session.split(target, step, command, before=logs is not None)}"


def down(
    session: TmuxSession, calibrations: list[str] | None, timeout_s: float = STOP_TIMEOUT_S
) -> list[str]:
    """SIGTERM the daemons of ``calibrations`` (None: the whole session), wait until they
    exited, then close their windows (the session, for None); one report line each."""
    windows = session.windows()
    if calibrations is not None:
        windows = {cal: windows[cal] for cal in calibrations if cal in windows}
    stopping = {}
    for calibration, window in windows.items():
        for pane in session.panes(window):
            proc = procfs.stat(pane.pid)
            if pane.role in STEPS and proc is not None and not proc.zombie:
                with contextlib.suppress(ProcessLookupError):  # exited since the listing
                    os.kill(pane.pid, signal.SIGTERM)
                stopping[proc] = f"{calibration} {pane.role} (pid {pane.pid})"
    _wait_exited(stopping, timeout_s)
    if calibrations is None:
        session.kill()
    else:
        for window in windows.values():
            session.kill_window(window)
    return [f"{label}: stopped" for label in stopping.values()]


def _wait_exited(stopping: dict[ProcStat, str], timeout_s: float) -> None:
    """Wait until every process of ``stopping`` has exited. Exited means a zombie too:
    reaping is the tmux server's business, and it does not always do it at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [
            label for proc, label in stopping.items() if procfs.live(proc.pid, proc.start_ticks)
        ]
        if not left:
            return
        if time.monotonic() >= deadline:
            raise TmuxError(
                f"still running {timeout_s:g} s after SIGTERM: {', '.join(left)}; their "
                "windows stay open: look at their panes, or kill -TERM them again"
            )
        time.sleep(POLL_S)
