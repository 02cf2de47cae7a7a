"""Calibration-store latency vs the number of versions in one file.

Run: ``python benchmarks/store_bench.py``. For files holding 10, 1,000 and 10,000
versions (two versions per run range), prints side by side in one run:

* ``get()`` by run (p50/p99) on a warm reader, and the one-off cost of the first lookup
  after a write (reopen + index build);
* ``add()`` latency (p50/p99), each a full durable transaction (journal + 2 fsyncs);
* plain h5py reading the same array by path (file kept open, and open-read-close).

Goals: ``get()`` flat and under 1 ms at 10,000 versions; ``add()`` not growing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import percentiles_ms, table, timed
from loop.store import CalibStore

CHANNELS = 512


def build(root: Path, versions: int) -> CalibStore:
    store = CalibStore(root)
    det = store.detector("ecal-0001", create=True)
    with det.batch() as batch:
        for i in range(versions):
            run = 100_000 + i // 2
            batch.add("pedestals", np.full(CHANNELS, float(i)), begin=run, comment=f"v{i}")
    return store


def measure(versions: int, lookups: int, adds: int) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp:
        store = build(Path(tmp), versions)
        det = store.detector("ecal-0001")
        runs = [100_000 + random.randrange(max(1, versions // 2)) for _ in range(lookups)]
        start = time.perf_counter()
        det.get("pedestals", run=runs[0])
        first_ms = (time.perf_counter() - start) * 1e3
        it = iter(runs)
        get_p50, get_p99 = percentiles_ms(
            timed(lambda: det.get("pedestals", run=next(it)), lookups - 1)
        )
        constants = det.get("pedestals", run=runs[0])
        dataset = f"pedestals/{constants.range}/{constants.version}/calib"
        det.close()
        with h5py.File(det.path, "r") as h5:
            open_p50, _ = percentiles_ms(timed(lambda: h5[dataset][()], lookups))

        def open_read_close() -> None:
            with h5py.File(det.path, "r") as h5:
                h5[dataset][()]

        plain_p50, _ = percentiles_ms(timed(open_read_close, min(lookups, 300)))
        counter = iter(range(10**9))
        add_p50, add_p99 = percentiles_ms(
            timed(
                lambda: det.add("pedestals", np.zeros(CHANNELS), begin=200_000 + next(counter)),
                adds,
            )
        )
        store.close()
    return [versions, get_p50, get_p99, first_ms, add_p50, add_p99, open_p50, plain_p50]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--adds", type=int, default=50)
    args = parser.parse_args()
    random.seed(1)
    rows = [measure(n, args.lookups, args.adds) for n in args.sizes]
    table(
        f"calibration store, {CHANNELS}-channel float64 payloads (milliseconds)",
        [
            "versions",
            "get p50",
            "get p99",
            "1st get after write",
            "add p50",
            "add p99",
            "h5py open file p50",
            "h5py open+read+close p50",
        ],
        rows,
    )
    base = rows[0]
    for row in rows[1:]:
        print(
            f"  {row[0]} vs {base[0]} versions: get p50 x{row[1] / base[1]:.2f}, "  # type: ignore[operator]
            f"add p50 x{row[4] / base[4]:.2f}"
        )  # type: ignore[operator]


if __name__ == "__main__":
    main()
