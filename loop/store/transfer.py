"""Export a squeezed, self-consistent copy of a detector file, and merge copies back.

An export (for an experiment or a local workspace) keeps the chosen calibration types
and every range overlapping a run or time window, with all their versions, ids and
history. Importing merges a copy into a store: versions whose content and metadata are
already present in the same range are skipped, the rest are added as new versions with
their provenance recorded, in one transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from loop.errors import StoreError
from loop.fsutil import atomic_path
from loop.store.lookup import Validity
from loop.store.store import (
    INDEX,
    LIBVER,
    CalibStore,
    Detector,
    _append_history,
    _json_attr,
    _rebuild_index,
    _validity_of,
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
        wanted = ctypes or sorted(snap.indexes)
        for ctype in wanted:
            detector._index(snap, ctype)  # unknown ctype: clear error before writing
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
                    if _overlaps(_validity_of(range_group), runs, times):
                        snap.h5.copy(range_group, dest, name=range_name)
            _rebuild_index(out)
    return target


@dataclass
class ImportReport:
    """What an import did."""

    detector: str
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def import_file(store: CalibStore, path: Path, *, force: bool = False) -> ImportReport:
    """Merge a (possibly squeezed) detector file into ``store``."""
    try:
        source, handle = open_readonly(path)
    except OSError as exc:
        raise StoreError(f"cannot import {path}: not a readable HDF5 file ({exc})") from None
    with handle, source:
        try:
            name = f"{source.attrs['dettype']}-{source.attrs['detid']}"
        except KeyError:
            raise StoreError(f"cannot import {path}: not a calloop calibration file") from None
        detector = store.detector(name, create=True)
        report = ImportReport(name)
        with detector.batch() as batch:
            h5 = batch.h5
            for ctype, ctype_group in source.items():
                if ctype == INDEX:
                    continue
                for range_name, range_group in ctype_group.items():
                    present = _present(h5, ctype, range_name)
                    for vid, group in range_group.items():
                        key = _identity(group)
                        if key in present:
                            report.skipped.append(vid)
                            continue
                        metadata = _json_attr(group, "metadata", {})
                        metadata.setdefault("imported_from", f"{path}:{vid}")
                        new = detector._add_version(
                            h5,
                            ctype,
                            group["calib"][()],
                            _validity_of(range_group),
                            metadata=metadata,
                            comment=str(group.attrs["comment"]),
                            force=force,
                            retired=bool(group.attrs["retired"]),
                            produced=float(group.attrs["produced"]),
                        )
                        present.add(key)
                        report.added.append(new)
            _append_history(
                h5,
                "import",
                json.dumps(
                    {"from": str(path), "added": report.added, "skipped": len(report.skipped)}
                ),
            )
    return report


def _identity(group: h5py.Group) -> tuple[str, str]:
    """Content hash and canonical metadata, ignoring where a copy was imported from."""
    metadata = {k: v for k, v in _json_attr(group, "metadata", {}).items() if k != "imported_from"}
    return str(group.attrs["content_hash"]), json.dumps(metadata, sort_keys=True, default=str)


def _present(h5: h5py.File, ctype: str, range_name: str) -> set[tuple[str, str]]:
    if ctype not in h5 or range_name not in h5[ctype]:
        return set()
    return {_identity(group) for group in h5[ctype][range_name].values()}
