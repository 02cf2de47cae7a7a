"""Worker throughput (reco, alca, harvest) beside an h5py read of the same files, in one run.

Run: ``python benchmarks/worker_bench.py [--repeat 5] [--data-dir DIR]``; for the code before
this round: ``PYTHONPATH=/work/baseline python benchmarks/worker_bench.py --data-dir DIR``
(the header names the code that ran). Each scenario generates a run's raw LS files with the
simulated detector (``loop.sim.detector``, gzip + shuffle as the detector writes them), then,
interleaved in every repetition: h5py reads the raw files; the reco job (``workers.reco.main``
with a frozen calibration, manifest included) turns them into one reco file; h5py reads that;
the ALCA job reduces it; the harvest job merges and computes the payload; h5py reads the ALCA
output. Prints medians, MB/s of uncompressed frames (the harvest: MB/s of its input files)
and the ratio to the h5py read of the same input, and the SHA-256 of the payload so two runs
(before/after) can be compared byte for byte. With ``--data-dir`` the raw files are kept and
reused, so both runs read identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: baseline wins
import loop
from benchmarks._common import table
from loop.config import CalibrationConfig, load_calibration, load_loop_config
from loop.demo import write_workspace
from loop.jobconfig import freeze
from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec
from workers import alca, harvest, reco

RUN = 424242


@dataclass(frozen=True)
class Scenario:
    """One detector and calibration: a reco job of ``files`` LS, its ALCA and harvest."""

    name: str
    calibration: str
    channels: int
    events: int
    files: int


SCENARIOS = (
    Scenario("tracker 2,048 ch, SiStripBad (every event kept)", "SiStripBad", 2048, 200, 8),
    Scenario("ECAL 75,848 ch, EcalPedestals (pedestal events)", "EcalPedestals", 75_848, 200, 8),
    Scenario("ECAL 75,848 ch, SiStripBad (every event kept)", "SiStripBad", 75_848, 200, 8),
)


def _calibration(root: Path, scenario: Scenario) -> CalibrationConfig:
    loop_config = load_loop_config(write_workspace(root / "ws"))
    cal = load_calibration(loop_config.calibrations_dir / f"{scenario.calibration}.yaml")
    raw_input = cal.raw_input.model_copy(update={"channels": scenario.channels})
    return cal.model_copy(update={"raw_input": raw_input})


def _raw_files(data_dir: Path, scenario: Scenario, stream: str) -> list[Path]:
    """The scenario's raw files, generated once (deterministic in the seed)."""
    spec = DetectorSpec(channels=scenario.channels, events_per_ls=scenario.events)
    root = data_dir / f"{scenario.channels}ch_{scenario.events}ev"
    paths = [raw_path(root, stream, RUN, ls) for ls in range(1, scenario.files + 1)]
    truth = None
    for ls, path in enumerate(paths, start=1):
        if path.exists():
            continue
        truth = truth or make_truth(spec, seed=3)
        content = generate_ls(
            spec, truth, detector=stream, run=RUN, ls=ls, seed=3, start_time=0, end_time=1
        )
        write_raw_ls(path, content)
    return paths


def _read_all(paths: list[Path]) -> None:
    """h5py reads every dataset of every file (what a job cannot beat without tricks)."""
    for path in paths:
        with h5py.File(path, "r") as h5:
            h5.visititems(lambda _name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)


def _job(module: Callable[[list[str]], int], config: Path, out: Path, *inputs: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    code = module(["--calibration", str(config), "--output-dir", str(out), *map(str, inputs)])
    if code != 0:
        raise SystemExit(f"{module.__module__} exited {code}")


def _timed(samples: dict[str, list[float]], key: str, fn: Callable[[], None]) -> None:
    start = time.perf_counter()
    fn()
    samples.setdefault(key, []).append(time.perf_counter() - start)


def _row(what: str, megabytes: float, seconds: float, reference: float) -> list[object]:
    """A table row; the ratio is to the h5py read rate of the same input (``reference``)."""
    return [what, megabytes, seconds, megabytes / seconds, megabytes / seconds / reference]


def run_scenario(scenario: Scenario, data_dir: Path, work: Path, repeat: int) -> None:
    """Measure one scenario and print its table."""
    cal = _calibration(work, scenario)
    raw = _raw_files(data_dir, scenario, cal.raw_input.stream)
    config, _sha = freeze(cal, work / "job")
    reco_out, alca_out, harvest_out = work / "reco", work / "alca", work / "harvest"
    reco_file, alca_file = reco_out / reco.OUTPUT, alca_out / alca.OUTPUT
    samples: dict[str, list[float]] = {}
    for _ in range(repeat):  # interleaved: every measurement sees the same machine load
        _timed(samples, "raw", lambda: _read_all(raw))
        _timed(samples, "reco", lambda: _job(reco.main, config, reco_out, *raw))
        _timed(samples, "reco read", lambda: _read_all([reco_file]))
        _timed(samples, "alca", lambda: _job(alca.main, config, alca_out, reco_file))
        _timed(samples, "harvest", lambda: _job(harvest.main, config, harvest_out, alca_file))
        _timed(samples, "alca read", lambda: _read_all([alca_file]))
    median = {key: statistics.median(values) for key, values in samples.items()}
    frames_mb = scenario.files * scenario.events * scenario.channels * 2 / 1e6
    alca_mb = alca_file.stat().st_size / 1e6
    raw_rate, alca_rate = frames_mb / median["raw"], alca_mb / median["alca read"]
    rows = [
        _row("h5py read, raw files", frames_mb, median["raw"], raw_rate),
        _row("reco job", frames_mb, median["reco"], raw_rate),
        _row("h5py read, reco output", frames_mb, median["reco read"], raw_rate),
        _row("alca job", frames_mb, median["alca"], raw_rate),
        _row("h5py read, alca output", alca_mb, median["alca read"], alca_rate),
        _row("harvest job", alca_mb, median["harvest"], alca_rate),
    ]
    raw_disk = sum(p.stat().st_size for p in raw) / 1e6
    table(
        f"{scenario.name}: {scenario.files} LS x {scenario.events} events "
        f"({frames_mb:.0f} MB of frames; raw {raw_disk:.0f} MB, reco output "
        f"{reco_file.stat().st_size / 1e6:.0f} MB on disk), median of {repeat}",
        ["what", "input MB", "median s", "MB/s", "vs h5py read"],
        rows,
    )
    digest = hashlib.sha256((harvest_out / harvest.PAYLOAD).read_bytes()).hexdigest()
    summary = hashlib.sha256((harvest_out / harvest.SUMMARY).read_bytes()).hexdigest()
    print(f"  payload.npy sha256 {digest}  summary.json sha256 {summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, help="keep and reuse the raw files here")
    parser.add_argument(
        "--only", type=int, nargs="*", help="indices of the scenarios to run (default: all)"
    )
    args = parser.parse_args()
    print(f"code under test: {Path(loop.__file__).resolve().parent.parent}")
    chosen = [SCENARIOS[i] for i in args.only] if args.only else list(SCENARIOS)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        for n, scenario in enumerate(chosen):
            run_scenario(scenario, data_dir, Path(tmp) / f"work{n}", args.repeat)


if __name__ == "__main__":
    main()
