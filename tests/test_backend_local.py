"""The local backend and the job wrapper with real subprocesses: every test runs with jobs
started as subprocesses and with jobs forked by the warm pool (its fork server ready)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from workers.backends import procfs
from workers.backends.base import JobSpec, JobState, JobStatus, exit_status_path, started_path
from workers.backends.forkserver import PAYLOAD_MODULES
from workers.backends.local import LocalBackend

MakeBackend = Callable[[], LocalBackend]


def local_backend(
    mode: str, max_parallel: int = 1, preload: Sequence[str] = PAYLOAD_MODULES
) -> LocalBackend:
    """A local backend starting jobs as subprocesses (``mode`` "subprocess") or from its
    warm pool, once the fork server is ready (so no job silently starts otherwise)."""
    backend = LocalBackend(max_parallel, warm_pool=mode != "subprocess", preload=preload)
    if backend.pool is not None:
        assert backend.pool.wait_ready(60), "the fork server did not start"
    return backend


@pytest.fixture(params=["subprocess", "pool"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[MakeBackend]:
    """Local backends of one mode; a pool that fell back to subprocesses fails the test."""
    made: list[LocalBackend] = []

    def make() -> LocalBackend:
        made.append(local_backend(request.param))
        return made[-1]

    yield make
    for backend in made:
        assert backend.pool is None or not backend.pool.degraded, "jobs fell back"
        backend.close()


# a payload that starts a grandchild in its own process group and records both pids
SPAWNER = (
    "import os, subprocess, sys, time; "
    "child = subprocess.Popen(['sleep', '60']); "
    "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}'); "
    "time.sleep(60)"
)


def _spec(tmp_path: Path, code: str, *, timeout: float = 30.0, attempt: int = 1) -> JobSpec:
    return JobSpec(
        key="T.step2.run1.b0001",
        argv=[sys.executable, "-c", code],
        job_dir=tmp_path / "job",
        attempt=attempt,
        timeout_s=timeout,
    )


def finish(backend: LocalBackend, backend_id: str, spec: JobSpec, limit: float = 30) -> JobStatus:
    """Poll until the job's final status."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = backend.poll({backend_id: spec})[backend_id]
        if status.state.finished:
            return status
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_success_with_logs_and_exit_status(tmp_path: Path, make_backend: MakeBackend) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "print('hello'); import sys; print('oops', file=sys.stderr)")
    status = finish(backend, backend.submit(spec), spec)
    assert status == JobStatus(JobState.SUCCEEDED, 0)
    assert spec.log_path("stdout").read_text() == "hello\n"
    assert spec.log_path("stderr").read_text() == "oops\n"
    record = json.loads(exit_status_path(spec).read_text())
    assert record["exit_code"] == 0 and record["attempt"] == 1


def test_failure_exit_code(tmp_path: Path, make_backend: MakeBackend) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "raise SystemExit(3)")
    status = finish(backend, backend.submit(spec), spec)
    assert status.state is JobState.FAILED and status.exit_code == 3


def test_timeout_kills_the_payload(tmp_path: Path, make_backend: MakeBackend) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "import time; time.sleep(60)", timeout=0.5)
    status = finish(backend, backend.submit(spec), spec)
    assert status.state is JobState.TIMEOUT and status.exit_code == 124
    assert json.loads(exit_status_path(spec).read_text())["timed_out"] is True


def test_cancel(tmp_path: Path, make_backend: MakeBackend) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "import time; time.sleep(60)")
    backend_id = backend.submit(spec)
    _started(spec)
    backend.cancel(backend_id)
    assert finish(backend, backend_id, spec).state is JobState.CANCELLED


