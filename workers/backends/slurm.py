"""The Slurm backend: ``sbatch`` to submit, one ``squeue`` per poll for all jobs (state
and run time), ``sacct`` (``-c``, the job-completion record, when accounting is off) for
finished ones, ``scancel`` to cancel or kill.

Each attempt gets a batch script in its job directory (``submit.<attempt>.sh``, the
wrapper's argv quoted with :func:`shlex.quote`, so config data never reaches a shell
unquoted) and its stdout/stderr there too. A job that left the queue without any record
is resolved from the wrapper's exit-status file after a grace period. An unreachable
controller raises :class:`~workers.backends.base.BackendUnavailable`: the daemon waits
and retries, jobs keep their state. Every command runs with a timeout
(``jobs.slurm.command_timeout_s``) and has its exit code checked.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from loop.config import SlurmConfig
from loop.errors import JobError
from workers.backends.base import (
    BackendUnavailable,
    JobSpec,
    JobState,
    JobStatus,
    read_exit_status,
)

STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "RESIZING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.TIMEOUT,
}
UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted",
    "Communication connection",
)
DIRECTIVE_KEYS = {
    "partition": "jobs.slurm.partition",
    "time": "jobs.slurm.time_limit",
    "mem": "jobs.slurm.mem",
    "cpus": "jobs.slurm.cpus",
}


def slurm_state(text: str) -> JobState:
    """Map a Slurm state (``CANCELLED by 0`` included) onto the backend states."""
    return STATES.get(text.split(maxsplit=1)[0].rstrip("+") if text else "", JobState.FAILED)


def parse_elapsed(text: str) -> float | None:
    """squeue's run time (``%M``: ``M:SS``, ``H:MM:SS``, ``D-HH:MM:SS``) in seconds."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not (days or "0").isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None  # e.g. INVALID
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(int(days or 0) * 86400 + seconds)


def parse_exit_code(text: str) -> int | None:
    """``3:0`` -> 3; a signal ``0:9`` -> 128 + 9."""
    code, _, sig = text.partition(":")
    if not code.isdigit():
        return None
    return 128 + int(sig) if sig.isdigit() and int(sig) else int(code)


