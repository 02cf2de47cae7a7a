"""Helpers shared by the benchmark scripts (timing and table printing)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn``."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def percentiles_ms(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``samples`` in milliseconds."""
    arr = np.asarray(samples) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print an aligned text table."""
    cells = [header, *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for row in cells:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
