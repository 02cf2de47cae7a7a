"""Plays a scenario: writes raw LS files and updates the registry state file in time.

At each LS close the raw files of every detector are written first (atomically) and the
registry is updated after, as at an experiment where the registry learns of an LS once
its data is safe. A run's end is published only after its last LS file exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loop.logs import get_logger
from loop.rawformat import raw_path, write_raw_ls
from loop.registry import iso
from loop.sim.detector import Truth, generate_ls, make_truth, save_truth
from loop.sim.scenario import Event, Scenario, timeline
from loop.sim.state import RegistryState

log = get_logger("calloop.sim.player")


@dataclass
class PlayReport:
    """What a play produced."""

    raw_files: int = 0
    raw_bytes: int = 0
    runs_started: list[int] = field(default_factory=list)
    runs_ended: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


def detector_seed(scenario: Scenario, detector: str) -> int:
    """The seed of one detector's truth and events (stable across plays)."""
    return scenario.seed * 1000 + sorted(scenario.detectors).index(detector)


class Player:
    """Plays ``scenario`` at ``speed`` x real time against ``state_file`` and ``raw_root``."""

    def __init__(
        self,
        scenario: Scenario,
        state_file: Path,
        raw_root: Path,
        *,
        speed: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.scenario = scenario
        self.state_file = state_file
        self.raw_root = raw_root
        self.speed = speed
        self._clock = clock
        self._sleep = sleep
        self.truths: dict[str, Truth] = {
            name: make_truth(spec, detector_seed(scenario, name))
            for name, spec in scenario.detectors.items()
        }
        self.state = RegistryState.load(state_file)
        self.report = PlayReport()
        self.t0 = 0.0

    def real_time(self, scenario_s: float) -> float:
        """Unix time at which scenario time ``scenario_s`` is played."""
        return self.t0 + scenario_s / self.speed

    def prepare(self) -> None:
        """Save the truths and publish the fault schedule; starts the clock."""
        self.t0 = self._clock()
        for name, truth in self.truths.items():
            stream = self.raw_root / name
            stream.mkdir(parents=True, exist_ok=True)
            save_truth(stream, truth)
        self.state.faults = [
            {
                "target": f.target,
                "kind": f.kind,
                "start": self.real_time(f.start),
                "end": self.real_time(f.start + f.duration),
                "status": f.status,
            }
            for f in self.scenario.faults
        ]
        self.state.save(self.state_file)

    def play(self) -> PlayReport:
        """Play every event at its time; returns what was produced."""
        self.prepare()
        for event in timeline(self.scenario):
            delay = self.real_time(event.at) - self._clock()
            if delay > 0:
                self._sleep(delay)
            self.apply(event)
        self.report.elapsed_s = self._clock() - self.t0
        return self.report

    def apply(self, event: Event) -> None:
        """Carry out one timeline event."""
        run = next(r for r in self.scenario.runs if r.run_number == event.run)
        key = str(event.run)
        stamp = self._clock()
        if event.kind == "run_start":
            self.state.runs[key] = {
                "run_number": run.run_number,
                "start_time": iso(_utc(stamp)),
                "end_time": None,
                "run_type": run.run_type,
                "stable_beam": run.stable_beam,
                "last_lumisection_number": 0,
            }
            self.state.lumisections[key] = []
            self.report.runs_started.append(run.run_number)
        elif event.kind == "ls_close":
            ls_start = stamp - run.ls_seconds / self.speed
            for name in self.scenario.detectors_of(run):
                self._write_ls(name, event.run, event.ls, ls_start, stamp)
            self.state.lumisections[key].append(
                {
                    "run_number": event.run,
                    "lumisection_number": event.ls,
                    "start_time": iso(_utc(ls_start)),
                    "end_time": iso(_utc(stamp)),
                }
            )
            self.state.runs[key]["last_lumisection_number"] = event.ls
        else:
            self.state.runs[key]["end_time"] = iso(_utc(stamp))
            self.report.runs_ended.append(run.run_number)
        self.state.save(self.state_file)
        log.info(event.kind, run=event.run, ls=event.ls or None)

    def _write_ls(self, detector: str, run: int, ls: int, start: float, end: float) -> None:
        spec = self.scenario.detectors[detector]
        content = generate_ls(
            spec,
            self.truths[detector],
            detector=detector,
            run=run,
            ls=ls,
            seed=detector_seed(self.scenario, detector),
            start_time=start,
            end_time=end,
        )
        size = write_raw_ls(raw_path(self.raw_root, detector, run, ls), content)
        self.report.raw_files += 1
        self.report.raw_bytes += size


def _utc(stamp: float) -> datetime:
    return datetime.fromtimestamp(stamp, UTC)
