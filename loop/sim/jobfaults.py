"""Job faults of a scenario, played by the jobs themselves.

The player (``calloop sim play --work-dir W``) writes the scenario's job faults to
``W/.sim/job_faults.json`` (:data:`PLAN`), the plan; production daemons never write it.
Every worker looks for the plan when it starts (:func:`play`, called by
:func:`workers.common.worker_main`): a job directory lies at
``<work_dir>/<Calibration>/run<R>/<step>/batch<NNNN>`` and holds the job's frozen
``calibration.json``, so the plan's place follows from the worker's ``--calibration``
argument, at the cost of one failed ``open`` when there is no plan.

A job selected by a fault of the plan, on one of its first ``attempts`` attempts, then
exits with the fault's code, kills itself with its signal or sleeps until the time limit
of the attempt kills it, after saying so in its stderr log. The attempt number is the
one of the log the backend opened as the job's stderr (``stderr.<attempt>.log`` in the
job directory); a worker whose stderr is not such a log (run by hand) is never faulted.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loop.fsutil import atomic_write_json

if TYPE_CHECKING:  # imported when a plan exists: a job without one does not build its models
    from loop.sim.scenario import JobFaultSpec

PLAN = Path(".sim") / "job_faults.json"
"""The plan's place under the loop's ``work_dir``."""

_RUN_DIR = re.compile(r"^run([1-9][0-9]*)$")
_BATCH_DIR = re.compile(r"^batch([0-9]+)$")
_STDERR_LOG = re.compile(r"^stderr\.([1-9][0-9]*)\.log$")


def plan_path(work_dir: Path) -> Path:
    """Where the job fault plan of the loop working in ``work_dir`` lies."""
    return work_dir / PLAN


def write_plan(work_dir: Path, faults: list[JobFaultSpec]) -> Path:
    """Write ``faults`` as the plan (atomically); with none, remove any earlier plan so
    that a scenario without job faults does not play those of an earlier one."""
    path = plan_path(work_dir)
    if faults:
        atomic_write_json(
            path, {"faults": [f.model_dump(mode="json", exclude_unset=True) for f in faults]}
        )
    else:
        path.unlink(missing_ok=True)
    return path


def read_plan(path: Path) -> list[JobFaultSpec] | None:
    """The faults of the plan at ``path``; None if there is no plan."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    from loop.sim.scenario import JobFaultSpec

    return [JobFaultSpec.model_validate(entry) for entry in json.loads(text)["faults"]]


@dataclass(frozen=True)
class JobCoordinates:
    """Which job a worker process runs, and where."""

    job_dir: Path
    work_dir: Path
    calibration: str
    run: int
    batch: int

    @classmethod
    def of(cls, calibration_json: Path) -> JobCoordinates | None:
        """The job whose frozen configuration is ``calibration_json``; None if that file
        does not lie in a job directory of the loop's layout."""
        job_dir = calibration_json.absolute().parent
        parts = job_dir.parts
        if len(parts) < 5:
            return None
        run, batch = _RUN_DIR.match(parts[-3]), _BATCH_DIR.match(job_dir.name)
        if run is None or batch is None:
            return None
        return cls(job_dir, job_dir.parents[3], parts[-4], int(run[1]), int(batch[1]))


def current_attempt(job_dir: Path) -> int | None:
    """The attempt this process runs: the number of the job log its stderr writes to."""
    try:
        log = Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return None
    match = _STDERR_LOG.match(log.name)
    if match is None or log.parent.resolve() != job_dir.resolve():
        return None
    return int(match[1])


def play(worker: str, calibration_json: Path) -> int | None:
    """Play the plan's fault on this job, if one selects it: return the exit code to exit
    with (``exit``), or never return (``signal``, ``hang``); None: run normally."""
    job = JobCoordinates.of(calibration_json)
    if job is None:
        return None
    faults = read_plan(plan_path(job.work_dir))
    if faults is None:
        return None
    attempt = current_attempt(job.job_dir)
    for fault in faults:
        if (
            attempt is not None
            and attempt <= fault.attempts
            and fault.selects(worker, job.calibration, job.run, job.batch)
        ):
            return _inflict(fault, worker, attempt)
    return None


def _inflict(fault: JobFaultSpec, worker: str, attempt: int) -> int:
    print(
        f"workers.{worker}: simulated job fault (scenario plan, attempt {attempt}): "
        f"this attempt {fault.what()}",
        file=sys.stderr,
        flush=True,
    )
    if fault.kind == "exit":
        return fault.exit_code
    if fault.kind == "signal":
        number = signal.Signals[fault.signal]
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash, without a core file
        if number != signal.SIGKILL:  # (which cannot be handled)
            signal.signal(number, signal.SIG_DFL)  # a handler of Python's would outlive it
        signal.raise_signal(number)
    while True:  # hang; a signal that did not end the process ends up here too
        time.sleep(3600)
