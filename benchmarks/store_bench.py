"""Calibration-store latency vs the number of versions in one file.

Run: ``python benchmarks/store_bench.py`` (``PYTHONPATH=<other checkout>`` measures that
checkout's store: the script and its child processes import whichever ``loop`` wins).
For files holding 10, 1,000 and 10,000 versions (two versions per run range), prints
side by side in one run, medians of interleaved repetitions:

* cold ``get()``: a new process per lookup, the case of a job that reads its calibration
  once. Measured as the lookup's own cost (timed inside the process, after its imports,
  with the read system calls and bytes it made) and as the whole process's wall time
  minus that of a process that only imports the same modules; next to it, a new process
  that opens the file with plain h5py and reads the same dataset by path;
* warm ``get()`` by run (p50/p99) on a reader that stays open, and the one-off cost of
  its first lookup after another writer's commit;
* ``add()`` (p50/p99), each a durable transaction, interleaved with plain h5py creating
  a file holding the same array and fsyncing it;
* plain h5py reading the same array by path in this process (open+read+close).

``--checkouts A B C`` measures several checkouts side by side in one run, interleaved
(each size for each checkout in turn, ``--rounds`` times; medians), e.g. a baseline
against the working tree: ``python benchmarks/store_bench.py --checkouts /work/baseline
/work/main``.

Goals: cold ``get()`` flat in the number of versions and near the plain-h5py process;
warm ``get()`` flat; ``add()`` flat and near h5py create+fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: it wins
import loop
from benchmarks._common import percentiles_ms, table, timed
from loop.store import CalibStore

CHANNELS = 512
DETECTOR, CTYPE = "ecal-0001", "pedestals"
CHILD_TIMEOUT_S = 120

# The child processes. Every one runs the same imports first, so that subtracting the
# import-only process leaves what the lookup itself costs a fresh process.
PRELUDE = """
import json, sys, time
from pathlib import Path
import h5py
from loop.store import CalibStore

def io():
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}
"""
LOOKUP = """
root, run = Path(sys.argv[1]), int(sys.argv[2])
idle0, idle1 = io(), io()
before, start = io(), time.perf_counter()
constants = CalibStore(root).detector("ecal-0001").get("pedestals", run=run)
own = time.perf_counter() - start
after = io()
print(json.dumps({
    "ms": own * 1e3,
    "reads": after["syscr"] - before["syscr"] - (idle1["syscr"] - idle0["syscr"]),
    "kib": (after["rchar"] - before["rchar"] - (idle1["rchar"] - idle0["rchar"])) / 1024,
    "version": constants.version,
}))
"""
PLAIN = """
path, dataset = sys.argv[1], sys.argv[2]
start = time.perf_counter()
with h5py.File(path, "r") as h5:
    h5[dataset][()]
