"""The serving loop shared by the simulator's HTTP servers (the registry and the
conditions-DB fault proxy).

A ``refuse`` fault cannot be played per request: a refused connection never reaches a
handler. The loop therefore closes the listening socket for the fault's window, so
clients get a real "connection refused", and binds the same port again after it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Self

from loop.logs import get_logger
from loop.sim.state import StateFileCache, now

log = get_logger("calloop.sim.server")


class FaultServer(ABC):
    """Serves :meth:`new_http`'s server and plays the ``refuse`` faults aimed at
    ``target``; subclasses build the HTTP server, and play the per-request faults."""

    target = "registry"

    def __init__(self, state_file: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cache = StateFileCache(state_file)
        self.host = host
        self._http: ThreadingHTTPServer | None = self.new_http((host, port))
        self.port = self._http.server_address[1]
        self._thread: threading.Thread | None = None
        self._background: threading.Thread | None = None
        self._stop = threading.Event()

    @abstractmethod
    def new_http(self, address: tuple[str, int]) -> ThreadingHTTPServer:
        """A listening HTTP server on ``address`` (again after each refuse window)."""

    @property
    def url(self) -> str:
        """Base URL clients use."""
        return f"http://{self.host}:{self.port}"

    def serve_forever(self, check_every_s: float = 0.05) -> None:
        """Serve until :meth:`stop`; open and close the socket as refuse faults demand."""
        while not self._stop.is_set():
            fault = self.cache.get().active_fault(now(), self.target)
            refusing = fault is not None and fault["kind"] == "refuse"
            if refusing and self._http is not None:
                self._close_http()
                log.info(
                    "refusing connections (fault)",
                    target=self.target,
                    until=fault["end"] if fault else None,
                )
            elif not refusing and self._http is None:
                self._http = self.new_http((self.host, self.port))
                log.info("accepting connections again", target=self.target)
            if self._http is not None and self._thread is None:
                self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
                self._thread.start()
            self._stop.wait(check_every_s)
        self._close_http()

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def start_background(self) -> Self:
        """Serve from a background thread (tests, the demo); returns self."""
        self._background = threading.Thread(target=self.serve_forever, daemon=True)
        self._background.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._stop.set()
        if self._background is not None:
            self._background.join(timeout=10)
