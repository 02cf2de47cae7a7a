"""Crash-safe in-place modification of an HDF5 file: a page-level redo journal.

HDF5 updates metadata in place, so a writer killed during a flush can leave a file that
no longer opens. :class:`JournaledFile` is the file object h5py writes through (its
``fileobj`` driver): every write lands in dirty in-memory pages and the file on disk is
untouched until :meth:`JournaledFile.commit`, which

1. writes all dirty pages, the final length and a SHA-256 over them at the start of
   ``<file>.journal`` and syncs it (the commit point);
2. applies the pages to the file and syncs it;
3. clears the journal's magic number (a journal without it means "nothing pending").

:func:`recover` (run under the writer lock before any access) replays a complete journal
and discards anything else, so after a SIGKILL at any moment the file holds either the
whole transaction or none of it. The cost of a commit is the number of pages HDF5
touched, not the size of the file, plus two syncs.

The journal file is kept and overwritten in place, never shortened, rather than renamed
into place and removed: a rename and a removal each need a sync of the directory, and
a file whose size or blocks change needs a filesystem-journal commit on every sync.
Its first creation syncs the directory once. Clearing the magic number needs no sync:
if a crash undoes it, recovery replays a journal the file already holds (idempotent);
the next commit overwrites the journal and syncs it before it touches the file. A crash
while a journal is overwritten leaves a mix of old and new bytes whose checksum fails
(discarded: the file was not touched yet), or the old journal whole (replayed: again
one the file already holds). Bytes past a journal's own length are leftovers of a
longer one and never read.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loop.fsutil import fsync_dir

PAGE = 4096
MAGIC = b"CALJRNL1"
_HEADER = struct.Struct("<8sQQQ")  # magic, final length, zero-from offset, page count
_INDEX = struct.Struct("<Q")


def journal_path(path: Path) -> Path:
    """The journal file of ``path``."""
    return path.with_name(path.name + ".journal")


class JournaledFile(io.RawIOBase):
    """A read-write view of ``path`` whose writes stay in memory until :meth:`commit`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        self._base_len = os.fstat(self._fd).st_size
        self._len = self._base_len
        self._zero_from = self._base_len  # base bytes at or past this offset read as zero
        self._pages: dict[int, bytearray] = {}
        self._pos = 0

    # io.RawIOBase protocol (what h5py's fileobj driver calls)
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._read_at(self._pos, len(buffer))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        offset, done = self._pos, 0
        while done < len(view):
            index, start = divmod(offset + done, PAGE)
            count = min(PAGE - start, len(view) - done)
            self._page(index)[start : start + count] = view[done : done + count]
            done += count
        self._pos += done
        self._len = max(self._len, self._pos)
        return done

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self._len:
            for index in [i for i in self._pages if i * PAGE >= size]:
                del self._pages[index]
            last = self._pages.get(size // PAGE)
            if last is not None:
                last[size % PAGE :] = bytes(PAGE - size % PAGE)
            self._zero_from = min(self._zero_from, size)
        self._len = size
        return size

    def flush(self) -> None:
        """Nothing reaches the disk before :meth:`commit`."""

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    # paging
    def _base_page(self, index: int) -> bytearray:
        page = bytearray(PAGE)
        start = index * PAGE
        if start < self._zero_from:
            chunk = os.pread(self._fd, min(PAGE, self._zero_from - start), start)
            page[: len(chunk)] = chunk
        return page

    def _page(self, index: int) -> bytearray:
        page = self._pages.get(index)
        if page is None:
            page = self._pages[index] = self._base_page(index)
        return page

    def _read_at(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self._len - offset))
        out = bytearray()
        while len(out) < size:
            index, start = divmod(offset + len(out), PAGE)
            count = min(PAGE - start, size - len(out))
            page = self._pages.get(index)
            if page is None:
                page = self._base_page(index)
            out += page[start : start + count]
        return bytes(out)

    # commit
    @property
    def dirty_pages(self) -> int:
        """How many pages the transaction changed."""
        return len(self._pages)

    def commit(self) -> None:
        """Make every write durable atomically (see the module docstring)."""
        if not self._pages and self._len == self._base_len == self._zero_from:
            return
        pending = _Pending(self._len, self._zero_from, sorted(self._pages.items()))
        body = pending.encode()
        target = journal_path(self.path)
        created = not target.exists()
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, body, 0)
            os.fdatasync(fd)  # the commit point (with the directory entry, when new)
        finally:
            os.close(fd)
        if created:
            fsync_dir(target.parent)
        _apply(self.path, pending)
        self._base_len = self._zero_from = self._len
        self._pages.clear()


