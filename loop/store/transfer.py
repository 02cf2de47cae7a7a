"""Export a squeezed, self-consistent copy of a detector file, and merge copies back.

An export (for an experiment or a local workspace) keeps the chosen calibration types
and every range overlapping a run or time window, with all their versions, ids and
history. Importing merges a copy into a store: versions whose content and metadata are
already present in the same range are skipped, the rest are added as new versions with
their provenance recorded, in one transaction.

An import file comes from outside and is untrusted: before the store is touched, every
name is checked (:mod:`loop.store.names`), every object must be a plain group or
dataset reached by a hard link (no soft or external links, external storage or virtual
datasets, which would make HDF5 read other files), every array a plain number type, and
sizes are bounded by :class:`ImportLimits`; all of it before any array is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from loop.errors import StoreError
from loop.fsutil import atomic_path
from loop.store.index import INTERNAL, checked_range_name, rebuild_from_groups, validity_of
from loop.store.lookup import Validity
from loop.store.names import check_detector, check_name
from loop.store.store import (
    LIBVER,
    CalibStore,
    Detector,
    _append_history,
    _json_attr,
    check_storable,
    content_hash,
    open_readonly,
)


def _overlaps(v: Validity, runs: tuple[int, int] | None, times: tuple[float, float] | None) -> bool:
    if runs is not None:
        if v.begin_run is None:
            return False
        if v.begin_run > runs[1] or (v.end_run is not None and v.end_run < runs[0]):
            return False
    if times is not None:
        if v.begin_time is None:
            return False
        if v.begin_time >= times[1] or (v.end_time is not None and v.end_time <= times[0]):
            return False
    return True


def export_detector(
    detector: Detector,
    dest_root: Path,
    *,
    ctypes: list[str] | None = None,
    runs: tuple[int, int] | None = None,
    times: tuple[float, float] | None = None,
) -> Path:
    """Write ``<dest_root>/<dettype>/<name>.h5`` holding the selected subset."""
    target = dest_root / detector.dettype / detector.path.name
    if target.exists():
        raise StoreError(f"export target {target} exists; choose an empty destination")
    with detector._reading() as snap:
        wanted = ctypes or snap.index.ctypes()
        for ctype in wanted:
            detector._check_ctype(snap, ctype)  # unknown ctype: clear error before writing
        with atomic_path(target, ".h5") as tmp, h5py.File(tmp, "w", libver=LIBVER) as out:
            for key, value in snap.h5.attrs.items():
                out.attrs[key] = value
            window = f"ctypes={wanted} runs={runs} times={times}"
            _append_history(out, "export", f"squeezed copy of {detector.path}: {window}")
            for ctype in wanted:
                source = snap.h5[ctype]
                dest = out.create_group(ctype)
                for key, value in source.attrs.items():
                    dest.attrs[key] = value
                for range_name, range_group in source.items():
                    if _overlaps(validity_of(range_group), runs, times):
                        snap.h5.copy(range_group, dest, name=range_name)
            rebuild_from_groups(out)
    return target


@dataclass
class ImportReport:
    """What an import did."""

    detector: str
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on what one import file may make calloop read, checked before reading data.

    Sized well above the largest detectors (a multi-megapixel pedestal set over several
    gain modes is tens of MB per version). Every imported array stays in memory until the
    import commits, so ``max_total_bytes`` also bounds the memory an import uses.
    """

    max_file_bytes: int = 2 << 30  # the import file on disk (bounds attribute text too)
    max_total_bytes: int = 2 << 30  # all arrays, uncompressed
    max_dataset_bytes: int = 512 << 20  # one array, or one chunk, uncompressed
    max_objects: int = 100_000  # groups and datasets walked


# Filters HDF5 and h5py carry themselves; any other id makes HDF5 load a plugin library.
_BUILTIN_FILTERS = frozenset(
    {
        h5py.h5z.FILTER_DEFLATE,
        h5py.h5z.FILTER_SHUFFLE,
        h5py.h5z.FILTER_FLETCHER32,
        h5py.h5z.FILTER_SCALEOFFSET,
        h5py.h5z.FILTER_NBIT,
        h5py.h5z.FILTER_LZF,
    }
)

