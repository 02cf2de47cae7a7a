"""Per-channel plots of a payload, drawn server-side with matplotlib's Agg renderer (no
display, no browser code): the payload page's images and ``calloop plot`` are the same
figure.

Pedestals: mean and noise vs channel (the healthy noise band shaded, channels outside it
marked), the noise histogram, and the change of the mean from the previous version and
from the one currently uploaded. Bad channels: the status map, the status counts, and
the channels whose status changed from the previous and the uploaded version.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from loop.web.payloads import PEDESTALS, PayloadView
from workers.algorithms import ChannelStatus

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn: the pages start faster
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}
STATUS_COLOURS = ("#4caf50", "#212121", "#ff9800", "#e53935")  # good, dead, noisy, hot
OUTSIDE = "#d81b60"

# matplotlib's font and text caches are shared by every figure of the process
_RENDER_LOCK = threading.Lock()


def render(view: PayloadView, fmt: str = "png") -> bytes:
    """The payload's figure as PNG or SVG bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown plot format {fmt!r}; use one of {', '.join(FORMATS)}")
    from matplotlib.figure import Figure

    with _RENDER_LOCK:
        figure = Figure(figsize=(11, 7.5), layout="constrained")
        if view.kind == PEDESTALS:
            _pedestals(figure, view)
        else:
            _bad_channels(figure, view)
        figure.suptitle(
            f"{view.detector} {view.ctype} {view.constants.version} "
            f"(range {view.constants.range}{', retired' if view.constants.retired else ''})"
        )
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=80)
    return buffer.getvalue()


def _compare(view: PayloadView) -> list[tuple[str, np.ndarray]]:
    """(label, array) of the versions this one is compared with."""
    found = []
    for label, other in (("previous", view.previous), ("uploaded", view.uploaded)):
        if (
            other is not None
            and other.version != view.constants.version
            and other.array.shape == view.constants.array.shape
        ):
            found.append((f"{label} {other.version}", np.asarray(other.array)))
    return found


def _pedestals(figure: Figure, view: PayloadView) -> None:
    mean, noise = view.constants.array[0], view.constants.array[1]
    channels = np.arange(mean.size)
    outside = np.array([o.channel for o in view.outside], dtype=int)
    (ax_mean, ax_noise), (ax_hist, ax_diff) = figure.subplots(2, 2)
    ax_mean.plot(channels, mean, ".", ms=3, label=view.constants.version)
    ax_mean.set(title="pedestal mean", xlabel="channel", ylabel="ADC")
    ax_noise.plot(channels, noise, ".", ms=3)
    if view.noise_band is not None:
        ax_noise.axhspan(*view.noise_band, color="#4caf50", alpha=0.15, label="healthy")
        ax_hist.axvspan(*view.noise_band, color="#4caf50", alpha=0.15)
    if outside.size:
        ax_noise.plot(outside, noise[outside], "o", mfc="none", color=OUTSIDE, label="outside")
        ax_mean.plot(outside, mean[outside], "o", mfc="none", color=OUTSIDE)
    ax_noise.set(title="noise", xlabel="channel", ylabel="ADC rms")
    ax_noise.legend(loc="upper right", fontsize="small")
    finite = noise[np.isfinite(noise)]
    ax_hist.hist(finite, bins=40, color="#1e88e5")
    ax_hist.set(title="noise distribution", xlabel="ADC rms", ylabel="channels")
    _differences(ax_diff, view, lambda other: mean - other[0], "mean - other (ADC)")


def _bad_channels(figure: Figure, view: PayloadView) -> None:
    from matplotlib.colors import ListedColormap

    status = np.asarray(view.constants.array).astype(int)
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
    names = [s.name.lower() for s in ChannelStatus]
    counts = [int((status == s).sum()) for s in ChannelStatus]
    ax_counts.bar(names, counts, color=STATUS_COLOURS)
    ax_counts.set(title="channels per status", yscale="log")
    _differences(ax_diff, view, lambda other: status - other.astype(int), "status - other")


def _differences(
    ax: Axes, view: PayloadView, delta: Callable[[np.ndarray], np.ndarray], label: str
) -> None:
    """Plot ``delta(other)`` for each compared version, or say there is none."""
    compared = _compare(view)
    for name, other in compared:
        values = delta(other)
        ax.plot(np.arange(values.size), values, ".", ms=3, label=name)
    if compared:
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no other version to compare", ha="center", transform=ax.transAxes)
    ax.set(title="difference to previous / uploaded", xlabel="channel", ylabel=label)
