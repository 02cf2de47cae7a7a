"""The local backend: a bounded pool of subprocesses on this machine.

Each job is ``workers.wrapper`` in its own session (so it survives a daemon restart and
can be re-adopted), stdout/stderr go to the job directory, and the backend id
``local:<pid>:<start ticks>`` identifies the process even if its pid is later reused; the
start ticks also give the attempt's run time (:mod:`workers.backends.procfs`).

With the warm pool (``jobs.local.warm_pool``, the default) the wrapper is forked from
the daemon's fork server (:mod:`workers.backends.forkserver`, started with the daemon's
first job) instead of started as a new interpreter, with the same files, id, deadlines
and isolation. When the server cannot
be used, jobs start as subprocesses again, with one WARNING, and a new server is tried
after :data:`RETRY_AFTER_S`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol

from loop.errors import JobError
from loop.logs import get_logger
from workers.backends import procfs
from workers.backends.base import (
    JobSpec,
    JobState,
    JobStatus,
    read_exit_status,
    started_path,
)
from workers.backends.forkserver import PAYLOAD_MODULES, ForkServer, ForkServerError

RETRY_AFTER_S = 60.0  # after the fork server failed, jobs start as subprocesses this long

log = get_logger("calloop.backend.local")


def _wrapper(backend_id: str) -> procfs.ProcStat | None:
    """The job's wrapper process while it runs (None once it exited or vanished)."""
    _, pid, ticks = backend_id.split(":")
    return procfs.live(int(pid), int(ticks))


def _payload_group(spec: JobSpec) -> tuple[int, int | None] | None:
    """(process group, leader start ticks) of the payload, from the wrapper's started file."""
    try:
        record = json.loads(started_path(spec).read_text())
        return int(record["payload_pgid"]), record["payload_start_ticks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not started yet, or started by a wrapper that did not record it


def _running(wrapper: procfs.ProcStat, spec: JobSpec) -> JobStatus:
    """A running attempt: its run time, and which of its processes are stopped."""
    group = _payload_group(spec)
    payload = procfs.live(*group) if group is not None else None
    stopped = [
        f"{name} pid {proc.pid}"
        for name, proc in (("wrapper", wrapper), ("payload", payload))
        if proc is not None and proc.stopped
    ]
    return JobStatus(
        JobState.RUNNING,
        elapsed_s=wrapper.age_s,
        stopped=bool(stopped),
        detail=f"stopped: {', '.join(stopped)}" if stopped else "",
    )


def _kill_payload(spec: JobSpec) -> None:
    group = _payload_group(spec)
    if group is not None:
        procfs.kill_group(*group)


class _Child(Protocol):
    """A started wrapper this backend waits for: a Popen, or a fork server's child."""

    def wait(self, timeout: float | None = None) -> object:
        """Return once it exited; TimeoutExpired if it runs on after ``timeout``."""
        ...


class _PoolChild:
    """A wrapper forked by the fork server: its exit is collected there, so waiting for
    it means watching it in ``/proc``."""

    def __init__(self, pid: int, start_ticks: int) -> None:
        self.pid, self.start_ticks = pid, start_ticks

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while procfs.live(self.pid, self.start_ticks) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.02)


class WarmPool:
    """The backend's fork server: started with the first job, in the background (jobs
    start as subprocesses until it is ready), replaced some time after a failure. Not at
    start-up: a daemon whose calibration never runs a job (an idle one, of the tens a
    deployment has) costs no server and its memory."""

    def __init__(self, python: str, preload: Sequence[str]) -> None:
        self.python = python
        self.preload = tuple(preload)
        self.server: ForkServer | None = None
        self._retry_at = 0.0
        self._failing = False  # since the last WARNING: no second one until it works

    @property
    def degraded(self) -> bool:
        """True from a failure of the server until a new one is ready."""
        return self._failing

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the server can take jobs (benchmarks, tests); False if it cannot."""
        if self.server is None:
            self._start()
        return self._usable(wait_s=timeout) is not None

    def spawn(self, spec: JobSpec, stdout: IO[bytes], stderr: IO[bytes]) -> _PoolChild | None:
        """Start the job's wrapper from the server; None: start it as a subprocess."""
        if self.server is None and time.monotonic() >= self._retry_at:
            self._start()
        server = self._usable(wait_s=0.0)
        if server is None:
            return None
        try:
            pid, ticks = server.spawn(
                spec.wrapper_args(), spec.wrapped(self.python), stdout.fileno(), stderr.fileno()
            )
        except ForkServerError as exc:
            self._failed(exc)
            return None
        return _PoolChild(pid, ticks)

    def _start(self) -> None:
        try:
            self.server = ForkServer.start(self.python, self.preload)
        except ForkServerError as exc:
            self._failed(exc)

    def _usable(self, wait_s: float) -> ForkServer | None:
        """The server if it is ready; None while it imports, or after it failed."""
        if self.server is None:
            return None
        try:
            if not self.server.ready(wait_s):
                return None
        except ForkServerError as exc:
            self._failed(exc)
            return None
        if self._failing:
            log.info("warm worker pool restarted", server_pid=self.server.pid)
            self._failing = False
        return self.server

    def _failed(self, exc: ForkServerError) -> None:
        """Stop the server; jobs start as subprocesses until a new one is tried."""
        if self.server is not None:
            self.server.close(kill=True)
            self.server = None
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        (log.info if self._failing else log.warning)(
            "warm worker pool unusable; jobs start as subprocesses until it is restarted",
            error=str(exc),
            retry_in_s=RETRY_AFTER_S,
        )
        self._failing = True

    def close(self) -> None:
        """Stop the server (running jobs go on)."""
        if self.server is not None:
            self.server.close()
            self.server = None


