"""Damaged raw LS files, one kind each, made from a good one (shared by the worker and
daemon tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loop.rawformat import read_raw_ls, write_raw_ls


def _rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    content = read_raw_ls(path)
    write_raw_ls(path, dataclasses.replace(content, frames=change(content.frames)))


def nan_values(path: Path) -> None:
    """Float frames with NaN in four channels."""

    def change(frames: np.ndarray) -> np.ndarray:
        values = frames.astype(np.float32)
        values[:, [3, 7, 11, 13]] = np.nan
        return values

    _rewrite(path, change)


def truncated(path: Path) -> None:
    """The first half of the file only."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    """An empty file."""
    path.write_bytes(b"")


def wrong_dtype(path: Path) -> None:
    """Frames stored as int64."""
    _rewrite(path, lambda frames: frames.astype(np.int64))


def wrong_channels(path: Path) -> None:
    """One channel too few."""
    _rewrite(path, lambda frames: frames[:, :-1])


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "nan": (nan_values, "non-finite values"),
    "truncated": (truncated, "unreadable"),
    "zero-byte": (zero_bytes, "unreadable"),
    "wrong-dtype": (wrong_dtype, "dtype int64"),
    "wrong-channels": (wrong_channels, "channels, the detector has"),
}
"""kind -> (how to damage a file in place, what the rejection reason says)."""
