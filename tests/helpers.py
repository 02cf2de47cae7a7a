"""Shared test helpers: the one-shot numpy reference and workspace set-up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loop.config import CalibrationConfig, LoopConfig, load_calibration, load_loop_config
from loop.demo import write_workspace
from loop.rawformat import TRIGGER_CODES, parse_raw_name, raw_path, read_raw_ls
from tests.conftest import REPO
from workers.accumulators import ChannelStats
from workers.algorithms import compute_payload


def one_shot_stats(frames: np.ndarray, threshold: float) -> ChannelStats:
    """Statistics computed in one numpy pass (no merging): the reference."""
    values = frames.astype(np.float64)
    return ChannelStats(
        count=values.shape[0],
        mean=values.mean(0),
        m2=values.var(0) * values.shape[0],
        minimum=values.min(0),
        maximum=values.max(0),
        occupancy=(values > threshold).sum(0).astype(np.int64),
    )


def reference_payload(
    raw_root: Path, cal: CalibrationConfig, run: int | list[int], exclude: tuple[int, ...] = ()
) -> tuple[np.ndarray, int]:
    """The payload of ``run`` (or of several runs together) from all its raw files (but
    the LS in ``exclude``) at once; returns (array, events)."""
    files = []
    for number in [run] if isinstance(run, int) else run:
        directory = raw_path(raw_root, cal.raw_input.stream, number, 1).parent
        parsed = {path: parse_raw_name(path) for path in directory.glob("*.h5")}
        files += sorted(p for p, key in parsed.items() if key is not None and key[1] not in exclude)
    contents = [read_raw_ls(f) for f in files]
    frames = np.concatenate([c.frames for c in contents])
    trigger = np.concatenate([c.trigger for c in contents])
    accumulators = {
        name: one_shot_stats(frames[trigger == TRIGGER_CODES[name]], cal.step3.occupancy_threshold)
        for name in cal.step2.trigger_types
    }
    return compute_payload(accumulators, cal).array, accumulators["pedestal"].count


def workspace(tmp_path: Path, **overrides: object) -> LoopConfig:
    """A loop.yaml + calibrations under ``tmp_path`` (see ``loop.demo.write_workspace``)."""
    return load_loop_config(write_workspace(tmp_path, **overrides))  # type: ignore[arg-type]


def calibration(loop_config: LoopConfig, name: str) -> CalibrationConfig:
    """A calibration of the workspace."""
    return load_calibration(loop_config.calibrations_dir / f"{name}.yaml")


def kill_a_writer(
    root: Path, start: int, wait_s: float, committed: dict[int, str], retired: set[str]
) -> int:
    """Run tests/store_crash_child.py from version ``start``, SIGKILL it after ``wait_s``
    of writing, and record what it reported as done; returns the next start."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.store_crash_child", str(root), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    assert child.stdout is not None
    ready = child.stdout.readline()  # start-up takes what it takes on a busy machine
    time.sleep(wait_s)  # then a moment of the writing
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=10)
    for line in (ready + out).splitlines():
        words = line.split()
        if words[0] == "added":
            committed[int(words[1])] = words[2]
        elif words[0] == "retired":
            retired.add(words[1])
    return max(committed, default=start - 1) + 1
