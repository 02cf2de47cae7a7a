"""Simulation scenarios: a YAML timeline of runs, and faults of the registry, of the
conditions DB, of jobs and of raw files.

Times are in *scenario seconds* from the start of play; ``calloop sim play --speed S``
plays them S times faster than real time. The timeline is pure data, built and checked
here without touching files, so it can be printed (``--dry-run``) and unit-tested.

Each entry of ``faults`` is aimed at a ``target``:

- ``registry`` (the default) and ``conddb``: the service misbehaves during ``[start,
  start + duration)`` (:class:`FaultSpec`);
- ``job``: selected jobs exit with a code, are killed by a signal or hang until their
  time limit, for their first ``attempts`` attempts (:class:`JobFaultSpec`, played by
  the jobs themselves: :mod:`loop.sim.jobfaults`);
- ``raw``: selected LS files arrive corrupt, late, twice or never
  (:class:`RawFaultSpec`, played by :mod:`loop.sim.player`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from loop.config import Loc, StrictModel, location, read_yaml, validate_model
from loop.errors import ConfigError, ScenarioError

FaultTarget = Literal["registry", "conddb"]
FaultKind = Literal["refuse", "timeout", "hang", "http_error", "auth", "malformed", "bad_schema"]
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    # the registry server plays these (loop/sim/registry_server.py)
    "registry": ("refuse", "timeout", "http_error", "malformed", "bad_schema"),
    # the fault proxy in front of the conditions DB plays these (loop/sim/conddb_proxy.py)
    "conddb": ("refuse", "timeout", "hang", "http_error", "auth"),
}


ADC_ONLY = ("pedestal_fraction", "dead", "noisy", "hot", "occupancy", "hot_occupancy")
PMT_ONLY = ("gain_mean", "gain_spread", "spe_width", "mu", "out_of_range")


class DetectorSpec(StrictModel):
    """A simulated detector writing one raw stream.

    ``type: adc`` (:mod:`loop.sim.detector`): channels with a pedestal and a noise, a few
    of them dead, noisy or hot, in pedestal- and physics-trigger events. ``type: pmt``
    (:mod:`loop.sim.pmt`): photomultipliers lit by an LED, every event an ``led``
    trigger; each channel is one PMT with a pedestal (``pedestal_mean``,
    ``pedestal_spread``) of width in ``[noise_low, noise_high]`` and a gain, and
    ``out_of_range`` PMTs have a gain outside the healthy range
    (:func:`loop.sim.pmt.healthy_gain`). A key of the other type is an error.
    """

    type: Literal["adc", "pmt"] = "adc"
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
    gain_mean: float = Field(40.0, gt=0, description="pmt: mean gain, ADC per photoelectron")
    gain_spread: float = Field(3.0, gt=0, description="pmt: rms of the healthy PMTs' gains")
    spe_width: float = Field(0.3, gt=0, le=1, description="pmt: single-photoelectron width / gain")
    mu: float = Field(1.0, gt=0, le=4, description="pmt: mean photoelectrons per LED event")
    out_of_range: int = Field(2, ge=0, description="pmt: PMTs outside the healthy gain range")

    @model_validator(mode="after")
    def _bad_fit(self) -> DetectorSpec:
        others = PMT_ONLY if self.type == "adc" else ADC_ONLY
        misplaced = [key for key in others if key in self.model_fields_set]
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} do not apply to a detector of type {self.type}"
            )
        if self.type == "adc" and self.dead + self.noisy + self.hot > self.channels:
            raise ValueError("dead + noisy + hot exceeds the number of channels")
        if self.type == "pmt" and self.out_of_range > self.channels:
            raise ValueError("out_of_range exceeds the number of channels")
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


JobStep = Literal["reco", "alca", "harvest"]
JobSignal = Literal["SIGSEGV", "SIGKILL", "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL", "SIGTERM"]
"""Signals a job may be killed by: each ends a process that does not handle it."""


class JobFaultSpec(StrictModel):
    """Jobs that fail: ``exit`` (with ``exit_code``), ``signal`` (killed by ``signal``)
    or ``hang`` (sleep until the time limit of the attempt, ``timeouts.job_s``, kills them).

    A job is selected when it matches every selector given (``step``: the worker,
    ``calibration``, ``run``, ``batch``); its first ``attempts`` attempts fail and the
    later ones run normally, so that the loop's retries are exercised (set ``attempts``
    to at least ``jobs.max_attempts`` for a job that is given up).
    """

    target: Literal["job"]
    kind: Literal["exit", "signal", "hang"]
    step: JobStep | None = None
    calibration: str | None = None
    run: int | None = Field(None, gt=0)
    batch: int | None = Field(None, ge=1)
    attempts: int = Field(1, ge=1)
    exit_code: int = Field(3, ge=1, le=255, description="kind exit only")
    signal: JobSignal = Field("SIGSEGV", description="kind signal only")

    @model_validator(mode="after")
    def _options_of_kind(self) -> JobFaultSpec:
        for option, kind in (("exit_code", "exit"), ("signal", "signal")):
            if option in self.model_fields_set and self.kind != kind:
                raise ValueError(f"{option} applies to kind {kind} only, not {self.kind}")
        return self

    def selects(self, step: str, calibration: str, run: int, batch: int) -> bool:
        """True if this fault aims at the job of ``calibration`` ``run`` ``batch``
        run by the ``step`` worker (any attempt)."""
        wanted = (self.step, self.calibration, self.run, self.batch)
        return all(
            w is None or w == actual
            for w, actual in zip(wanted, (step, calibration, run, batch), strict=True)
        )

    def what(self) -> str:
        """What a selected attempt does."""
        if self.kind == "exit":
            return f"exits with code {self.exit_code}"
        if self.kind == "signal":
            return f"is killed by {self.signal}"
        return "hangs until its time limit kills it"

    def describe(self) -> str:
        """A line for ``--dry-run``."""
        selectors = [
            f"{name} {value}"
            for name, value in (
                ("step", self.step),
                ("calibration", self.calibration),
                ("run", self.run),
                ("batch", self.batch),
            )
            if value is not None
        ]
        jobs = f"jobs of {', '.join(selectors)}" if selectors else "every job"
        tries = "attempt" if self.attempts == 1 else f"{self.attempts} attempts"
        return f"{'':9}    job fault {self.kind}: {jobs}: {self.what()}, first {tries} only"


LS_RANGE = re.compile(r"^([1-9][0-9]*)-([1-9][0-9]*)$")


class RawFaultSpec(StrictModel):
    """LS files that arrive ``corrupt`` (complete but garbled or truncated: ``how``),
    ``late`` (``delay`` scenario seconds after their LS closed), ``twice`` (written again
    ``delay`` seconds after the first time, ``identical`` or with other events) or
    ``never``.

    ``ls`` is one LS number, a list of them or a range ``"first-last"``; ``detector``:
    the stream whose files are hit (default: every detector of the run). The registry
    learns of every LS at its close all the same.
    """

    target: Literal["raw"]
    kind: Literal["corrupt", "late", "twice", "never"]
    run: int = Field(gt=0)
    ls: int | list[int] | str
    detector: str | None = None
    delay: float | None = Field(None, ge=0, description="late (> 0) and twice only")
    how: Literal["truncate", "garble"] = Field("truncate", description="corrupt only")
    identical: bool = Field(True, description="twice only")

    @field_validator("ls")
    @classmethod
    def _ls_numbers(cls, value: int | list[int] | str) -> int | list[int] | str:
        ls_numbers(value)  # a malformed ``ls`` is an error here, where its key is named
        return value

    @model_validator(mode="after")
    def _options_of_kind(self) -> RawFaultSpec:
        for option, kinds in (
            ("delay", ("late", "twice")),
            ("how", ("corrupt",)),
            ("identical", ("twice",)),
        ):
            if option in self.model_fields_set and self.kind not in kinds:
                raise ValueError(
                    f"{option} applies to kind {' and '.join(kinds)} only, not {self.kind}"
                )
        if self.kind == "late" and not self.delay:
            raise ValueError("a late file needs a delay > 0 (scenario seconds after its LS closed)")
        return self

    def lumisections(self) -> list[int]:
        """The LS numbers hit, in order."""
        return ls_numbers(self.ls)

    def note(self) -> str:
        """What happens to a file hit by this fault at its LS close, for ``--dry-run``."""
        if self.kind == "corrupt":
            return f"corrupt ({self.how})"
        if self.kind == "never":
            return "never written"
        return f"{self.kind}: written {self.delay or 0:g} s later" + (
            " again" if self.kind == "twice" else ""
        )

    def rewrite_note(self) -> str:
        """How the file is written apart from its LS close (late, twice), for ``--dry-run``."""
        if self.kind == "late":
            return f"late, {self.delay or 0:g} s after its LS closed"
        return "again, " + ("identical" if self.identical else "with other events")


def ls_numbers(value: int | list[int] | str) -> list[int]:
    """The LS numbers of an ``ls`` key: one number, a list or a range ``"first-last"``."""
    if isinstance(value, int):
        numbers = [value]
    elif isinstance(value, list):
        numbers = value
    else:
        match = LS_RANGE.match(value)
        if match is None or int(match[1]) > int(match[2]):
            raise ValueError(f"{value!r} is not an LS number, a list or a range 'first-last'")
        numbers = list(range(int(match[1]), int(match[2]) + 1))
    if not numbers or min(numbers) < 1:
        raise ValueError(f"{value!r}: LS numbers start at 1")
    return sorted(set(numbers))


def _fault_of(value: Any) -> FaultSpec | JobFaultSpec | RawFaultSpec:
    """Validate one ``faults`` entry as the model of its ``target``: each error then
    names the entry's own keys (``faults.N.key``), as those of any other section."""
    if isinstance(value, FaultSpec | JobFaultSpec | RawFaultSpec):
        return value
    target = _Target.model_validate(value).target
    models: dict[str, type[FaultSpec | JobFaultSpec | RawFaultSpec]] = {
        "job": JobFaultSpec,
        "raw": RawFaultSpec,
    }
    return models.get(target, FaultSpec).model_validate(value)


