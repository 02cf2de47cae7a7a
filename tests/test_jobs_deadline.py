"""Deadlines the daemon enforces and fair submission order, with a real journal and real
local jobs: a stopped job is killed after its time limit plus grace and retried, the
deadline survives a daemon restart and ignores the wall clock, and a short run's job is
not queued behind a long run."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loop.jobs import JobManager, JobPolicy
from loop.journal import JobPhase, JobRow, Journal
from loop.logs import get_logger
from tests.test_backend_local import gone, stop
from workers.backends.base import Backend, JobSpec, JobStatus, exit_status_path, started_path
from workers.backends.local import LocalBackend

# hangs on its first attempt only: the retry of a killed attempt succeeds
HANG_ONCE = (
    "import pathlib, sys, time; marker = pathlib.Path(sys.argv[1]); "
    "first = not marker.exists(); marker.touch(); time.sleep(60 if first else 0)"
)
FAST = [sys.executable, "-S", "-c", "pass"]


def short_policy(timeout_s: float = 2.0, grace_s: float | None = 1.0) -> JobPolicy:
    """Seconds-long limits, immediate retries."""
    return JobPolicy(
        max_attempts=3,
        retry_backoff_s=0.0,
        timeout_s=timeout_s,
        key_prefix="Test.step2",
        resources={},
        grace_s=grace_s,
    )


def _ignore(_job: JobRow, _status: JobStatus) -> None:
    pass


def make_manager(
    journal: Journal,
    backend: Backend,
    on_success: Callable[[JobRow, JobStatus], None] = _ignore,
    policy: JobPolicy | None = None,
) -> JobManager:
    """A job manager as a step daemon builds one (short limits by default)."""
    return JobManager(
        journal, backend, policy or short_policy(), on_success, get_logger("test.jobs")
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """A real journal in the test's directory."""
    opened = Journal(tmp_path / "step2.journal.sqlite")
    yield opened
    opened.close()


def drive(
    manager: JobManager,
    done: Callable[[], bool],
    limit: float = 30.0,
    each: Callable[[], None] = lambda: None,
    interval: float = 0.02,
) -> None:
    """Cycle as a daemon does (new jobs, poll, submit) until ``done()``."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "condition not reached in time"
        each()
        manager.poll(time.time())
        manager.submit_ready(time.time())
        time.sleep(interval)


def add_hang_once(journal: Journal, tmp_path: Path) -> Path:
    """Job 1 of run 1, a HANG_ONCE payload; its directory."""
    job_dir = tmp_path / "run1" / "batch0001"
    journal.add_job(1, 1, job_dir, [sys.executable, "-c", HANG_ONCE, str(job_dir / "hung")], "")
    return job_dir


def stop_attempt(spec: JobSpec, limit: float = 10.0) -> tuple[int, int]:
    """SIGSTOP a HANG_ONCE attempt's wrapper and payload (as a fault would), once the
    payload has begun to hang; their pids."""
    deadline = time.monotonic() + limit
    while not (started_path(spec).exists() and (spec.job_dir / "hung").exists()):
        assert time.monotonic() < deadline, "payload did not start"
        time.sleep(0.01)
    started = json.loads(started_path(spec).read_text())
    wrapper, payload = int(started["pid"]), int(started["payload_pgid"])
    stop(wrapper, payload)
    return wrapper, payload


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_grace_defaults_to_ten_seconds_or_ten_percent() -> None:
    assert short_policy(timeout_s=20, grace_s=None).kill_after_s == 30
    assert short_policy(timeout_s=3600, grace_s=None).kill_after_s == 3960
    assert short_policy(timeout_s=20, grace_s=2).kill_after_s == 22


def test_due_jobs_are_oldest_created_first_across_runs(journal: Journal, tmp_path: Path) -> None:
    for run, batch in [(200, 1), (200, 2), (100, 1), (200, 3), (100, 2)]:
        journal.add_job(run, batch, tmp_path / f"{run}.{batch}", ["true"], "")

    def due(now: float, limit: int = 10) -> list[tuple[int, int]]:
        return [(j.run, j.batch) for j in journal.due_jobs(now, limit=limit)]

    assert due(0) == [(200, 1), (200, 2), (100, 1), (200, 3), (100, 2)]
    assert due(0, limit=2) == [(200, 1), (200, 2)]
    journal.update_job(200, 1, state=JobPhase.RETRY, attempts=1, next_attempt=50.0)
    journal.update_job(200, 2, state=JobPhase.RUNNING)
    journal.add_job(200, 1, tmp_path / "again", ["true"], "")  # idempotent: keeps its row
    assert due(10) == [(100, 1), (200, 3), (100, 2)]  # a retry not due yet is skipped
    assert due(50) == [(200, 1), (100, 1), (200, 3), (100, 2)]  # then keeps its place


def test_stopped_job_is_killed_at_its_deadline_and_retried(
    journal: Journal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrapper and payload SIGSTOPped: the wrapper cannot enforce its own time limit, so
    the daemon kills both after timeout + grace, and the retry succeeds."""
    backend = LocalBackend(1)
    manager = make_manager(journal, backend)
    job_dir = add_hang_once(journal, tmp_path)
    submitted = time.monotonic()
    assert manager.submit_ready(time.time()) == 1
    first = manager.spec(journal.jobs()[0], 1)
    wrapper, payload = stop_attempt(first)
    with caplog.at_level(logging.WARNING):
        drive(manager, lambda: journal.jobs()[0].state == JobPhase.SUCCEEDED)
    backend.wait_children(timeout=10)
    assert time.monotonic() - submitted >= manager.policy.kill_after_s
    assert journal.jobs()[0].attempts == 2
    [stopped] = _messages(caplog, "job is stopped")
    assert f"wrapper pid {wrapper}" in stopped and f"payload pid {payload}" in stopped
    [retried] = _messages(caplog, "job failed; retrying")
    assert "timeout: killed by the daemon after 3 s" in retried
    assert "timeouts.job_s = 2 s + 1 s grace" in retried
    assert gone(wrapper, limit=2.0) and gone(payload, limit=2.0)
    assert not exit_status_path(first).exists()  # ended by the daemon, not the wrapper
    assert exit_status_path(manager.spec(journal.jobs()[0], 2)).exists()
    assert (job_dir / "hung").exists()


