"""Job lifecycle on top of a backend: submit within limits, poll all at once, retry with
backoff, give up loudly, and re-adopt after a restart.

Journal states: ``pending`` -> ``submitting`` -> ``submitted`` -> (``running``) ->
``succeeded`` | ``retry`` (-> ``submitting`` ...) | ``given_up``. ``submitting`` is written
*before* the backend is called, so a crash mid-submission is resolved on restart by
asking the backend whether the attempt exists (:meth:`Backend.find`) instead of
submitting it twice.

Pending jobs are submitted oldest-created first across runs, so a short run that starts
during a long one waits only for the jobs created before its own, not for the rest of the
long run. The wrapper enforces each attempt's
time limit itself; when it cannot (stopped, hung, killed), the daemon does: an attempt
running longer than ``timeout_s`` plus a grace is killed through the backend and retried
like any failed one. Run time comes from the backend (process start time, Slurm's run
time), so neither a wall-clock jump nor a daemon restart moves the deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from loop.errors import CalloopError, JobError
from loop.fsutil import storage_error_in
from loop.journal import IN_FLIGHT_STATES, JobPhase, JobRow, Journal
from workers.backends.base import (
    Backend,
    BackendUnavailable,
    JobSpec,
    JobState,
    JobStatus,
    exit_status_path,
    started_path,
)


@dataclass(frozen=True)
class JobPolicy:
    """Retry and resource policy for one daemon's jobs."""

    max_attempts: int
    retry_backoff_s: float
    timeout_s: float
    key_prefix: str  # <calibration>.<step>
    resources: dict[str, Any]
    grace_s: float | None = None  # beyond timeout_s before the daemon kills; None: default

    @property
    def grace(self) -> float:
        """Seconds the wrapper gets past ``timeout_s`` to kill its payload and record it:
        ``grace_s``, by default the larger of 10 s and 10 % of the time limit (the wrapper
        needs milliseconds; the rest absorbs its start-up and the poll interval)."""
        return self.grace_s if self.grace_s is not None else max(10.0, 0.1 * self.timeout_s)

    @property
    def kill_after_s(self) -> float:
        """Run time after which the daemon kills an attempt itself."""
        return self.timeout_s + self.grace


SuccessHook = Callable[[JobRow, JobStatus], None]


