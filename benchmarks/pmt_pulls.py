"""Fit accuracy of the ``pmt_gain`` kind: pulls of the fitted gains against the simulated
truth, and the fit time per PMT.

Run: ``python benchmarks/pmt_pulls.py [--pmts N] [--events E]``. Simulates an LED scan of
N PMTs (the shipped PmtGain calibration's parameters, the simulator's default PMTs),
accumulates and fits it, and prints the pull distribution of the healthy PMTs'
gains ((fitted - true) / fitted error: mean 0, std 1 and 68/95/99.7 % within 1/2/3 if
the fit and its errors are right), whether exactly the out-of-range PMTs were flagged,
and the fit (finalize) time per PMT.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.config import load_calibration
from loop.sim.pmt import gain_pulls, generate_pmt_ls, make_pmt_truth
from loop.sim.scenario import DetectorSpec
from workers.kinds.pmt_gain import FitStatus, PmtGain, Row

CONFIG = Path(__file__).resolve().parent.parent / "config" / "calibrations" / "PmtGain.yaml"
EVENTS_PER_LS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pmts", type=int, default=1200)
    parser.add_argument("--events", type=int, default=8000, help="LED events per PMT")
    parser.add_argument("--out-of-range", type=int, default=12)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    spec = DetectorSpec(
        type="pmt",
        channels=args.pmts,
        events_per_ls=EVENTS_PER_LS,
        out_of_range=args.out_of_range,
    )
    shipped = load_calibration(CONFIG)
    config = shipped.model_copy(
        update={"raw_input": shipped.raw_input.model_copy(update={"channels": args.pmts})}
    )
    kind = PmtGain()
    params = kind.parameters(config)
    truth = make_pmt_truth(spec, args.seed)
    start = time.perf_counter()
    parts = []
    for ls in range(1, args.events // EVENTS_PER_LS + 1):
        content = generate_pmt_ls(
            spec, truth, detector="pmt", run=1, ls=ls, seed=args.seed, start_time=0, end_time=1
        )
        parts.append(kind.accumulate(content.frames, content.trigger, params, config))
    accumulated = kind.merge(parts)
    simulated = time.perf_counter() - start
    start = time.perf_counter()
    payload = kind.finalize(accumulated, params, {})
    fitted = time.perf_counter() - start
    array = payload.array
    healthy = np.setdiff1d(np.arange(args.pmts), truth.out_of_range)
    pull = gain_pulls(array, truth)[healthy]
    within = [float(np.mean(np.abs(pull) < k)) for k in (1, 2, 3)]
    table(
        f"pmt_gain pulls: {healthy.size} healthy PMTs, {payload.summary['events']} LED events "
        f"each, mu {spec.mu}, gain {spec.gain_mean} +- {spec.gain_spread} ADC/pe",
        ["mean", "std", "|pull|<1", "|pull|<2", "|pull|<3", "max |pull|"],
        [[float(pull.mean()), float(pull.std()), *within, float(np.abs(pull).max())]],
    )
    ok = int((array[Row.STATUS] == FitStatus.OK).sum())
    error = np.median(array[Row.GAIN_ERROR][healthy])
    table(
        "fits",
        ["PMTs", "status ok", "median gain error", "flagged = out of range", "fit ms / PMT"],
        [
            [
                args.pmts,
                ok,
                float(error),
                payload.summary["flagged"] == truth.out_of_range,
                fitted / args.pmts * 1e3,
            ]
        ],
    )
    print(f"\n(simulation and accumulation: {simulated:.1f} s)")


if __name__ == "__main__":
    main()
