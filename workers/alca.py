"""Step-3 worker: reco files -> the calibration kind's mergeable accumulators (``alca.h5``).

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
from workers.accumulators import save_accumulators
from workers.common import WorkerResult, worker_main
from workers.kinds import kind_of

OUTPUT = "alca.h5"


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, _args: argparse.Namespace
) -> WorkerResult:
    """Reduce every reco file with the calibration's kind and merge; an unreadable or
    non-finite one is rejected."""
    kind = kind_of(config)
    params = kind.parameters(config)
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
        parts.append(kind.accumulate(frames, trigger, params, config))
    save_accumulators(
        output_dir / OUTPUT, kind.merge(parts), {"run": run_number, "calibration": config.name}
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.alca``."""
    return worker_main("alca", run, argv)


if __name__ == "__main__":
    sys.exit(main())
