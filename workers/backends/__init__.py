"""Job backends: where the daemons run their workers (local subprocesses, Slurm)."""

from __future__ import annotations

from loop.config import CalibrationConfig, LoopConfig
from loop.errors import ConfigError
from workers.backends.base import Backend


def make_backend(loop_config: LoopConfig, calibration: CalibrationConfig) -> Backend:
    """The backend the calibration (or, by default, loop.yaml) selects."""
    name = calibration.backend or loop_config.jobs.backend
    if name == "slurm":
        raise ConfigError(
            [
                f"calibration {calibration.name}: backend 'slurm' is not available "
                "in this version; use 'local'"
            ]
        )
    from workers.backends.local import LocalBackend

    return LocalBackend(loop_config.jobs.local.max_parallel)
