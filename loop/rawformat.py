"""The raw lumisection file format: the contract between the detector and step 2.

``<raw_root>/<stream>/run<R>/run<R>_ls<NNNN>.h5`` holds one closed lumisection:

* dataset ``frames``: [events x channels] ADC counts, ``uint16`` (or ``float32`` /
  ``float64`` from detectors that deliver corrected values), chunked, gzip with shuffle;
* dataset ``trigger``: uint8 [events], codes from :data:`TRIGGER_CODES`;
* attributes ``run``, ``ls``, ``detector``, ``start_time``, ``end_time`` (Unix seconds).

The name is canonical: the run number without leading zeros, the LS number with at
least four digits and no more leading zeros than that (``ls0001``, ``ls12345``), so one
LS has exactly one file name. Files appear by atomic rename, so a file with the final
name is always complete; :func:`check_raw_ls` is what reco requires of its content.
:func:`start_reading_raw_ls` reads the layout :func:`write_raw_ls` writes faster than h5py
does, by inflating its chunks in several threads; any other layout is read by h5py.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loop.errors import CalloopError
from loop.fsutil import atomic_path

TRIGGER_CODES = {"pedestal": 0, "physics": 1, "led": 2}
FRAME_DTYPES = (np.dtype(np.uint16), np.dtype(np.float32), np.dtype(np.float64))
RAW_NAME = re.compile(r"^run(?P<run>\d+)_ls(?P<ls>\d+)\.h5$")


class RawFileError(CalloopError):
    """A raw file is unreadable or does not follow the format."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"raw file {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class RawLS:
    """One lumisection's content."""

    run: int
    ls: int
    detector: str
    frames: np.ndarray
    trigger: np.ndarray
    start_time: float
    end_time: float


def run_dir(raw_root: Path, stream: str, run: int) -> Path:
    """Directory of a run's raw files."""
    return raw_root / stream / f"run{run}"


def raw_name(run: int, ls: int) -> str:
    """The canonical file name of one LS."""
    return f"run{run}_ls{ls:04d}.h5"


def raw_path(raw_root: Path, stream: str, run: int, ls: int) -> Path:
    """Path of one LS file."""
    return run_dir(raw_root, stream, run) / raw_name(run, ls)


def parse_raw_name(path: Path) -> tuple[int, int] | None:
    """(run, ls) of a canonically named LS file in its run's directory, else None."""
    match = RAW_NAME.match(path.name)
    if match is None:
        return None
    run, ls = int(match["run"]), int(match["ls"])
    if path.name != raw_name(run, ls) or path.parent.name != f"run{run}" or ls < 1:
        return None
    return run, ls


def write_raw_ls(path: Path, content: RawLS) -> int:
    """Write one LS file atomically; return its size in bytes."""
    events, channels = content.frames.shape
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset(
            "frames",
            data=content.frames,
            chunks=(min(events, 64) or 1, channels),
            compression="gzip",
            compression_opts=1,
            shuffle=True,
        )
        h5.create_dataset("trigger", data=content.trigger)
        h5.attrs.update(
            run=content.run,
            ls=content.ls,
            detector=content.detector,
            start_time=content.start_time,
            end_time=content.end_time,
            trigger_codes=str(TRIGGER_CODES),
        )
    return path.stat().st_size


def read_raw_ls(path: Path, pool: Executor | None = None) -> RawLS:
    """Read one LS file; any corruption becomes a :class:`RawFileError` naming the file.
    With ``pool`` (threads), see :func:`start_reading_raw_ls`."""
    return start_reading_raw_ls(path, pool)()


def start_reading_raw_ls(path: Path, pool: Executor | None) -> Callable[[], RawLS]:
    """Start reading one LS file; the returned callable waits for its content (or raises
    the :class:`RawFileError` :func:`read_raw_ls` raises).

    HDF5 is read now, in this thread. With ``pool`` (threads), the frames' gzip chunks
    are then inflated in the pool, in parallel, while the caller goes on (e.g. writes the
    previous LS): h5py holds the GIL and its own lock while HDF5 runs its filters, one
    chunk after the other, whereas zlib and numpy's copies release the GIL.
    """
    try:
        content, inflating = _start_read(path, pool)
    except RawFileError as exc:
        return _raiser(exc)
    except _READ_ERRORS as exc:
        return _raiser(_unreadable(path, exc))

    def wait() -> RawLS:
        try:
            for job in inflating:
                job.result()
        except _READ_ERRORS as exc:
            raise _unreadable(path, exc) from exc
        return content

    return wait


_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, zlib.error)


def _unreadable(path: Path, exc: Exception) -> RawFileError:
    error = RawFileError(path, f"unreadable or not in calloop raw format ({exc})")
    error.__cause__ = exc
    return error


def _raiser(error: RawFileError) -> Callable[[], RawLS]:
    def fail() -> RawLS:
        raise error

    return fail


