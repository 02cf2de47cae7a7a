"""Step-4 worker: merge new accumulators into the run's running state and compute the
payload. A re-harvest reads the previous state plus only the new ALCA outputs.

Outputs: ``state.h5`` (merged accumulators), ``payload.npy`` and ``summary.json``
(quality summary).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import atomic_path, atomic_write_json
from workers.accumulators import load_accumulators, merge_all, save_accumulators
from workers.algorithms import compute_payload
from workers.common import WorkerResult, worker_main

STATE, PAYLOAD, SUMMARY = "state.h5", "payload.npy", "summary.json"


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, args: argparse.Namespace
) -> WorkerResult:
    """Merge, compute, write."""
    parts = [load_accumulators(args.previous_state)] if args.previous_state else []
    parts += [load_accumulators(path) for path in inputs]
    merged = merge_all(parts)
    payload = compute_payload(merged, config)
    save_accumulators(output_dir / STATE, merged, {"calibration": config.name})
    with atomic_path(output_dir / PAYLOAD, ".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, payload.array, allow_pickle=False)
    atomic_write_json(output_dir / SUMMARY, payload.summary)
    return WorkerResult([STATE, PAYLOAD, SUMMARY])


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--previous-state", type=Path, help="state.h5 of the last harvest")


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.harvest``."""
    return worker_main("harvest", run, argv, _extra)


if __name__ == "__main__":
    sys.exit(main())
