"""``calloop step2|step3|step4 --all``: one process hosting one step of every calibration.

A daemon process costs about 64 MB (PSS) whatever it does, so at tens of calibrations
the processes, not the work, are the bill; a hosted daemon adds about half a megabyte
(``benchmarks/idle_cost.py``). The host runs, for each calibration YAML of the
calibrations directory, an ordinary :class:`~loop.daemon.Daemon` in a thread of its own
(:meth:`Daemon.serve <loop.daemon.Daemon.serve>`): its own lock, journal, watcher,
status file and log files (:func:`loop.logs.setup_hosted_logging`), its own blocking
wait on its own events. ``calloop status``, the web page and ``calloop runs`` see each
as any daemon, and a daemon of the same step started for one calibration is refused by
the lock, as a second daemon always is. A daemon's SQLite connections stay in its thread.

Threads rather than one loop taking turns: a cycle that takes long (the start-up scan
of the look-back window, a store lock held elsewhere: each bounded by the step's own
deadlines) delays its own calibration only. The only limit one calibration puts on the
others is the interpreter lock while its cycle computes, handed over every few
milliseconds (``sys.getswitchinterval()``).

**Failures stay with their calibration.** A YAML that does not validate, a lock held by
another daemon, a start or a run that raises: one ERROR line naming the calibration, the
file and the reason; the calibration's status file (unless another daemon holds its
lock, and with it the file) says ``state: failed`` with the reason; the start is retried
after :attr:`Backoff.first_s`, then twice as late each time up to :attr:`Backoff.max_s`
(a daemon that had run longer than that before failing starts again from the first
delay). An error within a cycle is the daemon's business, as in its own process: logged,
and the next cycle runs. The other calibrations carry on throughout.

**Signals only set flags**; the main thread acts on them. SIGHUP reloads every hosted
daemon (:meth:`Daemon.reload <loop.daemon.Daemon.reload>`: all or nothing, per
calibration), hosts a YAML added since, stops a calibration whose YAML was removed, and
retries every failed calibration at once. SIGTERM/SIGINT stop every daemon, each
shutting down in its own thread, so that one that fails keeps no other from its own.

**systemd** (``Type=notify``): READY once every daemon has been started (each restores
and scans in its own thread); the watchdog is pinged while no hosted daemon's cycle has
been running longer than the watchdog timeout. A thread cannot be killed, so a hung
calibration gets the whole process restarted, as a hung daemon of its own would be.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog

from loop.config import LoopConfig, calibration_path
from loop.control.notify import Notifier
from loop.daemon import Daemon, daemon_lock, error_line, publish_status, status_path
from loop.locks import LockTimeout
from loop.logs import SAFE_NAME, get_logger

STOP_TIMEOUT_S = 25.0
"""How long SIGTERM waits for the daemons to stop (the units' TimeoutStopSec= is 30 s);
a daemon stuck in a cycle past it ends with the process, and its jobs are re-adopted."""


@dataclass(frozen=True)
class Backoff:
    """When a calibration that failed to start (or to run) is started again."""

    first_s: float = 5.0
    max_s: float = 300.0

    def next_delay(self, previous: float | None, ran_for: float) -> float:
        """The delay after a failure: the first one, or twice the ``previous`` up to
        the maximum; the first again when the daemon had run for longer than that."""
        if previous is None or ran_for > self.max_s:
            return self.first_s
        return min(2 * previous, self.max_s)


@dataclass
class Hosted:
    """One calibration of the host: its daemon and thread while it runs (or stops),
    else why it failed and when it is started again."""

    name: str
    daemon: Daemon | None = None
    thread: threading.Thread | None = None
    started_at: float = 0.0  # monotonic, of the last start
    failure: str = ""  # set by the thread when the daemon's life ends in an error
    finished: bool = False  # set by the thread last: is_alive() may lag behind its wake
    delay: float | None = None  # the last retry delay (None: never failed)
    retry_at: float = 0.0  # monotonic


class Host:
    """The daemons of one step for every calibration of the calibrations directory.

    ``initialize()`` starts them; ``loop(now)`` is one pass of the main thread (a
    requested reload, daemons whose thread ended, retries that are due); ``shutdown()``
    stops them all; ``run_forever()`` does all that with signal handlers, blocking on
    :attr:`wake` between passes. ``on_removed(name)`` is called once a calibration is
    no longer hosted (the log router closes its files)."""

    def __init__(
        self,
        step: str,
        loop_config: LoopConfig,
        *,
        loop_config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        backoff: Backoff = Backoff(),
        on_removed: Callable[[str], None] = lambda _name: None,
    ) -> None:
        self.step_name = step
        self.loop_config = loop_config
        self.loop_config_path = loop_config_path
        self.clock = clock
        self.monotonic = monotonic
        self.backoff = backoff
        self.on_removed = on_removed
        self.log = get_logger(f"calloop.{step}").bind(step=step)
        self.wake = threading.Event()  # a thread ended, a signal came
        self.stop_requested = False
        self.reload_requested = False
        self.wanted: set[str] = set()  # the calibrations whose YAML is there
        self.hosted: dict[str, Hosted] = {}
        self._hung: set[str] = set()  # already reported

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Start a daemon for every calibration YAML."""
        self.wanted = self._scan()
        if not self.wanted:
            self.log.warning(
                "no calibration YAML to host; add one, then reload (SIGHUP)",
                path=str(self.loop_config.calibrations_dir),
            )
        self.log.info("host started", pid=os.getpid(), calibrations=sorted(self.wanted))
        self.loop(self.clock())

    def _scan(self) -> set[str]:
        directory = self.loop_config.calibrations_dir
        return {path.stem for path in directory.glob("*.yaml")} if directory.is_dir() else set()

    def loop(self, now: float) -> None:
        """One pass: apply a requested reload, collect the daemons whose thread ended
        (a failure is retried later), start the calibrations due, forget the removed."""
        self.wake.clear()  # before looking: what happens from now on wakes the next pause
        if self.reload_requested:
            self.reload_requested = False
            self._reload()
        for entry in self.hosted.values():
            if entry.thread is not None and entry.finished:
                self._ended(entry, now)
        for name in sorted(self.wanted):
            entry = self.hosted.setdefault(name, Hosted(name))
            if entry.thread is None and self.monotonic() >= entry.retry_at:
                self._start(entry, now)
        for name in [n for n, e in self.hosted.items() if n not in self.wanted and not e.thread]:
            self._stopped(self.hosted.pop(name), now)
            self.on_removed(name)
            self.log.info("calibration no longer hosted", calibration=name)

    def shutdown(self) -> None:
        """Stop every daemon and wait for them (at most :data:`STOP_TIMEOUT_S`)."""
        for entry in self.hosted.values():
            if entry.daemon is not None:
                entry.daemon.request_stop()
            else:
                self._stopped(entry, self.clock())
        deadline = self.monotonic() + STOP_TIMEOUT_S
        for entry in self.hosted.values():
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - self.monotonic()))
        stuck = sorted(e.name for e in self.hosted.values() if e.thread and e.thread.is_alive())
        if stuck:
            self.log.error(
                "daemons still in a cycle; they end with the process and their jobs are "
                "re-adopted at the next start",
                calibrations=stuck,
            )
        self.log.info("host stopped")

    # --------------------------------------------------------- one calibration

    def _start(self, entry: Hosted, now: float) -> None:
        """A daemon for ``entry`` in a new thread (a YAML that does not load fails here)."""
        try:
            daemon = Daemon(
                self.step_name,
                self.loop_config,
                entry.name,
                clock=self.clock,
                monotonic=self.monotonic,
                loop_config_path=self.loop_config_path,
            )
        except Exception as exc:  # one calibration's YAML must not stop the others
            self._failed(entry, now, error_line(exc), ran_for=0.0, logged=False)
            return
        entry.daemon, entry.failure, entry.finished = daemon, "", False
        entry.started_at = self.monotonic()
        entry.thread = threading.Thread(
            target=self._serve,
            args=(entry, daemon),
            name=f"{self.step_name}:{entry.name}",
            daemon=True,  # a hung cycle must not keep the process from exiting
        )
        entry.thread.start()

    def _serve(self, entry: Hosted, daemon: Daemon) -> None:
        """The thread of one daemon."""
        # the records of libraries called from this thread belong to this calibration
        structlog.contextvars.bind_contextvars(calibration=entry.name, step=self.step_name)
        try:
            daemon.serve()
        except Exception as exc:  # the daemon logged it; the host retries it
            entry.failure = error_line(exc)
        finally:
            entry.finished = True
            self.wake.set()

    def _ended(self, entry: Hosted, now: float) -> None:
        assert entry.thread is not None
        entry.thread.join()  # it has finished: only its last bytecodes are left
        entry.thread, entry.daemon = None, None
        if entry.failure:  # else it was asked to stop: removed, or the host stops
            ran_for = self.monotonic() - entry.started_at
            self._failed(entry, now, entry.failure, ran_for, logged=True)

    def _failed(
        self, entry: Hosted, now: float, reason: str, ran_for: float, *, logged: bool
    ) -> None:
        """Publish the failure in the calibration's status, schedule the retry, and say
        so: an ERROR, or INFO when the daemon has logged its error already."""
        entry.failure = reason
        entry.delay = self.backoff.next_delay(entry.delay, ran_for)
        entry.retry_at = self.monotonic() + entry.delay
        (self.log.info if logged else self.log.error)(
            "calibration not running; its start is retried",
            calibration=entry.name,
            file=str(calibration_path(self.loop_config, entry.name)),
            error=reason,
            retry_in_s=entry.delay,
        )
        self._publish(entry, now, "failed")

    def _stopped(self, entry: Hosted, now: float) -> None:
        """A calibration without a daemon is no longer hosted: a failed one's status
        says "stopped" (a daemon that ran said so itself), so that no host that is gone
        still asks an operator (``calloop status``) to look at it."""
        if entry.failure:
            self._publish(entry, now, "stopped")

    def _publish(self, entry: Hosted, now: float, state: str) -> None:
        """The state of a calibration without a running daemon in its status file, with
        the last failure, unless another daemon holds its lock (that daemon owns the
        file, and its status stands)."""
        if not SAFE_NAME.match(entry.name):
            return  # a file name that is no calibration name has no directory of its own
        lock = daemon_lock(self.loop_config, entry.name, self.step_name)
        path = status_path(self.loop_config, entry.name, self.step_name)
        status = {
            "calibration": entry.name,
            "step": self.step_name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": state,
            "error": entry.failure,
            "retry_in_s": entry.delay if state == "failed" else None,
            "heartbeat": now,
            "config": {
                "calibration_file": str(calibration_path(self.loop_config, entry.name)),
                "loop_file": str(self.loop_config_path or ""),
            },
        }
        try:
            with lock.hold(0):
                publish_status(path, status)
        except LockTimeout:
            return
        except OSError as exc:
            self.log.warning("status not written", calibration=entry.name, error=str(exc))

    # ------------------------------------------------------------------- reload

    def _reload(self) -> None:
        """Reload the running daemons, stop the removed, host the added, retry the
        failed now."""
        wanted = self._scan()
        added, removed = sorted(wanted - self.wanted), sorted(self.wanted - wanted)
        self.wanted = wanted
        for name, entry in self.hosted.items():
            if entry.daemon is None:
                entry.retry_at = 0.0  # the operator may have fixed it: try it now
            elif name in removed:
                entry.daemon.request_stop()
            else:
                entry.daemon.request_reload()
        self.log.info("reloading every hosted calibration", added=added, removed=removed)

    # -------------------------------------------------------------------- running

    def request_stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: stop every daemon."""
        self.stop_requested = True
        self.wake.set()

    def request_reload(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: reload at the next pass (now)."""
        self.reload_requested = True
        self.wake.set()

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        notifier = Notifier.from_environment()  # before the threads: jobs must not see it
        try:
            self.initialize()
            notifier.ready(self.describe())
            while not self.stop_requested:
                self.loop(self.clock())
                if not self.hung(notifier.watchdog_s):
                    notifier.alive(self.describe)
                self.pause(notifier.next_ping_in())
        finally:
            notifier.stopping()
            self.shutdown()
        return 0

    def next_pass_in(self) -> float:
        """Seconds until the nearest retry is due (``inf``: none)."""
        mono = self.monotonic()
        due = [e.retry_at - mono for e in self.hosted.values() if e.thread is None]
        return max(0.0, min(due, default=float("inf")))

    def pause(self, ping_in: float = float("inf")) -> None:
        """Block until a signal, a daemon's end, a retry due or the watchdog's ping."""
        timeout = min(self.next_pass_in(), ping_in)
        self.wake.wait(None if timeout == float("inf") else timeout)

    def hung(self, limit_s: float | None) -> bool:
        """True while a daemon's cycle has run longer than ``limit_s`` (the watchdog's
        timeout; None: no watchdog, nothing to tell); one ERROR per hung calibration."""
        if limit_s is None:
            return False
        hung = set()
        for entry in self.hosted.values():
            age = entry.daemon.cycle_age if entry.daemon is not None else None
            if age is not None and age > limit_s:
                hung.add(entry.name)
        for name in sorted(hung - self._hung):
            self.log.error(
                "cycle hung; the watchdog is no longer pinged, so that systemd restarts the host",
                calibration=name,
                limit_s=limit_s,
            )
        self._hung = hung
        return bool(hung)

    def describe(self) -> str:
        """The host in one line for ``systemctl status`` (no journal read: those belong
        to the daemons' threads)."""
        failed = sorted(e.name for e in self.hosted.values() if e.thread is None)
        line = f"{len(self.hosted) - len(failed)} calibrations hosted"
        if failed:
            line += f"; FAILED {', '.join(failed)}"
        return line
