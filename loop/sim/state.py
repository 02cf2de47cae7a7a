"""The simulated registry's state file: written by the player, served by the server.

A JSON document replaced atomically on every change, so the player and the server can
be separate processes (as the registry and the detector are at an experiment)::

    {"runs": {"<run>": {run attributes}},
     "lumisections": {"<run>": [{lumisection attributes}, ...]},
     "faults": [{"target": "registry", "kind": ..., "start": unix, "end": unix,
                 "status": 503}]}

A fault's ``target`` is the service that plays it: the registry server, or the
conditions-DB fault proxy (``conddb``); a fault without one is the registry's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.fsutil import atomic_write_json


@dataclass
class RegistryState:
    """In-memory view of the state file."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lumisections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Replace the state file atomically."""
        atomic_write_json(
            path, {"runs": self.runs, "lumisections": self.lumisections, "faults": self.faults}
        )

    @classmethod
    def load(cls, path: Path) -> RegistryState:
        """Read the state file; a missing file is an empty registry."""
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(data.get("runs", {}), data.get("lumisections", {}), data.get("faults", []))

    def active_fault(self, now: float, target: str = "registry") -> dict[str, Any] | None:
        """The fault aimed at ``target`` whose window contains ``now``, if any."""
        for fault in self.faults:
            if fault.get("target", "registry") == target and fault["start"] <= now < fault["end"]:
                return fault
        return None


class StateFileCache:
    """Re-reads the state file only when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._state = RegistryState()

    def get(self) -> RegistryState:
        """The current state (cheap when nothing changed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._state
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._state = RegistryState.load(self.path)
            self._stamp = stamp
        return self._state


def now() -> float:
    """Wall-clock Unix time (one place to name it)."""
    return time.time()
