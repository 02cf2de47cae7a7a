"""Step-2 worker: raw LS files -> one reco file of the selected events.

Each raw file is checked first (:func:`loop.rawformat.check_raw_ls`: readable, expected
datasets, dtype, the detector's channel count, finite values, events > 0); a bad file
is rejected on its own, named with the reason in the manifest, and the rest of the
batch is processed. Keeps the events of the calibration's trigger types and, when
configured, subtracts the per-event common mode (median of each group of
``common_mode_group`` channels). Output: ``reco.h5`` with ``frames`` [events x
channels], ``trigger`` [events] and the run and LS numbers it covers (good LS only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import atomic_path
from loop.rawformat import TRIGGER_CODES, RawFileError, check_raw_ls, read_raw_ls
from workers.common import WorkerResult, worker_main

OUTPUT = "reco.h5"


def common_mode(frames: np.ndarray, group: int) -> np.ndarray:
    """Subtract the per-event median of each group of ``group`` channels (pure)."""
    values = np.asarray(frames, dtype=np.float64).copy()
    for start in range(0, values.shape[1], group):
        block = values[:, start : start + group]
        block -= np.median(block, axis=1, keepdims=True)
    return values


def select_events(
    frames: np.ndarray, trigger: np.ndarray, config: CalibrationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The events of the configured trigger types, common mode applied if configured."""
    codes = [TRIGGER_CODES[name] for name in config.step2.trigger_types]
    keep = np.isin(trigger, codes)
    selected = frames[keep]
    if config.step2.common_mode_group:
        selected = common_mode(selected, config.step2.common_mode_group)
    return selected, trigger[keep]


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, _args: argparse.Namespace
) -> WorkerResult:
    """Check, read, select, write."""
    result = WorkerResult([OUTPUT])
    channels = config.raw_input.channels
    frames: list[np.ndarray] = []
    triggers: list[np.ndarray] = []
    lumis: list[int] = []
    run_number = None
    for path in sorted(inputs):
        try:
            content = read_raw_ls(path)
            check_raw_ls(path, content, channels)
            if run_number is not None and content.run != run_number:
                raise RawFileError(path, f"belongs to run {content.run}, not {run_number}")
        except RawFileError as exc:
            result.reject(path, exc.reason, "reco")
            continue
        run_number = content.run
        selected, trigger = select_events(content.frames, content.trigger, config)
        frames.append(selected)
        triggers.append(trigger)
        lumis.append(content.ls)
    with atomic_path(output_dir / OUTPUT, ".h5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset(
            "frames",
            # every LS rejected: an empty output, so downstream sees a run with no events
            data=np.concatenate(frames) if frames else np.empty((0, channels), np.uint16),
            compression="gzip",
            compression_opts=1,
            shuffle=True,
        )
        h5.create_dataset(
            "trigger", data=np.concatenate(triggers) if triggers else np.empty(0, np.uint8)
        )
        h5.attrs.update(run=run_number or 0, lumisections=lumis, calibration=config.name)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.reco``."""
    return worker_main("reco", run, argv)


if __name__ == "__main__":
    sys.exit(main())
