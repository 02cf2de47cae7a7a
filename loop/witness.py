"""Witness files: the contract between steps (which may run on different machines).

A witness is JSON written atomically only after every output it lists is complete:
run, step, batch, inputs, outputs (path, size, SHA-256), job id, host, start/end,
exit code, attempts. Completion markers (``run.end``, ``step3.done``) are witnesses of a
run's end: they list every witness of the run and every batch given up on.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from loop.errors import CalloopError
from loop.fsutil import atomic_write_json, sha256_file

WITNESS_SUFFIX = ".witness.json"
T = TypeVar("T", bound=BaseModel)


class WitnessError(CalloopError):
    """A witness or marker file is unreadable, invalid, or its outputs do not match."""


class Output(BaseModel):
    """One output file a witness vouches for."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    size: int
    sha256: str


class Witness(BaseModel):
    """What a finished job produced."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calibration: str
    run: int
    step: str
    batch: int
    inputs: list[str]
    outputs: list[Output]
    job_id: str
    host: str
    start: float | None
    end: float | None
    exit_code: int
    attempts: int


class Marker(BaseModel):
    """A step's completion marker for a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calibration: str
    run: int
    step: str
    witnesses: list[str]
    failed_batches: list[int]
    reason: str
    written: float
    host: str


def describe_outputs(paths: list[Path]) -> list[Output]:
    """Sizes and hashes of complete output files."""
    return [Output(path=str(p), size=p.stat().st_size, sha256=sha256_file(p)) for p in paths]


def write_witness(path: Path, witness: Witness) -> None:
    """Write a witness atomically (after its outputs are complete)."""
    atomic_write_json(path, witness.model_dump(mode="json"))


def write_marker(path: Path, **fields: Any) -> Marker:
    """Write a completion marker atomically."""
    marker = Marker(written=time.time(), host=socket.gethostname(), **fields)
    atomic_write_json(path, marker.model_dump(mode="json"))
    return marker


def _load(model: type[T], path: Path) -> T:
    try:
        return model.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise WitnessError(f"{path}: missing") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise WitnessError(f"{path}: not a valid {model.__name__.lower()} ({exc})") from None


def read_witness(path: Path, *, verify: bool = True) -> Witness:
    """Read a witness; with ``verify`` check every output's size (cheap) exists."""
    witness = _load(Witness, path)
    if verify:
        for output in witness.outputs:
            try:
                size = Path(output.path).stat().st_size
            except OSError:
                raise WitnessError(f"{path}: output {output.path} is missing") from None
            if size != output.size:
                raise WitnessError(
                    f"{path}: output {output.path} has {size} bytes, the witness says {output.size}"
                )
    return witness


def read_marker(path: Path) -> Marker:
    """Read a completion marker."""
    return _load(Marker, path)
