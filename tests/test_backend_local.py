"""The local backend and the job wrapper with real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from workers.backends.base import JobSpec, JobState, JobStatus, exit_status_path
from workers.backends.local import LocalBackend


def _spec(tmp_path: Path, code: str, *, timeout: float = 30.0, attempt: int = 1) -> JobSpec:
    return JobSpec(
        key="T.step2.run1.b0001",
        argv=[sys.executable, "-c", code],
        job_dir=tmp_path / "job",
        attempt=attempt,
        timeout_s=timeout,
    )


def _wait(backend: LocalBackend, backend_id: str, spec: JobSpec, limit: float = 30) -> JobStatus:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = backend.poll({backend_id: spec})[backend_id]
        if status.state.finished:
            return status
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_success_with_logs_and_exit_status(tmp_path: Path) -> None:
    backend = LocalBackend(2)
    spec = _spec(tmp_path, "print('hello'); import sys; print('oops', file=sys.stderr)")
    status = _wait(backend, backend.submit(spec), spec)
    assert status == JobStatus(JobState.SUCCEEDED, 0)
    assert spec.log_path("stdout").read_text() == "hello\n"
    assert spec.log_path("stderr").read_text() == "oops\n"
    record = json.loads(exit_status_path(spec).read_text())
    assert record["exit_code"] == 0 and record["attempt"] == 1


def test_failure_exit_code(tmp_path: Path) -> None:
    backend = LocalBackend(1)
    spec = _spec(tmp_path, "raise SystemExit(3)")
    status = _wait(backend, backend.submit(spec), spec)
    assert status.state is JobState.FAILED and status.exit_code == 3


def test_timeout_kills_the_payload(tmp_path: Path) -> None:
    backend = LocalBackend(1)
    spec = _spec(tmp_path, "import time; time.sleep(60)", timeout=0.5)
    status = _wait(backend, backend.submit(spec), spec)
    assert status.state is JobState.TIMEOUT and status.exit_code == 124
    assert json.loads(exit_status_path(spec).read_text())["timed_out"] is True


def test_cancel(tmp_path: Path) -> None:
    backend = LocalBackend(1)
    spec = _spec(tmp_path, "import time; time.sleep(60)")
    backend_id = backend.submit(spec)
    time.sleep(0.5)
    backend.cancel(backend_id)
    assert _wait(backend, backend_id, spec).state is JobState.CANCELLED


def test_killed_wrapper_is_lost(tmp_path: Path) -> None:
    backend = LocalBackend(1)
    spec = _spec(tmp_path, "import time; time.sleep(60)")
    backend_id = backend.submit(spec)
    time.sleep(0.5)
    os.killpg(int(backend_id.split(":")[1]), signal.SIGKILL)
    assert _wait(backend, backend_id, spec).state is JobState.LOST


def test_another_backend_instance_adopts_running_jobs(tmp_path: Path) -> None:
    """After a daemon restart, a new backend object follows the old jobs by id."""
    first = LocalBackend(1)
    spec = _spec(tmp_path, "import time; time.sleep(1)")
    backend_id = first.submit(spec)
    time.sleep(0.3)
    adopted = LocalBackend(1)
    assert adopted.find(spec) == backend_id
    assert adopted.poll({backend_id: spec})[backend_id].state is JobState.RUNNING
    assert _wait(adopted, backend_id, spec).state is JobState.SUCCEEDED
    assert first.poll({backend_id: spec})[backend_id].state is JobState.SUCCEEDED  # reaped


def test_find_without_a_start_is_none(tmp_path: Path) -> None:
    assert LocalBackend(1).find(_spec(tmp_path, "pass")) is None


def test_wrapper_requires_a_command(tmp_path: Path) -> None:
    from workers.wrapper import main

    with pytest.raises(SystemExit):
        main(["--job-dir", str(tmp_path), "--attempt", "1", "--timeout", "1", "--"])
