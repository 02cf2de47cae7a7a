"""What Linux ``/proc`` tells about a process, and killing a process group safely.

Ages are measured on the boot clock: ``/proc/<pid>/stat`` gives a process's start time in
clock ticks after boot, and ``CLOCK_BOOTTIME`` (the clock behind ``/proc/uptime``, read
without the file, which some containers rewrite) counts from the same boot. So an age
needs no record of our own, survives a daemon restart and never jumps with the wall
clock.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the backends use."""

    pid: int
    state: str  # R, S, D, T (stopped by a signal), t (by a tracer), Z (zombie), ...
    start_ticks: int  # clock ticks after boot

    @property
    def zombie(self) -> bool:
        """Exited, not yet reaped by its parent."""
        return self.state == "Z"

    @property
    def stopped(self) -> bool:
        """Stopped (SIGSTOP, SIGTSTP, a tracer): it makes no progress until continued."""
        return self.state in ("T", "t")

    @property
    def age_s(self) -> float:
        """Seconds since the process started."""
        return time.clock_gettime(time.CLOCK_BOOTTIME) - self.start_ticks / TICKS_PER_S


def stat(pid: int) -> ProcStat | None:
    """The process's stat fields (zombies included), or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = _fields(text)
    return ProcStat(pid, fields[0], int(fields[19]))  # state and field 22, starttime


def _fields(text: str) -> list[str]:
    """The fields of a stat line after the command name, from field 3 (state) on."""
    return text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"


def live(pid: int, start_ticks: int | None) -> ProcStat | None:
    """The process ``pid`` if it is still the one that started at ``start_ticks`` (None:
    unknown, never matches) and has not exited (a pid can be reused; a pid and its start
    time cannot)."""
    proc = stat(pid)
    if proc is None or proc.zombie or proc.start_ticks != start_ticks:
        return None
    return proc


def kill_group(pgid: int, leader_ticks: int | None) -> None:
    """SIGKILL every process of group ``pgid``, stopped ones too, unless the number now
    belongs to another process.

    Linux hands a group's number to no new process while any member of the group lives,
    so a process with that pid but another start time (or an unknown one) means the group
    is gone and the number reused: it is left alone. Without such a process, members left
    behind by a dead leader are still killed.
    """
    leader = stat(pgid)
    if leader is not None and leader.start_ticks != leader_ticks:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def thread_count() -> int:
    """How many threads this process has (fork copies only the calling one)."""
    return len(os.listdir("/proc/self/task"))


def set_cmdline(argv: list[str]) -> bool:
    """Show ``argv`` as this process's command line (``ps``, ``/proc/<pid>/cmdline``), as
    far as it fits in the room of the command line the process was started with.

    A forked process keeps its parent's command line; the kernel reads it from this
    process's own memory between the addresses in fields 48 and 49 of its stat line, so
    it is rewritten there (what setproctitle does; the interpreter keeps its own copy of
    its arguments). False when there is no room at all.
    """
    fields = _fields(Path("/proc/self/stat").read_text())
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end
    room = end - start
    if room <= 1:
        return False
    text = b"\0".join(os.fsencode(arg) for arg in argv)[: room - 1]
    ctypes.memmove(start, text.ljust(room, b"\0"), room)  # ends in NUL: no more is read
    return True
