"""Runs one job attempt's payload and records how it ended.

``python -m workers.wrapper --job-dir D --attempt N --timeout T -- CMD ARGS...``

Runs CMD in its own process group, writes ``D/started.N.json`` (pid, host, time and the
payload's process group, so a daemon can kill what is left of it), kills the group after
T seconds or on SIGTERM (a backend's cancel), and writes ``D/exit_status.N.json``
atomically with the exit code before exiting with it. The payload is SIGKILLed by the
kernel when the wrapper dies, however it dies: a killed wrapper never leaves its payload
running beside the retry in the same job directory.

In the local backend's warm pool (:mod:`workers.backends.forkserver`) the wrapper runs in
a process forked from one that has already imported the built-in workers; a payload
``python -m <module> ...`` of such a module then runs in a further fork calling the
module's ``main(argv)``, with the same session, death signal and exit code as an exec'd
one, but without an interpreter start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NoReturn, Protocol

from loop.fsutil import atomic_write_json
from workers.backends import procfs

TIMEOUT_EXIT = 124
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Payload(Protocol):
    """The payload process as the wrapper sees it (a Popen, or a fork of this process)."""

    pid: int

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code (negative: the signal that ended it); TimeoutExpired if it runs on."""
        ...


def main(argv: list[str] | None = None, preloaded: Collection[str] = ()) -> int:
    """Run the payload; return its exit code (124 on timeout).

    ``preloaded``: modules imported in this process whose ``python -m`` command may run in
    a fork of it (the warm pool's; empty: every payload is exec'd).
    """
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
    child = _start(command, preloaded)

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


def run_main(entry: Callable[[list[str]], object], args: list[str]) -> int:
    """Call ``entry(args)`` as the interpreter runs ``sys.exit(main())``: its exit status
    (``SystemExit`` honoured; an uncaught exception printed with its traceback: 1), with
    every output buffer flushed, for a forked process that then leaves by ``os._exit``."""
    try:
        status = _exit_status(entry(args))
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream has nothing to add
            stream.flush()
    ctypes.CDLL(None).fflush(None)  # C-level output of extensions (os._exit does not flush)
    return status


def _exit_status(code: object) -> int:
    """What ``sys.exit(code)`` makes the process's exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _start(command: list[str], preloaded: Collection[str]) -> Payload:
    """The payload in a new session (its own group, killed as a whole), bound to die
    with this process: a fork calling a preloaded module's ``main``, or an exec."""
    module = _preloaded_module(command, preloaded)
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    if module is not None:
        return _fork(libc, module, command)
    return subprocess.Popen(
        command,
        start_new_session=True,
        # preexec_fn is unsafe only with threads, and the wrapper has none; the death
        # signal follows the thread that forks, which is this one
        preexec_fn=functools.partial(_die_with_parent, libc, os.getpid()),  # noqa: PLW1509
    )


def _preloaded_module(command: list[str], preloaded: Collection[str]) -> str | None:
    """The module of a ``<this python> -m <preloaded module> ...`` command, else None."""
    if command[:2] == [sys.executable, "-m"] and len(command) > 2 and command[2] in preloaded:
        return command[2]
    return None


class _Forked:
    """A payload forked from this process: waited for through a pidfd, so a time limit
    needs no polling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)  # not reaped before wait(): the pid is still ours

    def wait(self, timeout: float | None = None) -> int:
        if not select.select([self._pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        os.close(self._pidfd)
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def _fork(libc: ctypes.CDLL, module: str, command: list[str]) -> _Forked:
    """Fork the payload; return once it leads its own session (or has already ended), so
    that killing its group from now on reaches it."""
    parent = os.getpid()
    ready, ready_w = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would write this process's buffered output again
    pid = os.fork()
    if pid == 0:
        os.close(ready)
        _payload_child(libc, parent, ready_w, module, command)
    os.close(ready_w)
    os.read(ready, 1)  # end of file: the child closed its end, or died
    os.close(ready)
    return _Forked(pid)


def _payload_child(
    libc: ctypes.CDLL, parent: int, ready: int, module: str, command: list[str]
) -> NoReturn:
    """In the forked payload: what exec and ``python -m`` would have set up, then the
    module's ``main``; never returns to the wrapper's code."""
    status = 1
    try:
        os.setsid()
        _die_with_parent(libc, parent)
        os.close(ready)
        procfs.set_cmdline(command)  # as ps showed an exec'd payload (and not as a wrapper)
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # the global generator is the pool's copy: fresh entropy
            numpy.random.seed()
        imported = importlib.import_module(module)
        sys.argv = [imported.__file__ or module, *command[3:]]
        status = run_main(imported.main, command[3:])
    except BaseException:
        traceback.print_exc()  # the set-up failed: said in the job's stderr log
    finally:
        os._exit(status)


def _die_with_parent(libc: ctypes.CDLL, parent: int) -> None:
    """In the payload, before it runs: have the kernel SIGKILL it when the wrapper dies."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the wrapper died before the request took effect
        os._exit(128 + signal.SIGKILL)


def _kill_group(child: Payload) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
