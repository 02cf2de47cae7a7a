"""What Linux ``/proc`` tells about a process, and killing a process group safely.

Ages are measured on the boot clock: ``/proc/<pid>/stat`` gives a process's start time in
clock ticks after boot, and ``CLOCK_BOOTTIME`` (the clock behind ``/proc/uptime``, read
without the file, which some containers rewrite) counts from the same boot. So an age
needs no record of our own, survives a daemon restart and never jumps with the wall
clock.
"""

from __future__ import annotations

import contextlib
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
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return ProcStat(pid, fields[0], int(fields[19]))  # state and field 22, starttime


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
