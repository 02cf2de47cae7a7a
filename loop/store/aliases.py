"""Alias tables: human names and DAQ sources mapped to detector names, with validity.

One ``<root>/<dettype>/aliases.json`` per detector type, a list of
``{alias, source, detector, begin, end}`` entries (Unix times, ``end`` null = open).
A detector moved between experiments keeps its file; only its aliases change.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loop.errors import StoreError
from loop.fsutil import atomic_write_json
from loop.locks import FileLock
from loop.store.names import DETTYPE, check_detector, check_inside, check_name, is_valid


@dataclass(frozen=True)
class Alias:
    """One alias entry."""

    alias: str
    source: str
    detector: str
    begin: float
    end: float | None

    def valid_at(self, at: float) -> bool:
        """True when ``at`` lies in ``[begin, end)``."""
        return self.begin <= at and (self.end is None or at < self.end)


class AliasTable:
    """The alias table of one detector type."""

    def __init__(self, root: Path, dettype: str) -> None:
        self.dettype = check_name("detector type", dettype, DETTYPE)
        self.path = check_inside(root, root / dettype / "aliases.json")

    def entries(self) -> list[Alias]:
        """All entries (empty when the table does not exist)."""
        if not self.path.exists():
            return []
        try:
            return [Alias(**item) for item in json.loads(self.path.read_text())]
        except (ValueError, TypeError) as exc:
            raise StoreError(f"alias table {self.path} is malformed: {exc}") from None

    def add(
        self,
        alias: str,
        detector: str,
        *,
        source: str = "",
        begin: float | None = None,
        end: float | None = None,
        lock_timeout_s: float = 30.0,
    ) -> Alias:
        """Add an entry; an alias may not point to two detectors at the same time."""
        dettype, _, detid = detector.partition("-")
        check_detector(dettype, detid)
        if dettype != self.dettype:
            raise StoreError(f"detector {detector!r} is not of type {self.dettype!r}")
        entry = Alias(alias, source, detector, time.time() if begin is None else begin, end)
        if entry.end is not None and entry.end <= entry.begin:
            raise StoreError(f"alias {alias}: end {entry.end} is not after begin {entry.begin}")
        lock = FileLock(self.path.with_name("aliases.json.lock"), what=f"alias table {self.path}")
        with lock.hold(lock_timeout_s):
            entries = self.entries()
            for other in entries:
                if other.alias == alias and _overlap(other, entry):
                    raise StoreError(
                        f"alias {alias} already maps to {other.detector} from {other.begin} "
                        f"to {other.end or 'open'}; close that entry first"
                    )
            atomic_write_json(self.path, [asdict(e) for e in [*entries, entry]])
        return entry

    def resolve(self, name: str, at: float) -> str | None:
        """The detector an alias or DAQ source names at time ``at``."""
        for entry in self.entries():
            if name in (entry.alias, entry.source) and entry.valid_at(at):
                return entry.detector
        return None

    @staticmethod
    def tables(root: Path) -> list[AliasTable]:
        """Every detector type's table under ``root``."""
        if not root.is_dir():
            return []
        return [
            AliasTable(root, p.parent.name)
            for p in sorted(root.glob("*/aliases.json"))
            # a stray directory no detector type could have made must not break lookups
            if is_valid(p.parent.name, DETTYPE)
        ]

    @staticmethod
    def resolve_anywhere(root: Path, name: str, at: float | None) -> str | None:
        """Resolve ``name`` in any detector type's table."""
        moment = time.time() if at is None else at
        for table in AliasTable.tables(root):
            found = table.resolve(name, moment)
            if found:
                return found
        return None

    @staticmethod
    def all_aliases(root: Path) -> list[str]:
        """Every alias and source name (for "did you mean" suggestions)."""
        names: set[str] = set()
        for table in AliasTable.tables(root):
            for entry in table.entries():
                names.update(n for n in (entry.alias, entry.source) if n)
        return sorted(names)


def _overlap(a: Alias, b: Alias) -> bool:
    a_end = float("inf") if a.end is None else a.end
    b_end = float("inf") if b.end is None else b.end
    return a.begin < b_end and b.begin < a_end
