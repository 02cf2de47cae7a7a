"""The backend interface every job runner implements, and the job-status file contract.

Every job runs under :mod:`workers.wrapper`, which writes ``started.<attempt>.json`` when
it starts and ``exit_status.<attempt>.json`` when its payload ends (atomically), so any
backend can tell a finished job from a vanished one, even after a daemon restart.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from loop.errors import JobError


class BackendUnavailable(JobError):
    """The batch system cannot be reached now: wait and retry, do not fail jobs."""


class JobState(Enum):
    """What a backend knows of a job."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    LOST = "lost"  # vanished without any record of how it ended

    @property
    def finished(self) -> bool:
        """True for every final state."""
        return self not in (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class JobSpec:
    """Everything a backend needs to run one attempt of a job."""

    key: str  # unique and stable, e.g. EcalPedestals.step2.run386001.b0003
    argv: list[str]
    job_dir: Path
    attempt: int
    timeout_s: float
    resources: dict[str, Any] = field(default_factory=dict)

    def wrapped(self, python: str = sys.executable) -> list[str]:
        """The command line the backend runs: the wrapper around the payload argv."""
        return [python, "-m", "workers.wrapper", *self.wrapper_args()]

    def wrapper_args(self) -> list[str]:
        """The wrapper's arguments (:func:`workers.wrapper.main`), payload argv last."""
        return [
            "--job-dir",
            str(self.job_dir),
            "--attempt",
            str(self.attempt),
            "--timeout",
            f"{self.timeout_s:g}",
            "--",
            *self.argv,
        ]

    def log_path(self, stream: str) -> Path:
        """``stdout.<attempt>.log`` / ``stderr.<attempt>.log`` in the job directory."""
        return self.job_dir / f"{stream}.{self.attempt}.log"


@dataclass(frozen=True)
class JobStatus:
    """A job's state and, once finished, its exit code; while it runs, for how long
    (on a clock the wall clock cannot move, None when the backend cannot tell) and
    whether its processes are stopped."""

    state: JobState
    exit_code: int | None = None
    detail: str = ""
    elapsed_s: float | None = None
    stopped: bool = False


class Backend(Protocol):
    """Submit, poll and cancel jobs. Implementations: local, slurm."""

    name: str
    max_in_flight: int

    def submit(self, spec: JobSpec) -> str:
        """Start the job; return the backend's id for it."""
        ...

    def poll(self, jobs: dict[str, JobSpec]) -> dict[str, JobStatus]:
        """Status of every job (backend id -> spec) in one go."""
        ...

    def cancel(self, backend_id: str) -> None:
        """Ask the job to stop."""
        ...

    def kill(self, backend_id: str, spec: JobSpec) -> None:
        """Stop the attempt and everything it started now, stopped processes included,
        without waiting for the wrapper to record anything (the daemon's deadline)."""
        ...

    def find(self, spec: JobSpec) -> str | None:
        """The id of a job already submitted for ``spec`` (after a crash mid-submit)."""
        ...


def started_path(spec: JobSpec) -> Path:
    """Written by the wrapper when the payload starts."""
    return spec.job_dir / f"started.{spec.attempt}.json"


def exit_status_path(spec: JobSpec) -> Path:
    """Written by the wrapper when the payload ends."""
    return spec.job_dir / f"exit_status.{spec.attempt}.json"


def read_exit_status(spec: JobSpec) -> JobStatus | None:
    """The wrapper's record of how the attempt ended, if it wrote one."""
    path = exit_status_path(spec)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return JobStatus(JobState.FAILED, None, f"unreadable exit status file {path}")
    code = record.get("exit_code")
    if record.get("timed_out"):
        return JobStatus(JobState.TIMEOUT, code, f"exceeded its time limit ({path})")
    if record.get("cancelled"):
        return JobStatus(JobState.CANCELLED, code, "cancelled")
    if code == 0:
        return JobStatus(JobState.SUCCEEDED, 0)
    return JobStatus(JobState.FAILED, code, f"exit code {code}")
