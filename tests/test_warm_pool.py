"""The local backend's warm pool isolates a job exactly as the subprocess path does.

Each outcome is checked in three modes: a subprocess-started wrapper (the reference), a
pooled wrapper exec'ing its payload, and a pooled wrapper forking its payload and calling
the module's ``main`` (how built-in workers run). Payloads are ``tests.pool_payload``
with real processes, signals and files; the server's failures are real SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loop.jobconfig import freeze
from loop.journal import JobPhase, Journal
from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec
from tests.helpers import calibration, workspace
from tests.test_backend_local import finish, gone, local_backend, stop
from tests.test_jobs_deadline import drive, make_manager, stop_attempt
from workers import alca, harvest, reco
from workers.backends import local
from workers.backends.base import JobSpec, JobState, JobStatus, exit_status_path, started_path
from workers.backends.forkserver import PAYLOAD_MODULES, process_environment
from workers.backends.local import LocalBackend

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = "tests.pool_payload"
MODES = ("subprocess", "pool-exec", "pool-fork")


def backend_for(mode: str) -> LocalBackend:
    """A ready backend of ``mode``: only "pool-fork" preloads the test payload."""
    preload = (*PAYLOAD_MODULES, PAYLOAD) if mode == "pool-fork" else PAYLOAD_MODULES
    return local_backend(mode, preload=preload)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The start mode; from the repository, where ``python -m tests...`` finds the payload."""
    monkeypatch.chdir(REPO)
    return str(request.param)


@pytest.fixture
def backend(mode: str) -> Iterator[LocalBackend]:
    """A backend of ``mode``; every job went the way the mode says."""
    made = backend_for(mode)
    yield made
    assert made.pool is None or not made.pool.degraded, "jobs fell back to subprocesses"
    made.close()


def payload_spec(tmp_path: Path, *action: str, timeout: float = 30.0, name: str = "job") -> JobSpec:
    """A job running ``python -m tests.pool_payload ACTION...``."""
    return JobSpec(
        key=f"T.step2.run1.{name}",
        argv=[sys.executable, "-m", PAYLOAD, *action],
        job_dir=tmp_path / name,
        attempt=1,
        timeout_s=timeout,
    )


def run_job(backend: LocalBackend, spec: JobSpec) -> JobStatus:
    """Submit and wait for the end."""
    return finish(backend, backend.submit(spec), spec)


def info(backend: LocalBackend, tmp_path: Path, name: str = "job") -> dict[str, Any]:
    """What an ``info`` payload saw."""
    out = tmp_path / f"{name}.json"
    spec = payload_spec(tmp_path, "info", str(out), name=name)
    assert run_job(backend, spec) == JobStatus(JobState.SUCCEEDED, 0)
    assert spec.log_path("stdout").read_text() == "out"  # flushed though never ended by \n
    assert spec.log_path("stderr").read_text() == "err"
    return dict(json.loads(out.read_text()))


