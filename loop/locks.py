"""Advisory file locks (``flock``) that say who holds them.

``flock`` locks belong to an open file description, so two objects in one process
exclude each other just like two processes do, and the kernel drops the lock when its
holder dies (SIGKILL included): a stale lock file never blocks anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from loop.errors import CalloopError


class LockTimeout(CalloopError):
    """The lock stayed held by someone else for longer than the timeout."""


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


class FileLock:
    """An exclusive (or shared) flock on ``path`` with the holder recorded inside.

    ``acquire(timeout)`` polls until the deadline; ``timeout=0`` tries once.
    ``record=False`` leaves the file's content alone (for lock files that carry data).
    """

    def __init__(
        self, path: Path, *, shared: bool = False, what: str = "", record: bool = True
    ) -> None:
        self.path = path
        self.shared = shared
        self.record = record and not shared
        self.what = what or str(path)
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """The locked file's descriptor (only while held)."""
        if self._fd is None:
            raise RuntimeError(f"{self.what}: lock not held")
        return self._fd

    def acquire(self, timeout: float) -> None:
        """Take the lock or raise :class:`LockTimeout` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(
                        f"{self.what} is locked by {_describe_holder(self.path)} "
                        f"(waited {timeout:g} s; lock file {self.path})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        self._fd = fd
        if self.record:
            record = json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is None:
            return
        if self.record:
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[FileLock]:
        """``with lock.hold(timeout):`` acquire and always release."""
        self.acquire(timeout)
        try:
            yield self
        finally:
            self.release()
