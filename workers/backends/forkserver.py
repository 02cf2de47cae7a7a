"""The local backend's warm worker pool: a fork server that starts jobs without an
interpreter start-up.

``python -m workers.backends.forkserver --fd N --preload MODULES --room PADDING``

One server per daemon, started by it (:class:`ForkServer`), imports the built-in
workers (and with them calloop, numpy and h5py) once, then waits on the socket ``N``. For
each job the daemon sends the wrapper's arguments, its command line, working directory
and environment, and the job's open stdout and stderr files; the server forks a child
that becomes a session leader, stdin ``/dev/null``, stdout and stderr those files, every
other descriptor closed, the daemon's directory and environment, and shows the wrapper's
command line in ``ps``; then it runs :func:`workers.wrapper.main` in that child, which
runs a built-in worker in a further fork (no exec) and any other command by exec. The
files, the backend id and the isolation are those of a subprocess-started wrapper.

Why it is safe to fork: the server has one thread (BLAS pools are sized to one before
numpy is imported; checked before every fork), opens no HDF5 file, and a forked payload
re-seeds numpy's global generator (``random`` re-seeds itself).

A job is confirmed in two steps, so that the daemon knows of every job that runs: the
child, once in its own session, says it is ready; the server replies to the daemon with
its pid; only then is the child told to go. A child whose server dies before that exits
without doing anything. The server ends when its daemon closes the socket (or dies);
running jobs go on, as a subprocess-started wrapper outlives a daemon restart.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn

from loop.errors import CalloopError
from workers.backends import procfs

PAYLOAD_MODULES = ("workers.reco", "workers.alca", "workers.harvest")
ROOM = 8192  # bytes of padding in the server's command line: a job's ps line fits in it
START_TIMEOUT_S = 60.0  # imports take about a second; on a loaded machine, some more
REPLY_TIMEOUT_S = 10.0  # a fork and a handshake take milliseconds
HANDSHAKE_TIMEOUT_S = 10.0
MAX_MESSAGE = 16 << 20  # a job's environment and argv, with room to spare
# before numpy is imported: an OpenBLAS thread pool would make the server unsafe to fork
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_HEADER = struct.Struct("!I")
_READY, _GO = b"r", b"g"


class ForkServerError(CalloopError):
    """The fork server could not start a job (or could not start at all)."""


class ForkServer:
    """A running fork server, as the daemon that started it sees it."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._ready = False
        self._lock = threading.Lock()  # one exchange at a time on the socket
        self._start_deadline = time.monotonic() + START_TIMEOUT_S
        # a backend dropped without close() still ends its server (and reaps it)
        self._finalizer = weakref.finalize(self, _stop, proc, sock)

    @classmethod
    def start(cls, python: str, preload: Sequence[str]) -> ForkServer:
        """Start a server that imports ``preload``; it is usable once :meth:`ready`."""
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [
                    python,
                    "-m",
                    "workers.backends.forkserver",
                    *("--fd", str(theirs.fileno()), "--preload", ",".join(preload)),
                    *("--room", " " * ROOM),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is for the daemon, not for it
                env={**process_environment(), **SINGLE_THREADED},
            )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start the fork server: {exc}") from exc
        finally:
            theirs.close()
        return cls(proc, ours)

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the server has finished its imports (waiting up to ``wait_s``).

        ForkServerError when it failed to start, or is not ready after START_TIMEOUT_S.
        """
        if self._ready:
            return True
        self._sock.settimeout(max(0.0, min(wait_s, self._start_deadline - time.monotonic())))
        try:
            message, _ = recv_message(self._sock)
        except (BlockingIOError, TimeoutError):
            if time.monotonic() >= self._start_deadline:
                raise ForkServerError(
                    f"the fork server is not ready after {START_TIMEOUT_S:g} s"
                ) from None
            return False
        except (OSError, EOFError, ValueError) as exc:
            raise ForkServerError(f"the fork server did not start: {exc!r}") from exc
        if "error" in message:
            raise ForkServerError(f"the fork server did not start: {message['error']}")
        self._ready = True
        self._sock.settimeout(REPLY_TIMEOUT_S)
        return True

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self._proc.pid

    def spawn(
        self, wrapper_args: list[str], cmdline: list[str], stdout: int, stderr: int
    ) -> tuple[int, int]:
        """Start a job's wrapper with these arguments; (pid, start ticks) of its process."""
        request = {
            "args": wrapper_args,
            "cmdline": cmdline,
            "cwd": os.getcwd(),
            "env": process_environment(),
        }
        with self._lock:
            try:
                send_message(self._sock, request, [stdout, stderr])
                reply, _ = recv_message(self._sock)
            except (OSError, EOFError, ValueError) as exc:
                late = self._late_reply()
                if late is None:
                    raise ForkServerError(f"no answer from the fork server: {exc!r}") from exc
                reply = late
        if "error" in reply:
            raise ForkServerError(f"the fork server refused the job: {reply['error']}")
        return int(reply["pid"]), int(reply["start_ticks"])

    def _late_reply(self) -> dict[str, Any] | None:
        """After a failed exchange: kill the server, so that a job it forked and did not
        confirm never runs, then take a confirmation that arrived all the same (its job
        runs). The server is closed either way."""
        self._proc.kill()
        self._proc.wait()
        self._sock.setblocking(False)
        try:
            reply, _ = recv_message(self._sock)
        except (OSError, EOFError, ValueError):
            reply = None
        self.close()
        return reply if reply is not None and "pid" in reply else None

    def close(self, *, kill: bool = False) -> None:
        """Close the socket (the server exits) and reap the server; jobs run on."""
        if kill and self._proc.returncode is None:
            self._proc.kill()
        self._finalizer()


