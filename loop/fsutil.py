"""Atomic file writes and small filesystem helpers shared by every process.

Everything another process may read is written to a temporary name in the same
directory, fsynced, then renamed into place, and the directory entry is fsynced too, so
a reader sees either the old file or the complete new one, even across a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or unlink inside ``path``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync and rename it into place.

    For writers that need a path rather than a stream (h5py). The temporary name starts
    with a dot and ends in ``.tmp`` so directory watchers and globbing ignore it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f"{suffix}.tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode())


def atomic_write_json(target: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(path: Path) -> bool:
    """True for the in-progress names :func:`atomic_path` creates."""
    return path.name.startswith(".") or path.name.endswith(".tmp")


STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
)
STORAGE_SQLITE_MESSAGES = ("database or disk is full", "disk I/O error", "readonly database")


def is_storage_error(exc: BaseException) -> bool:
    """True when ``exc`` says the machine cannot write (full disk, I/O error, read-only
    or forbidden path), not that the data is bad: such errors must never fail a run,
    the daemon waits until it can write again."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return any(text in str(exc) for text in STORAGE_SQLITE_MESSAGES)
    return False


def storage_error_in(exc: BaseException) -> BaseException | None:
    """The storage error (:func:`is_storage_error`) in ``exc`` or in the exceptions it was
    raised from: a domain error or SQLAlchemy may wrap the ``OSError`` or SQLite error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if is_storage_error(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# h5py reports the file only inside its message: "..., filename = '/x/y.h5', ..."
_H5PY_FILENAME = re.compile(r"filename = '([^']+)'")


def error_path(exc: BaseException) -> Path | None:
    """The file an error names: an ``OSError``'s filename, or the one h5py puts in its
    message; None when the error does not say."""
    if isinstance(exc, OSError) and exc.filename:
        return Path(os.fsdecode(exc.filename))
    match = _H5PY_FILENAME.search(str(exc))
    return Path(match.group(1)) if match else None


def free_space(path: Path) -> str:
    """``"<free> free of <total>"`` on the filesystem holding ``path`` (or its nearest
    existing ancestor: the file itself may be what could not be created)."""
    for candidate in (path, *path.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return f"{_bytes(usage.free)} free of {_bytes(usage.total)}"
    return "unknown"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
