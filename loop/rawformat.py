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
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RawFileError(path, f"unreadable or not in calloop raw format ({exc})") from exc
    if frames.ndim != 2 or trigger.shape != (frames.shape[0],):
        raise RawFileError(path, f"frames {frames.shape} and trigger {trigger.shape} do not match")
    return content


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
