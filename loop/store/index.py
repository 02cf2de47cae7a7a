"""The index inside a store file: the mutation log and the lookup tables.

Format 1 files have only the log; format 2 adds lookup tables derived from it::

    /_index                        append-only log of every mutation (add, retire, pin,
                                   unpin): one chunked compound dataset (both formats)
    /_lookup                       attrs: log_rows (how many log rows the tables reflect)
    /_lookup/versions              row n-1: (ctype, range) of version n
    /_lookup/ranges/<ctype>/run    the ctype's ranges that have a begin run, as rows in
                                   lookup order (:mod:`loop.store.lookup`), chunked by
                                   :data:`BLOCK` rows; attr ``fences``: each block's first
                                   begin
    /_lookup/ranges/<ctype>/time   the same for begin times

So a reader that opens a file to look one thing up reads the ctype's fences (one
attribute) and the block they point to, or one row of the version table, however many
versions the file holds: format 1 read and replayed the whole log instead. A writer keeps
the tables in step with the log in the same journaled transaction as its change, so a
crash leaves both or neither. It moves a few rows per change: a new range is inserted in
lookup order, usually at the end of its table.

The tables are used only when ``log_rows`` equals the log's length. A file written by an
older calloop (which appends to the log only) is read by replaying its log in memory, as
format 1 did, until the next write here rebuilds the tables from the log (:func:`migrate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from loop.errors import StoreError
from loop.store.lookup import (
    AXES,
    ROW_DTYPE,
    Axis,
    RangeEntry,
    Validity,
    decode,
    encode,
    entry_of,
    on_axis,
    row_values,
    sort_key,
    span,
)

FORMAT = 2
INDEX = "_index"
LOOKUP = "_lookup"
INTERNAL = frozenset({INDEX, LOOKUP})  # root members that are not calibration types
BLOCK = 512  # rows per block of a lookup table (and per chunk: a block is one chunk read)
VERSION_CHUNK = 256

OP_ADD, OP_RETIRE, OP_PIN, OP_UNPIN = 1, 2, 3, 4
LOG_DTYPE = np.dtype(
    [
        ("op", "u1"),
        ("ctype", "S64"),
        ("range", "S48"),
        ("version", "S16"),
        ("begin_run", "i8"),
        ("end_run", "i8"),
        ("begin_time", "f8"),
        ("end_time", "f8"),
    ]
)
VERSION_DTYPE = np.dtype([("ctype", "S64"), ("range", "S48")])


def checked_range_name(validity: Validity) -> str:
    """The range's group name, refused when it would not fit the index."""
    name = validity.name()
    if len(name) > LOG_DTYPE["range"].itemsize:
        raise StoreError(f"range {name} does not fit the index log: its times are too large")
    return name


def version_number(vid: str) -> int:
    """42 for ``v000042``."""
    return int(vid[1:])


# ------------------------------------------------------------------------------------ log


def log_rows(h5: h5py.File) -> np.ndarray:
    """The whole mutation log (empty for a file that has none yet)."""
    return h5[INDEX][()] if INDEX in h5 else np.zeros(0, LOG_DTYPE)


def _append_log(h5: h5py.File, rows: list[tuple[Any, ...]]) -> int:
    """Append mutations to the log; returns its new length."""
    if INDEX not in h5:
        h5.create_dataset(INDEX, shape=(0,), maxshape=(None,), dtype=LOG_DTYPE, chunks=(64,))
    table = h5[INDEX]
    size = table.shape[0]
    table.resize((size + len(rows),))
    table[size:] = np.array(rows, dtype=LOG_DTYPE)
    return size + len(rows)


@dataclass
class _RangeState:
    validity: Validity
    versions: list[str] = field(default_factory=list)
    retired: set[str] = field(default_factory=set)
    pinned: str | None = None

    def default(self) -> str | None:
        if self.pinned is not None:
            return self.pinned
        live = [v for v in self.versions if v not in self.retired]
        return max(live) if live else None


