"""The built-in kind ``pedestals``: per-channel pedestal mean and noise from
pedestal-trigger events.

Payload: float64 ``[2, channels]``, row 0 the mean, row 1 the noise (ADC rms). Its healthy
noise range is that of the channel classification: above ``dead_max_noise``, below
``noisy_noise_factor`` times the median noise of the live channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.config import ValidationConfig
from workers.accumulators import Accumulators
from workers.algorithms import ChannelKind, ChannelThresholds, channel_summary
from workers.kinds.base import (
    Check,
    Outside,
    Payload,
    PayloadSchema,
    PlotContext,
    differences,
    require,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OUTSIDE_COLOUR = "#d81b60"
HEALTHY_COLOUR = "#4caf50"


def _mean_shift(array: np.ndarray, previous: np.ndarray | None) -> np.ndarray | None:
    """|mean - previous mean| per channel, when the previous payload is comparable."""
    if previous is None or previous.shape != array.shape or array.ndim != 2:
        return None
    return np.asarray(np.abs(array[0] - previous[0]))


class Pedestals(ChannelKind):
    """Pedestal mean and noise per channel."""

    schema = PayloadSchema(
        "float64", "[2, channels]", "pedestal mean (row 0) and noise (row 1) per channel, ADC"
    )

    def finalize(
        self,
        accumulated: Accumulators,
        params: ChannelThresholds,
        dependencies: Mapping[str, np.ndarray],
    ) -> Payload:
        """Mean and noise of the pedestal-trigger events."""
        _status, summary = channel_summary(accumulated, params)
        pedestal = require(accumulated, "pedestal")
        array = np.stack([pedestal.mean, pedestal.noise])
        finite = np.isfinite(array[0])
        summary.update(
            mean_pedestal=float(array[0][finite].mean()) if finite.any() else None,
            median_noise=float(np.median(array[1][finite])) if finite.any() else None,
        )
        return Payload(array, summary)

    def validate(
        self, payload: Payload, previous: np.ndarray | None, validation: ValidationConfig
    ) -> list[str]:
        """The shared checks, and the mean's shift from the previous payload."""
        problems = super().validate(payload, previous, validation)
        if validation.max_mean_shift is not None and previous is not None:
            shift = _mean_shift(payload.array, previous)
            largest = None if shift is None else float(np.nanmax(shift))
            if largest is not None and largest > validation.max_mean_shift:
                problems.append(
                    f"pedestal shift {largest:.2f} ADC from the previous payload exceeds "
                    f"validation.max_mean_shift = {validation.max_mean_shift}"
                )
        return problems

    def checks(
        self,
        array: np.ndarray,
        quality: Mapping[str, Any],
        previous: np.ndarray | None,
        validation: ValidationConfig,
    ) -> list[Check]:
        """The shared figures, and the largest shift of the mean."""
        found = super().checks(array, quality, previous, validation)
        shift = _mean_shift(array, previous)
        if validation.max_mean_shift is not None and shift is not None:
            largest = float(np.nanmax(shift)) if shift.size else 0.0
            found.append(
                Check(
                    "pedestal shift from previous (ADC)",
                    f"{largest:.2f}",
                    f"<= {validation.max_mean_shift}",
                    largest <= validation.max_mean_shift,
                )
            )
        return found

    def healthy_range(
        self, array: np.ndarray, params: ChannelThresholds | None
    ) -> tuple[float, float] | None:
        """The noise band of the live channels (None without parameters or live channels)."""
        if params is None or array.ndim != 2:
            return None
        noise = array[1][np.isfinite(array[1])]
        alive = noise[noise >= params.dead_max_noise]
        if not alive.size:
            return None
        return (params.dead_max_noise, params.noisy_noise_factor * float(np.median(alive)))

    def outside(
        self,
        array: np.ndarray,
        previous: np.ndarray | None,
        params: ChannelThresholds | None,
        validation: ValidationConfig | None,
    ) -> list[Outside]:
        """Non-finite values, a noise outside the healthy band, a mean shift beyond
        ``max_mean_shift``."""
        mean, noise = array[0], array[1]
        band = self.healthy_range(array, params)
        shift = _mean_shift(array, previous)
        limit = validation.max_mean_shift if validation is not None else None
        found = []
        for channel in range(mean.size):
            why = []
            if not (np.isfinite(mean[channel]) and np.isfinite(noise[channel])):
                why.append("non-finite")
            elif band is not None and not band[0] <= noise[channel] <= band[1]:
                why.append(f"noise outside [{band[0]:.2f}, {band[1]:.2f}]")
            if shift is not None and limit is not None and shift[channel] > limit:
                why.append(f"pedestal shift {shift[channel]:.1f} > {limit}")
            if why:
                values = f"mean {mean[channel]:.2f}, noise {noise[channel]:.3f}"
                found.append(Outside(channel, values, "; ".join(why)))
        return found

    def plot(
        self, figure: Figure, array: np.ndarray, summary: Mapping[str, Any], context: PlotContext
    ) -> None:
        """Mean and noise per channel (healthy band shaded, outside channels ringed),
        the noise distribution, the change of the mean from the compared versions."""
        mean, noise = array[0], array[1]
        channels = np.arange(mean.size)
        outside = np.array([o.channel for o in context.outside], dtype=int)
        params = context.params if isinstance(context.params, ChannelThresholds) else None
        band = self.healthy_range(array, params)
        (ax_mean, ax_noise), (ax_hist, ax_diff) = figure.subplots(2, 2)
        ax_mean.plot(channels, mean, ".", ms=3)
        ax_mean.set(title="pedestal mean", xlabel="channel", ylabel="ADC")
        ax_noise.plot(channels, noise, ".", ms=3)
        if band is not None:
            ax_noise.axhspan(*band, color=HEALTHY_COLOUR, alpha=0.15, label="healthy")
            ax_hist.axvspan(*band, color=HEALTHY_COLOUR, alpha=0.15)
        if outside.size:
            ax_noise.plot(
                outside, noise[outside], "o", mfc="none", color=OUTSIDE_COLOUR, label="outside"
            )
            ax_mean.plot(outside, mean[outside], "o", mfc="none", color=OUTSIDE_COLOUR)
        ax_noise.set(title="noise", xlabel="channel", ylabel="ADC rms")
        ax_noise.legend(loc="upper right", fontsize="small")
        ax_hist.hist(noise[np.isfinite(noise)], bins=40, color="#1e88e5")
        ax_hist.set(title="noise distribution", xlabel="ADC rms", ylabel="channels")
        differences(ax_diff, context.compared, lambda other: mean - other[0], "mean - other (ADC)")
