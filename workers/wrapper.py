"""Runs one job attempt's payload and records how it ended.

``python -m workers.wrapper --job-dir D --attempt N --timeout T -- CMD ARGS...``

Runs CMD in its own process group, writes ``D/started.N.json`` (pid, host, time and the
payload's process group, so a daemon can kill what is left of it), kills the group after
T seconds or on SIGTERM (a backend's cancel), and writes ``D/exit_status.N.json``
atomically with the exit code before exiting with it. The payload is SIGKILLed by the
kernel when the wrapper dies, however it dies: a killed wrapper never leaves its payload
running beside the retry in the same job directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from loop.fsutil import atomic_write_json
from workers.backends import procfs

TIMEOUT_EXIT = 124
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str] | None = None) -> int:
    """Run the payload; return its exit code (124 on timeout)."""
    parser = argparse.ArgumentParser(prog="python -m workers.wrapper")
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    started = time.time()
    cancelled = False
    child = _start(command)

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal cancelled
        cancelled = True
        _kill_group(child)

    signal.signal(signal.SIGTERM, on_term)  # before the started file: from then on, cancel works
    payload = procfs.stat(child.pid)  # not reaped yet, so readable even if it already ended
    base = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": started,
        "attempt": args.attempt,
        "command": command,
        "payload_pgid": child.pid,
        "payload_start_ticks": None if payload is None else payload.start_ticks,
    }
    atomic_write_json(args.job_dir / f"started.{args.attempt}.json", base)
    timed_out = False
    try:
        code = child.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(child)
        child.wait()
        code = TIMEOUT_EXIT
    atomic_write_json(
        args.job_dir / f"exit_status.{args.attempt}.json",
        {
            **base,
            "end": time.time(),
            "exit_code": code,
            "timed_out": timed_out,
            "cancelled": cancelled,
        },
    )
    return code if code >= 0 else 128 - code


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    """The payload in a new session (its own group, killed as a whole), bound to die
    with this process."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    return subprocess.Popen(
        command,
        start_new_session=True,
        # preexec_fn is unsafe only with threads, and the wrapper has none; the death
        # signal follows the thread that forks, which is this one
        preexec_fn=functools.partial(_die_with_parent, libc, os.getpid()),  # noqa: PLW1509
    )


def _die_with_parent(libc: ctypes.CDLL, parent: int) -> None:
    """In the payload, before exec: have the kernel SIGKILL it when the wrapper dies."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the wrapper died before the request took effect
        os._exit(128 + signal.SIGKILL)


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
