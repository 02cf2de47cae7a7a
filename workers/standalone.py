"""A payload derived in-process from raw LS or reco files, without any daemon.

The reco, ALCA and harvest workers run one after the other through their own ``main()``,
with the calibration's frozen configuration and the command lines the daemons' jobs get,
so the payload is the one the automatic system would compute from the same events (to
the rounding of merging the statistics in another grouping). Nothing here touches a
registry, a journal, the store or the conditions DB: the caller decides where the
payload goes. Used by ``calloop calibrations check`` (a dry run on simulated data) and
``calloop calibrations run`` (a payload from existing files).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loop.config import CalibrationConfig
from loop.errors import CalloopError
from loop.jobconfig import freeze
from loop.manifest import BadInput, ManifestError, read_manifest
from workers import alca, harvest, reco
from workers.kinds.base import Payload

RAW, RECO = "raw", "reco"


class StandaloneError(CalloopError):
    """A worker failed or an input is neither a raw LS file nor a reco output."""


@dataclass(frozen=True)
class Derived:
    """A derived payload, where it was written and what went into it."""

    payload: Payload
    payload_path: Path  # the harvest's payload.npy
    config_sha256: str  # of the frozen configuration the workers ran with
    runs: list[int]  # the runs of the events used, ascending
    rejected: list[BadInput]  # inputs a worker set aside, with the reason


def file_kind(path: Path) -> tuple[str, int]:
    """(:data:`RAW` for a raw LS file or :data:`RECO` for a reco output, the run it
    says it belongs to); anything else is a :class:`StandaloneError` naming the file."""
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            has_frames = "frames" in h5
    except OSError as exc:
        raise StandaloneError(f"{path}: not a readable HDF5 file ({exc})") from None
    kind = RAW if "ls" in attrs else RECO if "lumisections" in attrs else None
    if not has_frames or kind is None or "run" not in attrs:
        raise StandaloneError(
            f"{path}: neither a raw LS file (attribute 'ls') nor a reco output "
            "(attribute 'lumisections')"
        )
    return kind, int(attrs["run"])


def derive(
    config: CalibrationConfig,
    inputs: Sequence[Path],
    work_dir: Path,
    dependencies: Mapping[str, Path] | None = None,
) -> Derived:
    """Run reco (one job per run of the raw files), ALCA and the harvest on ``inputs``
    under ``work_dir``; ``dependencies`` names the payload (``.npy``) of each calibration
    of ``depends_on``. Raises :class:`StandaloneError` with the worker's own words."""
    if not inputs:
        raise StandaloneError("no input files")
    config_path, sha256 = freeze(config, work_dir)
    common = ["--calibration", str(config_path), "--output-dir"]
    raw_by_run: dict[int, list[Path]] = {}
    reco_files, runs = [], set()
    for path in inputs:
        kind, run = file_kind(path)
        runs.add(run)
        if kind == RAW:
            raw_by_run.setdefault(run, []).append(path)
        else:
            reco_files.append(path)
    rejected: list[BadInput] = []
    for run, raw in sorted(raw_by_run.items()):
        out = work_dir / f"reco-run{run}"
        rejected += _work(reco.main, "reco", [*common, str(out), *map(str, raw)])
        reco_files.append(out / reco.OUTPUT)
    rejected += _work(alca.main, "alca", [*common, str(work_dir / "alca"), *map(str, reco_files)])
    options = [
        arg
        for name, path in sorted((dependencies or {}).items())
        for arg in ("--dependency", f"{name}={path}")
    ]
    out = work_dir / "harvest"
    alca_output = str(work_dir / "alca" / alca.OUTPUT)
    rejected += _work(harvest.main, "harvest", [*common, str(out), alca_output, *options])
    payload = Payload(
        np.load(out / harvest.PAYLOAD, allow_pickle=False),
        json.loads((out / harvest.SUMMARY).read_text()),
    )
    return Derived(payload, out / harvest.PAYLOAD, sha256, sorted(runs), rejected)


def _work(main: Callable[[list[str] | None], int], worker: str, argv: list[str]) -> list[BadInput]:
    """Run a worker's ``main()`` as a job would; returns the inputs it rejected (from its
    manifest). A failure is a :class:`StandaloneError` with what the worker said."""
    output_dir = Path(argv[argv.index("--output-dir") + 1])
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            code = main(argv)
    except SystemExit as exc:  # argparse refused the command line
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # a job would crash: say so, as one line
        raise StandaloneError(f"{worker} worker crashed: {type(exc).__name__}: {exc}") from exc
    if code != 0:
        message = " ".join(said.getvalue().split()) or f"exit code {code}"
        raise StandaloneError(f"{worker} worker failed: {message}")
    try:
        return list(read_manifest(output_dir).bad_inputs)
    except ManifestError as exc:
        raise StandaloneError(f"{worker} worker: {exc}") from exc
