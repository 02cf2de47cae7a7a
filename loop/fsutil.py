"""Atomic file writes and small filesystem helpers shared by every process.

Everything another process may read is written to a temporary name in the same
directory, fsynced, then renamed into place, and the directory entry is fsynced too, so
a reader sees either the old file or the complete new one, even across a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


def retry_call(
    fn: Callable[[], T],
    attempts: int,
    backoff_s: float,
    retry_on: tuple[type[BaseException], ...],
    sleep: Callable[[float], None],
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping ``backoff_s * 2**i`` between tries.

    The last exception propagates. Shared by the registry and conditions-DB clients.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except retry_on:
            if attempt == attempts - 1:
                raise
            sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable: attempts must be >= 1")
