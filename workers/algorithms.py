"""The channel classification both built-in kinds share, and the entry points the loop
calls whatever the kind: :func:`compute_payload` (harvest) and :func:`validate` (step 4).

The kinds themselves are :mod:`workers.kinds.pedestals` and
:mod:`workers.kinds.bad_channels`; their common parameters are :class:`ChannelThresholds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loop.config import CalibrationConfig, ValidationConfig
from workers.accumulators import Accumulators
from workers.kinds import get_kind, kind_of
from workers.kinds.base import AlgorithmError, CalibrationKind, Payload, require, trigger_stats

__all__ = [
    "AlgorithmError",
    "ChannelKind",
    "ChannelStatus",
    "ChannelThresholds",
    "Payload",
    "channel_summary",
    "classify_channels",
    "compute_payload",
    "validate",
]


class ChannelStatus(IntEnum):
    """Per-channel status codes of bad-channel payloads (and of the simulator's truth)."""

    GOOD = 0
    DEAD = 1
    NOISY = 2
    HOT = 3


class ChannelThresholds(BaseModel):
    """Thresholds of the channel classification (the built-in kinds' ``parameters``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dead_max_noise: float = Field(0.5, ge=0, description="ADC rms below which a channel is dead")
    noisy_noise_factor: float = Field(
        2.5, gt=1, description="noisy: noise above this x the median noise"
    )
    hot_occupancy_factor: float = Field(
        10.0, gt=1, description="hot: occupancy above this x the median occupancy"
    )
    hot_min_occupancy: float = Field(
        0.05, ge=0, le=1, description="a hot channel is occupied in more than this fraction"
    )


def classify_channels(accumulators: Accumulators, cfg: ChannelThresholds) -> np.ndarray:
    """Status per channel: dead (no noise), noisy (noise >> median), hot (occupancy >>
    median in physics events). Noise comes from pedestal triggers."""
    pedestal = require(accumulators, "pedestal")
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


def channel_summary(
    accumulators: Accumulators, cfg: ChannelThresholds
) -> tuple[np.ndarray, dict[str, Any]]:
    """The channel status and the quality summary both built-in payloads carry.

    Channels whose statistics are not finite are listed in ``nonfinite_channels``
    whatever the payload kind (a status payload would otherwise call them dead), and
    validation refuses such a payload.
    """
    status = classify_channels(accumulators, cfg)
    pedestal = require(accumulators, "pedestal")
    counts = {s.name.lower(): int((status == s).sum()) for s in ChannelStatus}
    bad = int((status != ChannelStatus.GOOD).sum())
    nonfinite = ~(np.isfinite(pedestal.mean) & np.isfinite(pedestal.noise))
    return status, {
        "events": pedestal.count,
        "channels": int(status.size),
        "bad_channels": bad,
        "bad_fraction": bad / status.size if status.size else 0.0,
        "status_counts": counts,
        "bad_list": [int(i) for i in np.flatnonzero(status != ChannelStatus.GOOD)],
        "nonfinite_channels": [int(i) for i in np.flatnonzero(nonfinite)],
    }


class ChannelKind(CalibrationKind[ChannelThresholds]):
    """What the built-in kinds share: statistics per trigger type, the channel
    classification's thresholds as parameters."""

    Parameters = ChannelThresholds

    def accumulate(
        self,
        frames: np.ndarray,
        trigger: np.ndarray,
        params: ChannelThresholds,
        config: CalibrationConfig,
    ) -> Accumulators:
        """:class:`~workers.accumulators.ChannelStats` per trigger type."""
        return trigger_stats(frames, trigger, config.step3)


def compute_payload(
    accumulators: Accumulators,
    config: CalibrationConfig,
    dependencies: Mapping[str, np.ndarray] | None = None,
) -> Payload:
    """The payload of the calibration's kind from merged accumulators."""
    kind = kind_of(config)
    return kind.finalize(accumulators, kind.parameters(config), dependencies or {})


def validate(
    payload: Payload, previous: np.ndarray | None, config: ValidationConfig, kind: str
) -> list[str]:
    """Reasons the payload of a calibration of ``kind`` must not be uploaded (empty when
    it passes)."""
    return get_kind(kind).validate(payload, previous, config)
