"""Validity ranges and the lookup rule (pure, no I/O).

A validity range has a begin and an optional end, as run numbers (end inclusive) and/or
Unix times (end exclusive); an open end means "until superseded".

**Lookup rule.** Among the ranges of a calibration type that contain the point (a run
or a time) *and still have a default version* (a range whose versions are all retired
is withdrawn and skipped), the range with the latest begin wins; ties go to the
narrower range (an open end counts as infinitely wide); the answer is that range's
default version: the pinned one if an expert pinned it, else the newest not retired.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Validity:
    """Where a range applies. ``None`` begins are unknown; ``None`` ends are open."""

    begin_run: int | None = None
    end_run: int | None = None
    begin_time: float | None = None
    end_time: float | None = None

    def __post_init__(self) -> None:
        if self.begin_run is None and self.begin_time is None:
            raise ValueError("a validity range needs a begin run or a begin time")
        if any(run is not None and run < 0 for run in (self.begin_run, self.end_run)):
            raise ValueError("run numbers cannot be negative")
        if any(t is not None and not math.isfinite(t) for t in (self.begin_time, self.end_time)):
            raise ValueError("times must be finite")
        if self.begin_run is None and self.end_run is not None:
            raise ValueError("an end run needs a begin run")
        if self.begin_time is None and self.end_time is not None:
            raise ValueError("an end time needs a begin time")
        if (
            self.end_run is not None
            and self.begin_run is not None
            and self.end_run < self.begin_run
        ):
            raise ValueError(f"end run {self.end_run} is before begin run {self.begin_run}")
        if (
            self.end_time is not None
            and self.begin_time is not None
            and self.end_time <= self.begin_time
        ):
            raise ValueError(f"end time {self.end_time} is not after begin time {self.begin_time}")

    def contains_run(self, run: int) -> bool:
        """True when ``run`` lies in the run range (end inclusive)."""
        return (
            self.begin_run is not None
            and self.begin_run <= run
            and (self.end_run is None or run <= self.end_run)
        )

    def contains_time(self, time: float) -> bool:
        """True when ``time`` lies in the time range (end exclusive)."""
        return (
            self.begin_time is not None
            and self.begin_time <= time
            and (self.end_time is None or time < self.end_time)
        )

    def name(self) -> str:
        """The range's group name in the store file (stable for equal validities)."""
        if self.begin_run is not None:
            end = "open" if self.end_run is None else f"{self.end_run:09d}"
            return f"run{self.begin_run:09d}-{end}"
        end = "open" if self.end_time is None else f"{self.end_time:.3f}"
        return f"time{self.begin_time:.3f}-{end}"

    def describe(self) -> str:
        """Human text, e.g. ``runs 386001-open``."""
        parts = []
        if self.begin_run is not None:
            parts.append(
                f"runs {self.begin_run}-{self.end_run if self.end_run is not None else 'open'}"
            )
        if self.begin_time is not None:
            end = f"{self.end_time:.0f}" if self.end_time is not None else "open"
            parts.append(f"time {self.begin_time:.0f}-{end}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RangeEntry:
    """What the index knows of one range."""

    name: str
    validity: Validity
    default: str | None  # version id, None when every version is retired


def _width(begin: float, end: float | None) -> float:
    return math.inf if end is None else end - begin


Axis = Literal["run", "time"]


def _bounds(validity: Validity, axis: Axis) -> tuple[float | None, float | None]:
    if axis == "run":
        return validity.begin_run, validity.end_run
    return validity.begin_time, validity.end_time


class _SortedAxis:
    """The ranges that have a begin on one axis (runs or times), sorted for bisection:
    by begin, and among equal begins the widest first, so that scanning backwards meets
    the narrowest of the latest-beginning ranges first."""

    def __init__(self, entries: list[RangeEntry], axis: Axis) -> None:
        self.axis = axis
        keyed = []
        for entry in entries:
            begin, end = _bounds(entry.validity, axis)
            if begin is not None:
                keyed.append(((begin, -_width(begin, end)), entry))
        keyed.sort(key=lambda item: item[0])
        self.entries = [entry for _, entry in keyed]
        self.begins = [key[0] for key, _ in keyed]

    def contains(self, entry: RangeEntry, point: float) -> bool:
        if self.axis == "run":
            return entry.validity.contains_run(int(point))
        return entry.validity.contains_time(point)

    def select(self, point: float) -> RangeEntry | None:
        for entry in reversed(self.entries[: bisect.bisect_right(self.begins, point)]):
            if entry.default is not None and self.contains(entry, point):
                return entry
        return None

    def nearest(self, point: float, count: int) -> list[RangeEntry]:
        def distance(entry: RangeEntry) -> float:
            begin, end = _bounds(entry.validity, self.axis)
            return _gap(point, float(begin or 0), None if end is None else float(end))

        return sorted(self.entries, key=distance)[:count]


class RangeIndex:
    """Ranges of one calibration type, sorted for O(log n) typical lookups."""

    def __init__(self, entries: list[RangeEntry]) -> None:
        self.entries = entries
        self._axes = {"run": _SortedAxis(entries, "run"), "time": _SortedAxis(entries, "time")}

    def _axis(self, run: int | None, time: float | None) -> tuple[_SortedAxis, float]:
        if (run is None) == (time is None):
            raise ValueError("give exactly one of run= or time=")
        if run is not None:
            return self._axes["run"], float(run)
        assert time is not None
        return self._axes["time"], time

    def select(self, *, run: int | None = None, time: float | None = None) -> RangeEntry | None:
        """The range the lookup rule picks for a run or a time (exactly one of them)."""
        axis, point = self._axis(run, time)
        return axis.select(point)

    def nearest(
        self, *, run: int | None = None, time: float | None = None, count: int = 3
    ) -> list[RangeEntry]:
        """The ranges closest to the point, for "nothing covers this" messages."""
        axis, point = self._axis(run, time)
        return axis.nearest(point, count)


def _gap(point: float, begin: float, end: float | None) -> float:
    if point < begin:
        return begin - point
    if end is not None and point > end:
        return point - end
    return 0.0