class _Target(BaseModel):
    """The ``target`` of a ``faults`` entry, checked before the entry itself."""

    model_config = ConfigDict(extra="ignore")
    target: Literal["registry", "conddb", "job", "raw"] = "registry"


AnyFault = Annotated[FaultSpec | JobFaultSpec | RawFaultSpec, PlainValidator(_fault_of)]


class Scenario(StrictModel):
    """A whole scenario file."""

    name: str
    description: str = ""
    seed: int = 12345
    detectors: dict[str, DetectorSpec] = Field(min_length=1)
    runs: list[RunSpec] = Field(min_length=1)
    faults: list[AnyFault] = Field(default_factory=list)

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
        """The faults aimed at the service ``target`` (``registry`` or ``conddb``)."""
        return [f for f in self.faults if isinstance(f, FaultSpec) and f.target == target]

    def service_faults(self) -> list[FaultSpec]:
        """The faults of the registry and of the conditions DB."""
        return [f for f in self.faults if isinstance(f, FaultSpec)]

    def job_faults(self) -> list[JobFaultSpec]:
        """The faults aimed at jobs."""
        return [f for f in self.faults if isinstance(f, JobFaultSpec)]

    def raw_faults(self) -> dict[RawFile, RawFaultSpec]:
        """The raw-file faults by the file they hit (see :meth:`fault_problems` for two
        faults on one file: the last one wins here)."""
        return {file: fault for _, file, fault in self._raw_files()}

    def _raw_files(self) -> Iterator[tuple[int, RawFile, RawFaultSpec]]:
        """(index in ``faults``, file, fault) of every file a raw fault hits."""
        runs = {run.run_number: run for run in self.runs}
        for index, fault in enumerate(self.faults):
            if not isinstance(fault, RawFaultSpec) or fault.run not in runs:
                continue
            detectors = [fault.detector] if fault.detector else self.detectors_of(runs[fault.run])
            for detector in detectors:
                for ls in fault.lumisections():
                    yield index, RawFile(detector, fault.run, ls), fault

    def fault_problems(self) -> list[tuple[Loc, str]]:
        """Job and raw faults that do not fit the runs: (key path, problem)."""
        runs = {run.run_number: run for run in self.runs}
        problems: list[tuple[Loc, str]] = []
        for index, fault in enumerate(self.faults):
            if isinstance(fault, FaultSpec) or fault.run is None:
                continue
            run = runs.get(fault.run)
            if run is None:
                known = ", ".join(map(str, runs))
                problems.append(
                    (("faults", index, "run"), f"run {fault.run} is not one of {known}")
                )
            elif isinstance(fault, RawFaultSpec):
                problems.extend(self._misfits(index, fault, run))
        return problems + self._clashes()

    def _misfits(self, index: int, fault: RawFaultSpec, run: RunSpec) -> list[tuple[Loc, str]]:
        """A raw fault's detector or LS that ``run`` does not have."""
        problems: list[tuple[Loc, str]] = []
        detectors = self.detectors_of(run)
        if fault.detector is not None and fault.detector not in detectors:
            problems.append(
                (
                    ("faults", index, "detector"),
                    f"detector {fault.detector!r} takes no data in run {run.run_number} "
                    f"({', '.join(detectors)})",
                )
            )
        beyond = [ls for ls in fault.lumisections() if ls > run.ls_count]
        if beyond:
            problems.append(
                (
                    ("faults", index, "ls"),
                    f"run {run.run_number} has LS 1-{run.ls_count}, not {beyond}",
                )
            )
        return problems

    def _clashes(self) -> list[tuple[Loc, str]]:
        """Raw faults hitting a file an earlier one hits (the first such file of each)."""
        first: dict[RawFile, int] = {}
        clashes: dict[int, str] = {}
        for index, file, _ in self._raw_files():
            earlier = first.setdefault(file, index)
            if earlier != index and index not in clashes:
                clashes[index] = (
                    f"{file} is already hit by faults.{earlier}: one raw fault per file"
                )
        return [(("faults", index), text) for index, text in clashes.items()]

    def check_faults(self) -> None:
        """Raise :class:`ScenarioError` if a job or raw fault does not fit the runs
        (:func:`load_scenario` reports them with their file and line instead)."""
        problems = self.fault_problems()
        if problems:
            raise ScenarioError(
                "; ".join(f"{'.'.join(map(str, loc))}: {text}" for loc, text in problems)
            )


