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
    """The process start time from /proc (None when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
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
                    env={**os.environ, **spec.env},
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
            child = self._children.get(backend_id)
            if child is not None and child.poll() is not None:
                del self._children[backend_id]  # reaped: no zombie left behind
            status = read_exit_status(spec)
            if status is not None:
                result[backend_id] = status
            elif _alive(backend_id):
                result[backend_id] = JobStatus(JobState.RUNNING)
            else:
                result[backend_id] = JobStatus(
                    JobState.LOST, None, f"process gone without an exit status in {spec.job_dir}"
                )
        return result

    def cancel(self, backend_id: str) -> None:
        """SIGTERM the wrapper, which kills its payload and records the cancellation."""
        _, pid, _ = backend_id.split(":")
        if _alive(backend_id):
            os.kill(int(pid), signal.SIGTERM)

    def find(self, spec: JobSpec) -> str | None:
        """A wrapper already started for this attempt (from its started file)."""
        try:
            pid = int(json.loads(started_path(spec).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        ticks = _start_ticks(pid)
        if ticks is None and read_exit_status(spec) is None:
            return None
        return f"local:{pid}:{ticks or 0}"
