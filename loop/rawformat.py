"""The raw lumisection file format: the contract between the detector and step 2.

``<raw_root>/<stream>/run<R>/run<R>_ls<NNNN>.h5`` holds one closed lumisection:

* dataset ``frames``: uint16 [events x channels], chunked, gzip-compressed with shuffle;
* dataset ``trigger``: uint8 [events], codes from :data:`TRIGGER_CODES`;
* attributes ``run``, ``ls``, ``detector``, ``start_time``, ``end_time`` (Unix seconds).

Files appear by atomic rename, so a file with the final name is always complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loop.errors import CalloopError
from loop.fsutil import atomic_path

TRIGGER_CODES = {"pedestal": 0, "physics": 1}
RAW_NAME = re.compile(r"^run(?P<run>\d+)_ls(?P<ls>\d{4,})\.h5$")


class RawFileError(CalloopError):
    """A raw file is unreadable or does not follow the format."""


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


def raw_path(raw_root: Path, stream: str, run: int, ls: int) -> Path:
    """Path of one LS file."""
    return run_dir(raw_root, stream, run) / f"run{run}_ls{ls:04d}.h5"


def parse_raw_name(path: Path) -> tuple[int, int] | None:
    """(run, ls) from a raw file name, or None for anything else (temp files included)."""
    match = RAW_NAME.match(path.name)
    return (int(match["run"]), int(match["ls"])) if match else None


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


def read_raw_ls(path: Path) -> RawLS:
    """Read one LS file; any corruption becomes a :class:`RawFileError` naming the file."""
    try:
        with h5py.File(path, "r") as h5:
            frames = h5["frames"][...]
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
    except (OSError, KeyError, ValueError) as exc:
        raise RawFileError(
            f"raw file {path}: unreadable or not in calloop raw format ({exc})"
        ) from exc
    if frames.ndim != 2 or trigger.shape != (frames.shape[0],):
        raise RawFileError(
            f"raw file {path}: frames {frames.shape} and trigger {trigger.shape} do not match"
        )
    return content
