"""The versioned HDF5 calibration store (after the LCLS Detector Calibration Store).

Layout: ``<root>/<dettype>/<dettype>-<detid>.h5``, one self-consistent file per detector,
plus ``<root>/<dettype>/aliases.json``. Inside a file::

    /                        attrs: dettype, detid, created, predecessor, successor,
                                    parameters (JSON), history (JSON), next_version
    /<ctype>/                attrs: ctype, parameters, history
    /<ctype>/<range>/        attrs: begin_run, end_run, begin_time, end_time,
                                    default_version, pinned, history
    /<ctype>/<range>/<vid>/  dataset ``calib``; attrs: produced, metadata (JSON),
                                    comment, retired, content_hash, history

Versions are immutable once written; nothing is deleted by normal use (retired versions
stay readable but are never default). See :mod:`loop.store.lookup` for the lookup rule.

Concurrency: one writer per file (``<file>.lock``, holder named on timeout); writers
commit through a redo journal (:mod:`loop.store.journal`) applied under an exclusive
``<file>.rlock`` that readers hold shared while they read, so a reader never sees a
half-written version. The ``.rlock`` file also carries a generation counter, bumped
before every apply and replay, that tells readers when to reopen their cached handle and
index, and a writer when the handle it kept open since its last commit is stale.
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import hashlib
import json
import os
import struct
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import h5py
import numpy as np

from loop import __version__
from loop.errors import StoreError
from loop.fsutil import atomic_path
from loop.locks import FileLock
from loop.store.index import (
    FORMAT,
    OP_ADD,
    OP_PIN,
    OP_RETIRE,
    OP_UNPIN,
    FileIndex,
    checked_range_name,
    entry_of_group,
    migrate,
    record,
    validity_of,
)
from loop.store.journal import JournaledFile, pending, recover
from loop.store.lookup import RangeEntry, Validity, encode, nearest, point_of, select, version_id
from loop.store.names import check_detector, check_inside, check_name

LIBVER = "latest"
_GEN = struct.Struct("<Q")


# ------------------------------------------------------------------------------ records


class AddOptions(TypedDict, total=False):
    """Keyword options of :meth:`Detector.add` and :meth:`Batch.add`."""

    begin: int | None
    end: int | None
    begin_time: float | None
    end_time: float | None
    metadata: dict[str, Any] | None
    comment: str
    force: bool
    allow_nonfinite: bool
    retired: bool
    produced: float | None


@dataclass(frozen=True)
class Constants:
    """One version's payload and what is known about it."""

    array: np.ndarray
    version: str
    ctype: str
    range: str
    validity: Validity
    produced: float
    metadata: dict[str, Any]
    comment: str
    retired: bool


@dataclass(frozen=True)
class VersionInfo:
    """A version without its array (for listings)."""

    version: str
    ctype: str
    range: str
    produced: float
    retired: bool
    is_default: bool
    shape: tuple[int, ...]
    dtype: str
    comment: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class HistoryRecord:
    """One entry of a history: at file, ctype, range or version level."""

    time: float
    user: str
    action: str
    text: str
    where: str = "/"


def _json_attr(obj: h5py.HLObject, key: str, default: Any) -> Any:
    raw = obj.attrs.get(key)
    return default if raw is None else json.loads(raw)


