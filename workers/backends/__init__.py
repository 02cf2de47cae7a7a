"""Job backends: where the daemons run their workers (local subprocesses, Slurm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the wrapper imports this package in every job: keep it light
    from loop.config import CalibrationConfig, LoopConfig
    from workers.backends.base import Backend


def make_backend(loop_config: LoopConfig, calibration: CalibrationConfig) -> Backend:
    """The backend the calibration (or, by default, loop.yaml) selects."""
    name = calibration.backend or loop_config.jobs.backend
    if name == "slurm":
        from workers.backends.slurm import SlurmBackend

        return SlurmBackend(loop_config.jobs.slurm, calibration.name)
    from workers.backends.local import LocalBackend

    local = loop_config.jobs.local
    return LocalBackend(local.max_parallel, warm_pool=local.warm_pool)
