"""The sd_notify protocol without libsystemd: newline-separated ``KEY=value`` datagrams
to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket). Without the variable (tmux, tests) every call is a no-op.

A daemon run by ``Type=notify`` units sends ``READY=1`` once it has restored its runs
and is watching, ``WATCHDOG=1`` after each completed cycle (a hung cycle stops the pings
and systemd restarts the daemon after ``WatchdogSec=``; an idle daemon wakes for a cycle
when a ping is due, :meth:`Notifier.next_ping_in`), a short ``STATUS=`` line for
``systemctl status``, and ``STOPPING=1`` when it shuts down. A notification that cannot
be delivered never stops the daemon: it is one WARNING until delivery works again.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING

from loop.logs import get_logger

if TYPE_CHECKING:
    from loop.daemon import Daemon

STATUS_EVERY_S = 5.0  # systemctl status is read by a person: fresher is not needed
MAX_STATUS_CHARS = 400  # one line in systemctl status; far below the datagram limit
# the variables systemd sets for the main process only; its jobs must not see them
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | None:
    """The AF_UNIX address of ``$NOTIFY_SOCKET``: an absolute path, or ``@name`` for an
    abstract socket (leading NUL); None for anything else (e.g. ``vsock:``)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_seconds(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """The watchdog timeout in seconds, as sd_watchdog_enabled(3) reads it: None when
    unset, invalid, or meant for another process (``$WATCHDOG_PID``)."""
    if usec is None or (pid is not None and pid != str(own_pid)):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Notifier:
    """Notifications to the service manager, paced: ``WATCHDOG=1`` at most every half
    watchdog timeout, ``STATUS=`` at most every :data:`STATUS_EVERY_S`."""

    def __init__(
        self,
        address: str | None,
        watchdog_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self.monotonic = monotonic
        self.log = get_logger("calloop.notify")
        self._next_ping = 0.0
        self._next_status = 0.0
        self._failing = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for. Takes the variables out of ``environ``: jobs
        are child processes of the daemon, and a job speaking sd_notify must not pass
        for the daemon (NotifyAccess=main drops it anyway, with a warning per message)."""
        raw, usec, pid = (environ.pop(name, None) for name in ENVIRONMENT)
        address = socket_address(raw) if raw else None
        if raw and address is None:
            get_logger("calloop.notify").warning(
                "NOTIFY_SOCKET is not a path or @abstract socket; systemd is not notified",
                notify_socket=raw,
            )
        watchdog = watchdog_seconds(usec, pid, os.getpid()) if address else None
        return cls(address, watchdog)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when delivered."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failing:  # once per outage: a ping per cycle would flood the log
                self.log.warning(
                    "systemd notification not delivered; the daemon carries on, but a "
                    "watchdog may restart it",
                    error=f"{type(exc).__name__}: {exc}",
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str) -> None:
        """Start-up is complete: restored, adopted, watching."""
        self._next_status = self.monotonic() + STATUS_EVERY_S
        self.send("READY=1", _status(status))

    def alive(self, describe: Callable[[], str]) -> None:
        """A cycle completed: ping the watchdog and refresh the status when each is due;
        ``describe()`` is only called when a status is due."""
        if self.address is None:
            return
        now = self.monotonic()
        assignments = []
        if self.watchdog_s is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog_s / 2
            assignments.append("WATCHDOG=1")
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            assignments.append(_status(describe()))
        if assignments:
            self.send(*assignments)

    def next_ping_in(self) -> float:
        """Seconds until the next ``WATCHDOG=1`` is due (``inf`` without a watchdog): an
        idle daemon sleeps between cycles, and must wake for the ping (see
        :meth:`loop.daemon.Daemon.next_cycle_in`)."""
        if self.address is None or self.watchdog_s is None:
            return float("inf")
        return max(0.0, self._next_ping - self.monotonic())

    def stopping(self) -> None:
        """Shutdown has begun (systemd then waits TimeoutStopSec= for the exit)."""
        self.send("STOPPING=1", _status("stopping: finishing the cycle, persisting"))


def _status(text: str) -> str:
    line = " ".join(text.split())  # a newline would end the assignment
    return f"STATUS={line[:MAX_STATUS_CHARS]}"


def describe(daemon: Daemon) -> str:
    """The daemon in one line for ``systemctl status``: runs in flight, jobs, runs that
    need attention; the reason when it is degraded."""
    if daemon.degraded is not None:  # no journal read: the disk may be what fails
        return f"DEGRADED: {daemon.degraded.failure.reason()}"
    if daemon.step is None:
        return "starting"
    try:
        status = daemon.step.status()
    except Exception as exc:  # the next cycle meets the same error and logs it properly
        return f"status unavailable: {type(exc).__name__}: {exc}"
    runs = status["runs_in_flight"]
    line = (
        f"{len(runs)} runs in flight, {status['jobs_running']} jobs running, "
        f"{status['jobs_pending']} pending, {status['jobs_failed']} failed"
    )
    attention = status["runs_needing_attention"]
    if attention:
        line += f"; ATTENTION runs {', '.join(attention)}"
    return line
