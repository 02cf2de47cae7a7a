"""Mergeable per-channel statistics (pure numpy; HDF5 I/O at the bottom).

Every ALCA job reduces its events to :class:`ChannelStats` per trigger type; the harvest
merges them with the parallel variance algorithm (Chan, Golub & LeVeque), so merging in
any grouping or order gives the one-shot mean and variance to rounding error, and a
re-harvest costs what is new, not the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loop.fsutil import atomic_path


@dataclass
class ChannelStats:
    """count, mean, M2, min, max, occupancy (and an optional histogram) per channel."""

    count: int
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    occupancy: np.ndarray  # events above the occupancy threshold, per channel
    histogram: np.ndarray | None = None  # [channels, bins]

    @classmethod
    def empty(cls, channels: int, bins: int | None = None) -> ChannelStats:
        """Statistics of no events."""
        return cls(
            0,
            np.zeros(channels),
            np.zeros(channels),
            np.full(channels, np.inf),
            np.full(channels, -np.inf),
            np.zeros(channels, dtype=np.int64),
            None if bins is None else np.zeros((channels, bins), dtype=np.int64),
        )

    @classmethod
    def from_frames(
        cls, frames: np.ndarray, threshold: float, histogram: tuple[int, float, float] | None = None
    ) -> ChannelStats:
        """Statistics of ``frames`` [events x channels]."""
        values = np.asarray(frames, dtype=np.float64)
        events, channels = values.shape
        if events == 0:
            return cls.empty(channels, None if histogram is None else histogram[0])
        mean = values.mean(axis=0)
        hist = None
        if histogram is not None:
            bins, low, high = histogram
            index = np.clip(((values - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)
            hist = np.zeros((channels, bins), dtype=np.int64)
            np.add.at(hist, (np.broadcast_to(np.arange(channels), index.shape), index), 1)
        return cls(
            count=events,
            mean=mean,
            m2=((values - mean) ** 2).sum(axis=0),
            minimum=values.min(axis=0),
            maximum=values.max(axis=0),
            occupancy=(values > threshold).sum(axis=0).astype(np.int64),
            histogram=hist,
        )

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sets of events together."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        hist = None
        if self.histogram is not None and other.histogram is not None:
            hist = self.histogram + other.histogram
        return ChannelStats(
            total,
            mean,
            m2,
            np.minimum(self.minimum, other.minimum),
            np.maximum(self.maximum, other.maximum),
            self.occupancy + other.occupancy,
            hist,
        )

    @property
    def variance(self) -> np.ndarray:
        """Population variance per channel (NaN with no events)."""
        return self.m2 / self.count if self.count else np.full_like(self.mean, np.nan)

    @property
    def noise(self) -> np.ndarray:
        """Standard deviation per channel."""
        return np.sqrt(self.variance)

    @property
    def occupancy_fraction(self) -> np.ndarray:
        """Fraction of events above threshold per channel."""
        return self.occupancy / self.count if self.count else np.zeros_like(self.mean)


Accumulators = dict[str, ChannelStats]
"""Statistics per trigger type name."""


def merge_all(parts: list[Accumulators]) -> Accumulators:
    """Merge several accumulator sets (any order, any grouping)."""
    merged: Accumulators = {}
    for part in parts:
        for trigger, stats in part.items():
            merged[trigger] = merged[trigger].merge(stats) if trigger in merged else stats
    return merged


_FIELDS = ("mean", "m2", "minimum", "maximum", "occupancy")


def save_accumulators(path: Path, accumulators: Accumulators, attrs: dict[str, object]) -> None:
    """Write accumulators atomically: one group per trigger type."""
    with atomic_path(path, ".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({k: v for k, v in attrs.items() if v is not None})
        for trigger, stats in accumulators.items():
            group = h5.create_group(trigger)
            group.attrs["count"] = stats.count
            for name in _FIELDS:
                group.create_dataset(name, data=getattr(stats, name))
            if stats.histogram is not None:
                group.create_dataset("histogram", data=stats.histogram, compression="gzip")


def _load_stats(group: h5py.Group) -> ChannelStats:
    return ChannelStats(
        count=int(group.attrs["count"]),
        mean=group["mean"][()],
        m2=group["m2"][()],
        minimum=group["minimum"][()],
        maximum=group["maximum"][()],
        occupancy=group["occupancy"][()],
        histogram=group["histogram"][()] if "histogram" in group else None,
    )


def load_accumulators(path: Path) -> Accumulators:
    """Read accumulators written by :func:`save_accumulators`."""
    with h5py.File(path, "r") as h5:
        return {trigger: _load_stats(group) for trigger, group in h5.items()}
