"""The frozen configuration a job runs with.

When a job is created, the effective calibration configuration (every default resolved)
is written into its job directory as canonical JSON, and its SHA-256 is recorded in the
journal. Workers read only that file, so editing, breaking or deleting the live YAML
never changes or fails a job that already exists, a retry runs with exactly the
configuration of its first attempt, and every payload can name the configuration it
was derived from (``config_sha256`` in the witness, ``summary.json`` and the upload).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import ValidationError

from loop.config import CalibrationConfig
from loop.errors import ConfigError
from loop.fsutil import atomic_write_bytes

FROZEN_CONFIG = "calibration.json"


def freeze(config: CalibrationConfig, job_dir: Path) -> tuple[Path, str]:
    """Write ``config`` into ``job_dir``; return its path and SHA-256."""
    blob = config.canonical_json()
    path = job_dir / FROZEN_CONFIG
    atomic_write_bytes(path, blob)
    return path, hashlib.sha256(blob).hexdigest()


def load_frozen(path: Path, expected_sha256: str | None = None) -> CalibrationConfig:
    """Read a frozen configuration; with ``expected_sha256``, refuse one that changed."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the job's configuration ({exc})"]) from None
    actual = hashlib.sha256(blob).hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise ConfigError(
            [f"{path}: SHA-256 {actual[:12]}... differs from the job's {expected_sha256[:12]}..."]
        )
    try:
        return CalibrationConfig.model_validate_json(blob)
    except ValidationError as exc:
        raise ConfigError([f"{path}: not a valid frozen configuration ({exc})"]) from None