class LocalBackend:
    """Run jobs as local subprocesses, at most ``max_parallel`` at a time; with
    ``warm_pool``, forked from a fork server that has imported ``preload``."""

    name = "local"

    def __init__(
        self,
        max_parallel: int,
        python: str = sys.executable,
        *,
        warm_pool: bool = True,
        preload: Sequence[str] = PAYLOAD_MODULES,
    ) -> None:
        self.max_in_flight = max_parallel
        self.python = python
        self.pool = WarmPool(python, preload) if warm_pool else None
        self._children: dict[str, _Child] = {}

    def submit(self, spec: JobSpec) -> str:
        """Start the wrapper in a new session with its logs in the job directory."""
        spec.job_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (
                open(spec.log_path("stdout"), "wb") as out,
                open(spec.log_path("stderr"), "wb") as err,
            ):
                pooled = self.pool.spawn(spec, out, err) if self.pool is not None else None
                if pooled is not None:
                    return self._started(pooled, pooled.pid, pooled.start_ticks)
                child = subprocess.Popen(
                    spec.wrapped(self.python),
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as exc:
            raise JobError(f"job {spec.key}: cannot start {spec.argv[0]!r}: {exc}") from exc
        proc = procfs.stat(child.pid)  # our child, not reaped: readable even if it ended
        return self._started(child, child.pid, proc.start_ticks if proc is not None else 0)

    def _started(self, child: _Child, pid: int, start_ticks: int) -> str:
        backend_id = f"local:{pid}:{start_ticks}"
        self._children[backend_id] = child
        return backend_id

    def close(self) -> None:
        """Stop the fork server, if any (jobs run on and can be re-adopted)."""
        if self.pool is not None:
            self.pool.close()

    def poll(self, jobs: dict[str, JobSpec]) -> dict[str, JobStatus]:
        """Exit-status files first; then whether the process still lives."""
        return {backend_id: self._status(backend_id, spec) for backend_id, spec in jobs.items()}

    def _status(self, backend_id: str, spec: JobSpec) -> JobStatus:
        # the process is looked at before the file: a wrapper that ends in between has
        # written it, so an attempt is never taken for lost just as it finishes
        wrapper = _wrapper(backend_id)
        status = read_exit_status(spec)
        if status is not None:
            self._reap(backend_id, wait_s=5.0)  # the wrapper exits right after writing
            return status
        if wrapper is not None:
            return _running(wrapper, spec)
        self._reap(backend_id, wait_s=0.0)
        _kill_payload(spec)  # what the payload started must not outlive the attempt
        return JobStatus(
            JobState.LOST, None, f"process gone without an exit status in {spec.job_dir}"
        )

    def _reap(self, backend_id: str, wait_s: float) -> None:
        """Collect our own child's exit status so no zombie is left behind (a pooled
        one's is collected by the fork server: only its end is awaited)."""
        child = self._children.pop(backend_id, None)
        if child is None:
            return
        try:
            child.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self._children[backend_id] = child

    def wait_children(self, timeout: float) -> None:
        """Wait for every job this process started to exit (tests, orderly teardown).

        Daemons do not call it on SIGTERM: their jobs keep running and are re-adopted.
        """
        for child in self._children.values():
            child.wait(timeout=timeout)
        self._children.clear()

    def cancel(self, backend_id: str) -> None:
        """SIGTERM the wrapper, which kills its payload and records the cancellation."""
        wrapper = _wrapper(backend_id)
        if wrapper is not None:
            os.kill(wrapper.pid, signal.SIGTERM)

    def kill(self, backend_id: str, spec: JobSpec) -> None:
        """SIGKILL the wrapper's group, then what is left of the payload's (the kernel
        kills the payload itself with the wrapper), stopped processes included."""
        _, pid, ticks = backend_id.split(":")
        procfs.kill_group(int(pid), int(ticks))  # the wrapper leads its own session
        _kill_payload(spec)
        self._reap(backend_id, wait_s=5.0)

    def find(self, spec: JobSpec) -> str | None:
        """A wrapper already started for this attempt: from its started file, or, if it
        was killed before writing one, from the process table (its command line)."""
        pid: int | None
        try:
            pid = int(json.loads(started_path(spec).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pid = _find_process(spec)
        if pid is None:
            return None
        proc = procfs.stat(pid)
        if (proc is None or proc.zombie) and read_exit_status(spec) is None:
            return None
        return f"local:{pid}:{proc.start_ticks if proc is not None else 0}"


def _find_process(spec: JobSpec) -> int | None:
    """The pid of a live wrapper running this attempt, by its command line."""
    wanted = f"\0--job-dir\0{spec.job_dir}\0--attempt\0{spec.attempt}\0".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"\0workers.wrapper\0" in cmdline and wanted in cmdline:
            return int(entry.name)
    return None