def replay(rows: np.ndarray) -> dict[tuple[str, str], _RangeState]:
    """Range states from the mutation log (pure)."""
    states: dict[tuple[str, str], _RangeState] = {}
    for op, ctype, range_name, vid, b_run, e_run, b_time, e_time in rows.tolist():
        key, version = (ctype.decode(), range_name.decode()), vid.decode()
        if op == OP_ADD:
            state = states.get(key)
            if state is None:
                state = states[key] = _RangeState(decode(b_run, e_run, b_time, e_time))
            state.versions.append(version)
        elif op == OP_RETIRE:
            states[key].retired.add(version)
            if states[key].pinned == version:
                states[key].pinned = None
        elif op == OP_PIN:
            states[key].pinned = version
        elif op == OP_UNPIN:
            states[key].pinned = None
    return states


def build(rows: np.ndarray) -> tuple[dict[tuple[str, Axis], np.ndarray], np.ndarray]:
    """The lookup tables (by ctype and axis) and the version table a log describes (pure)."""
    states = replay(rows)
    numbers = [version_number(v) for state in states.values() for v in state.versions]
    versions = np.zeros(max(numbers, default=0), VERSION_DTYPE)
    values: dict[str, list[tuple[Any, ...]]] = {}
    for (ctype, name), state in states.items():
        values.setdefault(ctype, []).append(
            row_values(RangeEntry(name, state.validity, state.default()))
        )
        for vid in state.versions:
            versions[version_number(vid) - 1] = (ctype, name)
    tables = {}
    for ctype, found in values.items():
        for axis in AXES:
            rows_on_axis = on_axis(np.array(found, dtype=ROW_DTYPE), axis)
            if rows_on_axis.size:
                tables[ctype, axis] = rows_on_axis
    return tables, versions


def fences(rows: np.ndarray, axis: Axis) -> np.ndarray:
    """The begin of each block's first row (see :class:`loop.store.lookup.Blocks`)."""
    return span(rows[::BLOCK], axis)[0]


# ----------------------------------------------------------------------------- writers


def is_current(h5: h5py.File) -> bool:
    """True when the file has lookup tables and they reflect its whole log."""
    lookup = h5.get(LOOKUP)
    if lookup is None:
        return False
    log = h5.get(INDEX)
    return int(lookup.attrs["log_rows"]) == (0 if log is None else log.shape[0])


def migrate(h5: h5py.File) -> None:
    """(Re)build the lookup tables from the log unless they are current. Call inside the
    writer's transaction: it commits with the change that follows."""
    if is_current(h5):
        return
    if LOOKUP in h5:
        del h5[LOOKUP]
    log = log_rows(h5)
    tables, versions = build(log)
    lookup = h5.create_group(LOOKUP)
    lookup.create_dataset("versions", data=versions, maxshape=(None,), chunks=(VERSION_CHUNK,))
    ranges = lookup.create_group("ranges")
    for (ctype, axis), rows in tables.items():
        _create_table(ranges.require_group(ctype), axis, rows)
    lookup.attrs["log_rows"] = len(log)
    h5.attrs["format_version"] = FORMAT


def rebuild_from_groups(h5: h5py.File) -> None:
    """Write a fresh log and lookup tables by walking the groups (for exported subsets)."""
    for name in INTERNAL & set(h5):
        del h5[name]
    rows = []
    for ctype, ctype_group in h5.items():
        for name, range_group in ctype_group.items():
            stored = encode(validity_of(range_group))
            for vid in sorted(range_group):
                rows.append((OP_ADD, ctype, name, vid, *stored))
                if bool(range_group[vid].attrs["retired"]):
                    rows.append((OP_RETIRE, ctype, name, vid, *stored))
            pinned = str(range_group.attrs["default_version"])
            if bool(range_group.attrs["pinned"]) and pinned:
                rows.append((OP_PIN, ctype, name, pinned, *stored))
    if rows:
        _append_log(h5, rows)
    migrate(h5)


