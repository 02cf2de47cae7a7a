"""Job backend overhead, local vs Slurm, side by side in one run.

Run (as root, so the single-node cluster can start): ``python benchmarks/backend_overhead.py``.
Prints the per-job overhead (submit to completion of an empty job, sequential, p50/p99)
and the makespan of a 50-job batch (at most ``nproc`` running at once locally; all
submitted at once to Slurm, which schedules them on the node's CPUs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import percentiles_ms, table
from loop.config import SlurmConfig
from workers.backends.base import Backend, JobSpec
from workers.backends.local import LocalBackend
from workers.backends.slurm import SlurmBackend

EMPTY = [sys.executable, "-S", "-c", "pass"]
CLUSTER = Path(__file__).resolve().parent.parent / "tests" / "infra" / "slurm_cluster.sh"


def _spec(root: Path, n: int) -> JobSpec:
    return JobSpec(
        key=f"bench.job{n}", argv=EMPTY, job_dir=root / f"job{n}", attempt=1, timeout_s=600
    )


def _run_batch(
    backend: Backend, root: Path, count: int, in_flight: int, poll_s: float
) -> list[float]:
    """Run ``count`` jobs keeping at most ``in_flight`` open; per-job submit->done seconds."""
    pending = [_spec(root, n) for n in range(count)]
    running: dict[str, tuple[JobSpec, float]] = {}
    durations = []
    while pending or running:
        while pending and len(running) < in_flight:
            spec = pending.pop(0)
            running[backend.submit(spec)] = (spec, time.perf_counter())
        statuses = backend.poll({bid: spec for bid, (spec, _) in running.items()})
        for backend_id, status in statuses.items():
            if status.state.finished:
                _, started = running.pop(backend_id)
                durations.append(time.perf_counter() - started)
        time.sleep(poll_s)
    return durations


def measure(
    name: str, backend: Backend, *, jobs: int, batch: int, in_flight: int, poll_s: float
) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp:
        single = _run_batch(backend, Path(tmp) / "seq", jobs, 1, poll_s)
        start = time.perf_counter()
        _run_batch(backend, Path(tmp) / "batch", batch, in_flight, poll_s)
        makespan = time.perf_counter() - start
    p50, p99 = percentiles_ms(single)
    return [name, p50, p99, batch, makespan]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    rows = [
        measure(
            "local",
            LocalBackend(cpus),
            jobs=args.jobs,
            batch=args.batch,
            in_flight=cpus,
            poll_s=0.02,
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        started = subprocess.run(
            ["bash", str(CLUSTER), "start", tmp],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if started.returncode != 0:
            print(f"Slurm cluster unavailable (run as root): {started.stderr.strip()[-300:]}")
        else:
            os.environ["SLURM_CONF"] = str(Path(tmp) / "slurm.conf")
            try:
                rows.append(
                    measure(
                        "slurm",
                        SlurmBackend(SlurmConfig(), "bench"),
                        jobs=args.jobs,
                        batch=args.batch,
                        in_flight=args.batch,
                        poll_s=0.2,
                    )
                )
            finally:
                subprocess.run(
                    ["bash", str(CLUSTER), "stop", tmp],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
    table(
        f"empty-job overhead and {args.batch}-job makespan ({cpus} CPUs)",
        ["backend", "overhead p50 ms", "overhead p99 ms", "batch", "makespan s"],
        rows,
    )


if __name__ == "__main__":
    main()
