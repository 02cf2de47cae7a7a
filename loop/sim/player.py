"""Plays a scenario: writes raw LS files and updates the registry state file in time.

At each LS close the raw files of every detector are written first (atomically) and the
registry is updated after, as at an experiment where the registry learns of an LS once
its data is safe. A run's end is published only after its last LS file exists, unless a
raw fault of the scenario delays or drops that file.

Faults: those of the registry and the conditions DB go into the registry state file,
where the registry server and the fault proxy read them; raw-file faults are played
here (:meth:`Player.apply`); job faults go into the plan the jobs read
(:mod:`loop.sim.jobfaults`), under the loop's ``work_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from loop.errors import ScenarioError
from loop.fsutil import atomic_path
from loop.logs import get_logger
from loop.rawformat import raw_path, write_raw_ls
from loop.registry import iso
from loop.sim import jobfaults
from loop.sim.detector import (
    DetectorTruth,
    generate_detector_ls,
    make_detector_truth,
    save_detector_truth,
)
from loop.sim.scenario import Event, RawFaultSpec, RawFile, Scenario, timeline
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


OTHER_EVENTS_SEED = 1_000_003
"""Added to a detector's seed for the other events of a file written ``twice``."""
GARBLED_BYTES = 1024
"""A ``garble``d file's leading bytes (the HDF5 superblock among them) are random."""


def detector_seed(scenario: Scenario, detector: str) -> int:
    """The seed of one detector's truth and events (stable across plays)."""
    return scenario.seed * 1000 + sorted(scenario.detectors).index(detector)


def corrupt_file(path: Path, how: str, rng: np.random.Generator) -> None:
    """Damage a complete file in place: keep its first half (``truncate``) or overwrite
    its first :data:`GARBLED_BYTES` with random bytes (``garble``)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) // 2 :]
    else:
        size = min(GARBLED_BYTES, len(data))
        data[:size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


class Player:
    """Plays ``scenario`` at ``speed`` x real time against ``state_file`` and ``raw_root``;
    with job faults, they go into the plan under ``work_dir`` (the loop's)."""

    def __init__(
        self,
        scenario: Scenario,
        state_file: Path,
        raw_root: Path,
        *,
        work_dir: Path | None = None,
        speed: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        scenario.check_faults()
        if scenario.job_faults() and work_dir is None:
            raise ScenarioError(
                f"scenario {scenario.name} has job faults: the player needs the loop's "
                "work_dir, where the jobs read them (calloop sim play --work-dir)"
            )
        self.scenario = scenario
        self.work_dir = work_dir
        self.raw_faults = scenario.raw_faults()
        self._slots: dict[RawFile, tuple[float, float]] = {}  # LS start, end (unix)
        self.state_file = state_file
        self.raw_root = raw_root
        self.speed = speed
        self._clock = clock
        self._sleep = sleep
        self.truths: dict[str, DetectorTruth] = {
            name: make_detector_truth(spec, detector_seed(scenario, name))
            for name, spec in scenario.detectors.items()
        }
        self.state = RegistryState.load(state_file)
        self.report = PlayReport()
        self.t0 = 0.0

    def real_time(self, scenario_s: float) -> float:
        """Unix time at which scenario time ``scenario_s`` is played."""
        return self.t0 + scenario_s / self.speed

    def prepare(self) -> None:
        """Save the truths, publish the fault schedule and the job fault plan (a plan
        left by an earlier play is removed); starts the clock."""
        self.t0 = self._clock()
        for name, truth in self.truths.items():
            stream = self.raw_root / name
            stream.mkdir(parents=True, exist_ok=True)
            save_detector_truth(stream, truth)
        self.state.faults = [
            {
                "target": f.target,
                "kind": f.kind,
                "start": self.real_time(f.start),
                "end": self.real_time(f.start + f.duration),
                "status": f.status,
            }
            for f in self.scenario.service_faults()
        ]
        self.state.save(self.state_file)
        if self.work_dir is not None:
            jobfaults.write_plan(self.work_dir, self.scenario.job_faults())

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
                file = RawFile(name, event.run, event.ls)
                self._slots[file] = (ls_start, stamp)
                self._close_ls(file, self.raw_faults.get(file))
            self.state.lumisections[key].append(
                {
                    "run_number": event.run,
                    "lumisection_number": event.ls,
                    "start_time": iso(_utc(ls_start)),
                    "end_time": iso(_utc(stamp)),
                }
            )
            self.state.runs[key]["last_lumisection_number"] = event.ls
        elif event.kind == "raw_write":
            file = RawFile(event.detector, event.run, event.ls)
            fault = self.raw_faults[file]
            self._write_ls(file, other_events=fault.kind == "twice" and not fault.identical)
            log.warning("raw fault played", file=str(file), fault=fault.kind, how=event.note)
            return  # the registry is unchanged
        else:
            self.state.runs[key]["end_time"] = iso(_utc(stamp))
            self.report.runs_ended.append(run.run_number)
        self.state.save(self.state_file)
        log.info(event.kind, run=event.run, ls=event.ls or None)

    def _close_ls(self, file: RawFile, fault: RawFaultSpec | None) -> None:
        """Write one file at its LS close, as its raw fault (if any) has it."""
        if fault is None or fault.kind == "twice":
            self._write_ls(file)  # a twice file is written again by a raw_write event
            return
        if fault.kind == "corrupt":
            self._write_ls(file, corrupt=fault.how)
        # late: written by a raw_write event; never: not at all
        log.warning("raw fault played", file=str(file), fault=fault.kind, how=fault.note())

    def _write_ls(
        self, file: RawFile, *, other_events: bool = False, corrupt: str | None = None
    ) -> None:
        """Write ``file`` atomically with the events of its LS slot (or other ones); a
        ``corrupt`` file is damaged before it appears under its name, complete."""
        spec = self.scenario.detectors[file.detector]
        start, end = self._slots[file]
        seed = detector_seed(self.scenario, file.detector)
        content = generate_detector_ls(
            spec,
            self.truths[file.detector],
            detector=file.detector,
            run=file.run,
            ls=file.ls,
            seed=seed + OTHER_EVENTS_SEED if other_events else seed,
            start_time=start,
            end_time=end,
        )
        path = raw_path(self.raw_root, file.detector, file.run, file.ls)
        if corrupt is None:
            size = write_raw_ls(path, content)
        else:
            with atomic_path(path) as damaged:
                write_raw_ls(damaged, content)
                corrupt_file(damaged, corrupt, np.random.default_rng([seed, file.run, file.ls]))
                size = damaged.stat().st_size
        self.report.raw_files += 1
        self.report.raw_bytes += size


def _utc(stamp: float) -> datetime:
    return datetime.fromtimestamp(stamp, UTC)
