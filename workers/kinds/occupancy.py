"""The built-in kind ``occupancy``: the fraction of physics events in which each channel
has a hit, a signal above its pedestal by ``threshold_sigma`` times its noise.

The pedestals are not known when the events are accumulated, so each channel keeps a
histogram of its ADC values (ALCA); the harvest counts the entries above each channel's
threshold, with the pedestal payload of the calibration named in ``pedestals_from``
(which must be in ``depends_on``). Meant for short validity (``time_type: lumi``): the
occupancy follows the instantaneous luminosity and the beam conditions LS by LS, like
the beam spot of the CMS loop. Channels above ``hot_fraction`` are hot.

Payload: float64 ``[channels]``, the hit fraction per channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loop.config import CalibrationConfig, ValidationConfig
from loop.rawformat import TRIGGER_CODES
from workers.accumulators import Accumulators, ChannelStats
from workers.kinds.base import (
    AlgorithmError,
    CalibrationKind,
    Outside,
    Payload,
    PayloadSchema,
    PlotContext,
    differences,
    require,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PHYSICS = "physics"


class OccupancyParameters(BaseModel):
    """``parameters:`` of an ``occupancy`` calibration."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pedestals_from: str = Field(
        min_length=1,
        description="the calibration (in depends_on) whose pedestal payload [2, channels] "
        "(mean, noise) sets each channel's hit threshold",
    )
    threshold_sigma: float = Field(5.0, gt=0, description="hit: ADC above pedestal + N x noise")
    bins: int = Field(512, ge=16, le=65536, description="ADC histogram bins per channel")
    low: float = Field(0.0, description="lower edge of the ADC histogram")
    high: float = Field(1024.0, description="upper edge of the ADC histogram")
    hot_fraction: float = Field(
        0.2, gt=0, le=1, description="a channel with hits in more of the events is hot"
    )

    @model_validator(mode="after")
    def _ordered(self) -> OccupancyParameters:
        if self.high <= self.low:
            raise ValueError("high must be above low")
        return self


class Occupancy(CalibrationKind[OccupancyParameters]):
    """Hit fraction per channel in physics events."""

    Parameters = OccupancyParameters
    schema = PayloadSchema("float64", "[channels]", "fraction of physics events with a hit")

    def accumulate(
        self,
        frames: np.ndarray,
        trigger: np.ndarray,
        params: OccupancyParameters,
        config: CalibrationConfig,
    ) -> Accumulators:
        """An ADC histogram per channel of the physics events."""
        rows = np.flatnonzero(trigger == TRIGGER_CODES[PHYSICS])
        histogram = (params.bins, params.low, params.high)
        # the stats' own occupancy has one threshold for all channels: ours come later
        return {PHYSICS: ChannelStats.from_frames(frames, params.high, histogram, rows=rows)}

    def finalize(
        self,
        accumulated: Accumulators,
        params: OccupancyParameters,
        dependencies: Mapping[str, np.ndarray],
    ) -> Payload:
        """The fraction of entries above each channel's threshold."""
        stats = require(accumulated, PHYSICS)
        pedestals = dependencies.get(params.pedestals_from)
        if pedestals is None:
            raise AlgorithmError(
                f"needs the pedestal payload of {params.pedestals_from} "
                "(parameters.pedestals_from; is it in depends_on?)"
            )
        histogram = stats.histogram
        if histogram is None or pedestals.shape != (2, histogram.shape[0]):
            raise AlgorithmError(
                f"the pedestal payload of {params.pedestals_from} has shape "
                f"{list(pedestals.shape)}, not [2, {stats.mean.size}] (mean, noise)"
            )
        fraction = hit_fraction(histogram, pedestals, params)
        hot = np.flatnonzero(fraction > params.hot_fraction)
        return Payload(
            fraction,
            {
                "events": stats.count,
                "mean_occupancy": float(fraction.mean()),
                "hot_channels": [int(c) for c in hot],
                "bad_fraction": float(hot.size / fraction.size),
                "pedestals_from": params.pedestals_from,
            },
        )

    def healthy_range(
        self, array: np.ndarray, params: OccupancyParameters | None
    ) -> tuple[float, float] | None:
        """Up to ``hot_fraction``."""
        return None if params is None else (0.0, params.hot_fraction)

    def outside(
        self,
        array: np.ndarray,
        previous: np.ndarray | None,
        params: OccupancyParameters | None,
        validation: ValidationConfig | None,
    ) -> list[Outside]:
        """Hot channels."""
        limit = 1.0 if params is None else params.hot_fraction
        return [
            Outside(int(c), f"occupancy {array[c]:.3f}", f"hot (> {limit})")
            for c in np.flatnonzero(array > limit)
        ]

    def plot(
        self, figure: Figure, array: np.ndarray, summary: Mapping[str, Any], context: PlotContext
    ) -> None:
        """Occupancy per channel and its change from the compared versions."""
        ax_values, ax_diff = figure.subplots(1, 2)
        ax_values.plot(np.arange(array.size), array, ".", ms=3)
        ax_values.set(title="hit fraction", xlabel="channel", ylabel="fraction of events")
        differences(ax_diff, context.compared, lambda other: array - other, "occupancy - other")


def hit_fraction(
    histogram: np.ndarray, pedestals: np.ndarray, params: OccupancyParameters
) -> np.ndarray:
    """Per channel, the fraction of its histogram entries in the bins from the first
    whose lower edge is above pedestal + ``threshold_sigma`` x noise (pure: to the bin
    width; overflow counts, as the histogram keeps it in the last bin; a channel without
    entries gets 0). Strictly above: a dead channel, whose noise is 0, reads exactly its
    pedestal and must not count as hit."""
    edges = np.linspace(params.low, params.high, params.bins + 1)
    threshold = pedestals[0] + params.threshold_sigma * pedestals[1]
    first_bin = np.searchsorted(edges[:-1], threshold, side="right")
    cumulative = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]  # entries from a bin up
    total = histogram.sum(axis=1)
    above = np.where(
        first_bin < params.bins,
        cumulative[np.arange(len(first_bin)), np.minimum(first_bin, params.bins - 1)],
        0,
    )
    return np.where(total > 0, above / np.maximum(total, 1), 0.0)