@dataclass(frozen=True, order=True)
class RawFile:
    """One raw LS file of the scenario."""

    detector: str
    run: int
    ls: int

    def __str__(self) -> str:
        return f"{self.detector} run {self.run} LS {self.ls}"


def load_scenario(path: Path) -> Scenario:
    """Load and validate a scenario file (errors name the file, key and line)."""
    try:
        data, lines, problems = read_yaml(path)
        scenario = validate_model(Scenario, path, data, lines, problems)
    except ConfigError as exc:
        raise ScenarioError("; ".join(exc.problems)) from None
    misfits = scenario.fault_problems()
    if misfits:
        raise ScenarioError(
            "; ".join(f"{location(path, loc, lines)}: {text}" for loc, text in misfits)
        )
    return scenario


# ------------------------------------------------------------------------------ timeline


@dataclass(frozen=True, order=True)
class Event:
    """One thing the player does at scenario time ``at``.

    ``raw_write``: one detector's LS file written apart from its LS close (a ``late`` or
    a ``twice`` raw fault). ``note``: the raw faults of the event, for ``--dry-run``.
    """

    at: float
    order: int  # tie-break: LS files before the run end that follows them
    kind: Literal["run_start", "ls_close", "raw_write", "run_end"]
    run: int
    ls: int = 0
    detector: str = ""
    note: str = field(default="", compare=False)

    def describe(self) -> str:
        """A line for ``--dry-run``."""
        what = {
            "run_start": f"run {self.run} starts",
            "ls_close": f"run {self.run} LS {self.ls} closes (raw files written"
            + (f"; {self.note})" if self.note else ")"),
            "raw_write": f"run {self.run} LS {self.ls} {self.detector} file written {self.note}",
            "run_end": f"run {self.run} ends",
        }[self.kind]
        return f"{self.at:9.2f} s  {what}"


def timeline(scenario: Scenario) -> list[Event]:
    """Every event of the scenario, in play order."""
    raw_faults = scenario.raw_faults()
    events: list[Event] = []
    for run in scenario.runs:
        events.append(Event(run.start, 0, "run_start", run.run_number))
        for ls in range(1, run.ls_count + 1):
            at = run.start + ls * run.ls_seconds
            hit = {
                detector: fault
                for detector in scenario.detectors_of(run)
                if (fault := raw_faults.get(RawFile(detector, run.run_number, ls))) is not None
            }
            note = ", ".join(f"{detector} {fault.note()}" for detector, fault in hit.items())
            events.append(Event(at, 1, "ls_close", run.run_number, ls, note=note))
            for detector, fault in hit.items():
                if fault.kind in ("late", "twice"):
                    write_at = at + (fault.delay or 0.0)
                    events.append(
                        Event(
                            write_at,
                            1,
                            "raw_write",
                            run.run_number,
                            ls,
                            detector,
                            fault.rewrite_note(),
                        )
                    )
        if run.ends:
            events.append(Event(run.end, 2, "run_end", run.run_number))
    return sorted(events)