def record(h5: h5py.File, ctype: str, entry: RangeEntry, ops: list[tuple[int, str]]) -> None:
    """Log mutations of one range (``(op, version id)`` pairs) and bring the lookup tables
    in step: the version table for adds, the range's row for its default. ``entry`` is
    the range after the mutations. Call inside the writer's transaction after
    :func:`migrate`.
    """
    stored = encode(entry.validity)
    size = _append_log(h5, [(op, ctype, entry.name, vid, *stored) for op, vid in ops])
    lookup = h5[LOOKUP]
    for op, vid in ops:
        if op == OP_ADD:
            _set_version(lookup["versions"], vid, ctype, entry.name)
    row = np.array([row_values(entry)], dtype=ROW_DTYPE)
    for axis in AXES:
        if on_axis(row, axis).size:
            _upsert(lookup["ranges"].require_group(ctype), axis, row)
    lookup.attrs["log_rows"] = size


def _create_table(group: h5py.Group, axis: Axis, rows: np.ndarray) -> None:
    table = group.create_dataset(axis, data=rows, maxshape=(None,), chunks=(BLOCK,))
    table.attrs["fences"] = fences(rows, axis)


def _set_version(versions: h5py.Dataset, vid: str, ctype: str, name: str) -> None:
    number = version_number(vid)
    if versions.shape[0] < number:
        versions.resize((number,))
    versions[number - 1] = np.array((ctype, name), dtype=VERSION_DTYPE)


def _upsert(group: h5py.Group, axis: Axis, row: np.ndarray) -> None:
    """Replace the range's row in its table (its validity never changes, only its default),
    or insert it in lookup order, moving the rows after it (usually none) down by one."""
    if axis not in group:
        _create_table(group, axis, row)
        return
    table = group[axis]
    size = table.shape[0]
    key = sort_key(row[0], axis)
    last = sort_key(table[size - 1], axis)  # the usual case, a new latest range: one row read
    if key == last:
        table[size - 1] = row[0]
    elif key > last:
        _insert(table, axis, size, row)
    else:
        _upsert_inside(table, axis, size, row)


def _upsert_inside(table: h5py.Dataset, axis: Axis, size: int, row: np.ndarray) -> None:
    """:func:`_upsert` for a row that sorts before the table's last: reads the block(s)
    the row's begin falls in."""
    fence = table.attrs["fences"]
    begin, width, name = sort_key(row[0], axis)
    # rows that begin where the new one does may start in the block before the fence
    low = max(int(np.searchsorted(fence, begin, side="left")) - 1, 0) * BLOCK
    high = min(size, int(np.searchsorted(fence, begin, side="right")) * BLOCK)
    window = table[low:high]
    begins, ends = span(window, axis)
    widths = begins - ends
    before = (begins < begin) | (
        (begins == begin) & ((widths < width) | ((widths == width) & (window["range"] < name)))
    )
    at = int(np.count_nonzero(before))  # the window is in lookup order: a prefix is before
    if at < window.size and window["range"][at] == name:
        table[low + at] = row[0]
        return
    _insert(table, axis, low + at, row)


