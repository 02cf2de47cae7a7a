"""A payload's figure, drawn server-side with matplotlib's Agg renderer (no display, no
browser code): the payload page's images and ``calloop plot`` are the same figure.

The calibration's kind draws it (:meth:`workers.kinds.base.CalibrationKind.plot`):
pedestals show mean and noise per channel (the healthy noise band shaded, channels
outside it marked), the noise histogram and the change of the mean from the previous and
the uploaded version; bad channels the status map, the status counts and the status
changes.
"""

from __future__ import annotations

import io
import threading

import numpy as np

from loop.web.payloads import PayloadView, judged
from workers.kinds import get_kind
from workers.kinds.base import PlotContext

FORMATS = {"png": "image/png", "svg": "image/svg+xml"}

# matplotlib's font and text caches are shared by every figure of the process
_RENDER_LOCK = threading.Lock()


def render(view: PayloadView, fmt: str = "png") -> bytes:
    """The payload's figure as PNG or SVG bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown plot format {fmt!r}; use one of {', '.join(FORMATS)}")
    from matplotlib.figure import Figure

    with _RENDER_LOCK:
        figure = Figure(figsize=(11, 7.5), layout="constrained")
        context = PlotContext(view.params, _compare(view), view.outside)
        get_kind(view.kind).plot(figure, view.array, view.summary, context)
        figure.suptitle(
            f"{view.detector} {view.ctype} {view.constants.version}"
            f"{f' {view.part}' if view.part else ''} "
            f"(range {view.constants.range}{', retired' if view.constants.retired else ''})"
        )
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=80)
    return buffer.getvalue()


def _compare(view: PayloadView) -> list[tuple[str, np.ndarray]]:
    """(label, array) of the versions this one is compared with."""
    found = []
    for label, other in (("previous", view.previous), ("uploaded", view.uploaded)):
        if other is None or other.version == view.constants.version:
            continue
        array = judged(other, view.config)[0]
        if array.shape == view.array.shape:
            found.append((f"{label} {other.version}", array))
    return found
