"""Runs one job attempt's payload and records how it ended.

``python -m workers.wrapper --job-dir D --attempt N --timeout T -- CMD ARGS...``

Writes ``D/started.N.json`` (pid, host, time), runs CMD in its own process group,
kills the group after T seconds or on SIGTERM (a backend's cancel), and writes
``D/exit_status.N.json`` atomically with the exit code before exiting with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from loop.fsutil import atomic_write_json

TIMEOUT_EXIT = 124


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
    base = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": started,
        "attempt": args.attempt,
        "command": command,
    }
    atomic_write_json(args.job_dir / f"started.{args.attempt}.json", base)
    cancelled = False
    child = subprocess.Popen(command, start_new_session=True)

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal cancelled
        cancelled = True
        _kill_group(child)

    signal.signal(signal.SIGTERM, on_term)
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


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
