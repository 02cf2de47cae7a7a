"""Step 4's view of the calibrations it depends on (``depends_on``).

If B depends on A, B's step 4 harvests a run only once A's step 4 has finished that run:
B reads A's journals **read-only** (``<work_dir>/<A>/step<N>.journal.sqlite``; a missing
journal or row means A has not seen the run yet) and never writes there. A finished run
of A is one of:

- ``Done`` with an accepted store version: B harvests with that payload;
- without one: ``Done`` with no payload, ``Rejected``, ``UploadRefused``, ``Skipped``
  or ``Failed`` in its step 4, or ``Skipped``/``Failed`` in its step 2 or 3 (not
  selected, closed by an operator, quarantined: the run will not reach A's step 4 by
  itself). B then follows its ``step4.on_dependency_missing``: ``use_previous`` (the
  default) takes A's newest accepted payload valid for the run from the store, and the
  run fails if there is none; ``wait`` waits until A has an accepted payload (an operator
  retries or reruns A's run); ``fail`` sends B's run to Failed with A's state as reason.

What B used is recorded as :class:`DependencyInput` rows (calibration, detector, ctype,
version and why that version) in ``run<R>/step4/dependencies.json``; each harvest job
gets its own copy and the payloads as ``.npy`` files (:func:`stage`), and the stored
version's metadata and ``summary.json`` name them (provenance).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import CalibrationConfig, DependencyPolicy
from loop.errors import CalloopError, StoreError
from loop.fsutil import atomic_path, atomic_write_json
from loop.runrecord import RunRecord
from loop.store import CalibStore

STEP4_FINAL = ("Done", "Rejected", "UploadRefused", "Skipped", "Failed")
"""A dependency's step-4 states after which it does nothing more for the run by itself
(a Failed run waits for an operator)."""
STOPPED_UPSTREAM = ("Skipped", "Failed")
"""States of a dependency's step 2 or 3 that keep the run from reaching its step 4."""
RESOLVED = "dependencies.json"
"""The resolved inputs of a run (run directory) or of one harvest job (job directory)."""
STAGED_DIR = "dependencies"
"""Subdirectory of a harvest job holding one ``<Calibration>.npy`` per dependency."""


class DependencyError(CalloopError):
    """A run cannot be harvested: a dependency has no usable payload for it."""


@dataclass(frozen=True)
class DependencyState:
    """Where a dependency is with one run."""

    name: str
    step: str | None  # the step whose state decides (None: no step has seen the run)
    state: str | None
    accepted_version: str | None = None  # its step 4's accepted store version, if any

    @property
    def finished(self) -> bool:
        """The dependency does nothing more for the run by itself."""
        if self.step == "step4":
            return self.state in STEP4_FINAL
        return self.state in STOPPED_UPSTREAM

    @property
    def accepted(self) -> bool:
        """Finished with a payload that passed validation and is in the conditions DB."""
        return self.step == "step4" and self.state == "Done" and self.accepted_version is not None

    def describe(self) -> str:
        """One phrase for status lines and errors, e.g. ``A: Failed in step4``."""
        if self.state is None:
            return f"{self.name}: run not seen yet"
        if self.accepted:
            return f"{self.name}: Done, version {self.accepted_version}"
        if self.step == "step4" and self.state == "Done":
            return f"{self.name}: Done without a payload"
        return f"{self.name}: {self.state} in {self.step}"


@dataclass(frozen=True)
class DependencyInput:
    """One dependency payload a harvest uses (provenance)."""

    calibration: str
    detector: str
    ctype: str
    version: str
    source: str  # "final": the dependency's payload of this run; "previous": policy

    def to_json(self) -> dict[str, str]:
        """The stored form."""
        return asdict(self)