def process_environment() -> dict[str, str]:
    """The environment an exec'd child of this process gets: the C library's, which
    libraries may have changed behind ``os.environ`` (as curses sets LINES and COLUMNS)."""
    variables = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    environment: dict[str, str] = {}
    index = 0
    while (entry := variables[index]) is not None:
        name, _, value = os.fsdecode(entry).partition("=")
        environment.setdefault(name, value)  # the first of duplicates is the one getenv reads
        index += 1
    return environment


def _stop(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    sock.close()  # end of file: the server leaves its loop at once (or its start-up)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one length-prefixed JSON message, passing ``fds`` along with it."""
    data = json.dumps(message).encode()
    frame = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    sock.sendall(frame[sent:])


def recv_message(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and the descriptors sent with it (close-on-exec).

    EOFError when the peer has closed the socket before a message.
    """
    head, fds, _flags, _address = socket.recv_fds(
        sock, _HEADER.size, max_fds, socket.MSG_CMSG_CLOEXEC
    )
    try:
        if not head:
            raise EOFError("the other end closed the socket")
        (size,) = _HEADER.unpack(head + _recv_exactly(sock, _HEADER.size - len(head)))
        if size > MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes")
        message = json.loads(_recv_exactly(sock, size))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EOFError("the other end closed the socket mid-message")
        chunks += chunk
    return bytes(chunks)


# -- the server process ---------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Import the payload modules, say ready, serve until the daemon closes the socket."""
    parser = argparse.ArgumentParser(prog="python -m workers.backends.forkserver")
    parser.add_argument("--fd", type=int, required=True, help="socket to the daemon")
    parser.add_argument("--preload", default=",".join(PAYLOAD_MODULES))
    parser.add_argument("--room", default="", help="padding: room for a job's command line")
    args = parser.parse_args(argv)
    conn = socket.socket(fileno=args.fd)
    preload = frozenset(filter(None, args.preload.split(",")))
    try:
        for name in ("workers.wrapper", *sorted(preload)):
            importlib.import_module(name)
        _check_pidfd()
        _check_single_threaded()
    except Exception as exc:
        with contextlib.suppress(OSError):  # the daemon may have gone meanwhile
            send_message(conn, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        send_message(conn, {"pid": os.getpid()})
    except OSError:
        return 0  # the daemon exited during our imports (e.g. it refused to start)
    _serve(conn, preload)
    return 0


def _check_pidfd() -> None:
    """The wrapper waits for a forked payload through a pidfd (Linux 5.3)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:
        raise ForkServerError(f"pidfd_open is not available ({exc})") from exc


def _check_single_threaded() -> None:
    threads = procfs.thread_count()
    if threads != 1:
        raise ForkServerError(f"the fork server has {threads} threads: forking is unsafe")


def _serve(conn: socket.socket, preload: frozenset[str]) -> None:
    """Start a job per request; collect ended children; return when the daemon is gone."""
    home = (os.getcwd(), os.environ.get("PYTHONPATH"))
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    # an ended child wakes the server (SIGCHLD writes to this pipe): idle, it never wakes
    children_ended, wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    poller.register(children_ended, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if children_ended in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(children_ended, 4096)
        _reap()
        if conn.fileno() not in ready:
            continue
        try:
            request, fds = recv_message(conn, max_fds=2)
        except (OSError, EOFError, ValueError):
            return  # the daemon is gone (or talks nonsense): so is its pool
        # ``python -m`` imports from the working directory and PYTHONPATH: a job with
        # others than the server's may not be served by the server's modules
        same_home = (request["cwd"], request["env"].get("PYTHONPATH")) == home
        try:
            _spawn(conn, request, fds, preload if same_home else frozenset())
        except OSError:
            return  # the daemon went away mid-answer; the child was not told to go
        finally:
            for fd in fds:
                os.close(fd)


def _reap() -> None:
    """Collect every child that ended (jobs outlive the server; zombies must not)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _spawn(
    conn: socket.socket, request: dict[str, Any], fds: list[int], preloaded: frozenset[str]
) -> None:
    """Fork the job's child, confirm it to the daemon, then let it go."""
    try:
        if len(fds) != 2:
            raise ForkServerError(f"expected stdout and stderr, got {len(fds)} descriptors")
        _check_single_threaded()
    except ForkServerError as exc:
        send_message(conn, {"error": str(exc)})
        return
    ours, theirs = socket.socketpair()
    with ours:
        try:
            pid = os.fork()
        except OSError as exc:
            theirs.close()
            send_message(conn, {"error": f"fork: {exc}"})
            return
        if pid == 0:
            ours.close()
            _job_child(conn, theirs, request, fds, preloaded)
        theirs.close()
        ours.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            ready = ours.recv(1) == _READY
        except OSError:
            ready = False
        proc = procfs.stat(pid)  # not reaped yet: readable even if it already ended
        if not ready or proc is None:
            os.kill(pid, signal.SIGKILL)
            send_message(conn, {"error": "the job's process did not get ready (see stderr)"})
            return
        send_message(conn, {"pid": pid, "start_ticks": proc.start_ticks})
        with contextlib.suppress(OSError):  # it ended already: its backend finds it lost
            ours.sendall(_GO)


def _job_child(
    conn: socket.socket,
    handshake: socket.socket,
    request: dict[str, Any],
    fds: list[int],
    preloaded: frozenset[str],
) -> NoReturn:
    """The forked job: set up as a subprocess-started wrapper would be, run the wrapper;
    never returns to the server's loop."""
    status = 1
    try:
        # the server's SIGCHLD wake-up is not the job's: its children are its own business
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.chdir(request["cwd"])  # before "ready": a failure falls back to a subprocess
        os.environ.clear()
        os.environ.update(request["env"])
        handshake.sendall(_READY)
        if handshake.recv(1) != _GO:
            os._exit(1)  # the daemon never learnt of this job: it must not run
        conn.close()
        handshake.close()
        null = os.open(os.devnull, os.O_RDWR)
        for target, fd in enumerate((null, *fds)):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # close_fds: nothing of the server's
        procfs.set_cmdline(request["cmdline"])
        from workers import wrapper

        entry = functools.partial(wrapper.main, preloaded=preloaded)
        status = wrapper.run_main(entry, request["args"])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