print(json.dumps({"ms": (time.perf_counter() - start) * 1e3}))
"""


def build(root: Path, versions: int) -> CalibStore:
    store = CalibStore(root)
    det = store.detector(DETECTOR, create=True)
    with det.batch() as batch:
        for i in range(versions):
            run = 100_000 + i // 2
            batch.add(CTYPE, np.full(CHANNELS, float(i)), begin=run, comment=f"v{i}")
    return store


def _child(code: str, *args: str, cwd: Path) -> tuple[float, dict[str, float]]:
    """(wall seconds, the JSON it printed) of one child process running ``code``."""
    # the children import the same loop as this process, whatever sys.path says there
    env = {**os.environ, "PYTHONPATH": str(Path(loop.__file__).resolve().parent.parent)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args],
        cwd=cwd,  # not the checkout: "-c" puts the working directory first on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    wall = time.perf_counter() - start
    return wall, json.loads(done.stdout) if done.stdout.strip() else {}


def measure_cold(root: Path, path: Path, runs: list[int], dataset: str) -> dict[str, float]:
    """Cold lookups, an import-only process and a plain-h5py process, interleaved."""
    samples: dict[str, list[float]] = {k: [] for k in ("own", "net", "reads", "kib", "h5py")}
    for run in runs:
        imports, _ = _child("", cwd=root)
        wall, out = _child(LOOKUP, str(root), str(run), cwd=root)
        _, plain = _child(PLAIN, str(path), dataset, cwd=root)
        samples["own"].append(out["ms"])
        samples["net"].append((wall - imports) * 1e3)
        samples["reads"].append(out["reads"])
        samples["kib"].append(out["kib"])
        samples["h5py"].append(plain["ms"])
    return {key: statistics.median(values) for key, values in samples.items()}


def h5py_create_fsync(directory: Path, array: np.ndarray) -> None:
    """Plain h5py: a new file holding ``array``, made durable."""
    path = directory / f"plain-{time.perf_counter_ns()}.h5"
    with h5py.File(path, "w") as h5:
        h5["calib"] = array
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def measure(versions: int, lookups: int, adds: int, colds: int) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build(root / "store", versions)
        det = store.detector(DETECTOR)
        runs = [100_000 + random.randrange(max(1, versions // 2)) for _ in range(lookups)]
        start = time.perf_counter()
        det.get(CTYPE, run=runs[0])
        first_ms = (time.perf_counter() - start) * 1e3
        it = iter(runs)
        get_p50, get_p99 = percentiles_ms(timed(lambda: det.get(CTYPE, run=next(it)), lookups - 1))
        constants = det.get(CTYPE, run=runs[0])
        dataset = f"{CTYPE}/{constants.range}/{constants.version}/calib"
        det.close()
        cold = measure_cold(root / "store", det.path, runs[:colds], dataset)

        def open_read_close() -> None:
            with h5py.File(det.path, "r") as h5:
                h5[dataset][()]

        plain_p50, _ = percentiles_ms(timed(open_read_close, min(lookups, 300)))
        counter = iter(range(10**9))
        payload = np.zeros(CHANNELS)
        add_samples: list[float] = []
        create_samples: list[float] = []
        for _ in range(adds):  # interleaved: both see the same disk and machine load
            add_samples += timed(lambda: det.add(CTYPE, payload, begin=200_000 + next(counter)), 1)
            create_samples += timed(lambda: h5py_create_fsync(root, payload), 1)
        add_p50, add_p99 = percentiles_ms(add_samples)
        create_p50, _ = percentiles_ms(create_samples)
        store.close()
    return [
        versions,
        cold["own"],
        cold["net"],
        cold["h5py"],
        f"{cold['reads']:.0f}/{cold['kib']:.0f}",
        get_p50,
        get_p99,
        first_ms,
        plain_p50,
        add_p50,
        add_p99,
        create_p50,
    ]


HEADER = [
    "versions",
    "cold get own",
    "cold get proc-import",
    "cold h5py own",
    "cold reads/KiB",
    "warm get p50",
    "warm get p99",
    "1st get after write",
    "h5py open+read+close",
    "add p50",
    "add p99",
    "h5py create+fsync",
]


def measure_checkout(checkout: Path, size: int, args: argparse.Namespace) -> list[object]:
    """One size measured with another checkout's ``loop`` (this script in a child process
    with ``PYTHONPATH=<checkout>``, from a directory that is no checkout)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--row", "--sizes", str(size)]
    command += ["--lookups", str(args.lookups), "--adds", str(args.adds)]
    command += ["--colds", str(args.colds)]
    done = subprocess.run(
        command,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONPATH": str(checkout.resolve())},
        capture_output=True,
        text=True,
        check=True,
    )
    row: list[object] = json.loads(done.stdout.splitlines()[-1])
    return row


def median_row(rows: list[list[object]]) -> list[object]:
    """Column-wise medians of repeated rows (text columns: the first round's)."""
    return [
        statistics.median(column) if isinstance(column[0], float) else column[0]  # type: ignore[type-var]
        for column in zip(*rows, strict=True)
    ]


def side_by_side(args: argparse.Namespace) -> None:
    """Every checkout measured in turn for each size, ``--rounds`` times: the machine's
    load drifts over minutes, so interleaving keeps the comparison fair."""
    results: dict[tuple[Path, int], list[list[object]]] = {}
    for _ in range(args.rounds):
        for size in args.sizes:
            for checkout in args.checkouts:
                row = measure_checkout(checkout, size, args)
                results.setdefault((checkout, size), []).append(row)
    table(
        f"calibration store, {CHANNELS}-channel float64 payloads (milliseconds; medians of "
        f"{args.rounds} interleaved round(s))",
        ["checkout", *HEADER],
        [
            [str(checkout), *median_row(results[checkout, size])]
            for size in args.sizes
            for checkout in args.checkouts
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--adds", type=int, default=50)
    parser.add_argument("--colds", type=int, default=7, help="cold processes per size (>= 5)")
    parser.add_argument(
        "--checkouts",
        type=Path,
        nargs="+",
        help="measure these checkouts side by side, interleaved (see side_by_side)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds with --checkouts")
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    random.seed(1)
    if args.checkouts:
        side_by_side(args)
        return
    rows = [measure(n, args.lookups, args.adds, args.colds) for n in args.sizes]
    if args.row:
        print(json.dumps(rows[0]))
        return
    print(f"store code: {Path(loop.__file__).resolve().parent}")
    table(
        f"calibration store, {CHANNELS}-channel float64 payloads (milliseconds; medians)",
        HEADER,
        rows,
    )
    base = rows[0]
    for row in rows:
        print(
            f"  {row[0]} versions: cold get / cold h5py x{row[1] / row[3]:.2f}, "  # type: ignore[operator]
            f"warm get / h5py open+read+close x{row[5] / row[8]:.2f}, "  # type: ignore[operator]
            f"add / h5py create+fsync x{row[9] / row[11]:.2f}; vs {base[0]} versions: "  # type: ignore[operator]
            f"cold get x{row[1] / base[1]:.2f}, add x{row[9] / base[9]:.2f}"  # type: ignore[operator]
        )


if __name__ == "__main__":
    main()
