"""Statistics gathered over consecutive runs (``statistics.across_runs``).

A calibration that needs ``statistics.min_events`` events per payload holds back every
harvest short of them (nothing stored, nothing uploaded). With ``across_runs``, a run
that ends short hands its merged statistics on: step 4 closes it ``Done`` with the
outcome ``carried`` and records a :class:`Carry` (the runs so far, their events, a copy
of the last harvest's ``state.h5``). The next run of the calibration waits in
``WaitingForDependencies`` until every earlier run its step 2 has seen is finished (in
step 4, or stopped before it: :func:`states.dependencies.dependency_state`), takes the
carry of the newest one step 4 finished, and its harvests start from that state instead
of from nothing. Its first harvest that reaches ``min_events`` is stored and uploaded as one
payload valid from the first run of the range, open-ended, whose metadata names every
run used (``source_runs``); the next run starts a new range.

The chain follows run numbers, whatever order the runs' jobs finish in. A run that
ends in step 4 any other way than ``Done`` (Failed, Skipped, Rejected, UploadRefused)
breaks the chain: its statistics are not carried, and the next run starts a new range (a
Failed run retried later closes into its own range). A run that never reaches step 4
(not selected, or stopped in step 2 or 3) is passed over.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loop.fsutil import atomic_path, atomic_write_json

CARRY = "carry.json"
"""A run's inherited statistics (``run<R>/step4/``): where they came from."""
CARRIED_STATE = "carried_state.h5"
"""The copy of the statistics a run hands on (its own ``run<R>/step4/``)."""


@dataclass(frozen=True)
class Carry:
    """Statistics handed from one run to the next: the runs they are from (ascending),
    their events, and the ``state.h5`` holding them."""

    runs: list[int]
    events: int
    state: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Carry:
        """A carry from its stored form."""
        runs = [int(r) for r in data["runs"]]
        return cls(runs=runs, events=int(data["events"]), state=str(data["state"]))

    def describe(self) -> str:
        """One phrase for logs and summaries."""
        runs = ", ".join(map(str, self.runs))
        return f"{self.events} events of run(s) {runs}"


def predecessor(runs: list[tuple[int, str]], run: int) -> tuple[int, str] | None:
    """The newest run before ``run`` and its state (pure), the one whose statistics
    ``run`` may inherit: only from a ``Done`` one, whose record holds a carry."""
    earlier = [(r, state) for r, state in runs if r < run]
    return max(earlier) if earlier else None


def hand_on(step_dir: Path, state: Path, runs: list[int], events: int) -> Carry:
    """Copy the statistics a run hands on into its own directory (the job directory
    they come from may be cleaned up) and describe them."""
    target = step_dir / CARRIED_STATE
    with atomic_path(target, ".h5") as tmp:
        shutil.copyfile(state, tmp)
    return Carry(runs=runs, events=events, state=str(target))


def write_carry(step_dir: Path, carry: Carry | None) -> None:
    """Record what a run inherits (None: nothing; an earlier record is removed)."""
    path = step_dir / CARRY
    if carry is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_json(path, asdict(carry))


def read_carry(step_dir: Path) -> Carry | None:
    """What a run inherits (None: nothing)."""
    try:
        return Carry.from_json(json.loads((step_dir / CARRY).read_text()))
    except FileNotFoundError:
        return None