@dataclass(frozen=True)
class _Pending:
    """One transaction as its journal holds it: the file's final length, the offset from
    which the old bytes read as zero, and the changed pages in order."""

    length: int
    zero_from: int
    pages: Sequence[tuple[int, bytes | bytearray]]

    def encode(self) -> bytes:
        """The journal's bytes: header, (index, page) pairs, SHA-256 over them."""
        parts: list[bytes | bytearray] = [
            _HEADER.pack(MAGIC, self.length, self.zero_from, len(self.pages))
        ]
        for index, page in self.pages:
            parts += (_INDEX.pack(index), page)
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def runs(self) -> list[tuple[int, bytes]]:
        """(offset, bytes) of each run of consecutive pages inside the final length, the
        last page cut at that length: one write per run, not one per page."""
        runs: list[tuple[int, list[bytes | bytearray]]] = []
        for index, page in self.pages:
            start = index * PAGE
            if start >= self.length:
                continue
            if runs and runs[-1][0] + PAGE * len(runs[-1][1]) == start:
                runs[-1][1].append(page)
            else:
                runs.append((start, [page]))
        return [(start, b"".join(pages)[: self.length - start]) for start, pages in runs]


def _parse(blob: bytes) -> _Pending | None:
    """The transaction a journal holds, or None if it is torn."""
    if len(blob) < _HEADER.size + 32:
        return None
    magic, length, zero_from, count = _HEADER.unpack_from(blob)
    size = _HEADER.size + count * (_INDEX.size + PAGE)
    if magic != MAGIC or len(blob) < size + 32:
        return None
    if hashlib.sha256(blob[:size]).digest() != blob[size : size + 32]:
        return None
    pages, offset = [], _HEADER.size
    for _ in range(count):
        (index,) = _INDEX.unpack_from(blob, offset)
        pages.append((index, blob[offset + _INDEX.size : offset + _INDEX.size + PAGE]))
        offset += _INDEX.size + PAGE
    return _Pending(length, zero_from, pages)


def _apply(path: Path, pending: _Pending) -> None:
    """Write a committed transaction into the file, sync it, mark the journal done."""
    fd = os.open(path, os.O_RDWR)
    try:
        if pending.zero_from < os.fstat(fd).st_size:
            os.ftruncate(fd, pending.zero_from)  # bytes the transaction truncated away
        for offset, data in pending.runs():
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, pending.length)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    _clear(path)


def _clear(path: Path) -> None:
    """Mark the journal as nothing pending (no sync needed: see the module docstring)."""
    fd = os.open(journal_path(path), os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(len(MAGIC)), 0)
    finally:
        os.close(fd)


def recover(path: Path) -> str | None:
    """Finish or discard an interrupted commit of ``path``. Call under the writer lock.

    Returns ``"replayed"``, ``"discarded"`` or None when there was nothing to do.
    """
    target = journal_path(path)
    # a journal still being written when calloop renamed journals into place
    target.with_name(target.name + ".tmp").unlink(missing_ok=True)
    if not pending(path):
        return None
    parsed = _parse(target.read_bytes())
    if parsed is None:
        _clear(path)
        return "discarded"
    _apply(path, parsed)
    return "replayed"


def pending(path: Path) -> bool:
    """True when ``path`` has a journal to replay (readers must wait for a writer)."""
    try:
        fd = os.open(journal_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    finally:
        os.close(fd)
