"""The simulated PMT detector (``type: pmt``): seeded per-PMT truth and LED-scan raw LS files.

Each channel is one photomultiplier lit by a pulsed LED. In every event (all ``led``
triggers) PMT *p* sees n ~ Poisson(mu) photoelectrons and reads

    charge = pedestal[p] + Normal(0, pedestal_width[p]) + sum of n Normal(gain[p], spe_width[p])

rounded to whole ADC counts; the sum of n Gaussian photoelectrons is drawn as one
Normal(n gain, sqrt(n) spe_width), the same distribution. Healthy gains are Normal(gain_mean,
gain_spread) within :data:`HEALTHY_DRAW` spreads of the mean; the healthy range
(:func:`healthy_gain`) is wider, :data:`HEALTHY_SPREADS` spreads, so no healthy PMT is near
its edge, and the ``out_of_range`` PMTs are well outside it. The truth is saved beside the
raw files (:func:`save_pmt_truth`) so tests and the demo can check the fitted gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop.fsutil import atomic_path
from loop.rawformat import TRIGGER_CODES, RawLS
from loop.sim.scenario import DetectorSpec
from workers.kinds.pmt_gain import Row

HEALTHY_SPREADS = 3.0
"""The healthy gain range is ``gain_mean`` +- this many ``gain_spread``."""
HEALTHY_DRAW = 2.0
"""Healthy PMTs' gains are drawn within ``gain_mean`` +- this many ``gain_spread``."""
OUTSIDE_FACTOR = (1.15, 1.5)
"""An out-of-range PMT's gain is the healthy range's edge times (high side) or divided by
(low side) a factor drawn uniformly in this interval."""
TRUTH_FILE = "pmt_truth.npz"
ADC_MAX = float(np.iinfo(np.uint16).max)


@dataclass(frozen=True)
class PmtTruth:
    """What the PMTs really are; the ``pmt_gain`` calibration should rediscover it."""

    gain: np.ndarray  # float64 [pmts], ADC per photoelectron
    pedestal: np.ndarray  # float64 [pmts], ADC
    pedestal_width: np.ndarray  # float64 [pmts], ADC rms of the pedestal
    spe_width: np.ndarray  # float64 [pmts], ADC rms of one photoelectron
    mu: float  # mean photoelectrons per LED event
    healthy: tuple[float, float]  # the healthy gain range

    @property
    def out_of_range(self) -> list[int]:
        """The PMTs whose gain is outside the healthy range."""
        low, high = self.healthy
        return [int(i) for i in np.flatnonzero((self.gain < low) | (self.gain > high))]


def healthy_gain(spec: DetectorSpec) -> tuple[float, float]:
    """The healthy gain range of a PMT detector (the ``pmt_gain`` calibration's
    ``healthy_gain`` should be this)."""
    half = HEALTHY_SPREADS * spec.gain_spread
    return (spec.gain_mean - half, spec.gain_mean + half)


def _healthy_gains(spec: DetectorSpec, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` gains Normal(gain_mean, gain_spread) within :data:`HEALTHY_DRAW` spreads
    (redrawn until inside: a truncated normal)."""
    gains = rng.normal(spec.gain_mean, spec.gain_spread, count)
    while True:
        outside = np.abs(gains - spec.gain_mean) > HEALTHY_DRAW * spec.gain_spread
        if not outside.any():
            return gains
        gains[outside] = rng.normal(spec.gain_mean, spec.gain_spread, int(outside.sum()))


def make_pmt_truth(spec: DetectorSpec, seed: int) -> PmtTruth:
    """The truth of one PMT detector, fixed by ``seed``."""
    if spec.type != "pmt":
        raise ValueError(f"a PMT truth needs a detector of type pmt, not {spec.type}")
    low, high = healthy_gain(spec)
    if low <= 0:
        raise ValueError(
            f"gain_mean {spec.gain_mean} must exceed {HEALTHY_SPREADS:g} x gain_spread "
            f"{spec.gain_spread}: the healthy gain range must start above 0"
        )
    rng = np.random.default_rng(seed)
    pmts = spec.channels
    pedestal = rng.normal(spec.pedestal_mean, spec.pedestal_spread, pmts)
    pedestal_width = rng.uniform(spec.noise_low, spec.noise_high, pmts)
    gain = _healthy_gains(spec, pmts, rng)
    chosen = rng.choice(pmts, spec.out_of_range, replace=False)
    factor = rng.uniform(*OUTSIDE_FACTOR, chosen.size)
    above = rng.random(chosen.size) < 0.5
    gain[chosen] = np.where(above, high * factor, low / factor)
    return PmtTruth(
        gain=gain,
        pedestal=pedestal,
        pedestal_width=pedestal_width,
        spe_width=spec.spe_width * gain,
        mu=spec.mu,
        healthy=(low, high),
    )


def generate_pmt_ls(
    spec: DetectorSpec,
    truth: PmtTruth,
    *,
    detector: str,
    run: int,
    ls: int,
    seed: int,
    start_time: float,
    end_time: float,
) -> RawLS:
    """One lumisection of LED events; deterministic in (seed, run, ls)."""
    rng = np.random.default_rng([seed, run, ls])
    shape = (spec.events_per_ls, spec.channels)
    photoelectrons = rng.poisson(truth.mu, shape)
    charge = truth.pedestal + truth.pedestal_width * rng.standard_normal(shape)
    charge += photoelectrons * truth.gain
    charge += np.sqrt(photoelectrons) * truth.spe_width * rng.standard_normal(shape)
    frames = np.clip(np.rint(charge), 0, ADC_MAX).astype(np.uint16)
    return RawLS(
        run=run,
        ls=ls,
        detector=detector,
        frames=frames,
        trigger=np.full(spec.events_per_ls, TRIGGER_CODES["led"], dtype=np.uint8),
        start_time=start_time,
        end_time=end_time,
    )


def gain_pulls(payload: np.ndarray, truth: PmtTruth) -> np.ndarray:
    """(fitted - true gain) / fitted error per PMT of a ``pmt_gain`` payload (NaN where the
    fit gave no error): N(0, 1) distributed if the fit and its errors are right."""
    gain, error = payload[Row.GAIN], payload[Row.GAIN_ERROR]
    return np.asarray((gain - truth.gain) / error)


def pmt_truth_path(stream_dir: Path) -> Path:
    """Where a PMT stream's truth is saved."""
    return stream_dir / TRUTH_FILE


def save_pmt_truth(stream_dir: Path, truth: PmtTruth) -> None:
    """Write the truth atomically beside the raw files."""
    with atomic_path(pmt_truth_path(stream_dir), suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            gain=truth.gain,
            pedestal=truth.pedestal,
            pedestal_width=truth.pedestal_width,
            spe_width=truth.spe_width,
            mu=np.float64(truth.mu),
            healthy=np.array(truth.healthy),
        )


def load_pmt_truth(stream_dir: Path) -> PmtTruth:
    """Read a PMT stream's saved truth."""
    with np.load(pmt_truth_path(stream_dir)) as data:
        low, high = (float(v) for v in data["healthy"])
        return PmtTruth(
            gain=data["gain"],
            pedestal=data["pedestal"],
            pedestal_width=data["pedestal_width"],
            spe_width=data["spe_width"],
            mu=float(data["mu"]),
            healthy=(low, high),
        )
