"""The built-in kind ``bad_channels``: a status per channel (good, dead, noisy, hot) from
the noise of pedestal-trigger events and the occupancy of physics-trigger events.

Payload: uint8 ``[channels]``, :class:`~workers.algorithms.ChannelStatus` codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.config import ValidationConfig
from workers.accumulators import Accumulators
from workers.algorithms import ChannelKind, ChannelStatus, ChannelThresholds, channel_summary
from workers.kinds.base import Outside, Payload, PayloadSchema, PlotContext, differences

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STATUS_COLOURS = ("#4caf50", "#212121", "#ff9800", "#e53935")  # good, dead, noisy, hot
STATUS_NAMES = {int(s): s.name.lower() for s in ChannelStatus}


class BadChannels(ChannelKind):
    """A status code per channel."""

    schema = PayloadSchema(
        "uint8", "[channels]", "status per channel: 0 good, 1 dead, 2 noisy, 3 hot"
    )

    def finalize(
        self,
        accumulated: Accumulators,
        params: ChannelThresholds,
        dependencies: Mapping[str, np.ndarray],
    ) -> Payload:
        """The channel classification."""
        status, summary = channel_summary(accumulated, params)
        physics = accumulated.get("physics")
        summary["physics_events"] = physics.count if physics is not None else 0
        return Payload(status, summary)

    def validate(
        self, payload: Payload, previous: np.ndarray | None, validation: ValidationConfig
    ) -> list[str]:
        """The shared checks, and no status code outside :class:`ChannelStatus`."""
        problems = super().validate(payload, previous, validation)
        unknown = ~np.isin(payload.array, list(STATUS_NAMES))
        if unknown.any():
            problems.append(f"{int(unknown.sum())} channels have an unknown status code")
        return problems

    def outside(
        self,
        array: np.ndarray,
        previous: np.ndarray | None,
        params: ChannelThresholds | None,
        validation: ValidationConfig | None,
    ) -> list[Outside]:
        """Every channel not good, with its status (or its unknown code)."""
        found = []
        for channel in np.flatnonzero(array != ChannelStatus.GOOD):
            code = int(array[channel])
            name = STATUS_NAMES.get(code)
            found.append(
                Outside(int(channel), name or str(code), "status" if name else "unknown code")
            )
        return found

    def plot(
        self, figure: Figure, array: np.ndarray, summary: Mapping[str, Any], context: PlotContext
    ) -> None:
        """The status map, the channels per status, the status changes from the
        compared versions."""
        from matplotlib.colors import ListedColormap

        status = np.asarray(array).astype(int)
        ax_map, ax_counts, ax_diff = figure.subplots(1, 3, width_ratios=(2, 1, 2))
        width = int(np.ceil(np.sqrt(status.size)))
        grid = np.full(width * width, np.nan)
        grid[: status.size] = status
        ax_map.imshow(
            grid.reshape(width, width),
            cmap=ListedColormap(STATUS_COLOURS),
            vmin=-0.5,
            vmax=len(STATUS_COLOURS) - 0.5,
            interpolation="nearest",
        )
        ax_map.set(title=f"status map (channel = row x {width} + column)")
        counts = [int((status == code).sum()) for code in STATUS_NAMES]
        ax_counts.bar(list(STATUS_NAMES.values()), counts, color=STATUS_COLOURS)
        ax_counts.set(title="channels per status", yscale="log")
        differences(
            ax_diff, context.compared, lambda other: status - other.astype(int), "status - other"
        )
