"""A payload for the warm-pool tests: ``python -m tests.pool_payload ACTION ARGS``.

The local backend runs it exec'd, or, when its fork server preloads this module, forked
from the server with ``main(argv)`` called, as it runs the built-in workers. ACTION:

* ``info OUT``: write what the process sees (ids, descriptors, environment, random
  numbers, its command line) to OUT as JSON; print to stdout and stderr (no newline);
* ``exit N``; ``signal NAME`` (no core file); ``raise``; ``message TEXT`` (sys.exit(TEXT));
* ``count``: add one to a module-level counter (0 at import), print it;
* ``sleep S``; ``hang``; ``hang-once MARKER`` (hangs only if MARKER did not exist);
* ``spawn PIDFILE``: start ``sleep 60`` in the same group, write both pids, hang.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

COUNTER = 0


def _open_fds() -> list[int]:
    """This process's open descriptors, found without opening one."""
    found = []
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def info(out: Path) -> None:
    """Record what an isolated job must see the same way, however it was started."""
    import numpy as np  # here: the other actions start fast also when exec'd

    record = {
        "pid": os.getpid(),
        "wrapper": os.getppid(),
        "wrapper_parent": _parent_of(os.getppid()),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "orig_argv": sys.orig_argv,
        "built_in_workers_imported": all(
            f"workers.{name}" in sys.modules for name in ("reco", "alca", "harvest")
        ),
        "cmdline": Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").decode().split("\0"),
        "fds": _open_fds(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "numpy_random": float(np.random.random()),
        "random": random.random(),
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }
    out.write_text(json.dumps(record))
    print("out", end="")
    print("err", end="", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Do ACTION; return its exit code."""
    action, *args = argv
    if action == "info":
        info(Path(args[0]))
    elif action == "count":
        global COUNTER  # noqa: PLW0603 (the module state a pooled job must not share)
        COUNTER += 1
        print(COUNTER)
    elif action == "exit":
        return int(args[0])
    elif action == "signal":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), getattr(signal, args[0]))
        time.sleep(10)
    elif action == "raise":
        raise RuntimeError("payload failed")
    elif action == "message":
        sys.exit(args[0])
    elif action == "sleep":
        time.sleep(float(args[0]))
    elif action == "hang":
        time.sleep(60)
    elif action == "hang-once":
        marker = Path(args[0])
        first = not marker.exists()
        marker.touch()
        time.sleep(60 if first else 0)
    elif action == "spawn":
        child = subprocess.Popen(["sleep", "60"])
        Path(args[0]).write_text(f"{os.getpid()} {child.pid}")
        time.sleep(60)
    else:
        raise ValueError(f"unknown action {action!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