def _started(spec: JobSpec, limit: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if started_path(spec).exists():
            return dict(json.loads(started_path(spec).read_text()))
        time.sleep(0.02)
    raise AssertionError("wrapper did not start")


def _spawned(spec: JobSpec, limit: float = 10) -> tuple[int, int]:
    """(payload, grandchild) pids of a SPAWNER job."""
    path = spec.job_dir / "pids"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            payload, grandchild = path.read_text().split()
            return int(payload), int(grandchild)
        time.sleep(0.02)
    raise AssertionError("payload did not start its child")


def gone(pid: int, limit: float = 0.0) -> bool:
    """True when ``pid`` has exited (a zombie counts: nothing reaps orphans here)."""
    deadline = time.monotonic() + limit
    while True:
        proc = procfs.stat(pid)
        if proc is None or proc.zombie:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop(*pids: int) -> None:
    """SIGSTOP ``pids`` and wait until they are stopped (delivery is asynchronous)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not all((proc := procfs.stat(pid)) is not None and proc.stopped for pid in pids):
        assert time.monotonic() < deadline, "processes did not stop"
        time.sleep(0.01)


def _spawner_spec(tmp_path: Path) -> JobSpec:
    spec = _spec(tmp_path, SPAWNER)
    return replace(spec, argv=[*spec.argv, str(spec.job_dir / "pids")])


def test_killed_wrapper_is_lost(tmp_path: Path, make_backend: MakeBackend) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "import time; time.sleep(60)")
    backend_id = backend.submit(spec)
    time.sleep(0.5)
    os.killpg(int(backend_id.split(":")[1]), signal.SIGKILL)
    assert finish(backend, backend_id, spec).state is JobState.LOST


def test_another_backend_instance_adopts_running_jobs(
    tmp_path: Path, make_backend: MakeBackend
) -> None:
    """After a daemon restart, a new backend object follows the old jobs by id."""
    first, adopted = make_backend(), make_backend()
    spec = _spec(tmp_path, "import time; time.sleep(1)")
    backend_id = first.submit(spec)
    time.sleep(0.3)
    assert adopted.find(spec) == backend_id
    assert adopted.poll({backend_id: spec})[backend_id].state is JobState.RUNNING
    assert finish(adopted, backend_id, spec).state is JobState.SUCCEEDED
    assert first.poll({backend_id: spec})[backend_id].state is JobState.SUCCEEDED  # reaped


def test_find_without_a_start_is_none(tmp_path: Path, make_backend: MakeBackend) -> None:
    assert make_backend().find(_spec(tmp_path, "pass")) is None


def test_wrapper_requires_a_command(tmp_path: Path) -> None:
    from workers.wrapper import main

    with pytest.raises(SystemExit):
        main(["--job-dir", str(tmp_path), "--attempt", "1", "--timeout", "1", "--"])


def test_killed_wrapper_takes_its_payload_along(tmp_path: Path, make_backend: MakeBackend) -> None:
    """SIGKILL of the wrapper alone: the kernel kills the payload at once (death signal);
    what the payload started in its group is killed when the backend finds the job lost."""
    backend = make_backend()
    spec = _spawner_spec(tmp_path)
    backend_id = backend.submit(spec)
    payload, grandchild = _spawned(spec)
    assert _started(spec)["payload_pgid"] == payload
    os.kill(int(backend_id.split(":")[1]), signal.SIGKILL)
    assert gone(payload, limit=2.0), "payload outlived its wrapper"
    assert not gone(grandchild)
    assert finish(backend, backend_id, spec).state is JobState.LOST
    assert gone(grandchild, limit=2.0), "the payload's child outlived the lost attempt"


def test_running_status_has_run_time_and_stopped_processes(
    tmp_path: Path, make_backend: MakeBackend
) -> None:
    backend = make_backend()
    spec = _spec(tmp_path, "import time; time.sleep(60)")
    backend_id = backend.submit(spec)
    payload = int(str(_started(spec)["payload_pgid"]))
    time.sleep(0.3)
    running = backend.poll({backend_id: spec})[backend_id]
    assert running.state is JobState.RUNNING and not running.stopped
    assert running.elapsed_s is not None and 0.2 < running.elapsed_s < 10
    stop(payload)
    stopped = backend.poll({backend_id: spec})[backend_id]
    assert stopped.stopped and stopped.detail == f"stopped: payload pid {payload}"
    backend.kill(backend_id, spec)
    assert gone(payload, limit=2.0)


def test_kill_ends_stopped_wrapper_payload_and_descendants(
    tmp_path: Path, make_backend: MakeBackend
) -> None:
    backend = make_backend()
    spec = _spawner_spec(tmp_path)
    backend_id = backend.submit(spec)
    payload, grandchild = _spawned(spec)
    wrapper = int(backend_id.split(":")[1])
    stop(wrapper, payload, grandchild)
    backend.kill(backend_id, spec)
    assert all(gone(pid, limit=2.0) for pid in (wrapper, payload, grandchild))
    assert not exit_status_path(spec).exists()  # the daemon, not the wrapper, ended it
    assert backend.poll({backend_id: spec})[backend_id].state is JobState.LOST


def test_kill_spares_a_reused_process_group_number(
    tmp_path: Path, make_backend: MakeBackend
) -> None:
    """A recorded group whose number now leads another process is left alone."""
    bystander = make_backend()
    other = _spec(tmp_path / "other", "import time; time.sleep(60)")
    other_id = bystander.submit(other)
    pid = int(other_id.split(":")[1])
    procfs.kill_group(pid, int(other_id.split(":")[2]) + 1)  # another start time: spared
    assert not gone(pid, limit=0.3)
    bystander.kill(other_id, other)
    assert gone(pid, limit=2.0)
