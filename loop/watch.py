"""File arrival events: inotify through watchdog, or a polling observer for network
filesystems (EOS, NFS) where inotify sees nothing.

The watcher only queues paths; the daemon drains the queue each cycle, so a cycle's
work is proportional to what arrived, never to everything seen so far. Every accepted
path, and every *doorbell* (a file another process replaces to wake the daemon: an
operator command waits), sets :attr:`FileWatcher.wake`, on which the idle daemon blocks.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection
from pathlib import Path

from watchdog.events import (
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from loop.fsutil import is_temporary


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        accept: Callable[[Path], bool],
        sink: queue.SimpleQueue[Path],
        wake: threading.Event,
        doorbells: frozenset[Path],
    ) -> None:
        self.accept = accept
        self.sink = sink
        self.wake = wake
        self.doorbells = doorbells

    def _offer(self, raw: str | bytes) -> None:
        path = Path(raw.decode() if isinstance(raw, bytes) else raw)
        if path in self.doorbells:
            self.wake.set()
        elif not is_temporary(path) and self.accept(path):
            self.sink.put(path)
            self.wake.set()

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._offer(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._offer(event.dest_path)  # atomic writers rename into place


class FileWatcher:
    """Watch ``roots`` recursively for files that ``accept`` likes, and the
    ``doorbells`` (their directories, not recursively, unless under a root)."""

    def __init__(
        self,
        roots: list[Path],
        accept: Callable[[Path], bool],
        *,
        polling: bool = False,
        polling_interval_s: float = 1.0,
        doorbells: Collection[Path] = (),
    ) -> None:
        self.roots = roots
        self.accept = accept
        self.doorbells = frozenset(doorbells)
        self.wake = threading.Event()
        self._queue: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.polling = polling
        self.polling_interval_s = polling_interval_s
        self._observer = self._make_observer()

    def _make_observer(self) -> BaseObserver:
        if self.polling:
            return PollingObserver(timeout=self.polling_interval_s)
        return Observer()

    @property
    def alive(self) -> bool:
        """False when the observer thread died (events would be missed silently)."""
        return self._observer.is_alive()

    def restart(self) -> None:
        """Replace a dead observer with a new one."""
        self._observer = self._make_observer()
        self.start()

    def start(self) -> None:
        """Begin watching (roots are created if missing)."""
        handler = _Handler(self.accept, self._queue, self.wake, self.doorbells)
        events = [FileCreatedEvent, FileMovedEvent]
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(handler, str(root), recursive=True, event_filter=events)
        for directory in sorted({bell.parent for bell in self.doorbells}):
            if not any(directory.is_relative_to(root) for root in self.roots):
                directory.mkdir(parents=True, exist_ok=True)
                self._observer.schedule(handler, str(directory), event_filter=events)
        self._observer.start()

    def stop(self) -> None:
        """Stop watching."""
        self._observer.stop()
        self._observer.join(timeout=5)

    def drain(self) -> list[Path]:
        """Every path queued since the last call."""
        self.wake.clear()
        paths = []
        while True:
            try:
                paths.append(self._queue.get_nowait())
            except queue.Empty:
                return paths

    def scan(self, directory: Path, pattern: str) -> list[Path]:
        """List one directory (start-up, and the slow safety net for missed events)."""
        if not directory.is_dir():
            return []
        return [p for p in directory.glob(pattern) if not is_temporary(p) and self.accept(p)]
