"""Step-2 worker: raw LS files -> one reco file of the selected events.

Each raw file is checked first (:func:`loop.rawformat.check_raw_ls`: readable, expected
datasets, dtype, the detector's channel count, finite values, events > 0); a bad file
is rejected on its own, named with the reason in the manifest, and the rest of the
batch is processed. Keeps the events of the calibration's trigger types and, when
configured, subtracts the per-event common mode (median of each group of
``common_mode_group`` channels). Output: ``reco.h5`` with ``frames`` [events x
channels], ``trigger`` [events] and the run and LS numbers it covers (good LS only).

The output is read once, by the ALCA job on the same site: it is written uncompressed
(deflating it cost more than all the rest of the job), each LS's selection as soon as it
is made (:class:`RowWriter`), while the next LS's chunks inflate in a few threads.
Earlier versions wrote a plain gzip-compressed ``frames``; ALCA reads both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import atomic_path
from loop.rawformat import TRIGGER_CODES, RawFileError, RawLS, check_raw_ls, start_reading_raw_ls
from workers.common import WorkerResult, job_threads, worker_main

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
    if keep.all():  # e.g. every trigger type kept: no copy
        selected, kept = frames, trigger
    else:
        selected, kept = frames[keep], trigger[keep]
    if config.step2.common_mode_group:
        selected = common_mode(selected, config.step2.common_mode_group)
    return selected, kept


SELECTED = "selected"
"""Group of the per-LS datasets that ``frames`` stacks."""


class RowWriter:
    """The reco file's events, written LS by LS as each is selected.

    Each LS's selected rows go into a contiguous dataset of their own
    (``selected/NNNN``, in input order, attribute ``ls``): written once at their exact
    size, no concatenated copy, no resizing, one LS in memory besides the read-ahead. At
    the end ``frames`` [events x channels] is a virtual dataset stacking them (source
    file ``.``: this file, whatever it is renamed to), so readers see what they saw
    before; its dtype is numpy's concatenation dtype of the parts (HDF5 converts on read;
    every promotion among the frame dtypes is exact). ``trigger`` is a plain dataset.
    """

    def __init__(self, h5: h5py.File, channels: int) -> None:
        self.h5, self.channels = h5, channels
        self.parts: list[h5py.Dataset] = []
        self.dtypes: list[np.dtype] = []
        self.triggers: list[np.ndarray] = []

    def append(self, ls: int, frames: np.ndarray, trigger: np.ndarray) -> None:
        """Write one LS's selected events."""
        self.dtypes.append(frames.dtype)
        self.triggers.append(trigger)
        if len(frames):
            part = self.h5.create_dataset(f"{SELECTED}/{len(self.parts):04d}", data=frames)
            part.attrs["ls"] = ls
            self.parts.append(part)

    def close(self) -> None:
        """Write ``trigger`` and ``frames``; with no event (every LS or every event
        rejected), an empty ``frames``, so downstream sees a run with no events."""
        dtype = np.result_type(*self.dtypes) if self.dtypes else np.dtype(np.uint16)
        triggers = np.concatenate(self.triggers) if self.triggers else np.empty(0, np.uint8)
        self.h5.create_dataset("trigger", data=triggers)
        if not self.parts:
            self.h5.create_dataset("frames", shape=(0, self.channels), dtype=dtype)
            return
        layout = h5py.VirtualLayout(shape=(len(triggers), self.channels), dtype=dtype)
        start = 0
        for part in self.parts:
            source = h5py.VirtualSource(".", part.name, shape=part.shape, dtype=part.dtype)
            layout[start : start + part.shape[0]] = source
            start += part.shape[0]
        self.h5.create_virtual_dataset("frames", layout)


def _read_ahead(
    paths: list[Path], pool: ThreadPoolExecutor
) -> Iterator[tuple[Path, Callable[[], RawLS]]]:
    """Each file with what waits for its content; the next file's read is started before
    a file is handed out, so its chunks inflate while this one is selected and written."""
    started = None
    for path in paths:
        following = (path, start_reading_raw_ls(path, pool))
        if started is not None:
            yield started
        started = following
    if started is not None:
        yield started


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, _args: argparse.Namespace
) -> WorkerResult:
    """Check, read, select, write."""
    result = WorkerResult([OUTPUT])
    channels = config.raw_input.channels
    lumis: list[int] = []
    run_number = None
    with (
        ThreadPoolExecutor(job_threads(), thread_name_prefix="inflate") as pool,
        atomic_path(output_dir / OUTPUT, ".h5") as tmp,
        h5py.File(tmp, "w") as h5,
    ):
        output = RowWriter(h5, channels)
        for path, wait in _read_ahead(sorted(inputs), pool):
            try:
                content = wait()
                check_raw_ls(path, content, channels)
                if run_number is not None and content.run != run_number:
                    raise RawFileError(path, f"belongs to run {content.run}, not {run_number}")
            except RawFileError as exc:
                result.reject(path, exc.reason, "reco")
                continue
            run_number = content.run
            output.append(content.ls, *select_events(content.frames, content.trigger, config))
            lumis.append(content.ls)
        output.close()
        h5.attrs.update(run=run_number or 0, lumisections=lumis, calibration=config.name)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.reco``."""
    return worker_main("reco", run, argv)


if __name__ == "__main__":
    sys.exit(main())