def _insert(table: h5py.Dataset, axis: Axis, position: int, row: np.ndarray) -> None:
    """Insert ``row`` at ``position``, moving the rows after it down by one, and update
    the fences of the blocks that changed (none unless a block starts at or after it)."""
    size = table.shape[0]
    moved = row if position == size else np.concatenate([row, table[position:size]])
    table.resize((size + 1,))
    table[position:] = moved
    first = -(-position // BLOCK)  # the first block that starts at or after the new row
    if first * BLOCK > size:
        return  # no block starts at or after it: every fence stays
    fence = table.attrs["fences"]
    new_fence = np.concatenate(
        [fence[:first], span(moved[first * BLOCK - position :: BLOCK], axis)[0]]
    )
    if not np.array_equal(new_fence, fence):
        table.attrs["fences"] = new_fence


# ----------------------------------------------------------------------------- readers


def validity_of(group: h5py.Group) -> Validity:
    """The validity a range group's attributes record."""
    attrs = group.attrs
    return decode(attrs["begin_run"], attrs["end_run"], attrs["begin_time"], attrs["end_time"])


def entry_of_group(group: h5py.Group) -> RangeEntry:
    """The index entry of a range group, from its attributes."""
    name = group.name.rsplit("/", 1)[1]
    return RangeEntry(name, validity_of(group), str(group.attrs["default_version"]) or None)


class Table:
    """One lookup table (an HDF5 dataset, or an array for a file read through its log),
    its blocks read on first use and kept."""

    def __init__(self, rows: h5py.Dataset | np.ndarray, fence: np.ndarray) -> None:
        self.rows = rows
        self.fences = fence
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, number: int) -> np.ndarray:
        """The rows of block ``number``."""
        if number not in self._blocks:
            self._blocks[number] = self.rows[number * BLOCK : (number + 1) * BLOCK]
        return self._blocks[number]

    def all(self) -> np.ndarray:
        """Every row (for listings and error messages)."""
        return np.asarray(self.rows[()])


class FileIndex:
    """The index of one open file as a reader sees it, read lazily (see the module
    docstring): the lookup tables when they are current, else the log replayed."""

    def __init__(self, h5: h5py.File) -> None:
        self._tables: dict[tuple[str, Axis], Table | None] = {}
        self._memory: dict[tuple[str, Axis], np.ndarray] | None = None
        if is_current(h5):
            self._ranges: h5py.Group | None = h5[LOOKUP]["ranges"]
            self._versions: h5py.Dataset | np.ndarray = h5[LOOKUP]["versions"]
        else:
            self._ranges = None
            self._memory, self._versions = build(log_rows(h5))

    def ctypes(self) -> list[str]:
        """The calibration types that have ranges."""
        if self._memory is not None:
            return sorted({ctype for ctype, _ in self._memory})
        assert self._ranges is not None
        return sorted(self._ranges)

    def has(self, ctype: str) -> bool:
        """True when ``ctype`` has ranges."""
        if self._memory is not None:
            return any((ctype, axis) in self._memory for axis in AXES)
        assert self._ranges is not None
        return ctype in self._ranges

    def table(self, ctype: str, axis: Axis) -> Table | None:
        """The ctype's table of one axis, None when none of its ranges has that axis."""
        if (ctype, axis) not in self._tables:
            self._tables[ctype, axis] = self._open(ctype, axis)
        return self._tables[ctype, axis]

    def _open(self, ctype: str, axis: Axis) -> Table | None:
        if self._memory is not None:
            rows = self._memory.get((ctype, axis))
            return None if rows is None else Table(rows, fences(rows, axis))
        assert self._ranges is not None
        group = self._ranges.get(ctype)
        dataset = None if group is None else group.get(axis)
        return None if dataset is None else Table(dataset, dataset.attrs["fences"])

    def entries(self, ctype: str) -> list[RangeEntry]:
        """Every range of ``ctype``, by name."""
        found: dict[str, RangeEntry] = {}
        for axis in AXES:
            table = self.table(ctype, axis)
            for row in [] if table is None else table.all():
                entry = entry_of(row)
                found[entry.name] = entry
        return [found[name] for name in sorted(found)]

    def locate(self, vid: str) -> tuple[str, str] | None:
        """(ctype, range) of a version id, None when the file has no such version."""
        number = version_number(vid)
        if not 0 < number <= len(self._versions):
            return None
        ctype, name = self._versions[number - 1]
        return (ctype.decode(), name.decode()) if ctype else None

    def versions(self) -> list[tuple[str, str, str]]:
        """(version id, ctype, range) of every version, oldest first."""
        rows = np.asarray(self._versions[()])
        return [
            (f"v{number:06d}", ctype.decode(), name.decode())
            for number, (ctype, name) in enumerate(rows.tolist(), start=1)
            if ctype
        ]
