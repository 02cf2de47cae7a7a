"""Simulation scenarios: a YAML timeline of runs, and faults of the registry and of the
conditions DB.

Times are in *scenario seconds* from the start of play; ``calloop sim play --speed S``
plays them S times faster than real time. The timeline is pure data, built and checked
here without touching files, so it can be printed (``--dry-run``) and unit-tested.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from loop.config import StrictModel, read_yaml, validate_model
from loop.errors import ConfigError, ScenarioError

FaultTarget = Literal["registry", "conddb"]
FaultKind = Literal["refuse", "timeout", "hang", "http_error", "auth", "malformed", "bad_schema"]
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    # the registry server plays these (loop/sim/registry_server.py)
    "registry": ("refuse", "timeout", "http_error", "malformed", "bad_schema"),
    # the fault proxy in front of the conditions DB plays these (loop/sim/conddb_proxy.py)
    "conddb": ("refuse", "timeout", "hang", "http_error", "auth"),
}


class DetectorSpec(StrictModel):
    """A simulated detector writing one raw stream."""

    channels: int = Field(256, ge=8)
    events_per_ls: int = Field(80, ge=1)
    pedestal_fraction: float = Field(0.5, gt=0, le=1)
    dead: int = Field(3, ge=0)
    noisy: int = Field(3, ge=0)
    hot: int = Field(3, ge=0)
    pedestal_mean: float = 200.0
    pedestal_spread: float = 15.0
    noise_low: float = 2.0
    noise_high: float = 4.0
    occupancy: float = Field(0.005, ge=0, le=1)
    hot_occupancy: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _bad_fit(self) -> DetectorSpec:
        if self.dead + self.noisy + self.hot > self.channels:
            raise ValueError("dead + noisy + hot exceeds the number of channels")
        return self


class RunSpec(StrictModel):
    """One run of the timeline."""

    run_number: int = Field(gt=0)
    start: float = Field(ge=0, description="scenario seconds")
    run_type: str = "collisions"
    stable_beam: bool = True
    ls_seconds: float = Field(23.31, gt=0)
    ls_count: int = Field(ge=1)
    ends: bool = Field(True, description="false: the run never ends (look-back test)")
    detectors: list[str] | None = Field(None, description="default: every detector")

    @property
    def end(self) -> float:
        """Scenario time of the last LS close (and of the run end, if it ends)."""
        return self.start + self.ls_seconds * self.ls_count


class FaultSpec(StrictModel):
    """A fault of the registry or the conditions DB, active in ``[start, start + duration)``."""

    target: FaultTarget = "registry"
    kind: FaultKind
    start: float = Field(ge=0)
    duration: float = Field(gt=0)
    status: int = Field(503, ge=400, le=599)

    @model_validator(mode="after")
    def _kind_of_target(self) -> FaultSpec:
        if self.kind not in FAULT_KINDS[self.target]:
            raise ValueError(
                f"{self.target} faults are {', '.join(FAULT_KINDS[self.target])}; got {self.kind!r}"
            )
        return self

    def describe(self) -> str:
        """A line for ``--dry-run``."""
        status = f" (HTTP {self.status})" if self.kind == "http_error" else ""
        return (
            f"{self.start:9.2f} s  {self.target} fault {self.kind}{status} for {self.duration:g} s"
        )


class Scenario(StrictModel):
    """A whole scenario file."""

    name: str
    description: str = ""
    seed: int = 12345
    detectors: dict[str, DetectorSpec] = Field(min_length=1)
    runs: list[RunSpec] = Field(min_length=1)
    faults: list[FaultSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ordered = sorted(self.runs, key=lambda run: run.start)
        for before, after in itertools.pairwise(ordered):
            if after.start < before.end or not before.ends:
                raise ValueError(
                    f"runs {before.run_number} and {after.run_number} overlap in time: run "
                    f"{before.run_number} lasts until {before.end:g} s"
                    + ("" if before.ends else " and never ends")
                    + f", run {after.run_number} starts at {after.start:g} s"
                )
            if after.run_number <= before.run_number:
                raise ValueError(
                    f"run numbers must increase with time: {after.run_number} starts after "
                    f"{before.run_number}"
                )
        for run in self.runs:
            unknown = set(run.detectors or []) - set(self.detectors)
            if unknown:
                raise ValueError(f"run {run.run_number} names unknown detectors {sorted(unknown)}")
        return self

    def detectors_of(self, run: RunSpec) -> list[str]:
        """Detectors taking data in ``run``."""
        return run.detectors if run.detectors is not None else list(self.detectors)

    def faults_of(self, target: str) -> list[FaultSpec]:
        """The faults aimed at ``target`` (``registry`` or ``conddb``)."""
        return [fault for fault in self.faults if fault.target == target]


def load_scenario(path: Path) -> Scenario:
    """Load and validate a scenario file (errors name the file, key and line)."""
    try:
        data, lines, problems = read_yaml(path)
        return validate_model(Scenario, path, data, lines, problems)
    except ConfigError as exc:
        raise ScenarioError("; ".join(exc.problems)) from None


# ------------------------------------------------------------------------------ timeline


@dataclass(frozen=True, order=True)
class Event:
    """One thing the player does at scenario time ``at``."""

    at: float
    order: int  # tie-break: LS files before the run end that follows them
    kind: Literal["run_start", "ls_close", "run_end"]
    run: int
    ls: int = 0

    def describe(self) -> str:
        """A line for ``--dry-run``."""
        what = {
            "run_start": f"run {self.run} starts",
            "ls_close": f"run {self.run} LS {self.ls} closes (raw files written)",
            "run_end": f"run {self.run} ends",
        }[self.kind]
        return f"{self.at:9.2f} s  {what}"


def timeline(scenario: Scenario) -> list[Event]:
    """Every event of the scenario, in play order."""
    events: list[Event] = []
    for run in scenario.runs:
        events.append(Event(run.start, 0, "run_start", run.run_number))
        for ls in range(1, run.ls_count + 1):
            events.append(Event(run.start + ls * run.ls_seconds, 1, "ls_close", run.run_number, ls))
        if run.ends:
            events.append(Event(run.end, 2, "run_end", run.run_number))
    return sorted(events)
