"""What every worker shares: its command line, its configuration, its manifest, and how
it reports failure.

Workers are launched by a backend as ``python -m workers.<name> --calibration
<job_dir>/calibration.json --output-dir D INPUT...``: the calibration is the job's
frozen copy (:mod:`loop.jobconfig`), never the live YAML. A worker writes its outputs
atomically into D, then (last) ``D/manifest.json`` declaring them and the inputs it
rejected, and exits 0; or prints one line naming the problem and exits 2 (the daemon
retries, then gives up).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loop.config import CalibrationConfig
from loop.errors import CalloopError
from loop.jobconfig import load_frozen
from loop.manifest import BadInput, write_manifest
from loop.sim import jobfaults

EXIT_BAD_INPUT = 2
MAX_THREADS = 4
"""Most threads one job starts (reco's threads inflating raw chunks)."""


def job_threads() -> int:
    """Threads a job may use: the CPUs it may run on (its Slurm allocation, its cgroup's
    affinity), at most :data:`MAX_THREADS`."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


@dataclass
class WorkerResult:
    """What a worker produced: output file names in its output directory, and the
    inputs it rejected (the rest were processed)."""

    outputs: list[str]
    bad_inputs: list[BadInput] = field(default_factory=list)

    def reject(self, path: Path, reason: str, worker: str) -> None:
        """Record a rejected input and say so on stderr (the job's log)."""
        self.bad_inputs.append(BadInput(input=str(path), reason=reason))
        print(f"workers.{worker}: input rejected: {path}: {reason}", file=sys.stderr)


Work = Callable[[CalibrationConfig, list[Path], Path, argparse.Namespace], WorkerResult]


def worker_main(
    name: str,
    run: Work,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the standard worker arguments, call ``run``, write the manifest; map
    errors to exit codes."""
    parser = argparse.ArgumentParser(prog=f"python -m workers.{name}")
    parser.add_argument(
        "--calibration", type=Path, required=True, help="the job's frozen calibration.json"
    )
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("inputs", nargs="+", type=Path)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        # the simulator's job faults (loop.sim.jobfaults); without a plan, one failed open
        faulted = jobfaults.play(name, args.calibration)
        if faulted is not None:
            return faulted
        config = load_frozen(args.calibration)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        result = run(config, args.inputs, args.output_dir, args)
        write_manifest(args.output_dir, result.outputs, result.bad_inputs, config.config_hash())
    except (CalloopError, OSError, ValueError, KeyError) as exc:
        print(f"workers.{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
