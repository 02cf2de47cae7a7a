"""The daemon runtime shared by steps 2, 3 and 4.

``initialize()`` takes the per-(calibration, step) lock, restores every run from the
journal, re-adopts jobs and starts watching; ``loop(now)`` runs one cycle with the clock
injected (tests drive time instead of sleeping); ``shutdown()`` persists and releases.
Signal handlers only set flags: SIGTERM/SIGINT stop after the current cycle, SIGHUP
reloads the calibration YAML and loop.yaml. A reload is all or nothing: an invalid file,
or a changed key that cannot take effect without a restart (:mod:`loop.reload`), is one
ERROR naming the file or the keys, and the running configuration stays.

**The machine fails, the daemon stays.** A write the machine refuses in a cycle (a full
disk or quota, an I/O error, a read-only or forbidden path: the heartbeat, the journal,
job directories, witnesses) is one CRITICAL line naming the path, the error and the free
space there; the daemon then waits in a *degraded* state: it retries the whole cycle
after 2 s, then twice as late each time up to 30 s (:class:`DegradedPace`), repeats the
CRITICAL line at most every 5 minutes, publishes ``state: degraded`` with the reason
whenever the status file can be written, and on the first cycle that succeeds logs
"writes succeed again" and carries on. A failed journal write rolls its own transaction
back and every change is one transaction, so the journal stays consistent and the retry
goes on from it. Each retry first rescans the inputs: files the watcher delivered to a
failed cycle were not recorded.

Durations use the monotonic clock (``monotonic=``); a wall clock that moves unlike it
between two cycles (an NTP step, a manual change) is one WARNING with the jump.

**Idle costs nothing.** Between cycles the daemon blocks on its events, not on a tick:
a new file (inotify), a finished registry poll or upload (its background thread), an
operator command (its doorbell file, :mod:`loop.control.runcontrol`) and SIGTERM/SIGHUP
wake it at once; otherwise it sleeps until the nearest timer: the heartbeat, the step's
timers (registry poll, job status polls while jobs are in flight, a retry or timed
decision coming due: :meth:`~states.step.Step.next_cycle_in`), the degraded retry and
the systemd watchdog ping. The heartbeat cycle is also the safety net of every timer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from loop.conddb.client import ConditionsDB
from loop.config import (
    CalibrationConfig,
    LoopConfig,
    calibration_path,
    load_calibration,
    load_loop_config,
)
from loop.control.notify import Notifier, describe
from loop.errors import CalloopError, ConfigError, DaemonError
from loop.fsutil import error_path, free_space, storage_error_in
from loop.locks import FileLock, LockTimeout
from loop.logs import get_logger
from loop.registry import RegistryClient
from loop.reload import LIVE_CALIBRATION_KEYS, LIVE_LOOP_KEYS, changed_keys, restart_keys
from loop.store import CalibStore
from states import STEPS
from states.step import Step, StepContext
from workers.backends import make_backend

CYCLE_FAILED = "cycle failed; continuing with the next one"
CLOCK_JUMP_S = 60.0  # NTP slews by far less; more is a step worth telling the operator


@dataclass(frozen=True)
class DegradedPace:
    """How a daemon that cannot write waits: the cycle is retried ``first_s`` after the
    failure, then twice as late each time up to ``max_s``; the CRITICAL line is repeated
    at most every ``remind_s``."""

    first_s: float = 2.0
    max_s: float = 30.0
    remind_s: float = 300.0


@dataclass(frozen=True)
class WriteFailure:
    """A write the machine refused: the path (when known), the error, the room left."""

    path: Path | None
    error: str
    free: str

    @classmethod
    def of(cls, exc: BaseException, journal: Path | None, where: Path) -> WriteFailure | None:
        """The refused write in ``exc`` (None when ``exc`` is no storage error). SQLite
        names no file: a bare SQLite error comes from the daemon's ``journal``; when the
        path is unknown, the free space is that of ``where``."""
        cause = storage_error_in(exc)
        if cause is None:
            return None
        path = error_path(cause)
        if path is None and cause is exc and isinstance(cause, sqlite3.Error):
            path = journal
        return cls(path, f"{type(cause).__name__}: {cause}", free_space(path or where))

    def fields(self) -> dict[str, str]:
        """The log fields: path, error, free."""
        return {"path": str(self.path or "unknown"), "error": self.error, "free": self.free}

    def reason(self) -> str:
        """One line for the status file and ``calloop status``."""
        return f"cannot write {self.path or 'to disk'}: {self.error} ({self.free})"


@dataclass
class Degraded:
    """The degraded wait: the last refused write, since when, and the next retry."""

    failure: WriteFailure
    since: float  # wall clock, for the status
    started: float  # monotonic, like every other time below
    delay: float
    retry_at: float
    remind_at: float


def status_path(loop_config: LoopConfig, calibration: str, step: str) -> Path:
    """Where a daemon publishes its heartbeat and status."""
    return loop_config.work_dir / calibration / f"{step}.status.json"


def error_line(exc: BaseException) -> str:
    """An error in one line: a calloop error says it all, anything else its type too."""
    return str(exc) if isinstance(exc, CalloopError) else f"{type(exc).__name__}: {exc}"


def daemon_lock(loop_config: LoopConfig, calibration: str, step: str) -> FileLock:
    """The lock that makes one daemon per (calibration, step): whoever holds it owns the
    journal and the status file."""
    return FileLock(
        loop_config.work_dir / calibration / f"{step}.lock", what=f"{step} of {calibration}"
    )


def publish_status(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically, WITHOUT fsync: a reader (``calloop status``,
    operators, monitoring) sees the old file or the complete new one, because the rename
    is atomic; durability across a power cut is not needed, because a lost heartbeat is
    rewritten within ``poll.heartbeat_s`` of the restart. The fsync of the file and of
    its directory every heartbeat was most of an idle daemon's cost. The temporary name
    (dot prefix, ``.tmp`` suffix) is one that watchers and globs ignore."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(status, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_step(
    step: str,
    loop_config: LoopConfig,
    calibration: CalibrationConfig,
    clock: Callable[[], float],
    monotonic: Callable[[], float] = time.monotonic,
) -> Step:
    """The step logic with the services it needs (registry, store, conditions DB)."""
    from states.step2 import Step2
    from states.step3 import Step3
    from states.step4 import Step4

    log = get_logger(f"calloop.{step}").bind(calibration=calibration.name, step=step)
    backend = make_backend(loop_config, calibration)
    ctx = StepContext(loop_config, calibration, backend, log, clock, monotonic)
    timeouts = loop_config.timeouts
    if step == "step2":
        registry = RegistryClient(
            loop_config.registry_url,
            policy=timeouts.registry_policy(),
            max_ls=loop_config.registry_max_ls,
        )
        return Step2(ctx, registry)
    if step == "step3":
        return Step3(ctx)
    if step != "step4":
        raise DaemonError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    store = CalibStore(loop_config.store_root, lock_timeout_s=timeouts.store_lock_s)

    def connect() -> Any:
        return ConditionsDB.connect(
            loop_config.conddb_url,
            loop_config.conddb_token(),
            policy=timeouts.conddb_policy(),
        )

    return Step4(ctx, store, connect)


class Daemon:
    """One step of one calibration, as a long-running process."""

    def __init__(
        self,
        step: str,
        loop_config: LoopConfig,
        calibration: str,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        loop_config_path: Path | None = None,
        pace: DegradedPace = DegradedPace(),
    ) -> None:
        self.step_name = step
        self.loop_config = loop_config
        self.loop_config_path = loop_config_path  # re-read on SIGHUP when known
        self.cal_path = calibration_path(loop_config, calibration)
        self.calibration = load_calibration(self.cal_path)
        self.config_sha256 = self.calibration.config_hash()  # shown in every heartbeat
        self.clock = clock
        self.monotonic = monotonic
        self.pace = pace
        self.log = get_logger(f"calloop.{step}").bind(calibration=calibration, step=step)
        self.work_dir = loop_config.work_dir / calibration
        self._lock = daemon_lock(loop_config, calibration, step)
        self.step: Step | None = None
        self.stop_requested = False
        self.reload_requested = False
        self.degraded: Degraded | None = None
        self._next_heartbeat = 0.0
        self._published: dict[str, Any] | None = None  # the status last written, sans beat
        self._last_clocks: tuple[float, float] | None = None  # (wall, monotonic) of last cycle
        self.started = clock()

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Lock, restore, adopt, watch, catch up. A refused write before the journal is
        open and restored stops the start (DaemonError); later ones, in the catch-up
        scan, begin the degraded wait, whose first retry scans again."""
        try:
            self._open()
        except LockTimeout as exc:
            raise DaemonError(
                f"another {self.step_name} daemon runs for {self.calibration.name}: {exc}"
            ) from None
        except Exception as exc:
            failure = WriteFailure.of(exc, None, self.work_dir)
            if failure is None:
                raise
            raise DaemonError(
                f"{self.step_name} of {self.calibration.name} cannot start: "
                f"{failure.reason()}; free space or repair the filesystem, then start it again"
            ) from None
        assert self.step is not None
        self.step.watcher.start()
        self.log.info(
            "daemon started",
            pid=os.getpid(),
            backend=self.step.jobs.backend.name,
            runs_restored=len(self.step.models),
        )
        now = self.clock()
        try:
            self.step.startup_scan()
            self._heartbeat(now)
        except Exception as exc:
            if not self._write_failed(exc, now):
                raise

    def _open(self) -> None:
        self._lock.acquire(0)
        self.step = build_step(
            self.step_name, self.loop_config, self.calibration, self.clock, self.monotonic
        )
        self.step.restore()

    def loop(self, now: float) -> None:
        """One cycle. An unexpected error is logged and the daemon carries on; a refused
        write begins (or prolongs) the degraded wait, during which the cycle only runs
        when its retry is due."""
        assert self.step is not None, "initialize() first"
        self._watch_clock(now)
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        if self.degraded is not None and self.monotonic() < self.degraded.retry_at:
            return
        try:
            self._cycle(now)
        except Exception as exc:  # one bad cycle must not kill the daemon
            if not self._write_failed(exc, now):
                self.log.exception(CYCLE_FAILED)

    def _cycle(self, now: float) -> None:
        assert self.step is not None
        if self.degraded is not None:
            self._heartbeat(now)  # the smallest write first: can the daemon write at all?
            self.step.startup_scan()  # files drained by a failed cycle were not recorded
        try:
            self.step.tick(now)
        except Exception as exc:
            if storage_error_in(exc) is not None:
                raise  # the degraded wait, in loop()
            self.log.exception(CYCLE_FAILED)
        if self.degraded is not None:
            self._recovered()
        if now >= self._next_heartbeat:
            self._heartbeat(now)

    def shutdown(self) -> None:
        """Stop watching, publish the final status, release the lock."""
        if self.step is not None:
            self.step.watcher.stop()
            try:
                self._heartbeat(self.clock(), "stopped")
            except Exception as exc:  # the daemon stops either way
                self.log.warning(
                    "final status not written; the status file keeps the last heartbeat",
                    error=f"{type(exc).__name__}: {exc}",
                )
            self.step.close()
        self._lock.release()
        self.log.info("daemon stopped")

    def reload(self) -> None:
        """Re-read the calibration YAML (and loop.yaml when its path is known); apply
        it only if it is valid and every changed key is live."""
        try:
            calibration = load_calibration(self.cal_path)
            loop_config = (
                load_loop_config(self.loop_config_path)
                if self.loop_config_path is not None
                else self.loop_config
            )
        except ConfigError as exc:
            self.log.error(
                "reload rejected: a configuration file is invalid; the previous "
                "configuration keeps running",
                problems=exc.problems,
            )
            return
        loop_changed = changed_keys(self.loop_config, loop_config)
        calibration_changed = changed_keys(self.calibration, calibration)
        changed = [*(f"loop.{k}" for k in loop_changed), *calibration_changed]
        blocked = [
            *(f"loop.{k}" for k in restart_keys(loop_changed, LIVE_LOOP_KEYS)),
            *restart_keys(calibration_changed, LIVE_CALIBRATION_KEYS),
        ]
        if blocked:
            self.log.error(
                "reload refused: these keys cannot change while the daemon runs; "
                "restart the daemon to apply them (the previous configuration keeps running)",
                keys=blocked,
            )
            return
        self.calibration, self.loop_config = calibration, loop_config
        self.config_sha256 = calibration.config_hash()
        if self.step is not None:
            self.step.reconfigure(loop_config, calibration)
        self.log.info("configuration reloaded", changed=changed, config_sha256=self.config_sha256)

    def _heartbeat(self, now: float, state: str | None = None) -> None:
        """Publish the status; ``state`` defaults to running, or degraded with the reason.

        A status like the one last published only has its file's modification time set
        to ``now`` (``calloop status`` reads the beat from both: see
        :func:`loop.commands.daemon_cmd.beat_time`): one metadata update, no
        new file, no rename that wakes the watchers of the calibration's directory. The
        degraded wait always rewrites the file: that write is its test of the disk."""
        self._next_heartbeat = now + self.loop_config.poll.heartbeat_s
        status = self.step.status() if self.step is not None else {}
        if self.degraded is not None:
            status["degraded_reason"] = self.degraded.failure.reason()
            status["degraded_since"] = self.degraded.since
        document = {
            "calibration": self.calibration.name,
            "step": self.step_name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "state": state or ("running" if self.degraded is None else "degraded"),
            "config": {
                "calibration_file": str(self.cal_path),
                "config_sha256": self.config_sha256,
                "loop_file": str(self.loop_config_path or ""),
            },
            **status,
        }
        path = status_path(self.loop_config, self.calibration.name, self.step_name)
        try:
            if self.degraded is None and document == self._published:
                with contextlib.suppress(FileNotFoundError):  # deleted: written again below
                    os.utime(path, (now, now))
                    return
            self._published = None  # until the new one is in place
            publish_status(path, {**document, "heartbeat": now})
            self._published = document
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # name the file

    # ------------------------------------------------------------- degraded wait

    def _write_failed(self, exc: Exception, now: float) -> bool:
        """Begin or prolong the degraded wait if ``exc`` is a refused write; False if not."""
        journal = self.step.journal.path if self.step is not None else None
        failure = WriteFailure.of(exc, journal, self.work_dir)
        if failure is None:
            return False
        mono = self.monotonic()
        degraded = self.degraded
        if degraded is None:
            self.degraded = Degraded(
                failure,
                since=now,
                started=mono,
                delay=self.pace.first_s,
                retry_at=mono + self.pace.first_s,
                remind_at=mono + self.pace.remind_s,
            )
            self.log.critical(
                "cannot write to disk; the daemon keeps running and retries the cycle until "
                "writes succeed: free space, or repair the filesystem or the permissions of "
                "the path",
                **failure.fields(),
            )
            with contextlib.suppress(Exception):  # the status may be on the failing disk too
                self._heartbeat(now)
            return True
        degraded.failure = failure
        degraded.delay = min(2 * degraded.delay, self.pace.max_s)
        degraded.retry_at = mono + degraded.delay
        if mono >= degraded.remind_at:
            degraded.remind_at = mono + self.pace.remind_s
            self.log.critical(
                "still cannot write to disk; the daemon keeps retrying the cycle",
                degraded_for_s=round(mono - degraded.started),
                **failure.fields(),
            )
        return True

    def _recovered(self) -> None:
        assert self.degraded is not None
        self.log.info(
            "writes succeed again; the daemon carries on",
            degraded_for_s=round(self.monotonic() - self.degraded.started, 1),
            last_error=self.degraded.failure.error,
        )
        self.degraded = None
        self._next_heartbeat = 0.0  # publish "running" at once

    def _watch_clock(self, now: float) -> None:
        """One WARNING when the wall clock moved unlike the monotonic clock since the
        last cycle (waits are measured on the monotonic one and are not affected)."""
        mono = self.monotonic()
        if self._last_clocks is not None:
            wall_delta, mono_delta = now - self._last_clocks[0], mono - self._last_clocks[1]
            jump = wall_delta - mono_delta
            if abs(jump) > CLOCK_JUMP_S:
                self.log.warning(
                    f"wall clock jumped by {jump:+.0f} s; waits are measured on the "
                    "monotonic clock and are not affected",
                    wall_delta_s=round(wall_delta, 1),
                    monotonic_delta_s=round(mono_delta, 1),
                )
        self._last_clocks = (now, mono)

    # -------------------------------------------------------------------- running

    def request_stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: stop after the current cycle."""
        self.stop_requested = True
        if self.step is not None:
            self.step.watcher.wake.set()

    def request_reload(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: reload the calibration at the next cycle (now)."""
        self.reload_requested = True
        if self.step is not None:
            self.step.watcher.wake.set()

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.serve(Notifier.from_environment())  # systemd's Type=notify; no-op without it
        return 0

    def serve(self, notifier: Notifier | None = None) -> None:
        """Initialize, cycle until :meth:`request_stop`, shut down: the daemon's whole
        life, without signal handlers, so that a host can run many daemons, each in a
        thread of its own (:mod:`loop.hosting`). A failed start is one ERROR line, then
        what it took (the lock, the journal) is released and the error raised: the host
        retries in the same process, where a lock left held would refuse every retry."""
        notifier = notifier or Notifier(None)
        try:
            self.initialize()
        except Exception as exc:
            self.log.error("daemon cannot start", error=error_line(exc))  # in the files too
            self._release_after_failed_start()
            raise
        assert self.step is not None
        notifier.ready(describe(self))
        try:
            while not self.stop_requested:
                self.loop(self.clock())
                notifier.alive(lambda: describe(self))  # a hung cycle starves the watchdog
                self.pause(notifier.next_ping_in())
        except Exception:  # loop() keeps a cycle's errors; this is outside it (the wait)
            self.log.exception("daemon stopped by an unexpected error")
            raise
        finally:
            notifier.stopping()
            self.shutdown()

    def _release_after_failed_start(self) -> None:
        if self.step is not None:
            with contextlib.suppress(Exception):  # the start failed already; free the rest
                if self.step.watcher.alive:
                    self.step.watcher.stop()
                self.step.close()
            self.step = None
        self._lock.release()

    @property
    def cycle_age(self) -> float | None:
        """Monotonic seconds since the last cycle began (None before the first): an idle
        daemon cycles at least every ``poll.heartbeat_s``, so a large age is a hung cycle."""
        if self._last_clocks is None:
            return None
        return self.monotonic() - self._last_clocks[1]

    def next_cycle_in(self, now: float) -> float:
        """Seconds until the next cycle is due when no event comes: the heartbeat, or
        the step's nearest timer; in the degraded wait, the retry."""
        assert self.step is not None
        if self.degraded is not None:
            return max(0.0, self.degraded.retry_at - self.monotonic())
        # capped at heartbeat_s: a wall clock stepped back must not stop the heartbeat
        heartbeat = min(self._next_heartbeat - now, self.loop_config.poll.heartbeat_s)
        return max(0.0, min(heartbeat, self.step.next_cycle_in(now)))

    def pause(self, ping_in: float = math.inf) -> None:
        """Block until the next cycle (see the module docstring): an event wakes the
        loop at once, except in the degraded wait, where file events wait for the retry
        (SIGTERM and SIGHUP still wake it); ``ping_in`` is the watchdog's deadline."""
        assert self.step is not None
        wake = self.step.watcher.wake
        if self.degraded is not None:
            wake.clear()  # else a file event left set would spin the loop until the retry
        wake.wait(min(self.next_cycle_in(self.clock()), ping_in))
