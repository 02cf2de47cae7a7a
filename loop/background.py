"""Blocking service calls off the daemon's loop.

A registry poll or a conditions-DB upload may take its whole call deadline (see
:mod:`loop.callpolicy`); made inside a cycle, that delays every run's file processing
and the answer to SIGTERM. A :class:`BackgroundCall` runs one such call at a time on
its own daemon thread: the loop starts a call when none is in flight and collects the
outcome on a later cycle, never waiting; ``on_done`` (the daemon's wake event) tells
the sleeping loop that an outcome waits. The thread is a daemon thread, so a call stuck
in a hung service never holds the process at exit.

The loop keeps every journal write to itself: the callable given to :meth:`start` talks
to the service only, and its result is applied by the loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class ServiceHealth:
    """What the daemon knows of a service it calls: shown by ``calloop status``."""

    reachable: bool | None = None  # None: not called yet
    last_success: float | None = None
    last_error: str = ""
    last_error_at: float | None = None

    def succeeded(self, now: float) -> None:
        """A call was answered."""
        self.reachable, self.last_success = True, now

    def failed(self, now: float, error: str) -> None:
        """A call found the service unreachable (or refusing us)."""
        self.reachable, self.last_error, self.last_error_at = False, error, now


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a finished call returned or raised."""

    value: T | None = None
    error: Exception | None = None


class BackgroundCall(Generic[T]):
    """One call at a time on a dedicated daemon thread (the same thread every time, so
    a client object with thread affinity stays on one thread); ``on_done`` is called on
    that thread after each call, its outcome stored."""

    def __init__(self, name: str, on_done: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self._on_done = on_done
        self._requests: queue.SimpleQueue[Callable[[], T]] = queue.SimpleQueue()
        self._outcome: Outcome[T] | None = None
        self._busy = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A call is in flight, or its outcome was not collected yet."""
        with self._lock:
            return self._busy

    def start(self, call: Callable[[], T]) -> bool:
        """Start ``call`` unless one is in flight; True if it was started."""
        with self._lock:
            if self._busy:
                return False
            self._busy = True
        self._requests.put(call)
        return True

    def collect(self) -> Outcome[T] | None:
        """The outcome of the finished call, once; None while it runs or if none ran."""
        with self._lock:
            outcome, self._outcome = self._outcome, None
            if outcome is not None:
                self._busy = False
            return outcome

    def _serve(self) -> None:
        while True:
            call = self._requests.get()
            try:
                outcome: Outcome[T] = Outcome(value=call())
            except BaseException as exc:  # handed to the loop, which logs it with context;
                # nothing may end this thread, or the loop would wait for it forever
                error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                outcome = Outcome(error=error)
            with self._lock:
                self._outcome = outcome
            self._on_done()
