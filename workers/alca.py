"""Step-3 worker: reco files -> mergeable per-channel accumulators (``alca.h5``).

Reads every format reco has written: ``frames`` uncompressed, a virtual dataset over
per-LS parts (now), or one gzip-compressed dataset (earlier versions, still on disk in a
running deployment); h5py resolves both."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

from loop.config import CalibrationConfig
from loop.rawformat import TRIGGER_CODES
from workers.accumulators import Accumulators, ChannelStats, merge_all, save_accumulators
from workers.common import WorkerResult, worker_main

OUTPUT = "alca.h5"
TRIGGER_NAMES = {code: name for name, code in TRIGGER_CODES.items()}


def reduce_events(
    frames: np.ndarray, trigger: np.ndarray, config: CalibrationConfig
) -> Accumulators:
    """Accumulators per trigger type of one set of events (pure). Each trigger type's
    events are read from ``frames`` by row index, block by block, not copied out whole."""
    histogram = None
    if config.step3.histogram is not None:
        h = config.step3.histogram
        histogram = (h.bins, h.low, h.high)
    codes = np.unique(trigger)
    return {
        TRIGGER_NAMES[int(code)]: ChannelStats.from_frames(
            frames,
            config.step3.occupancy_threshold,
            histogram,
            rows=None if len(codes) == 1 else np.flatnonzero(trigger == code),
        )
        for code in codes
    }


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, _args: argparse.Namespace
) -> WorkerResult:
    """Reduce every reco file and merge; an unreadable or non-finite one is rejected."""
    result = WorkerResult([OUTPUT])
    parts, run_number = [], 0
    for path in inputs:
        try:
            with h5py.File(path, "r") as h5:
                frames, trigger = h5["frames"][()], h5["trigger"][()]
                number = int(h5.attrs["run"])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            result.reject(path, f"unreadable reco file ({exc})", "alca")
            continue
        if frames.dtype.kind == "f" and not np.isfinite(frames).all():
            result.reject(path, "non-finite values (NaN/inf) in the reco frames", "alca")
            continue
        run_number = number
        parts.append(reduce_events(frames, trigger, config))
    save_accumulators(
        output_dir / OUTPUT, merge_all(parts), {"run": run_number, "calibration": config.name}
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.alca``."""
    return worker_main("alca", run, argv)


if __name__ == "__main__":
    sys.exit(main())
