"""Step-3 worker: reco files -> the calibration kind's mergeable accumulators (``alca.h5``).

Reads every format reco has written: ``frames`` uncompressed, a virtual dataset over
per-LS parts (now), or one gzip-compressed dataset (earlier versions, still on disk in a
running deployment); h5py resolves both. A ``time_type: lumi`` calibration accumulates
each LS apart (:mod:`workers.lumi`), from the per-LS parts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

from loop.config import CalibrationConfig
from workers.accumulators import save_accumulators
from workers.common import WorkerResult, worker_main
from workers.kinds import kind_of
from workers.lumi import lumi_key, lumisections

OUTPUT = "alca.h5"


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, _args: argparse.Namespace
) -> WorkerResult:
    """Reduce every reco file with the calibration's kind and merge; an unreadable or
    non-finite one is rejected."""
    kind = kind_of(config)
    params = kind.parameters(config)
    per_lumi = config.payload.time_type == "lumi"
    result = WorkerResult([OUTPUT])
    parts, run_number = [], 0
    for path in inputs:
        try:
            with h5py.File(path, "r") as h5:
                sections = list(lumisections(h5)) if per_lumi else [(0, *_whole(h5))]
                number = int(h5.attrs["run"])
        except (OSError, KeyError, ValueError, TypeError) as exc:
            result.reject(path, f"unreadable reco file ({exc})", "alca")
            continue
        if any(f.dtype.kind == "f" and not np.isfinite(f).all() for _, f, _ in sections):
            result.reject(path, "non-finite values (NaN/inf) in the reco frames", "alca")
            continue
        run_number = number
        for ls, frames, trigger in sections:
            accumulated = kind.accumulate(frames, trigger, params, config)
            if per_lumi:  # each LS apart (workers.lumi)
                accumulated = {lumi_key(ls, name): s for name, s in accumulated.items()}
            parts.append(accumulated)
    save_accumulators(
        output_dir / OUTPUT, kind.merge(parts), {"run": run_number, "calibration": config.name}
    )
    return result


def _whole(h5: h5py.File) -> tuple[np.ndarray, np.ndarray]:
    """Every event of a reco file: (frames, trigger)."""
    return h5["frames"][()], h5["trigger"][()]


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.alca``."""
    return worker_main("alca", run, argv)


if __name__ == "__main__":
    sys.exit(main())