def _start_read(path: Path, pool: Executor | None) -> tuple[RawLS, list[Future[None]]]:
    with h5py.File(path, "r") as h5:
        frames, inflating = _start_frames(h5["frames"], pool)
        trigger = h5["trigger"][...]
        attrs = dict(h5.attrs)
        content = RawLS(
            run=int(attrs["run"]),
            ls=int(attrs["ls"]),
            detector=str(attrs["detector"]),
            frames=frames,
            trigger=trigger,
            start_time=float(attrs["start_time"]),
            end_time=float(attrs["end_time"]),
        )
    if frames.ndim != 2 or trigger.shape != (frames.shape[0],):
        raise RawFileError(path, f"frames {frames.shape} and trigger {trigger.shape} do not match")
    return content, inflating


_GZIP_PIPELINES = ([h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE], [h5py.h5z.FILTER_DEFLATE])


def _start_frames(
    dataset: h5py.Dataset, pool: Executor | None
) -> tuple[np.ndarray, list[Future[None]]]:
    """The dataset's array, and the inflations still filling it (none when h5py read it)."""
    if pool is not None and _whole_row_gzip_chunks(dataset):
        started = _start_inflating(dataset, pool)
        if started is not None:
            return started
    return dataset[...], []


def _whole_row_gzip_chunks(dataset: h5py.Dataset) -> bool:
    """A 2-d native-endian dataset in chunks of whole rows, every chunk written, filtered by
    deflate alone or shuffle then deflate: the layout :func:`write_raw_ls` writes."""
    if dataset.ndim != 2 or dataset.chunks is None or not dataset.dtype.isnative:
        return False
    rows, width = dataset.chunks
    if width != dataset.shape[1] or dataset.dtype.kind not in "uif":
        return False
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    expected_chunks = -(-dataset.shape[0] // rows)
    return filters in _GZIP_PIPELINES and dataset.id.get_num_chunks() == expected_chunks


def _start_inflating(
    dataset: h5py.Dataset, pool: Executor
) -> tuple[np.ndarray, list[Future[None]]] | None:
    """Read every chunk's stored bytes (a memory copy), then have the pool inflate them
    and undo the shuffle filter straight into the array; None if a chunk was stored with
    a filter skipped (h5py then reads the dataset)."""
    rows = dataset.chunks[0]
    stored = []
    for start in range(0, dataset.shape[0], rows):
        mask, data = dataset.id.read_direct_chunk((start, 0))
        if mask != 0:
            return None
        stored.append((start, data))
    frames = np.empty(dataset.shape, dataset.dtype)
    shuffled = dataset.id.get_create_plist().get_filter(0)[0] == h5py.h5z.FILTER_SHUFFLE
    chunk_bytes = rows * dataset.shape[1] * dataset.dtype.itemsize
    return frames, [
        pool.submit(_inflate_into, data, frames[start : start + rows], shuffled, chunk_bytes)
        for start, data in stored
    ]


def _inflate_into(data: bytes, out: np.ndarray, shuffled: bool, chunk_bytes: int) -> None:
    """Decode one stored chunk into ``out`` (its rows inside the dataset: the chunk at the
    end of the dataset is stored whole, rows past the end included)."""
    raw = zlib.decompress(data, bufsize=chunk_bytes)
    if len(raw) != chunk_bytes:
        raise ValueError(f"a chunk inflates to {len(raw)} bytes, not {chunk_bytes}")
    itemsize, values = out.dtype.itemsize, out.size
    if shuffled and itemsize > 1:  # HDF5's shuffle: byte i of every value, for each i
        planes = np.frombuffer(raw, np.uint8).reshape(itemsize, -1)
        target = out.reshape(-1).view(np.uint8)
        for i in range(itemsize):  # one strided copy per plane: ~30x faster than a transpose
            target[i::itemsize] = planes[i, :values]
    else:
        out.reshape(-1)[...] = np.frombuffer(raw, out.dtype, count=values)


def check_raw_ls(path: Path, content: RawLS, channels: int) -> None:
    """Raise :class:`RawFileError` unless ``content`` may go into a payload: the LS its
    name says, at least one event, the detector's channel count, a frame dtype of the
    format, and only finite values."""
    expected = parse_raw_name(path)
    if expected is not None and expected != (content.run, content.ls):
        raise RawFileError(
            path, f"header says run {content.run} LS {content.ls}, the name says otherwise"
        )
    events, found = content.frames.shape
    if events == 0:
        raise RawFileError(path, "no events")
    if found != channels:
        raise RawFileError(
            path, f"{found} channels, the detector has {channels} (raw_input.channels)"
        )
    if content.frames.dtype not in FRAME_DTYPES:
        allowed = ", ".join(str(d) for d in FRAME_DTYPES)
        raise RawFileError(path, f"frames have dtype {content.frames.dtype}, expected {allowed}")
    if content.frames.dtype.kind == "f":
        bad = ~np.isfinite(content.frames).all(axis=0)
        if bad.any():
            shown = np.flatnonzero(bad)[:10].tolist()
            raise RawFileError(
                path, f"non-finite values (NaN/inf) in {int(bad.sum())} channels, e.g. {shown}"
            )
