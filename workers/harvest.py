"""Step-4 worker: merge new accumulators into the run's running state and compute the
payload with the calibration's kind. A re-harvest reads the previous state plus only the
new ALCA outputs.

Outputs: ``state.h5`` (merged accumulators), ``payload.npy`` and ``summary.json``
(quality summary). ``--dependency NAME=PATH`` (repeated) hands the kind the payload
(an ``.npy`` file) of each calibration of ``depends_on``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import atomic_path, atomic_write_json
from workers.accumulators import load_accumulators, save_accumulators
from workers.common import WorkerResult, worker_main
from workers.kinds import kind_of

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
    payload = kind.finalize(merged, kind.parameters(config), dependencies)
    save_accumulators(output_dir / STATE, merged, {"calibration": config.name})
    with atomic_path(output_dir / PAYLOAD, ".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, payload.array, allow_pickle=False)
    atomic_write_json(output_dir / SUMMARY, payload.summary)
    return WorkerResult([STATE, PAYLOAD, SUMMARY])


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
