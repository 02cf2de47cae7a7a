"""Step-4 worker: merge new accumulators into the run's running state and compute the
payload with the calibration's kind. A re-harvest reads the previous state plus only the
new ALCA outputs.

Outputs: ``state.h5`` (merged accumulators), ``payload.npy`` and ``summary.json``
(quality summary); a ``time_type: lumi`` calibration also ``lumi_<first LS>.npy`` per
group of LS (:mod:`workers.lumi`). ``--dependency NAME=PATH`` (repeated) hands the kind the payload
(an ``.npy`` file) of each calibration of ``depends_on``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import atomic_path, atomic_write_json
from workers.accumulators import Accumulators, load_accumulators, save_accumulators
from workers.common import WorkerResult, worker_main
from workers.kinds import kind_of
from workers.kinds.base import AlgorithmError, Payload
from workers.lumi import LumiGroup, by_lumi, groups

STATE, PAYLOAD, SUMMARY = "state.h5", "payload.npy", "summary.json"


def run(
    config: CalibrationConfig, inputs: list[Path], output_dir: Path, args: argparse.Namespace
) -> WorkerResult:
    """Merge, compute, write."""
    kind = kind_of(config)
    # in-process callers (tests, calibrations check) may pass a namespace without it
    dependencies = load_dependencies(config, getattr(args, "dependency", None) or [])
    parts = [load_accumulators(args.previous_state)] if args.previous_state else []
    parts += [load_accumulators(path) for path in inputs]
    merged = kind.merge(parts)
    save_accumulators(output_dir / STATE, merged, {"calibration": config.name})
    if config.payload.time_type == "lumi":
        payload, files = _lumi_payloads(config, merged, dependencies, output_dir)
    else:
        payload, files = kind.finalize(merged, kind.parameters(config), dependencies), []
    _save_array(output_dir / PAYLOAD, payload.array)
    atomic_write_json(output_dir / SUMMARY, payload.summary)
    return WorkerResult([STATE, PAYLOAD, SUMMARY, *files])


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _lumi_payloads(
    config: CalibrationConfig,
    merged: Accumulators,
    dependencies: dict[str, np.ndarray],
    output_dir: Path,
) -> tuple[Payload, list[str]]:
    """One payload per LS group with data (``lumi_<first LS>.npy``), and the whole: the
    groups' payloads stacked, with a summary listing them (:mod:`workers.lumi`). A group
    the kind cannot finalize is listed with its error and has no file."""
    kind = kind_of(config)
    params = kind.parameters(config)
    per_ls = by_lumi(merged)
    size = config.payload.lumi_group
    found, arrays, files = [], [], []
    for first, lumis in groups(list(per_ls), size).items():
        accumulated = kind.merge([per_ls[ls] for ls in lumis])
        group = LumiGroup(first, first + size - 1, lumis, None)
        try:
            payload = kind.finalize(accumulated, params, dependencies)
        except AlgorithmError as exc:
            found.append(replace(group, error=str(exc)).to_json())
            continue
        name = f"lumi_{first:04d}.npy"
        _save_array(output_dir / name, payload.array)
        files.append(name)
        arrays.append(payload.array)
        found.append(replace(group, file=name, summary=payload.summary).to_json())
    if not arrays:
        raise AlgorithmError(f"no LS group gives a payload: {found}")
    events = sum(int(g["summary"].get("events", 0)) for g in found if g["file"])
    summary = {"events": events, "lumi_group": size, "lumi_groups": found}
    return Payload(np.stack(arrays), summary), files


def load_dependencies(
    config: CalibrationConfig, given: list[tuple[str, Path]]
) -> dict[str, np.ndarray]:
    """The payload of each ``--dependency NAME=PATH``; a name not in ``depends_on`` or
    given twice, or an unreadable file, is an error naming it."""
    loaded: dict[str, np.ndarray] = {}
    for name, path in given:
        if name not in config.depends_on:
            raise ValueError(
                f"--dependency {name}: {config.name} does not depend on it "
                f"(depends_on: {', '.join(config.depends_on) or 'none'})"
            )
        if name in loaded:
            raise ValueError(f"--dependency {name}: given twice")
        try:
            loaded[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--dependency {name}: cannot read the payload {path} ({exc})"
            ) from exc
    return loaded


def dependency_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--dependency``."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, Path(path)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--previous-state", type=Path, help="state.h5 of the last harvest")
    parser.add_argument(
        "--dependency",
        type=dependency_option,
        action="append",
        metavar="NAME=PATH",
        help="the payload (.npy) of calibration NAME of depends_on; repeat for each",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.harvest``."""
    return worker_main("harvest", run, argv, _extra)


if __name__ == "__main__":
    sys.exit(main())
