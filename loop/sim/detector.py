"""The simulated detector: seeded per-channel truth and realistic raw LS content.

Every channel has a pedestal (Gaussian around ``pedestal_mean``) and a noise (uniform in
``[noise_low, noise_high]``). A few channels are bad: dead ones read a constant,
noisy ones have several times the noise, hot ones fire in most physics events. Events
are a mix of pedestal triggers (empty events) and physics triggers (occasional hits of
a few hundred ADC). The truth is saved beside the raw files so tests and the demo can
check that a calibration found it.

A detector of ``type: pmt`` is simulated by :mod:`loop.sim.pmt`; the ``*_detector_*``
functions at the bottom serve either type.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from loop.fsutil import atomic_path
from loop.rawformat import TRIGGER_CODES, RawLS
from loop.sim.pmt import PmtTruth, generate_pmt_ls, make_pmt_truth, save_pmt_truth
from loop.sim.scenario import DetectorSpec
from workers.algorithms import ChannelStatus

NOISY_FACTOR = 5.0
HIT_MIN_ADC = 250.0
HIT_SCALE_ADC = 100.0


@dataclass(frozen=True)
class Truth:
    """What the detector really is; calibrations should rediscover it."""

    pedestal: np.ndarray  # float64 [channels]
    noise: np.ndarray  # float64 [channels]
    status: np.ndarray  # uint8 [channels], ChannelStatus codes

    def bad_channels(self, status: ChannelStatus) -> list[int]:
        """Indices of the channels with ``status``."""
        return [int(i) for i in np.flatnonzero(self.status == status)]


def make_truth(spec: DetectorSpec, seed: int) -> Truth:
    """The truth of one detector, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    pedestal = rng.normal(spec.pedestal_mean, spec.pedestal_spread, spec.channels)
    noise = rng.uniform(spec.noise_low, spec.noise_high, spec.channels)
    status = np.full(spec.channels, ChannelStatus.GOOD, dtype=np.uint8)
    bad = rng.choice(spec.channels, spec.dead + spec.noisy + spec.hot, replace=False)
    status[bad[: spec.dead]] = ChannelStatus.DEAD
    status[bad[spec.dead : spec.dead + spec.noisy]] = ChannelStatus.NOISY
    status[bad[spec.dead + spec.noisy :]] = ChannelStatus.HOT
    noise[status == ChannelStatus.DEAD] = 0.0
    noise[status == ChannelStatus.NOISY] *= NOISY_FACTOR
    return Truth(pedestal=pedestal, noise=noise, status=status)


def generate_ls(
    spec: DetectorSpec,
    truth: Truth,
    *,
    detector: str,
    run: int,
    ls: int,
    seed: int,
    start_time: float,
    end_time: float,
) -> RawLS:
    """One lumisection's events; deterministic in (seed, run, ls)."""
    rng = np.random.default_rng([seed, run, ls])
    events, channels = spec.events_per_ls, spec.channels
    is_pedestal = rng.random(events) < spec.pedestal_fraction
    trigger = np.where(is_pedestal, TRIGGER_CODES["pedestal"], TRIGGER_CODES["physics"])
    values = truth.pedestal + truth.noise * rng.standard_normal((events, channels))
    occupancy = np.where(truth.status == ChannelStatus.HOT, spec.hot_occupancy, spec.occupancy)
    hits = (rng.random((events, channels)) < occupancy) & ~is_pedestal[:, None]
    hits &= truth.status != ChannelStatus.DEAD
    values += hits * (HIT_MIN_ADC + rng.exponential(HIT_SCALE_ADC, (events, channels)))
    frames = np.clip(np.rint(values), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return RawLS(
        run=run,
        ls=ls,
        detector=detector,
        frames=frames,
        trigger=trigger.astype(np.uint8),
        start_time=start_time,
        end_time=end_time,
    )


def truth_path(stream_dir: Path) -> Path:
    """Where a stream's truth is saved."""
    return stream_dir / "truth.npz"


def save_truth(stream_dir: Path, truth: Truth) -> None:
    """Write the truth atomically beside the raw files."""
    with atomic_path(truth_path(stream_dir), suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, pedestal=truth.pedestal, noise=truth.noise, status=truth.status)


def load_truth(stream_dir: Path) -> Truth:
    """Read a stream's saved truth."""
    with np.load(truth_path(stream_dir)) as data:
        return Truth(pedestal=data["pedestal"], noise=data["noise"], status=data["status"])


DetectorTruth = Truth | PmtTruth
"""The truth of a detector of either type."""


def make_detector_truth(spec: DetectorSpec, seed: int) -> DetectorTruth:
    """The truth of a detector of ``spec``'s type, fixed by ``seed``."""
    return make_pmt_truth(spec, seed) if spec.type == "pmt" else make_truth(spec, seed)


def generate_detector_ls(
    spec: DetectorSpec,
    truth: DetectorTruth,
    *,
    detector: str,
    run: int,
    ls: int,
    seed: int,
    start_time: float,
    end_time: float,
) -> RawLS:
    """One lumisection of a detector of either type; deterministic in (seed, run, ls)."""
    generate = (
        partial(generate_pmt_ls, spec, truth)
        if isinstance(truth, PmtTruth)
        else partial(generate_ls, spec, truth)
    )
    return generate(
        detector=detector,
        run=run,
        ls=ls,
        seed=seed,
        start_time=start_time,
        end_time=end_time,
    )


def save_detector_truth(stream_dir: Path, truth: DetectorTruth) -> None:
    """Write the truth of a detector of either type beside its raw files."""
    if isinstance(truth, PmtTruth):
        save_pmt_truth(stream_dir, truth)
    else:
        save_truth(stream_dir, truth)
