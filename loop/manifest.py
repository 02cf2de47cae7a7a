"""Job manifests: what a worker declares it produced, written last and atomically.

A job's outputs are exactly the files its ``out/manifest.json`` names, never a
directory listing, so a temporary file left by a worker killed mid-write can never
become an output. The manifest also lists the inputs the worker rejected (with the
reason) and the SHA-256 of the frozen configuration it ran with. Experiment commands
configured with ``stepN.command`` follow the same contract (see :func:`write_manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from loop.errors import CalloopError
from loop.fsutil import atomic_write_json, sha256_file

MANIFEST = "manifest.json"


class ManifestError(CalloopError):
    """A manifest is missing or invalid, or an output does not match it."""


class DeclaredOutput(BaseModel):
    """One output file, by its name inside the job's output directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    size: int
    sha256: str


class BadInput(BaseModel):
    """An input the worker rejected, and why (the rest of its inputs were processed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input: str
    reason: str


class Manifest(BaseModel):
    """What a job produced."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    outputs: list[DeclaredOutput]
    bad_inputs: list[BadInput] = []
    config_sha256: str | None = None


def write_manifest(
    output_dir: Path,
    names: list[str],
    bad_inputs: list[BadInput] | None = None,
    config_sha256: str | None = None,
) -> Manifest:
    """Declare the complete files ``names`` of ``output_dir`` (call it last)."""
    outputs = []
    for name in names:
        path = output_dir / name
        outputs.append(
            DeclaredOutput(name=name, size=path.stat().st_size, sha256=sha256_file(path))
        )
    manifest = Manifest(outputs=outputs, bad_inputs=bad_inputs or [], config_sha256=config_sha256)
    atomic_write_json(output_dir / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def read_manifest(output_dir: Path) -> Manifest:
    """The manifest of a finished job, every declared output checked against it.

    Names must be plain file names inside ``output_dir`` (no directories, no links out),
    and each file must have the declared size and SHA-256.
    """
    path = output_dir / MANIFEST
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (the worker declared no outputs)") from None
    except (OSError, ValueError, ValidationError) as exc:
        raise ManifestError(f"{path}: not a valid manifest ({exc})") from None
    for output in manifest.outputs:
        file = output_dir / output.name
        if Path(output.name).name != output.name or output.name in ("", ".", ".."):
            raise ManifestError(
                f"{path}: output {output.name!r} is not a file name in {output_dir}"
            )
        if file.is_symlink() or not file.is_file():
            raise ManifestError(f"{path}: declared output {file} is missing or not a plain file")
        if file.stat().st_size != output.size or sha256_file(file) != output.sha256:
            raise ManifestError(f"{path}: declared output {file} does not match its checksum")
    return manifest
