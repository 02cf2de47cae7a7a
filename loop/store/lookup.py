"""Validity ranges and the lookup rule (pure, no I/O).

A validity range has a begin and an optional end, as run numbers (end inclusive) and/or
Unix times (end exclusive); an open end means "until superseded".

**Lookup rule.** Among the ranges of a calibration type that contain the point (a run
or a time) *and still have a default version* (a range whose versions are all retired
is withdrawn and skipped), the range with the latest begin wins; ties go to the
narrower range (an open end counts as infinitely wide; equal spans on this axis, which
only ranges that differ on the other axis can have, go to the greater range name); the
answer is that range's default version: the pinned one if an expert pinned it, else the
newest not retired.

The rule is applied to rows in lookup order (:func:`on_axis`) read a block at a time
(:class:`Blocks`): the store keeps such sorted tables in each file, so a lookup reads
one block however many versions the file holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np


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


Axis = Literal["run", "time"]
AXES: tuple[Axis, ...] = ("run", "time")

# ----------------------------------------------------------------------------- range rows
#
# The index holds ranges as rows of fixed-width numbers, so that a sorted table of them
# can live in the file and be searched a block at a time. Runs use -1 and times NaN for
# "none" (the encoding of the range groups' attributes too); ``default`` is the default
# version's number, 0 when the range is withdrawn.

NO_RUN = -1
ROW_DTYPE = np.dtype(
    [
        ("begin_run", "i8"),
        ("end_run", "i8"),
        ("begin_time", "f8"),
        ("end_time", "f8"),
        ("default", "u4"),
        ("range", "S48"),
    ]
)


def encode(validity: Validity) -> tuple[int, int, float, float]:
    """``(begin_run, end_run, begin_time, end_time)`` as stored (-1 and NaN for none)."""
    return (
        NO_RUN if validity.begin_run is None else validity.begin_run,
        NO_RUN if validity.end_run is None else validity.end_run,
        math.nan if validity.begin_time is None else validity.begin_time,
        math.nan if validity.end_time is None else validity.end_time,
    )


def decode(begin_run: Any, end_run: Any, begin_time: Any, end_time: Any) -> Validity:
    """The Validity of a stored encoding (see :func:`encode`)."""
    begin_run, end_run = int(begin_run), int(end_run)
    begin_time, end_time = float(begin_time), float(end_time)
    return Validity(
        begin_run=None if begin_run == NO_RUN else begin_run,
        end_run=None if end_run == NO_RUN else end_run,
        begin_time=None if math.isnan(begin_time) else begin_time,
        end_time=None if math.isnan(end_time) else end_time,
    )


def version_id(number: int) -> str:
    """``v000042`` for 42."""
    return f"v{number:06d}"


def row_values(entry: RangeEntry) -> tuple[Any, ...]:
    """The row of a range, as a tuple for an array of :data:`ROW_DTYPE`."""
    default = 0 if entry.default is None else int(entry.default.lstrip("v"))
    return (*encode(entry.validity), default, entry.name)


def entry_of(row: np.void | np.ndarray) -> RangeEntry:
    """The range a row describes."""
    default = int(row["default"])
    return RangeEntry(
        np.asarray(row["range"]).item().decode(),
        decode(row["begin_run"], row["end_run"], row["begin_time"], row["end_time"]),
        version_id(default) if default else None,
    )


def span(rows: np.ndarray, axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """(begins, ends) of rows on one axis as floats; an open end is +inf. Rows without a
    begin on the axis get NaN begins (the axis tables never hold them)."""
    if axis == "run":
        begins = np.where(rows["begin_run"] == NO_RUN, np.nan, rows["begin_run"]).astype("f8")
        ends = np.where(rows["end_run"] == NO_RUN, np.inf, rows["end_run"]).astype("f8")
        return begins, ends
    return rows["begin_time"], np.where(np.isnan(rows["end_time"]), np.inf, rows["end_time"])


def on_axis(rows: np.ndarray, axis: Axis) -> np.ndarray:
    """The rows that have a begin on ``axis``, in lookup order: by begin, among equal begins
    the widest first (then by name), so that scanning backwards from the last row that
    begins at or before a point meets the narrowest of the latest-beginning ranges first."""
    rows = rows[~np.isnan(span(rows, axis)[0])]
    begins, ends = span(rows, axis)
    return rows[np.lexsort((rows["range"], begins - ends, begins))]


def sort_key(row: np.void | np.ndarray, axis: Axis) -> tuple[float, float, bytes]:
    """A row's position key in lookup order (see :func:`on_axis`)."""
    one = np.asarray(row).reshape(1)
    begins, ends = span(one, axis)
    return float(begins[0]), float(begins[0] - ends[0]), one["range"][0].item()