def wait_for(condition: Callable[[], object], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def server_pid(backend: LocalBackend) -> int:
    assert backend.pool is not None and backend.pool.server is not None
    return backend.pool.server.pid


# -- how a job ends: the same in every mode -------------------------------------------

ENDINGS = {
    "exit code": (["exit", "3"], JobState.FAILED, 3, ""),
    "crash by signal": (["signal", "SIGSEGV"], JobState.FAILED, -signal.SIGSEGV, ""),
    "uncaught exception": (["raise"], JobState.FAILED, 1, "RuntimeError: payload failed\n"),
    "sys.exit(text)": (["message", "bad input"], JobState.FAILED, 1, "bad input\n"),
    "success": (["sleep", "0"], JobState.SUCCEEDED, 0, ""),
}


@pytest.mark.parametrize("ending", ENDINGS, ids=list(ENDINGS))
def test_exit_status_is_the_subprocess_one(
    backend: LocalBackend, tmp_path: Path, ending: str
) -> None:
    action, state, code, stderr_tail = ENDINGS[ending]
    spec = payload_spec(tmp_path, *action)
    status = run_job(backend, spec)
    assert (status.state, status.exit_code) == (state, code)
    record = json.loads(exit_status_path(spec).read_text())
    assert record["exit_code"] == code and not record["timed_out"] and not record["cancelled"]
    assert spec.log_path("stderr").read_text().endswith(stderr_tail)


def test_how_the_job_was_started(mode: str, backend: LocalBackend, tmp_path: Path) -> None:
    """The wrapper is the server's child in pool modes, ours otherwise; only pool-fork runs
    the payload in a fork of the server (its interpreter's argv is the server's)."""
    seen = info(backend, tmp_path)
    pooled = mode != "subprocess"
    assert seen["wrapper_parent"] == (server_pid(backend) if pooled else os.getpid())
    forked = "workers.backends.forkserver" in seen["orig_argv"]
    assert forked == (mode == "pool-fork")
    assert seen["built_in_workers_imported"] == forked  # the server preloads them
    # what ps shows: the payload's own command line, as an exec'd payload has it
    assert seen["cmdline"] == [sys.executable, "-m", PAYLOAD, "info", str(tmp_path / "job.json")]


def test_the_job_sees_what_a_subprocess_sees(
    mode: str, backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Own session and group, stdin /dev/null, no descriptor but 0-2 (none of the
    server's), the daemon's directory and environment as they are at submission (set
    after the server started), no BLAS setting of the server's, default SIGTERM."""
    monkeypatch.setenv("CALLOOP_TEST_SUBMITTED", "yes")
    seen = info(backend, tmp_path)
    assert seen["pgid"] == seen["sid"] == seen["pid"]
    assert seen["stdin"] == os.devnull
    assert seen["fds"] == [0, 1, 2]
    assert seen["cwd"] == str(REPO)
    assert seen["env"] == process_environment()  # what exec passes on (not just os.environ)
    assert seen["env"]["CALLOOP_TEST_SUBMITTED"] == "yes"
    assert seen["sigterm"]


def test_random_generators_differ_between_jobs(backend: LocalBackend, tmp_path: Path) -> None:
    first, second = info(backend, tmp_path, "a"), info(backend, tmp_path, "b")
    assert first["numpy_random"] != second["numpy_random"]
    assert first["random"] != second["random"]


def test_time_limit_kills_the_payload_group(backend: LocalBackend, tmp_path: Path) -> None:
    spec = payload_spec(tmp_path, "spawn", str(tmp_path / "pids"), timeout=3.0)
    backend_id = backend.submit(spec)
    wait_for(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text())
    payload, grandchild = map(int, (tmp_path / "pids").read_text().split())
    status = finish(backend, backend_id, spec)
    assert (status.state, status.exit_code) == (JobState.TIMEOUT, 124)
    assert gone(payload, limit=2.0) and gone(grandchild, limit=2.0)


def test_cancel_kills_the_payload(backend: LocalBackend, tmp_path: Path) -> None:
    spec = payload_spec(tmp_path, "hang")
    backend_id = backend.submit(spec)
    wait_for(started_path(spec).exists)
    payload = int(json.loads(started_path(spec).read_text())["payload_pgid"])
    backend.cancel(backend_id)
    assert finish(backend, backend_id, spec).state is JobState.CANCELLED
    assert gone(payload, limit=2.0)


def test_killed_wrapper_leaves_nothing_behind(backend: LocalBackend, tmp_path: Path) -> None:
    """SIGKILL of the wrapper: the payload dies with it (death signal, also in a fork), its
    leaked child when the backend finds the attempt lost."""
    spec = payload_spec(tmp_path, "spawn", str(tmp_path / "pids"))
    backend_id = backend.submit(spec)
    wait_for(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text())
    payload, grandchild = map(int, (tmp_path / "pids").read_text().split())
    os.kill(int(backend_id.split(":")[1]), signal.SIGKILL)
    assert gone(payload, limit=2.0), "payload outlived its wrapper"
    assert finish(backend, backend_id, spec).state is JobState.LOST
    assert gone(grandchild, limit=2.0), "the payload's child outlived the lost attempt"


def test_kill_ends_a_stopped_job_and_its_children(backend: LocalBackend, tmp_path: Path) -> None:
    spec = payload_spec(tmp_path, "spawn", str(tmp_path / "pids"))
    backend_id = backend.submit(spec)
    wait_for(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text())
    payload, grandchild = map(int, (tmp_path / "pids").read_text().split())
    wrapper = int(backend_id.split(":")[1])
    stop(wrapper, payload, grandchild)
    backend.kill(backend_id, spec)
    assert all(gone(pid, limit=2.0) for pid in (wrapper, payload, grandchild))
    assert not exit_status_path(spec).exists()
    assert backend.poll({backend_id: spec})[backend_id].state is JobState.LOST


def test_find_by_command_line_before_the_started_file(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A wrapper whose started file is missing is found by its command line (a pooled one
    shows the wrapper's), and never confused with its payload."""
    spec = payload_spec(tmp_path, "hang")
    backend_id = backend.submit(spec)
    wait_for(started_path(spec).exists)
    started_path(spec).rename(tmp_path / "started.json")
    assert backend.find(spec) == backend_id
    backend.kill(backend_id, spec)


def test_hung_job_is_killed_at_the_daemon_deadline_and_retried(mode: str, tmp_path: Path) -> None:
    """Wrapper and payload SIGSTOPped: the job manager kills them after timeout + grace
    and the retry, started the same way, succeeds."""
    backend = backend_for(mode)
    journal = Journal(tmp_path / "step2.journal.sqlite")
    try:
        manager = make_manager(journal, backend)
        job_dir = tmp_path / "run1" / "batch0001"
        argv = [sys.executable, "-m", PAYLOAD, "hang-once", str(job_dir / "hung")]
        journal.add_job(1, 1, job_dir, argv, "")
        manager.submit_ready(time.time())
        wrapper, payload = stop_attempt(manager.spec(journal.jobs()[0], 1))
        drive(manager, lambda: journal.jobs()[0].state == JobPhase.SUCCEEDED)
        assert journal.jobs()[0].attempts == 2
        assert gone(wrapper, limit=2.0) and gone(payload, limit=2.0)
        assert backend.pool is None or not backend.pool.degraded
    finally:
        journal.close()
        backend.wait_children(timeout=10)
        backend.close()


# -- the pool's own failures ------------------------------------------------------------

DAEMON = """
import json, sys, time
from pathlib import Path
from tests.test_warm_pool import backend_for, payload_spec
backend = backend_for("pool-fork")
spec = payload_spec(Path(sys.argv[1]), "sleep", "2")
print(json.dumps([backend.submit(spec), backend.pool.server.pid]), flush=True)
time.sleep(60)
"""


def test_daemon_sigkill_leaves_the_job_running_for_its_successor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon SIGKILLed with a pooled job running: its fork server ends with it, the job
    runs on, and a new backend re-adopts it to the end."""
    monkeypatch.chdir(REPO)
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert daemon.stdout is not None
        backend_id, server = json.loads(daemon.stdout.readline())
        daemon.kill()
    finally:
        daemon.wait(timeout=10)
        if daemon.stdout is not None:
            daemon.stdout.close()
    assert gone(server, limit=5.0), "the fork server outlived its daemon"
    spec = payload_spec(tmp_path, "sleep", "2")
    successor = LocalBackend(1, warm_pool=False)
    assert successor.find(spec) == backend_id
    assert successor.poll({backend_id: spec})[backend_id].state is JobState.RUNNING
    assert finish(successor, backend_id, spec) == JobStatus(JobState.SUCCEEDED, 0)


def test_killed_server_falls_back_once_then_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server SIGKILLed mid-job: that job ends normally; the next jobs start as
    subprocesses with one WARNING; after the retry delay a new server takes jobs again."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(local, "RETRY_AFTER_S", 2.0)
    backend = backend_for("pool-fork")
    old_server = server_pid(backend)
    running = payload_spec(tmp_path, "sleep", "1", name="running")
    running_id = backend.submit(running)
    wait_for(started_path(running).exists)  # told to go: a job not yet told ends at once
    os.kill(old_server, signal.SIGKILL)
    with caplog.at_level(logging.INFO, logger="calloop.backend.local"):
        assert info(backend, tmp_path, "a")["wrapper_parent"] == os.getpid()
        assert info(backend, tmp_path, "b")["wrapper_parent"] == os.getpid()
        assert finish(backend, running_id, running) == JobStatus(JobState.SUCCEEDED, 0)
        assert backend.pool is not None and backend.pool.degraded
        time.sleep(2.0)
        info(backend, tmp_path, "c")  # starts a new server (this job: a subprocess)
        assert backend.pool.wait_ready(60)
        again = info(backend, tmp_path, "d")
    new_server = server_pid(backend)
    assert new_server != old_server and again["wrapper_parent"] == new_server
    assert not backend.pool.degraded
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    warnings = [m for level, m in messages if level == "WARNING"]
    assert len(warnings) == 1 and "warm worker pool unusable" in warnings[0]
    assert any("warm worker pool restarted" in m for _, m in messages)
    backend.close()


def test_server_that_cannot_start_means_subprocesses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload module that fails to import: the server reports it, jobs run anyway."""
    monkeypatch.chdir(REPO)
    with caplog.at_level(logging.WARNING, logger="calloop.backend.local"):
        backend = LocalBackend(1, preload=("workers.no_such_worker",))
        assert backend.pool is not None and not backend.pool.wait_ready(60)
        assert info(backend, tmp_path)["wrapper_parent"] == os.getpid()
    [warning] = [r.getMessage() for r in caplog.records]
    assert "No module named 'workers.no_such_worker'" in warning
    backend.close()


def test_server_is_single_threaded_without_open_files(tmp_path: Path) -> None:
    """Safe to fork: one thread, and no descriptor but stdio, its socket and the pipe of
    its SIGCHLD wake-up (no HDF5 file open), also after a job."""
    backend = backend_for("pool-fork")
    info(backend, tmp_path)
    server = server_pid(backend)
    assert len(os.listdir(f"/proc/{server}/task")) == 1
    fds = {
        int(fd): os.readlink(f"/proc/{server}/fd/{fd}") for fd in os.listdir(f"/proc/{server}/fd")
    }
    assert fds[0] == fds[1] == os.devnull
    others = sorted(target.split(":")[0] for fd, target in fds.items() if fd > 2)
    assert others == ["pipe", "pipe", "socket"]
    backend.close()


def test_module_state_of_a_job_does_not_reach_the_next(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A payload changing its module's state changes its own copy only."""
    for name in ("first", "second"):
        spec = payload_spec(tmp_path, "count", name=name)
        assert run_job(backend, spec).state is JobState.SUCCEEDED
        assert spec.log_path("stdout").read_text() == "1\n"


# -- the built-in workers ----------------------------------------------------------------


def _chain(backend: LocalBackend, root: Path, raw_root: Path, name: str) -> bytes:
    """reco -> alca -> harvest of one calibration as three jobs; the payload's bytes."""
    cal = calibration(workspace(root / "ws"), name)
    inputs = [str(raw_path(raw_root, cal.raw_input.stream, 7, ls)) for ls in (1, 2, 3)]
    for worker, worker_inputs, output in (
        ("reco", inputs, reco.OUTPUT),
        ("alca", [str(root / "reco" / "out" / reco.OUTPUT)], alca.OUTPUT),
        ("harvest", [str(root / "alca" / "out" / alca.OUTPUT)], harvest.PAYLOAD),
    ):
        job_dir = root / worker
        config_path, _ = freeze(cal, job_dir)
        spec = JobSpec(
            key=f"T.{worker}",
            argv=[
                *(sys.executable, "-m", f"workers.{worker}"),
                *("--calibration", str(config_path), "--output-dir", str(job_dir / "out")),
                *worker_inputs,
            ],
            job_dir=job_dir,
            attempt=1,
            timeout_s=120,
        )
        status = run_job(backend, spec)
        assert status == JobStatus(JobState.SUCCEEDED, 0), spec.log_path("stderr").read_text()
        assert (job_dir / "out" / output).exists()
    return (root / "harvest" / "out" / harvest.PAYLOAD).read_bytes()


def test_built_in_workers_in_the_pool_equal_subprocesses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three built-in workers forked from the server produce the payload that the
    same workers started as subprocesses produce, byte for byte."""
    name = "EcalPedestals"
    monkeypatch.chdir(REPO)
    loop_config = workspace(tmp_path / "raw")
    spec = DetectorSpec(channels=256, events_per_ls=120, dead=2, noisy=2, hot=2)
    for stream in ("ecal", "sistrip"):
        truth = make_truth(spec, seed=3)
        for ls in (1, 2, 3):
            content = generate_ls(
                spec, truth, detector=stream, run=7, ls=ls, seed=3, start_time=0, end_time=1
            )
            write_raw_ls(raw_path(loop_config.raw_root, stream, 7, ls), content)
    payloads = {}
    for mode in ("subprocess", "pool-fork"):
        backend = backend_for(mode)
        payloads[mode] = _chain(backend, tmp_path / mode, loop_config.raw_root, name)
        assert backend.pool is None or not backend.pool.degraded
        backend.close()
    assert payloads["subprocess"] == payloads["pool-fork"]
    assert np.load(tmp_path / "pool-fork" / "harvest" / "out" / harvest.PAYLOAD).shape[-1] == 256


def test_no_server_until_the_first_job(tmp_path: Path) -> None:
    """An idle daemon's backend starts no fork server; its first job starts one (and
    runs as a subprocess while the server imports)."""
    backend = LocalBackend(1, warm_pool=True)
    try:
        assert backend.pool is not None and backend.pool.server is None
        spec = payload_spec(tmp_path, "sleep", "0")
        assert run_job(backend, spec) == JobStatus(JobState.SUCCEEDED, 0)
        assert backend.pool.server is not None
        assert backend.pool.wait_ready(60)
    finally:
        backend.close()