# What h5py and numpy raise on a damaged or crafted file, besides our own refusals.
_MALFORMED = (StoreError, OSError, KeyError, ValueError, TypeError, ArithmeticError, RuntimeError)


@dataclass(frozen=True)
class _Version:
    """One version of an import file, its attributes read and checked."""

    ctype: str
    source: str  # its id in the import file
    validity: Validity
    metadata: dict[str, Any]
    comment: str
    retired: bool
    produced: float
    content_hash: str


@dataclass
class _Budget:
    """What the walk of an import file has counted so far against its limits."""

    limits: ImportLimits
    objects: int = 0
    total_bytes: int = 0

    def count_object(self) -> None:
        self.objects += 1
        if self.objects > self.limits.max_objects:
            raise StoreError(f"more than {self.limits.max_objects} objects (import limit)")

    def take(self, dataset: h5py.Dataset) -> None:
        """Count a dataset's uncompressed size (and its chunk's: one is read whole)."""
        itemsize = dataset.dtype.itemsize
        size = math.prod(dataset.shape) * itemsize
        chunk = math.prod(dataset.chunks) * itemsize if dataset.chunks else 0
        if max(size, chunk) > self.limits.max_dataset_bytes:
            raise StoreError(
                f"{dataset.name} holds {max(size, chunk)} bytes, over the per-dataset "
                f"import limit of {self.limits.max_dataset_bytes}"
            )
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise StoreError(
                f"arrays total more than {self.limits.max_total_bytes} bytes (import limit)"
            )


def import_file(
    store: CalibStore, path: Path, *, force: bool = False, limits: ImportLimits | None = None
) -> ImportReport:
    """Merge a (possibly squeezed) detector file into ``store``.

    A malformed or hostile file raises one :class:`StoreError` naming the file and the
    reason, and leaves the store unchanged: the whole file is checked and read first.
    """
    (dettype, detid), incoming = _read_import(path, limits or ImportLimits())
    detector = store.detector(f"{dettype}-{detid}", create=True)
    report = ImportReport(detector.name)
    with detector.batch() as batch:
        h5 = batch.h5
        present: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for version, array in incoming:
            where = (version.ctype, checked_range_name(version.validity))
            if where not in present:
                present[where] = _present(h5, *where)
            key = (version.content_hash, _canonical(version.metadata))
            if key in present[where]:
                report.skipped.append(version.source)
                continue
            new = detector._add_version(
                h5,
                version.ctype,
                array,
                version.validity,
                # a version imported before keeps the provenance it already has
                metadata={"imported_from": f"{path}:{version.source}", **version.metadata},
                comment=version.comment,
                force=force,
                retired=version.retired,
                produced=version.produced,
            )
            present[where].add(key)
            report.added.append(new)
        _append_history(
            h5,
            "import",
            json.dumps({"from": str(path), "added": report.added, "skipped": len(report.skipped)}),
        )
    return report


def _read_import(
    path: Path, limits: ImportLimits
) -> tuple[tuple[str, str], list[tuple[_Version, np.ndarray]]]:
    """The detector and the versions (with arrays) of an import file, all checked."""
    try:
        with _open_untrusted(path, limits) as source:
            detector = check_detector(_attr(source, "dettype"), _attr(source, "detid"))
            found = list(_walk(source, _Budget(limits)))  # every check before any data read
            return detector, [_read_array(version, dataset) for version, dataset in found]
    except _MALFORMED as exc:
        raise StoreError(f"cannot import {path}: {' '.join(str(exc).split())}") from None


@contextlib.contextmanager
def _open_untrusted(path: Path, limits: ImportLimits) -> Iterator[h5py.File]:
    info = path.stat()
    # a FIFO or device would block or never end
    if not stat.S_ISREG(info.st_mode):
        raise StoreError("not a regular file")
    if info.st_size > limits.max_file_bytes:
        raise StoreError(
            f"the file has {info.st_size} bytes, over the import limit of {limits.max_file_bytes}"
        )
    try:
        source, handle = open_readonly(path)
    except OSError as exc:
        raise StoreError(f"not a readable HDF5 file ({exc})") from None
    with handle, source:
        yield source