def _query(journal: Path, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` in another daemon's journal, opened read-only (none: no journal)."""
    if not journal.exists():
        return []
    try:
        db = sqlite3.connect(f"{journal.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise DependencyError(f"cannot read the journal {journal} ({exc})") from exc


def _read_row(journal: Path, run: int) -> tuple[str, dict[str, Any]] | None:
    """(state, info) of ``run`` in another daemon's journal (None: no journal, or the
    run is not in it)."""
    rows = _query(journal, "SELECT state, info FROM runs WHERE run=?", (run,))
    return (str(rows[0][0]), dict(json.loads(rows[0][1]))) if rows else None


def runs_before(work_dir: Path, name: str, run: int) -> list[int]:
    """The runs before ``run`` that calibration ``name``'s step 2 has seen (read-only;
    its journal is where every run of the calibration starts), ascending."""
    journal = work_dir / name / "step2.journal.sqlite"
    rows = _query(journal, "SELECT run FROM runs WHERE run<? ORDER BY run", (run,))
    return [int(row[0]) for row in rows]


def dependency_state(work_dir: Path, name: str, run: int) -> DependencyState:
    """Where calibration ``name`` is with ``run``: its step 4 if it has seen the run,
    else a step 3 or 2 that stopped it, else the furthest step that has it (None: no
    step has seen it yet)."""
    found = _read_row(work_dir / name / "step4.journal.sqlite", run)
    if found is not None:
        state, info = found
        version = RunRecord.from_json(info).accepted_version
        return DependencyState(name, "step4", state, version)
    upstream = {
        step: row[0]
        for step in ("step3", "step2")
        if (row := _read_row(work_dir / name / f"{step}.journal.sqlite", run)) is not None
    }
    stopped = [step for step, state in upstream.items() if state in STOPPED_UPSTREAM]
    step = stopped[0] if stopped else next(iter(upstream), None)
    return DependencyState(name, step, None if step is None else upstream[step])


def awaited(states: list[DependencyState], policy: DependencyPolicy) -> tuple[str, ...]:
    """The dependencies a run still waits for under ``policy`` (described); empty: the
    run may go on (and :func:`resolve` decides what it uses)."""
    return tuple(
        s.describe() for s in states if not s.finished or (policy == "wait" and not s.accepted)
    )


def resolve(
    run: int,
    states: list[DependencyState],
    configs: dict[str, CalibrationConfig],
    store: CalibStore,
    policy: DependencyPolicy,
) -> list[DependencyInput]:
    """The payload version of each finished dependency the run's harvests use: its
    accepted version of the run, else (``use_previous``) its newest accepted version
    valid for the run. Raises :class:`DependencyError` under ``fail`` or when no
    version is usable."""
    inputs = []
    for state in states:
        config = configs[state.name]
        final = state.accepted_version if state.accepted else None
        if final is not None:
            version, source = final, "final"
        elif policy == "fail":
            raise DependencyError(
                f"run {run}: dependency {state.describe()} (step4.on_dependency_missing: fail)"
            )
        else:
            version, source = _previous_version(run, state, config, store), "previous"
        inputs.append(
            DependencyInput(state.name, config.detector, config.payload.ctype, version, source)
        )
    return inputs


def _previous_version(
    run: int, state: DependencyState, config: CalibrationConfig, store: CalibStore
) -> str:
    """The dependency's accepted (not retired) version valid for ``run``."""
    try:
        constants = store.detector(config.detector).get(config.payload.ctype, run=run)
    except StoreError as exc:
        raise DependencyError(
            f"run {run}: dependency {state.describe()} and no earlier payload to use "
            f"(step4.on_dependency_missing: use_previous): {exc}"
        ) from exc
    if constants.retired:
        raise DependencyError(
            f"run {run}: dependency {state.describe()}; its payload valid for the run, "
            f"{constants.version}, is retired"
        )
    return constants.version


def write_inputs(path: Path, inputs: list[DependencyInput]) -> None:
    """Record resolved inputs (a run's, or one job's copy)."""
    atomic_write_json(path, [i.to_json() for i in inputs])


def read_inputs(path: Path) -> list[DependencyInput]:
    """Resolved inputs recorded at ``path`` (none when there is no file: no dependency)."""
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise DependencyError(f"{path}: unreadable dependency record ({exc})") from exc
    return [DependencyInput(**row) for row in rows]


def stage(job_dir: Path, inputs: list[DependencyInput], store: CalibStore) -> dict[str, Path]:
    """Write each input's payload from the store into ``job_dir`` as
    ``dependencies/<Calibration>.npy`` and the job's copy of the inputs; returns the
    ``.npy`` path by calibration. Idempotent: a version's bytes never change."""
    write_inputs(job_dir / RESOLVED, inputs)
    paths: dict[str, Path] = {}
    for item in inputs:
        constants = store.detector(item.detector).get(item.ctype, version=item.version)
        path = paths[item.calibration] = job_dir / STAGED_DIR / f"{item.calibration}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(constants.array), allow_pickle=False)
    return paths
