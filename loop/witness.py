"""Witness files: the contract between steps (which may run on different machines).

A witness is JSON written atomically only after every output it lists is complete:
run, step, batch, inputs, outputs (path, size, SHA-256), the inputs the job rejected,
the hash of the job's frozen configuration, job id, host, start/end, exit code,
attempts. The downstream step verifies every output's SHA-256 and refuses outputs
outside the job's own directory (:func:`verify_witness`).

Completion markers (``run.end``, ``step3.done``) are witnesses of a run's end: they
carry every witness of the run (in full, so a witness file deleted or damaged later is
recovered from the marker), every batch given up on and every input rejected upstream.
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
from loop.manifest import BadInput

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
    bad_inputs: list[BadInput] = []
    config_sha256: str = ""


class Marker(BaseModel):
    """A step's completion marker for a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calibration: str
    run: int
    step: str
    witnesses: dict[str, Witness]  # path -> content
    failed_batches: list[int]
    bad_inputs: dict[str, str] = {}  # input -> reason, this step's and upstream's
    reason: str
    written: float
    host: str


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


def read_witness(path: Path) -> Witness:
    """Read a witness (its outputs are checked by :func:`verify_witness`)."""
    return _load(Witness, path)


def job_dir_of(path: Path) -> Path:
    """The job directory a witness at ``path`` speaks for (``batchNNNN`` beside it)."""
    return path.with_name(path.name.removesuffix(WITNESS_SUFFIX))


def verify_witness(path: Path, witness: Witness, *, run: int, step: str) -> list[str]:
    """Check a witness found at ``path`` before its outputs are used; return their paths.

    The witness must speak for the run, step and batch its location says, every output
    must lie inside that job's directory (symbolic links resolved), and every output
    must have the size and SHA-256 the witness records.
    """
    job_dir = job_dir_of(path)
    where = (witness.run, witness.step, f"batch{witness.batch:04d}")
    if where != (run, step, job_dir.name):
        raise WitnessError(
            f"{path}: says run {witness.run} {witness.step} batch {witness.batch}, "
            f"but lies at run {run} {step} {job_dir.name}"
        )
    inside = job_dir.resolve()
    paths = []
    for output in witness.outputs:
        file = Path(output.path)
        if not file.resolve().is_relative_to(inside):
            raise WitnessError(f"{path}: output {file} lies outside the job directory {job_dir}")
        try:
            size = file.stat().st_size
            digest = sha256_file(file)
        except OSError:
            raise WitnessError(f"{path}: output {file} is missing or unreadable") from None
        if (size, digest) != (output.size, output.sha256):
            raise WitnessError(f"{path}: output {file} does not match its recorded SHA-256")
        paths.append(str(file))
    return paths


def read_marker(path: Path) -> Marker:
    """Read a completion marker."""
    return _load(Marker, path)