class Blocks(Protocol):
    """Rows in lookup order, read a block at a time (in memory, or a table in a file).

    ``fences[j]`` is the begin of block ``j``'s first row, so the rows that begin at or
    before a point lie in the blocks up to the last fence at or before it.
    """

    fences: np.ndarray

    def block(self, number: int) -> np.ndarray:
        """The rows of block ``number``."""
        ...


def _pick(rows: np.ndarray, point: float, axis: Axis) -> np.void | None:
    """The last row (in lookup order) that begins at or before ``point``, contains it and
    has a default version."""
    begins, ends = span(rows, axis)
    upto = int(np.searchsorted(begins, point, side="right"))
    inside = ends[:upto] >= point if axis == "run" else ends[:upto] > point
    hits = np.flatnonzero(inside & (rows["default"][:upto] != 0))
    return rows[hits[-1]] if hits.size else None


def select(blocks: Blocks, point: float, axis: Axis) -> RangeEntry | None:
    """The range the lookup rule picks for ``point``. Reads the one block the point falls
    in, and earlier blocks only while no range there covers the point."""
    for number in range(int(np.searchsorted(blocks.fences, point, side="right")) - 1, -1, -1):
        row = _pick(blocks.block(number), point, axis)
        if row is not None:
            return entry_of(row)
    return None


def nearest(rows: np.ndarray, point: float, axis: Axis, count: int = 3) -> list[RangeEntry]:
    """The ranges closest to the point, for "nothing covers this" messages."""
    begins, ends = span(rows, axis)
    gaps = np.maximum(np.maximum(begins - point, point - ends), 0.0)
    return [entry_of(rows[i]) for i in np.argsort(gaps, kind="stable")[:count]]


def point_of(run: int | None, time: float | None) -> tuple[Axis, float]:
    """The axis and point of a lookup given by ``run=`` or ``time=`` (exactly one)."""
    if (run is None) == (time is None):
        raise ValueError("give exactly one of run= or time=")
    return ("run", float(run)) if run is not None else ("time", float(time))  # type: ignore[arg-type]


class _InMemory:
    """Rows held in memory: one block."""

    def __init__(self, rows: np.ndarray, axis: Axis) -> None:
        self.rows = rows
        self.fences = span(rows[:1], axis)[0]

    def block(self, number: int) -> np.ndarray:
        return self.rows


class RangeIndex:
    """Ranges of one calibration type held in memory, sorted for O(log n) typical lookups."""

    def __init__(self, entries: list[RangeEntry]) -> None:
        self.entries = entries
        rows = np.array([row_values(entry) for entry in entries], dtype=ROW_DTYPE)
        self._axes = {axis: _InMemory(on_axis(rows, axis), axis) for axis in AXES}

    def select(self, *, run: int | None = None, time: float | None = None) -> RangeEntry | None:
        """The range the lookup rule picks for a run or a time (exactly one of them)."""
        axis, point = point_of(run, time)
        return select(self._axes[axis], point, axis)

    def nearest(
        self, *, run: int | None = None, time: float | None = None, count: int = 3
    ) -> list[RangeEntry]:
        """The ranges closest to the point, for "nothing covers this" messages."""
        axis, point = point_of(run, time)
        return nearest(self._axes[axis].rows, point, axis, count)