class SlurmBackend:
    """Run jobs on a Slurm cluster (``SLURM_CONF`` selects it, as for any client)."""

    name = "slurm"

    def __init__(self, config: SlurmConfig, calibration: str, python: str = sys.executable) -> None:
        self.config = config
        self.calibration = calibration
        self.python = python
        self.max_in_flight = config.max_in_flight
        self._clock = time.time
        self._missing_since: dict[str, float] = {}

    # ------------------------------------------------------------------ commands

    def _checked(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """:meth:`_run`, where any failure means Slurm cannot answer now."""
        result = self._run(argv)
        if result.returncode != 0:
            raise BackendUnavailable(f"{argv[0]} failed: {result.stderr.strip()}")
        return result

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                timeout=self.config.command_timeout_s,
                env={**os.environ, **self.config.env},
            )
        except subprocess.TimeoutExpired:
            raise BackendUnavailable(
                f"{argv[0]} did not answer within {self.config.command_timeout_s:g} s"
            ) from None
        except FileNotFoundError:
            raise BackendUnavailable(f"{argv[0]} not found: is slurm-wlm installed?") from None
        if result.returncode != 0 and any(m in result.stderr for m in UNREACHABLE):
            raise BackendUnavailable(f"{argv[0]}: {result.stderr.strip()}")
        return result

    def _script(self, spec: JobSpec) -> Path:
        script = spec.job_dir / f"submit.{spec.attempt}.sh"
        script.write_text(
            "#!/bin/sh\n# written by calloop; run by sbatch\nexec "
            + " ".join(shlex.quote(a) for a in spec.wrapped(self.python))
            + "\n"
        )
        return script

    def sbatch_argv(self, spec: JobSpec) -> list[str]:
        """The sbatch command line of one attempt (argv list, no shell)."""
        resources = spec.resources or {}
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={spec.key}",
            f"--output={spec.log_path('stdout')}",
            f"--error={spec.log_path('stderr')}",
            f"--chdir={spec.job_dir}",
            "--export=ALL",
            f"--time={resources.get('time_limit') or self.config.time_limit}",
            f"--mem={resources.get('mem') or self.config.mem}",
            f"--cpus-per-task={resources.get('cpus') or self.config.cpus}",
        ]
        partition = resources.get("partition") or self.config.partition
        if partition:
            argv.append(f"--partition={partition}")
        argv.extend(resources.get("extra_directives") or self.config.extra_directives)
        return argv

    # ------------------------------------------------------------------- backend

    def submit(self, spec: JobSpec) -> str:
        """``sbatch --parsable``; a refusal names the directive and its YAML key."""
        spec.job_dir.mkdir(parents=True, exist_ok=True)
        argv = [*self.sbatch_argv(spec), str(self._script(spec))]
        result = self._run(argv)
        if result.returncode != 0:
            raise JobError(self._refusal(spec, result.stderr))
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise JobError(f"sbatch gave no job id for {spec.key}: {result.stdout!r}")
        return job_id

    def _refusal(self, spec: JobSpec, stderr: str) -> str:
        text = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
        key = "jobs.slurm.extra_directives (or the calibration's backend settings)"
        for word, yaml_key in DIRECTIVE_KEYS.items():
            if word in text.lower():
                key = yaml_key
                break
        return (
            f"sbatch refused job {spec.key} of calibration {self.calibration}: {text}; "
            f"check {key} in loop.yaml"
        )

    def poll(self, jobs: dict[str, JobSpec]) -> dict[str, JobStatus]:
        """One squeue for all; one sacct -c for those that left the queue.

        A running job's ``elapsed_s`` is the run time squeue reports: counted by the
        controller from the job's start, so neither time in the queue nor a clock jump
        here adds to it (nor does time suspended by an administrator)."""
        if not jobs:
            return {}
        queued = self._squeue()
        result: dict[str, JobStatus] = {}
        gone = [job_id for job_id in jobs if job_id not in queued]
        for job_id in jobs:
            if job_id in queued:
                self._missing_since.pop(job_id, None)
                result[job_id] = queued[job_id]
        records = self._sacct(gone) if gone else {}
        now = self._clock()
        for job_id in gone:
            spec = jobs[job_id]
            if job_id in records:
                result[job_id] = self._finished(records[job_id], spec)
                self._missing_since.pop(job_id, None)
                continue
            first = self._missing_since.setdefault(job_id, now)
            status = read_exit_status(spec)
            if status is not None:
                result[job_id] = status
            elif now - first >= self.config.vanish_grace_s:
                result[job_id] = JobStatus(
                    JobState.LOST, None, f"job {job_id} vanished from Slurm without a record"
                )
            else:
                result[job_id] = JobStatus(JobState.RUNNING, None, "not in squeue yet/anymore")
        return result

    def _finished(self, record: tuple[JobState, int | None], spec: JobSpec) -> JobStatus:
        state, code = record
        wrapper = read_exit_status(spec)
        if state in (JobState.SUCCEEDED, JobState.FAILED) and wrapper is not None:
            return wrapper  # the wrapper's own record is the most precise
        detail = f"Slurm state {state.value}, exit code {code}"
        return JobStatus(state, code, detail)

    def _squeue(self) -> dict[str, JobStatus]:
        result = self._checked(["squeue", "-h", "-o", "%i|%T|%M", "-u", _user()])
        queued = {}
        for line in result.stdout.splitlines():
            job_id, _, rest = line.strip().partition("|")
            state, _, elapsed = rest.partition("|")
            if job_id:
                queued[job_id] = _queued(state, elapsed)
        return queued

    def _sacct(self, job_ids: list[str]) -> dict[str, tuple[JobState, int | None]]:
        result = self._run(
            ["sacct", "-c", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(job_ids)]
        )
        if result.returncode != 0:
            return {}  # no record yet: resolved after the grace period
        records = {}
        for line in result.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) >= 3 and fields[0] in job_ids:
                records[fields[0]] = (slurm_state(fields[1]), parse_exit_code(fields[2]))
        return records

    def cancel(self, backend_id: str) -> None:
        """``scancel``."""
        result = self._run(["scancel", backend_id])
        if result.returncode != 0:
            raise JobError(f"scancel {backend_id} failed: {result.stderr.strip()}")

    def kill(self, backend_id: str, spec: JobSpec) -> None:
        """``scancel``: Slurm itself ends every process of the job, stopped ones too
        (SIGCONT and SIGTERM, then SIGKILL after the cluster's KillWait)."""
        self.cancel(backend_id)

    def find(self, spec: JobSpec) -> str | None:
        """A job already submitted under this attempt's name (restart after a crash)."""
        # a failing squeue must not read as "not submitted": that would run the job twice
        queued = self._checked(["squeue", "-h", "-o", "%i", f"--name={spec.key}", "-u", _user()])
        ids = queued.stdout.split()
        if ids:
            return ids[-1]
        # sacct -c ignores --name: filter the job-completion records here
        done = self._run(["sacct", "-c", "-n", "-P", "-o", "JobID,JobName"])
        if done.returncode != 0:
            return None  # no longer queued, so resubmitting repeats work but never doubles it
        finished = [
            line.split("|")[0]
            for line in done.stdout.splitlines()
            if line.partition("|")[2] == spec.key
        ]
        return finished[-1] if finished and read_exit_status(spec) is not None else None


def _queued(state: str, elapsed: str) -> JobStatus:
    """A job squeue lists; a suspended one is stopped (and so is its run time)."""
    suspended = state == "SUSPENDED"
    return JobStatus(
        slurm_state(state),
        elapsed_s=parse_elapsed(elapsed),
        stopped=suspended,
        detail="suspended by Slurm, which stops its run time too" if suspended else "",
    )


def _user() -> str:
    return getpass.getuser()
