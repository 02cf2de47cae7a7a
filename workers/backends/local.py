"""The local backend: a bounded pool of subprocesses on this machine.

Each job is ``workers.wrapper`` in its own session (so it survives a daemon restart and
can be re-adopted), stdout/stderr go to the job directory, and the backend id
``local:<pid>:<start ticks>`` identifies the process even if its pid is later reused; the
start ticks also give the attempt's run time (:mod:`workers.backends.procfs`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from loop.errors import JobError
from workers.backends import procfs
from workers.backends.base import (
    JobSpec,
    JobState,
    JobStatus,
    read_exit_status,
    started_path,
)


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


class LocalBackend:
    """Run jobs as local subprocesses, at most ``max_parallel`` at a time."""

    name = "local"

    def __init__(self, max_parallel: int, python: str = sys.executable) -> None:
        self.max_in_flight = max_parallel
        self.python = python
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def submit(self, spec: JobSpec) -> str:
        """Start the wrapper in a new session with its logs in the job directory."""
        spec.job_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (
                open(spec.log_path("stdout"), "wb") as out,
                open(spec.log_path("stderr"), "wb") as err,
            ):
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
        backend_id = f"local:{child.pid}:{proc.start_ticks if proc is not None else 0}"
        self._children[backend_id] = child
        return backend_id

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
        """Collect our own child's exit status so no zombie is left behind."""
        child = self._children.pop(backend_id, None)
        if child is None:
            return
        try:
            child.wait(timeout=wait_s) if wait_s else child.poll()
        except subprocess.TimeoutExpired:
            self._children[backend_id] = child
            return
        if child.returncode is None:
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
