"""Raw-file write rate of the simulated detector vs plain h5py writing the same bytes.

Run: ``python benchmarks/sim_throughput.py [--files N]``. Prints MB/s (uncompressed
frame bytes per second) side by side, measured in the same run, and their ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    spec = DetectorSpec(channels=args.channels, events_per_ls=args.events)
    truth = make_truth(spec, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        contents = [
            generate_ls(
                spec, truth, detector="ecal", run=1, ls=ls, seed=1, start_time=0, end_time=1
            )
            for ls in range(1, args.files + 1)
        ]
        generate_s = time.perf_counter() - start
        nbytes = sum(c.frames.nbytes for c in contents)

        start = time.perf_counter()
        disk = sum(write_raw_ls(raw_path(root, "ecal", 1, c.ls), c) for c in contents)
        detector_s = time.perf_counter() - start

        start = time.perf_counter()
        for c in contents:
            with h5py.File(root / f"plain_{c.ls}.h5", "w") as h5:
                h5.create_dataset("frames", data=c.frames)
                h5.create_dataset("trigger", data=c.trigger)
        plain_s = time.perf_counter() - start
    mb = nbytes / 1e6
    rows = [
        ["plain h5py (no compression, not atomic)", mb / plain_s, 1.0],
        [
            "detector write_raw_ls (gzip+shuffle, atomic+fsync)",
            mb / detector_s,
            plain_s / detector_s,
        ],
        [
            "detector generate + write",
            mb / (generate_s + detector_s),
            plain_s / (generate_s + detector_s),
        ],
    ]
    table(
        f"raw LS write rate: {args.files} files x {args.events} events x {args.channels} ch "
        f"({mb:.1f} MB uncompressed, {disk / 1e6:.1f} MB on disk)",
        ["writer", "MB/s", "ratio vs plain"],
        rows,
    )


if __name__ == "__main__":
    main()
