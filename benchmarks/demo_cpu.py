"""The demo's CPU and wall time, before and after, side by side.

Run: ``python benchmarks/demo_cpu.py [--repeat 3] [--baseline /work/baseline]``. Each
repetition runs ``calloop demo`` (quickstart scenario, local backend) once with the code
at ``--baseline`` (``PYTHONPATH=<baseline>``) and once with this checkout, interleaved.
CPU is the user + system time of the demo and every process it waited for (registry,
daemons, their jobs and the warm pool's fork servers: ``RUSAGE_CHILDREN``), per
variant the median over repetitions; jobs is the number of job attempts the run made
(from the daemons' journals), so CPU per job shows the start-up each job pays.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table

REPO = Path(__file__).resolve().parent.parent


def run_demo(code: Path, work: Path) -> tuple[float, float, int, bool]:
    """(CPU-s, wall-s, job attempts, passed) of one ``calloop demo`` with the code at
    ``code``; a failed demo is reported (and its output printed), not hidden."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "loop.cli", "demo", "--work-dir", str(work)),
            # the same two calibrations in both (this checkout's default plays six)
            *("--scenario", str(code / "config" / "scenarios" / "quickstart.yaml")),
        ],
        env=env,
        cwd=work.parent,  # not the checkout: ``-m`` would import from the working directory
        capture_output=True,
        timeout=600,
        check=False,
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        print(f"demo of {code} failed ({result.returncode}):\n{result.stdout.decode()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, _attempts(work), result.returncode == 0


def _attempts(work: Path) -> int:
    """Job attempts recorded in every step journal of the demo's work directory."""
    total = 0
    for journal in work.glob("work/*/step*.journal.sqlite"):
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
            total += db.execute("SELECT COALESCE(SUM(attempts), 0) FROM jobs").fetchone()[0]
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=Path("/work/baseline"))
    parser.add_argument("--after", type=Path, default=REPO)
    args = parser.parse_args()
    samples: dict[str, list[tuple[float, float, int, bool]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="demo-cpu-") as tmp:
        for index in range(args.repeat):
            for label, code in (("before", args.baseline), ("after", args.after)):
                samples[label].append(run_demo(code, Path(tmp) / f"{label}-{index}"))
    rows: list[list[object]] = []
    for label, runs in samples.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        jobs = statistics.median(r[2] for r in runs)
        passed = sum(r[3] for r in runs)
        rows.append([label, cpu, wall, jobs, cpu / max(jobs, 1), f"{passed}/{len(runs)}"])
    table(
        f"calloop demo (quickstart, local backend), median of {args.repeat}",
        ["variant", "CPU s", "wall s", "job attempts", "CPU s per job", "demo passed"],
        rows,
    )
    print(f"\nafter/before CPU: {rows[1][1] / rows[0][1]:.2f}")  # type: ignore[operator]


if __name__ == "__main__":
    main()