def _now_user() -> tuple[float, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return time.time(), user


def _history(records: list[dict[str, Any]], action: str, text: str) -> str:
    """The ``history`` attribute: ``records`` and a new one, as JSON."""
    stamp, user = _now_user()
    return json.dumps([*records, {"time": stamp, "user": user, "action": action, "text": text}])


def _append_history(obj: h5py.HLObject, action: str, text: str) -> None:
    obj.attrs["history"] = _history(_json_attr(obj, "history", []), action, text)


def content_hash(array: np.ndarray) -> str:
    """SHA-256 over dtype, shape and bytes: equal arrays, equal hashes."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _shape_mismatch(ctype_group: h5py.Group, array: np.ndarray) -> str | None:
    """Why ``array`` does not fit the ctype's current default layout, or None."""
    current = ctype_group.attrs.get("current_shape")  # written with current_version
    if current is None:
        return None
    shape = tuple(int(n) for n in current)
    dtype = np.dtype(str(ctype_group.attrs["current_dtype"]))
    if shape == array.shape and dtype == array.dtype:
        return None
    return (
        f"shape/dtype {array.shape}/{array.dtype} differs from the current default "
        f"{ctype_group.attrs['current_version']} ({shape}/{dtype})"
    )


STORABLE_KINDS = "biufc"  # bool, integer, float, complex: what a calibration array may hold


def check_storable(what: str, dtype: np.dtype) -> None:
    """Refuse dtypes other than plain numbers and booleans (objects, strings, records)."""
    if dtype.kind not in STORABLE_KINDS or dtype.subdtype is not None:
        raise StoreError(f"{what}: dtype {dtype} is not a plain numeric or boolean type")


def _newest_valid(range_group: h5py.Group) -> str | None:
    live = [name for name, v in range_group.items() if not bool(v.attrs["retired"])]
    return max(live) if live else None


# ------------------------------------------------------------------------------- reader


@dataclass
class _Snapshot:
    """An open read handle and its index, valid for one generation of the file."""

    generation: int
    h5: h5py.File
    handle: Any  # the Python file object h5py reads through
    index: FileIndex

    def __post_init__(self) -> None:
        # closes the handles when the snapshot is dropped without close() (no leaked fds)
        self.close = weakref.finalize(self, _close_handles, self.h5, self.handle)


def _close_handles(h5: h5py.File, handle: Any) -> None:
    h5.close()
    handle.close()


def _file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime) of ``path``: changes when anything but our writer touched it."""
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


@dataclass
class _WriteHandle:
    """A writer's open file, kept between its transactions.

    Opening the file, checking its index and closing it again were 1.5-2 ms of a small
    transaction's 8-10 ms, before the writes re-read the metadata they need. Between
    transactions HDF5's metadata cache is clean (each commit flushed it into the journal)
    and matches the file as long as nobody else wrote: the generation and the file's
    identity after our commit say so.
    """

    journaled: JournaledFile
    h5: h5py.File
    generation: int = -1
    identity: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.close = weakref.finalize(self, _close_handles, self.h5, self.journaled)


def open_readonly(path: Path) -> tuple[h5py.File, Any]:
    """Open ``path`` for reading through a Python file object.

    HDF5 shares one internal file (and its metadata cache) among all native opens of
    the same inode in a process, so a native open next to an older handle would see
    stale metadata; the file-object driver is never shared.
    """
    handle = open(path, "rb")  # noqa: SIM115 (closed with the snapshot)
    try:
        return h5py.File(handle, "r"), handle
    except BaseException:
        handle.close()
        raise


def _build_snapshot(path: Path, generation: int) -> _Snapshot:
    h5, handle = open_readonly(path)
    try:
        return _Snapshot(generation, h5, handle, FileIndex(h5))
    except BaseException:
        _close_handles(h5, handle)
        raise


class Detector:
    """One detector's calibration file: lookups, listings, and (locked) writes."""

    def __init__(self, store: CalibStore, dettype: str, detid: str) -> None:
        self.store = store
        self.dettype, self.detid = check_detector(dettype, detid)
        self.name = f"{dettype}-{detid}"
        self.path = check_inside(store.root, store.root / dettype / f"{self.name}.h5")
        self._writer = FileLock(
            self.path.with_name(self.path.name + ".lock"), what=f"calibration file {self.path}"
        )
        self._rlock_path = self.path.with_name(self.path.name + ".rlock")
        self._snapshot: _Snapshot | None = None
        self._write_handle: _WriteHandle | None = None

    # --------------------------------------------------------------------- read access

    def exists(self) -> bool:
        """True once the detector's file has been created."""
        return self.path.exists()

    def _generation(self, fd: int) -> int:
        raw = os.pread(fd, _GEN.size, 0)
        return _GEN.unpack(raw)[0] if len(raw) == _GEN.size else 0

    @contextlib.contextmanager
    def _reading(self) -> Iterator[_Snapshot]:
        """Hold the shared read lock and yield an up-to-date snapshot."""
        if not self.exists():
            raise StoreError(f"detector {self.name}: no calibration file {self.path} yet")
        for _ in range(3):
            lock = FileLock(self._rlock_path, shared=True, what=f"reading {self.path}")
            lock.acquire(self.store.lock_timeout_s)
            try:
                if pending(self.path):
                    raise _NeedsRecovery
                generation = self._generation(lock.fd)
                if self._snapshot is None or self._snapshot.generation != generation:
                    self._close_snapshot()
                    try:
                        self._snapshot = _build_snapshot(self.path, generation)
                    except (OSError, KeyError, ValueError) as exc:
                        raise StoreError(
                            f"calibration file {self.path} is unreadable ({exc}); "
                            "restore it from the repository copy"
                        ) from exc
                yield self._snapshot
                return
            except _NeedsRecovery:
                pass
            finally:
                lock.release()
            with self._writer.hold(self.store.lock_timeout_s):
                self._recover()
        raise StoreError(
            f"{self.path}: could not obtain a consistent view (journal keeps returning)"
        )

    def _close_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None

    def close(self) -> None:
        """Close the cached read and write handles."""
        self._close_snapshot()
        self._drop_write_handle()

    def ctypes(self) -> list[str]:
        """Calibration types present in the file."""
        with self._reading() as snap:
            return snap.index.ctypes()

    def ranges(self, ctype: str) -> list[RangeEntry]:
        """The ranges of ``ctype`` in begin order."""
        with self._reading() as snap:
            self._check_ctype(snap, ctype)
            return snap.index.entries(ctype)

    def versions(
        self, ctype: str | None = None, range_name: str | None = None
    ) -> list[VersionInfo]:
        """Every version (of one ctype, of one of its ranges, or all), oldest first."""
        with self._reading() as snap:
            return [
                self._version_info(snap.h5[vctype][vrange], vid, vctype, vrange)
                for vid, vctype, vrange in snap.index.versions()
                if (ctype is None or vctype == ctype)
                and (range_name is None or vrange == range_name)
            ]

    @staticmethod
    def _version_info(
        range_group: h5py.Group, vid: str, ctype: str, range_name: str
    ) -> VersionInfo:
        group = range_group[vid]
        data = group["calib"]
        return VersionInfo(
            version=vid,
            ctype=ctype,
            range=range_name,
            produced=float(group.attrs["produced"]),
            retired=bool(group.attrs["retired"]),
            is_default=str(range_group.attrs["default_version"]) == vid,
            shape=tuple(data.shape),
            dtype=str(data.dtype),
            comment=str(group.attrs["comment"]),
            metadata=_json_attr(group, "metadata", {}),
        )

    def _check_ctype(self, snap: _Snapshot, ctype: str) -> None:
        if snap.index.has(ctype):
            return
        known = snap.index.ctypes()
        close = difflib.get_close_matches(ctype, known, n=3)
        raise StoreError(
            f"detector {self.name}: no calibration type {ctype!r}"
            + (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; it has {', '.join(known) or 'none'}"
            )
        )

    def get(
        self,
        ctype: str,
        *,
        run: int | None = None,
        time: float | None = None,
        version: str | None = None,
    ) -> Constants:
        """Constants of ``ctype`` valid at a run or a time, or one explicit version."""
        with self._reading() as snap:
            if version is not None:
                return self._read_version(snap, ctype, normalize_version(version))
            axis, point = point_of(run, time)
            self._check_ctype(snap, ctype)
            table = snap.index.table(ctype, axis)
            entry = None if table is None else select(table, point, axis)
            if entry is None:
                where = f"run {run}" if run is not None else f"time {time}"
                near = "; ".join(
                    f"{e.name} ({e.validity.describe()})"
                    for e in ([] if table is None else nearest(table.all(), point, axis))
                )
                raise StoreError(
                    f"detector {self.name}: no valid {ctype} constants cover {where}"
                    + (f"; nearest ranges: {near}" if near else "; the type has no ranges")
                )
            assert entry.default is not None
            return self._constants(snap, ctype, entry.name, entry.default, entry.validity)

    def _read_version(self, snap: _Snapshot, ctype: str, vid: str) -> Constants:
        where = snap.index.locate(vid)
        if where is None or where[0] != ctype:
            raise StoreError(f"detector {self.name}: no version {vid} of {ctype}")
        validity = validity_of(snap.h5[ctype][where[1]])
        return self._constants(snap, ctype, where[1], vid, validity)

    @staticmethod
    def _constants(
        snap: _Snapshot, ctype: str, range_name: str, vid: str, validity: Validity
    ) -> Constants:
        group = snap.h5[f"{ctype}/{range_name}/{vid}"]
        attrs = group.attrs
        return Constants(
            array=group["calib"][()],
            version=vid,
            ctype=ctype,
            range=range_name,
            validity=validity,
            produced=float(attrs["produced"]),
            metadata=_json_attr(group, "metadata", {}),
            comment=str(attrs["comment"]),
            retired=bool(attrs["retired"]),
        )

    def history(self, ctype: str | None = None) -> list[HistoryRecord]:
        """History records of the file (or of one ctype), all levels, oldest first."""
        with self._reading() as snap:
            records: list[HistoryRecord] = []

            def collect(name: str, obj: h5py.HLObject) -> None:
                for rec in _json_attr(obj, "history", []):
                    records.append(
                        HistoryRecord(
                            rec["time"], rec["user"], rec["action"], rec["text"], "/" + name
                        )
                    )

            top = snap.h5 if ctype is None else snap.h5.get(ctype)
            if top is None:
                self._check_ctype(snap, ctype or "")  # raises with close matches
            prefix = ctype or ""
            collect(prefix, top)
            top.visititems(
                lambda n, o: (
                    collect(f"{prefix}/{n}".lstrip("/"), o) if isinstance(o, h5py.Group) else None
                )
            )
            return sorted(records, key=lambda r: r.time)

    def diff(self, ctype: str, v1: str, v2: str) -> dict[str, Any]:
        """Per-element statistics of ``v2 - v1`` and how many elements changed."""
        a, b = self.get(ctype, version=v1).array, self.get(ctype, version=v2).array
        if a.shape != b.shape:
            return {"comparable": False, "shape1": list(a.shape), "shape2": list(b.shape)}
        delta = b.astype(np.float64) - a.astype(np.float64)
        changed = ~((a == b) | (np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))))
        finite = delta[np.isfinite(delta)]
        return {
            "comparable": True,
            "elements": int(a.size),
            "changed": int(changed.sum()),
            "max_abs_diff": float(np.abs(finite).max()) if finite.size else 0.0,
            "mean_diff": float(finite.mean()) if finite.size else 0.0,
            "rms_diff": float(np.sqrt((finite**2).mean())) if finite.size else 0.0,
        }

    # -------------------------------------------------------------------- write access

    def _apply_lock(self) -> FileLock:
        # record=False: the .rlock file carries the generation counter, not a holder
        return FileLock(self._rlock_path, what=f"applying to {self.path}", record=False)

    def _recover(self) -> None:
        """Finish or discard a dead writer's commit. Under the writer lock, only a dead
        writer can have left a journal, so checking without the apply lock is safe."""
        if pending(self.path):
            with self._apply_lock().hold(self.store.lock_timeout_s) as rlock:
                self._bump_generation(rlock.fd)  # the replay changes the file
                recover(self.path)

    def _bump_generation(self, fd: int) -> int:
        """Tell readers and kept writer handles that the file changes; returns the new
        generation. Call under the apply lock, before changing the file: a writer killed
        after the change then still leaves the file's new generation behind."""
        generation = self._generation(fd) + 1
        os.pwrite(fd, _GEN.pack(generation), 0)
        return generation

    def _current_generation(self) -> int:
        try:
            fd = os.open(self._rlock_path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            return self._generation(fd)
        finally:
            os.close(fd)

    def _drop_write_handle(self) -> None:
        """Close the kept write handle; the changes it holds in memory are never committed."""
        if self._write_handle is not None:
            self._write_handle.close()
            self._write_handle = None

    def _handle_for_writing(self) -> _WriteHandle:
        """The kept write handle if nobody else changed the file since our last commit,
        else a freshly opened one. Call under the writer lock, after recovery."""
        kept = self._write_handle
        if kept is not None and (
            kept.generation == self._current_generation()
            and kept.identity == _file_identity(self.path)
        ):
            return kept
        self._drop_write_handle()
        journaled = JournaledFile(self.path)
        try:
            # no chunk cache: a cached chunk is written back whole, so appending one row
            # to an index table cost a chunk of journal pages (43 KiB) instead of one page
            h5 = h5py.File(journaled, "r+", libver=LIBVER, rdcc_nbytes=0)
        except BaseException:
            journaled.close()
            raise
        self._write_handle = _WriteHandle(journaled, h5)
        migrate(h5)  # a file written by an older calloop gets its tables
        return self._write_handle

    @contextlib.contextmanager
    def _writing(self) -> Iterator[h5py.File]:
        """One atomic transaction on the file under the writer lock.

        A refused transaction leaves its changes in the write handle's memory only: the
        handle is dropped. A refused first transaction also removes the file it created:
        a failed add or import leaves no empty detector behind.
        """
        with self._writer.hold(self.store.lock_timeout_s):
            check_inside(self.store.root, self.path)  # a symlink may have appeared since
            created = not self.exists()
            if created:
                self._drop_write_handle()  # a kept handle of a removed file
                self._create()
            self._recover()
            try:
                handle = self._handle_for_writing()
                yield handle.h5
                handle.h5.flush()  # every change into the journaled file's pages
            except BaseException:
                self._drop_write_handle()
                if created:
                    self.path.unlink()
                raise
            try:
                self._commit(handle)
            except BaseException:
                self._drop_write_handle()  # the file may now differ from its cache
                raise

    def _commit(self, handle: _WriteHandle) -> None:
        with self._apply_lock().hold(self.store.lock_timeout_s) as rlock:
            handle.generation = self._bump_generation(rlock.fd)
            handle.journaled.commit()
            handle.identity = _file_identity(self.path)

    def _create(self) -> None:
        stamp, user = _now_user()
        with atomic_path(self.path, ".h5") as tmp, h5py.File(tmp, "w", libver=LIBVER) as h5:
            h5.attrs.update(
                dettype=self.dettype,
                detid=self.detid,
                created=stamp,
                predecessor="",
                successor="",
                parameters="{}",
                next_version=1,
                format_version=FORMAT,
                history=json.dumps(
                    [
                        {
                            "time": stamp,
                            "user": user,
                            "action": "create",
                            "text": f"created by calloop {__version__}",
                        }
                    ]
                ),
            )

    def add(self, ctype: str, array: np.ndarray, **options: Unpack[AddOptions]) -> str:
        """Add a new immutable version in its own transaction; returns its id (``v000042``).

        Options (:class:`AddOptions`): ``begin``/``end`` runs and/or ``begin_time``/
        ``end_time``, ``metadata``, ``comment``, ``produced``. Refused unless ``force``: a
        shape or dtype different from the ctype's current default layout. Refused unless
        ``allow_nonfinite``: NaN or inf values. ``retired=True`` stores a version that is
        never default (a payload that failed validation).
        """
        with self.batch() as batch:
            return batch.add(ctype, array, **options)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """Several adds in one transaction: ``with det.batch() as b: b.add(...)``.

        All of them commit together or not at all (imports, bulk loads).
        """
        with self._writing() as h5:
            yield Batch(self, h5)

    def _add_version(
        self,
        h5: h5py.File,
        ctype: str,
        array: np.ndarray,
        validity: Validity,
        *,
        metadata: dict[str, Any],
        comment: str,
        force: bool,
        retired: bool,
        produced: float,
    ) -> str:
        """Write one version inside an open transaction (shared by add and import)."""
        check_name("calibration type", ctype)
        check_storable(f"detector {self.name} {ctype}", array.dtype)
        ctype_group = self._ctype_group(h5, ctype)
        mismatch = _shape_mismatch(ctype_group, array)
        if mismatch and not force:
            raise StoreError(
                f"detector {self.name} {ctype}: {mismatch}; pass force=True (CLI: --force) "
                "if the new layout is intended"
            )
        number = int(h5.attrs["next_version"])
        vid = version_id(number)
        h5.attrs["next_version"] = number + 1
        range_group, entry = self._range_group(ctype_group, validity, None if retired else vid)
        group = range_group.create_group(vid)
        group.create_dataset("calib", data=array)
        group.attrs.update(
            produced=produced,
            metadata=json.dumps(metadata, sort_keys=True, default=str),
            comment=comment,
            retired=retired,
            content_hash=content_hash(array),
            history=_history([], "add", comment or "added"),
        )
        if mismatch:
            _append_history(ctype_group, "force", f"{vid}: {mismatch}")
        if not retired:
            ctype_group.attrs["current_version"] = vid
            if mismatch or "current_shape" not in ctype_group.attrs:  # else unchanged
                ctype_group.attrs.update(
                    current_shape=list(array.shape), current_dtype=array.dtype.str
                )
        ops = [(OP_ADD, vid), (OP_RETIRE, vid)] if retired else [(OP_ADD, vid)]
        record(h5, ctype, entry, ops)
        return vid

    @staticmethod
    def _ctype_group(h5: h5py.File, ctype: str) -> h5py.Group:
        if ctype in h5:
            return h5[ctype]
        group = h5.create_group(ctype, track_order=False)
        group.attrs.update(ctype=ctype, parameters="{}")
        _append_history(group, "create", f"calibration type {ctype}")
        return group

    @staticmethod
    def _range_group(
        ctype_group: h5py.Group, validity: Validity, newest: str | None
    ) -> tuple[h5py.Group, RangeEntry]:
        """The range group of ``validity`` (created if new) and its index entry once
        ``newest`` (a new version that is not retired, or None) is added to it."""
        name = checked_range_name(validity)
        if name not in ctype_group:
            group = ctype_group.create_group(name)
            begin_run, end_run, begin_time, end_time = encode(validity)
            group.attrs.update(  # every attribute at once: a new range has no history yet
                begin_run=begin_run,
                end_run=end_run,
                begin_time=begin_time,
                end_time=end_time,
                default_version=newest or "",
                pinned=False,
                history=_history([], "create", validity.describe()),
            )
            return group, RangeEntry(name, validity, newest)
        group = ctype_group[name]
        if validity_of(group) != validity:
            raise StoreError(
                f"range {name} exists with validity {validity_of(group).describe()}, "
                f"not {validity.describe()}"
            )
        if newest is not None and not bool(group.attrs["pinned"]):
            group.attrs["default_version"] = newest
            return group, RangeEntry(name, validity, newest)
        return group, entry_of_group(group)

    def _locate(self, h5: h5py.File, vid: str) -> tuple[str, h5py.Group, h5py.Group]:
        """(ctype, range group, version group) of ``vid``, found through the index."""
        where = FileIndex(h5).locate(vid)
        if where is None:
            raise StoreError(f"detector {self.name}: no version {vid}")
        ctype, range_name = where
        range_group = h5[ctype][range_name]
        return ctype, range_group, range_group[vid]

    def set_default(
        self,
        version: str | None,
        *,
        ctype: str | None = None,
        range_name: str | None = None,
        comment: str = "",
    ) -> None:
        """Pin ``version`` as its range's default; ``None`` (with ctype and range) unpins."""
        with self._writing() as h5:
            if version is None:
                if ctype is not None:
                    check_name("calibration type", ctype)
                if range_name is not None:
                    check_name("range", range_name)
                if ctype is None or range_name is None or range_name not in h5.get(ctype, {}):
                    raise StoreError("unpinning needs an existing --ctype and --range")
                range_group = h5[ctype][range_name]
                range_group.attrs.update(
                    pinned=False, default_version=_newest_valid(range_group) or ""
                )
                record(h5, ctype, entry_of_group(range_group), [(OP_UNPIN, "")])
                _append_history(range_group, "unpin", comment or "default follows newest")
                return
            vid = normalize_version(version)
            vctype, range_group, group = self._locate(h5, vid)
            if bool(group.attrs["retired"]):
                raise StoreError(f"{vid} is retired and cannot be the default")
            range_group.attrs.update(pinned=True, default_version=vid)
            record(h5, vctype, entry_of_group(range_group), [(OP_PIN, vid)])
            _append_history(range_group, "set_default", f"{vid} pinned. {comment}".strip())

    def retire(self, version: str, comment: str = "") -> None:
        """Mark a version retired: still readable by id, never default."""
        vid = normalize_version(version)
        with self._writing() as h5:
            vctype, range_group, group = self._locate(h5, vid)
            group.attrs["retired"] = True
            _append_history(group, "retire", comment or "retired")
            if str(range_group.attrs["default_version"]) == vid:
                range_group.attrs.update(
                    pinned=False, default_version=_newest_valid(range_group) or ""
                )
            record(h5, vctype, entry_of_group(range_group), [(OP_RETIRE, vid)])

    def set_links(
        self,
        *,
        predecessor: str | None = None,
        successor: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        """Record the predecessor/successor detector and file-level parameters."""
        with self._writing() as h5:
            for key, value in (("predecessor", predecessor), ("successor", successor)):
                if value is not None:
                    h5.attrs[key] = value
                    _append_history(h5, key, value)
            if parameters is not None:
                h5.attrs["parameters"] = json.dumps(parameters, sort_keys=True)
                _append_history(h5, "parameters", json.dumps(parameters, sort_keys=True))

    def attributes(self) -> dict[str, Any]:
        """Root attributes (dettype, detid, created, predecessor, successor, parameters)."""
        with self._reading() as snap:
            attrs = snap.h5.attrs
            return {
                "dettype": str(attrs["dettype"]),
                "detid": str(attrs["detid"]),
                "created": float(attrs["created"]),
                "predecessor": str(attrs["predecessor"]),
                "successor": str(attrs["successor"]),
                "parameters": _json_attr(snap.h5, "parameters", {}),
            }


class Batch:
    """Adds inside one open transaction (see :meth:`Detector.batch`)."""

    def __init__(self, detector: Detector, h5: h5py.File) -> None:
        self.detector = detector
        self.h5 = h5

    def add(
        self,
        ctype: str,
        array: np.ndarray,
        *,
        begin: int | None = None,
        end: int | None = None,
        begin_time: float | None = None,
        end_time: float | None = None,
        metadata: dict[str, Any] | None = None,
        comment: str = "",
        force: bool = False,
        allow_nonfinite: bool = False,
        retired: bool = False,
        produced: float | None = None,
    ) -> str:
        """Same contract as :meth:`Detector.add`."""
        array = np.asarray(array)
        validity = _validity(begin, end, begin_time, end_time)
        if not allow_nonfinite and array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise StoreError(
                f"detector {self.detector.name} {ctype}: refusing {bad} NaN/inf value(s); "
                "allow them in the calibration config (validation.allow_nonfinite) if intended"
            )
        return self.detector._add_version(
            self.h5,
            ctype,
            array,
            validity,
            metadata=metadata or {},
            comment=comment,
            force=force,
            retired=retired,
            produced=time.time() if produced is None else produced,
        )


class _NeedsRecovery(Exception):
    """A journal is pending: a writer died mid-commit; recover before reading."""


def normalize_version(version: str | int) -> str:
    """Accept ``v000042``, ``42`` or ``v42``; return the canonical id."""
    text = str(version).lstrip("v")
    if not text.isdigit():
        raise StoreError(f"invalid version id {version!r} (expected e.g. v000042 or 42)")
    return version_id(int(text))


def _validity(
    begin: int | None, end: int | None, begin_time: float | None, end_time: float | None
) -> Validity:
    try:
        return Validity(begin_run=begin, end_run=end, begin_time=begin_time, end_time=end_time)
    except ValueError as exc:
        raise StoreError(f"invalid validity range: {exc}") from None


# -------------------------------------------------------------------------------- store


class CalibStore:
    """The root of a calibration store: ``CalibStore(root).detector(name).get(...)``."""

    def __init__(self, root: Path, *, lock_timeout_s: float = 30.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        self._detectors: dict[str, Detector] = {}

    def detector_names(self) -> list[str]:
        """Every ``<dettype>-<detid>`` with a file in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*/*-*.h5"))

    def detector(self, name: str, *, at: float | None = None, create: bool = False) -> Detector:
        """A detector by name or alias (aliases resolved at time ``at``, default now).

        Unknown names raise :class:`StoreError` with close matches, unless ``create``.
        """
        from loop.store.aliases import AliasTable

        dettype, sep, detid = name.partition("-")
        if not (sep and dettype and detid) or name not in self.detector_names():
            resolved = AliasTable.resolve_anywhere(self.root, name, at)
            if resolved is not None:
                name = resolved
            elif not create or not (sep and dettype and detid):
                known = self.detector_names() + AliasTable.all_aliases(self.root)
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                raise StoreError(
                    f"unknown detector or alias {name!r} in store {self.root}"
                    + (f"; did you mean {', '.join(close)}?" if close else "")
                )
            dettype, _, detid = name.partition("-")
        if name not in self._detectors:
            self._detectors[name] = Detector(self, dettype, detid)
        return self._detectors[name]

    def close(self) -> None:
        """Close every cached read handle."""
        for detector in self._detectors.values():
            detector.close()