class JobManager:
    """Moves the jobs of one daemon through their lifecycle."""

    def __init__(
        self,
        journal: Journal,
        backend: Backend,
        policy: JobPolicy,
        on_success: SuccessHook,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self.journal = journal
        self.backend = backend
        self.policy = policy
        self.on_success = on_success
        self.log = log
        self._stopped: set[str] = set()  # backend ids already reported stopped

    def spec(self, job: JobRow, attempt: int) -> JobSpec:
        """The backend's view of one attempt of a job."""
        return JobSpec(
            key=f"{self.policy.key_prefix}.run{job.run}.b{job.batch:04d}",
            argv=job.argv,
            job_dir=job.job_dir,
            attempt=attempt,
            timeout_s=self.policy.timeout_s,
            resources=self.policy.resources,
        )

    def adopt(self) -> None:
        """Resolve attempts whose submission was interrupted (a crash, or a submit
        command that timed out: the batch system may have queued the job anyway), by
        asking the backend, so an attempt is never submitted twice."""
        for job in self.journal.jobs(states=(JobPhase.SUBMITTING,)):
            try:
                found = self.backend.find(self.spec(job, job.attempts))
            except BackendUnavailable as exc:
                self.log.warning(
                    "batch system unavailable; submission resolved later",
                    run=job.run,
                    batch=job.batch,
                    error=str(exc),
                )
                continue
            if found is None:
                self.journal.update_job(
                    job.run, job.batch, state=JobPhase.PENDING, attempts=job.attempts - 1
                )
                self.log.warning(
                    "interrupted submission not found; will resubmit", run=job.run, batch=job.batch
                )
            else:
                self.journal.update_job(
                    job.run, job.batch, state=JobPhase.SUBMITTED, backend_id=found
                )
                self.log.info("re-adopted job", run=job.run, batch=job.batch, backend_id=found)

    def submit_ready(self, now: float) -> int:
        """Submit due jobs while the backend has room; returns how many were submitted."""
        self.adopt()  # submissions left unresolved by a timed-out submit command
        in_flight = len(self.journal.jobs(states=IN_FLIGHT_STATES))
        room = self.backend.max_in_flight - in_flight
        if room <= 0:
            return 0
        submitted = 0
        for job in self.journal.due_jobs(now, limit=room):
            if not self._submit(job, now):
                break
            submitted += 1
        return submitted

    def _submit(self, job: JobRow, now: float) -> bool:
        attempt = job.attempts + 1
        spec = self.spec(job, attempt)
        # an operator's retry numbers attempts from 1 again: an earlier attempt's status
        # files must not be read as this attempt's
        for stale in (exit_status_path(spec), started_path(spec)):
            stale.unlink(missing_ok=True)
        self.journal.update_job(job.run, job.batch, state=JobPhase.SUBMITTING, attempts=attempt)
        try:
            backend_id = self.backend.submit(spec)
        except BackendUnavailable as exc:
            # it stays SUBMITTING: the next cycle asks the backend whether it was queued
            self.log.warning("batch system unavailable; submission checked again", error=str(exc))
            return False
        except JobError as exc:
            self._failed(job, attempt, JobStatus(JobState.FAILED, None, str(exc)), now)
            return True
        self.journal.update_job(
            job.run, job.batch, state=JobPhase.SUBMITTED, backend_id=backend_id, submitted=now
        )
        self.log.info(
            "job submitted", run=job.run, batch=job.batch, attempt=attempt, backend_id=backend_id
        )
        return True

    def poll(self, now: float) -> None:
        """One backend poll for every job in flight; finish, retry or give up; kill
        attempts past their deadline."""
        open_jobs = {
            j.backend_id: j
            for j in self.journal.jobs(states=(JobPhase.SUBMITTED, JobPhase.RUNNING))
            if j.backend_id
        }
        if not open_jobs:
            return
        specs = {bid: self.spec(job, job.attempts) for bid, job in open_jobs.items()}
        try:
            statuses = self.backend.poll(specs)
        except BackendUnavailable as exc:
            self.log.warning("batch system unavailable; jobs keep their state", error=str(exc))
            return
        for backend_id, status in statuses.items():
            job = open_jobs[backend_id]
            self._note_stopped(backend_id, job, status)
            if status.state.finished:
                self._finished(job, status, now)
            elif status.elapsed_s is not None and status.elapsed_s > self.policy.kill_after_s:
                self._kill_overdue(backend_id, job, specs[backend_id], status.elapsed_s, now)
            elif status.state is JobState.RUNNING and job.state != JobPhase.RUNNING:
                self.journal.update_job(job.run, job.batch, state=JobPhase.RUNNING)

    def _note_stopped(self, backend_id: str, job: JobRow, status: JobStatus) -> None:
        """One WARNING when an attempt's processes are first seen stopped: nothing else
        would show a job that makes no progress until its deadline."""
        if not status.stopped:
            self._stopped.discard(backend_id)
            return
        if backend_id in self._stopped:
            return
        self._stopped.add(backend_id)
        self.log.warning(
            "job is stopped; it makes no progress until continued",
            run=job.run,
            batch=job.batch,
            attempt=job.attempts,
            backend_id=backend_id,
            reason=status.detail,
            elapsed_s=round(status.elapsed_s or 0.0, 1),
            kill_after_s=self.policy.kill_after_s,
        )

    def _kill_overdue(
        self, backend_id: str, job: JobRow, spec: JobSpec, elapsed_s: float, now: float
    ) -> None:
        """Kill an attempt past ``timeout_s`` + grace and retry it as timed out."""
        try:
            self.backend.kill(backend_id, spec)
        except JobError as exc:
            self.log.warning(
                "could not kill an overdue job; trying again at the next poll",
                run=job.run,
                batch=job.batch,
                backend_id=backend_id,
                error=str(exc),
            )
            return
        self._stopped.discard(backend_id)
        detail = (
            f"killed by the daemon after {elapsed_s:.0f} s of run time, over the limit "
            f"timeouts.job_s = {self.policy.timeout_s:g} s + {self.policy.grace:g} s grace"
        )
        self._failed(job, job.attempts, JobStatus(JobState.TIMEOUT, None, detail), now)

    def _finished(self, job: JobRow, status: JobStatus, now: float) -> None:
        if status.state is JobState.SUCCEEDED:
            try:
                self.on_success(job, status)
            except (CalloopError, OSError, ValueError) as exc:
                if storage_error_in(exc):
                    raise  # our disk, not the job's outputs: the daemon waits, then retries
                status = JobStatus(JobState.FAILED, 0, f"outputs rejected: {exc}")
            else:
                self.journal.update_job(
                    job.run,
                    job.batch,
                    state=JobPhase.SUCCEEDED,
                    exit_code=0,
                    finished=now,
                    detail="",
                )
                self.log.info("job succeeded", run=job.run, batch=job.batch, attempt=job.attempts)
                return
        self._failed(job, job.attempts, status, now)

    def _failed(self, job: JobRow, attempt: int, status: JobStatus, now: float) -> None:
        stderr = self.spec(job, attempt).log_path("stderr")
        detail = f"{status.state.value}: {status.detail}".strip(": ")
        if attempt < self.policy.max_attempts:
            delay = self.policy.retry_backoff_s * 2 ** (attempt - 1)
            self.journal.update_job(
                job.run,
                job.batch,
                state=JobPhase.RETRY,
                exit_code=status.exit_code,
                next_attempt=now + delay,
                detail=detail,
            )
            self.log.warning(
                "job failed; retrying",
                run=job.run,
                batch=job.batch,
                attempt=attempt,
                retry_in_s=delay,
                reason=detail,
                log=str(stderr),
            )
            return
        self.journal.update_job(
            job.run,
            job.batch,
            state=JobPhase.GIVEN_UP,
            exit_code=status.exit_code,
            finished=now,
            detail=detail,
        )
        inputs = self.journal.inputs_of(job.run, job.batch)
        self.log.error(
            "job failed for good; the run continues without this batch",
            run=job.run,
            batch=job.batch,
            attempts=attempt,
            reason=detail,
            inputs=inputs,
            log=str(stderr),
        )