def _walk(source: h5py.File, budget: _Budget) -> Iterator[tuple[_Version, h5py.Dataset]]:
    """Every version of the file with its ``calib`` dataset, checked but not yet read."""
    for ctype in source:
        if ctype in INTERNAL:  # the store rebuilds its own index; this one is never read
            continue
        check_name("calibration type", ctype)
        for range_group in _subgroups(_hard_link(source, ctype, h5py.Group, budget), budget):
            validity = validity_of(range_group)
            checked_range_name(validity)  # fits the index log
            for group in _subgroups(range_group, budget):
                dataset = _hard_link(group, "calib", h5py.Dataset, budget)
                _check_dataset(dataset)
                budget.take(dataset)
                yield _version_of(ctype, group, validity), dataset


def _subgroups(group: h5py.Group, budget: _Budget) -> Iterator[h5py.Group]:
    """The children of ``group``, each checked to be a group."""
    for name in group:
        yield _hard_link(group, name, h5py.Group, budget)


def _hard_link(parent: h5py.Group, name: str, kind: type[h5py.HLObject], budget: _Budget) -> Any:
    """``parent[name]``, counted, when the name is valid and hard-links to a ``kind``."""
    budget.count_object()
    where = posixpath.join(parent.name, name)
    check_name(f"object name in {parent.name}", name)
    link = parent.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        found = type(link).__name__ if link is not None else "nothing"
        raise StoreError(f"{where} is a {found}, not a plain object (links are refused)")
    obj = parent[name]
    if not isinstance(obj, kind):
        raise StoreError(f"{where} is a {type(obj).__name__}, expected a {kind.__name__}")
    return obj


def _check_dataset(dataset: h5py.Dataset) -> None:
    """Refuse a dataset whose data HDF5 would fetch from elsewhere, or could not hold."""
    where = dataset.name
    if dataset.external:
        raise StoreError(f"{where} keeps its data in external files (refused)")
    if dataset.is_virtual:
        raise StoreError(f"{where} is a virtual dataset (refused)")
    plist = dataset.id.get_create_plist()
    for index in range(plist.get_nfilters()):
        code = plist.get_filter(index)[0]
        if code not in _BUILTIN_FILTERS:
            raise StoreError(f"{where} uses HDF5 filter {code}, not a built-in one (refused)")
    check_storable(where, dataset.dtype)
    if dataset.shape is None:
        raise StoreError(f"{where} has no dataspace")


def _version_of(ctype: str, group: h5py.Group, validity: Validity) -> _Version:
    metadata = _json_attr(group, "metadata", {})
    if not isinstance(metadata, dict):
        raise StoreError(f"{group.name}: metadata is not a JSON object")
    return _Version(
        ctype=ctype,
        source=group.name.rsplit("/", 1)[1],
        validity=validity,
        metadata=metadata,
        comment=_text(group, "comment"),
        retired=bool(_attr(group, "retired")),
        produced=float(_attr(group, "produced")),
        content_hash=_text(group, "content_hash"),
    )


def _read_array(version: _Version, dataset: h5py.Dataset) -> tuple[_Version, np.ndarray]:
    array = np.asarray(dataset[()])
    if content_hash(array) != version.content_hash:
        raise StoreError(f"{dataset.name} does not match its recorded content hash (damaged)")
    return version, array


def _attr(obj: h5py.HLObject, key: str) -> Any:
    if key not in obj.attrs:
        raise StoreError(f"{obj.name}: attribute {key!r} is missing")
    return obj.attrs[key]


def _text(obj: h5py.HLObject, key: str) -> str:
    value = _attr(obj, key)
    if not isinstance(value, str):
        raise StoreError(f"{obj.name}: attribute {key!r} is not text")
    return value


def _canonical(metadata: dict[str, Any]) -> str:
    """Metadata as compared between copies: where a copy was imported from is ignored."""
    return json.dumps(
        {k: v for k, v in metadata.items() if k != "imported_from"}, sort_keys=True, default=str
    )


def _present(h5: h5py.File, ctype: str, name: str) -> set[tuple[str, str]]:
    """The (content hash, metadata) of every version the store has in a range."""
    if ctype not in h5 or name not in h5[ctype]:
        return set()
    return {
        (str(group.attrs["content_hash"]), _canonical(_json_attr(group, "metadata", {})))
        for group in h5[ctype][name].values()
    }