def test_deadline_survives_a_restart_and_ignores_the_wall_clock(
    journal: Journal, tmp_path: Path
) -> None:
    """Run time is the process's own age: wall-clock jumps do not kill a job, and a
    daemon that starts late kills at once a job its predecessor started."""
    before = LocalBackend(1)
    manager = make_manager(journal, before)
    add_hang_once(journal, tmp_path)
    submitted = time.monotonic()
    manager.submit_ready(time.time())
    spec = manager.spec(journal.jobs()[0], 1)
    wrapper, payload = stop_attempt(spec)
    for jump in (1e6, -1e6):
        manager.poll(time.time() + jump)
        assert journal.jobs()[0].state == JobPhase.RUNNING
    time.sleep(max(0.0, submitted + manager.policy.kill_after_s + 0.3 - time.monotonic()))
    restarted = Journal(journal.path)
    try:
        make_manager(restarted, LocalBackend(1)).poll(time.time())  # its first poll
        job = restarted.jobs()[0]
    finally:
        restarted.close()
    before.wait_children(timeout=10)
    assert job.state == JobPhase.RETRY and "killed by the daemon" in job.detail
    assert gone(wrapper, limit=2.0) and gone(payload, limit=2.0)


class _Recording(LocalBackend):
    """The local backend, remembering the (run, batch) of each submission in order."""

    def __init__(self, max_parallel: int) -> None:
        super().__init__(max_parallel)
        self.submitted: list[tuple[int, int]] = []

    def submit(self, spec: JobSpec) -> str:
        run, batch = spec.key.removeprefix("Test.step2.run").split(".b")
        self.submitted.append((int(run), int(batch)))
        return super().submit(spec)


class _LongRun:
    """A 200-job run whose jobs are created as its data arrives, faster than they run:
    two always wait for a free slot while the run lasts."""

    BACKLOG = 2

    def __init__(self, journal: Journal, root: Path, run: int, jobs: int = 200) -> None:
        self.journal, self.root, self.run, self.jobs = journal, root, run, jobs
        self.created = 0

    def arrive(self) -> None:
        """Create jobs until the backlog is full again."""
        waiting = self.journal.jobs(run=self.run, states=(JobPhase.PENDING,))
        for _ in range(self.BACKLOG - len(waiting)):
            if self.created < self.jobs:
                self.created += 1
                self.journal.add_job(
                    self.run, self.created, self.root / f"a{self.created}", FAST, ""
                )


def test_short_run_is_not_queued_behind_a_long_one(journal: Journal, tmp_path: Path) -> None:
    """A job of run B, created while a 200-job run A keeps producing jobs, is overtaken by
    no job created after it (only A's two waiting jobs go first) and ends before at least
    190 of A's jobs. Ordered by (run, batch), every job A created later went first: B
    waited for all of A."""
    run_a, run_b = 100, 101
    long_run = _LongRun(journal, tmp_path, run_a)
    completed: list[int] = []
    backend = _Recording(2)
    manager = make_manager(journal, backend, lambda job, _status: completed.append(job.run))
    drive(manager, lambda: len(backend.submitted) >= 6, each=long_run.arrive)
    submitted_before, created_before = len(backend.submitted), long_run.created
    journal.add_job(run_b, 1, tmp_path / "b1", FAST, "")
    drive(manager, lambda: run_b in completed, each=long_run.arrive)
    backend.wait_children(timeout=30)
    position = backend.submitted.index((run_b, 1))
    assert position <= submitted_before + _LongRun.BACKLOG
    assert all(batch <= created_before for _, batch in backend.submitted[:position])
    assert completed.count(run_a) <= 10  # the other 190 or more of A's jobs end after B
