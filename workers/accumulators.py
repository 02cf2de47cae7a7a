"""Mergeable per-channel statistics (pure numpy; HDF5 I/O at the bottom).

Every ALCA job reduces its events to :class:`ChannelStats` per trigger type; the harvest
merges them with the parallel variance algorithm (Chan, Golub & LeVeque), so merging in
any grouping or order gives the one-shot mean and variance to rounding error, and a
re-harvest costs what is new, not the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator
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
        cls,
        frames: np.ndarray,
        threshold: float,
        histogram: tuple[int, float, float] | None = None,
        rows: np.ndarray | None = None,
    ) -> ChannelStats:
        """Statistics of ``frames`` [events x channels], or of its events ``rows`` only.

        The result is defined by the float64 formulas of :meth:`_from_float` (mean, then
        the squared deviations from it summed event by event, as numpy sums along axis
        0). ADC counts (unsigned integers of at most 16 bits) take a faster path with
        bit-identical results and no float64 copy of the frames: see
        :func:`_integer_stats`.
        """
        events, channels = frames.shape[0] if rows is None else len(rows), frames.shape[1]
        if events == 0:
            return cls.empty(channels, None if histogram is None else histogram[0])
        if frames.dtype.kind == "u" and frames.dtype.itemsize <= 2 and channels >= 2:
            return _integer_stats(frames, rows, threshold, histogram)
        return cls._from_float(frames if rows is None else frames[rows], threshold, histogram)

    @classmethod
    def _from_float(
        cls, frames: np.ndarray, threshold: float, histogram: tuple[int, float, float] | None
    ) -> ChannelStats:
        """The reference formulas, on a float64 copy of every frame."""
        values = np.asarray(frames, dtype=np.float64)
        events, channels = values.shape
        mean = values.mean(axis=0)
        hist = None
        if histogram is not None:
            index = bin_index(values, histogram)
            hist = np.zeros((channels, histogram[0]), dtype=np.int64)
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


def bin_index(values: np.ndarray, histogram: tuple[int, float, float]) -> np.ndarray:
    """Histogram bin of every value (under- and overflow go to the edge bins)."""
    bins, low, high = histogram
    return np.clip(((values - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)


_PASS1_ELEMENTS = 1 << 20
"""Values per block of the integer sums, minima, maxima and counts."""
_PASS2_ELEMENTS = 1 << 16
"""Values per block of the squared deviations: their float64 temporaries (512 KiB) stay in
a core's L2 cache instead of a float64 copy of every frame streaming through memory."""


def _blocks(frames: np.ndarray, rows: np.ndarray | None, elements: int) -> Iterator[np.ndarray]:
    """The selected events in blocks of about ``elements`` values (views without ``rows``)."""
    step = max(1, elements // frames.shape[1])
    count = frames.shape[0] if rows is None else len(rows)
    for start in range(0, count, step):
        if rows is None:
            yield frames[start : start + step]
        else:
            yield frames[rows[start : start + step]]


def _integer_stats(
    frames: np.ndarray,
    rows: np.ndarray | None,
    threshold: float,
    histogram: tuple[int, float, float] | None,
) -> ChannelStats:
    """:meth:`ChannelStats._from_float` for ADC counts (unsigned, <= 16 bits), bit for bit.

    * The sum is accumulated in int64: at most 65,535 per event and channel, so it cannot
      overflow below 1.4e14 events. In float64 every partial sum of such integers is an
      exact integer below 2**53, so numpy's float64 mean is this sum over the count.
    * Minimum, maximum, occupancy and histogram depend on each value alone: they are
      taken on the integers, the threshold and the bin of every possible ADC value being
      computed once with the float64 formulas.
    * M2 must be rounded as the reference rounds it: float64 deviations from the mean,
      squared, added event by event (numpy sums along axis 0 of a C-ordered array with
      more than one column in event order). Blocks of events are added the same way,
      each block starting from the running sum (row 0 of the buffer).
    """
    channels = frames.shape[1]
    adc = np.arange(np.iinfo(frames.dtype).max + 1, dtype=np.float64)
    above = adc > threshold  # monotonic in the value: occupied <=> value >= first
    first = int(np.argmax(above)) if above.any() else None
    lookup = None if histogram is None else bin_index(adc, histogram)
    total = np.zeros(channels, dtype=np.int64)
    low = np.full(channels, np.iinfo(frames.dtype).max, dtype=frames.dtype)
    high = np.zeros(channels, dtype=frames.dtype)
    occupancy = np.zeros(channels, dtype=np.int64)
    hist = None if histogram is None else np.zeros(channels * histogram[0], dtype=np.int64)
    offsets = None if histogram is None else np.arange(channels) * histogram[0]
    events = 0
    for block in _blocks(frames, rows, _PASS1_ELEMENTS):
        events += len(block)
        total += block.sum(axis=0, dtype=np.int64)
        np.minimum(low, block.min(axis=0), out=low)
        np.maximum(high, block.max(axis=0), out=high)
        if first is not None:
            occupancy += np.count_nonzero(block >= first, axis=0)
        if hist is not None and lookup is not None and offsets is not None:
            hist += np.bincount((lookup[block] + offsets).ravel(), minlength=hist.size)
    mean = total / events
    step = max(1, _PASS2_ELEMENTS // channels)
    buffer = np.empty((step + 1, channels))
    m2 = np.zeros(channels)
    for block in _blocks(frames, rows, _PASS2_ELEMENTS):
        squares = buffer[1 : len(block) + 1]
        buffer[0] = m2
        np.subtract(block, mean, out=squares)
        np.square(squares, out=squares)
        np.add.reduce(buffer[: len(block) + 1], axis=0, out=m2)
    return ChannelStats(
        count=events,
        mean=mean,
        m2=m2,
        minimum=low.astype(np.float64),
        maximum=high.astype(np.float64),
        occupancy=occupancy,
        histogram=None if hist is None else hist.reshape(channels, -1),
    )


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
