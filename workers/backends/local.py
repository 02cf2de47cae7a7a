"""The local backend: a bounded pool of subprocesses on this machine.

Each job is ``workers.wrapper`` in its own session (so it survives a daemon restart and
can be re-adopted), stdout/stderr go to the job directory, and the backend id
``local:<pid>:<start ticks>`` identifies the process even if its pid is later reused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from loop.errors import JobError
from workers.backends.base import (
    JobSpec,
    JobState,
    JobStatus,
    read_exit_status,
    started_path,
)


def _start_ticks(pid: int) -> int | None:
    """The process start time from /proc (None when the process is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, not yet reaped by its parent
        return None
    return int(fields[19])  # field 22 of stat; the first two fields precede ")"


def _alive(backend_id: str) -> bool:
    _, pid, ticks = backend_id.split(":")
    return _start_ticks(int(pid)) == int(ticks)


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
        ticks = _start_ticks(child.pid)
        backend_id = f"local:{child.pid}:{ticks if ticks is not None else 0}"
        self._children[backend_id] = child
        return backend_id

    def poll(self, jobs: dict[str, JobSpec]) -> dict[str, JobStatus]:
        """Exit-status files first; then whether the process still lives."""
        result = {}
        for backend_id, spec in jobs.items():
            status = read_exit_status(spec)
            if status is not None:
                self._reap(backend_id, wait_s=5.0)  # the wrapper exits right after writing
                result[backend_id] = status
            elif _alive(backend_id):
                result[backend_id] = JobStatus(JobState.RUNNING)
            else:
                self._reap(backend_id, wait_s=0.0)
                result[backend_id] = JobStatus(
                    JobState.LOST, None, f"process gone without an exit status in {spec.job_dir}"
                )
        return result

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
        _, pid, _ = backend_id.split(":")
        if _alive(backend_id):
            os.kill(int(pid), signal.SIGTERM)

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
        ticks = _start_ticks(pid)
        if ticks is None and read_exit_status(spec) is None:
            return None
        return f"local:{pid}:{ticks or 0}"


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
