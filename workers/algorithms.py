"""Calibration algorithms: pure functions from merged accumulators to payloads, and the
validation a payload must pass before it is uploaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from loop.config import AlgorithmConfig, CalibrationConfig, ValidationConfig
from workers.accumulators import Accumulators, ChannelStats


class ChannelStatus(IntEnum):
    """Per-channel status codes of bad-channel payloads (and of the simulator's truth)."""

    GOOD = 0
    DEAD = 1
    NOISY = 2
    HOT = 3


class AlgorithmError(ValueError):
    """The accumulators cannot produce this payload (e.g. a trigger type is missing)."""


@dataclass(frozen=True)
class Payload:
    """A computed payload and its quality summary."""

    array: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def _stats(accumulators: Accumulators, trigger: str) -> ChannelStats:
    stats = accumulators.get(trigger)
    if stats is None or stats.count == 0:
        raise AlgorithmError(f"no {trigger}-trigger events in the accumulated statistics")
    return stats


def classify_channels(accumulators: Accumulators, cfg: AlgorithmConfig) -> np.ndarray:
    """Status per channel: dead (no noise), noisy (noise >> median), hot (occupancy >>
    median in physics events). Noise comes from pedestal triggers."""
    pedestal = _stats(accumulators, "pedestal")
    noise = pedestal.noise
    status = np.full(noise.shape, ChannelStatus.GOOD, dtype=np.uint8)
    alive = noise >= cfg.dead_max_noise
    status[~alive] = ChannelStatus.DEAD
    if alive.any():
        status[alive & (noise > cfg.noisy_noise_factor * np.median(noise[alive]))] = (
            ChannelStatus.NOISY
        )
    physics = accumulators.get("physics")
    if physics is not None and physics.count:
        fraction = physics.occupancy_fraction
        limit = max(cfg.hot_occupancy_factor * float(np.median(fraction)), cfg.hot_min_occupancy)
        status[(status == ChannelStatus.GOOD) & (fraction > limit)] = ChannelStatus.HOT
    return status


def _summary(status: np.ndarray, events: int) -> dict[str, Any]:
    counts = {s.name.lower(): int((status == s).sum()) for s in ChannelStatus}
    bad = int((status != ChannelStatus.GOOD).sum())
    return {
        "events": events,
        "channels": int(status.size),
        "bad_channels": bad,
        "bad_fraction": bad / status.size if status.size else 0.0,
        "status_counts": counts,
        "bad_list": [int(i) for i in np.flatnonzero(status != ChannelStatus.GOOD)],
    }


def compute_payload(accumulators: Accumulators, config: CalibrationConfig) -> Payload:
    """The payload of ``config.payload.calibration_type`` from merged accumulators.

    Channels whose statistics are not finite are listed in ``nonfinite_channels``
    whatever the payload kind (a status payload would otherwise call them dead), and
    :func:`validate` refuses such a payload.
    """
    status = classify_channels(accumulators, config.algorithm)
    pedestal = _stats(accumulators, "pedestal")
    summary = _summary(status, pedestal.count)
    nonfinite = ~(np.isfinite(pedestal.mean) & np.isfinite(pedestal.noise))
    summary["nonfinite_channels"] = [int(i) for i in np.flatnonzero(nonfinite)]
    if config.payload.calibration_type == "pedestals":
        array = np.stack([pedestal.mean, pedestal.noise])
        finite = np.isfinite(array[0])
        summary.update(
            mean_pedestal=float(array[0][finite].mean()) if finite.any() else None,
            median_noise=float(np.median(array[1][finite])) if finite.any() else None,
        )
        return Payload(array, summary)
    physics = accumulators.get("physics")
    summary["physics_events"] = physics.count if physics is not None else 0
    return Payload(status, summary)


def validate(
    payload: Payload, previous: np.ndarray | None, config: ValidationConfig, calibration_type: str
) -> list[str]:
    """Reasons the payload must not be uploaded (empty when it passes)."""
    problems = []
    events = int(payload.summary.get("events", 0))
    if events < config.min_events:
        problems.append(f"only {events} events (validation.min_events = {config.min_events})")
    fraction = float(payload.summary.get("bad_fraction", 0.0))
    if fraction > config.max_bad_fraction:
        problems.append(
            f"bad-channel fraction {fraction:.3f} exceeds "
            f"validation.max_bad_fraction = {config.max_bad_fraction}"
        )
    if not config.allow_nonfinite:
        nonfinite = payload.summary.get("nonfinite_channels") or []
        if payload.array.dtype.kind == "f" and not np.isfinite(payload.array).all():
            problems.append("payload has NaN/inf values (validation.allow_nonfinite is false)")
        elif nonfinite:
            problems.append(
                f"derived from non-finite statistics in {len(nonfinite)} channels, "
                f"e.g. {nonfinite[:10]} (validation.allow_nonfinite is false)"
            )
    if calibration_type == "bad_channels":
        codes = np.array([int(s) for s in ChannelStatus])
        unknown = ~np.isin(payload.array, codes)
        if unknown.any():
            problems.append(f"{int(unknown.sum())} channels have an unknown status code")
    if (
        config.max_mean_shift is not None
        and previous is not None
        and calibration_type == "pedestals"
        and previous.shape == payload.array.shape
    ):
        shift = float(np.nanmax(np.abs(payload.array[0] - previous[0])))
        if shift > config.max_mean_shift:
            problems.append(
                f"pedestal shift {shift:.2f} ADC from the previous payload exceeds "
                f"validation.max_mean_shift = {config.max_mean_shift}"
            )
    return problems
