"""What every worker shares: its command line and how it reports failure.

Workers are launched by a backend as ``python -m workers.<name> --calibration C.yaml
--output-dir D INPUT...``; they write their outputs atomically into D and exit 0, or
print one line naming the bad input and exit 2 (the daemon retries, then gives up).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loop.config import CalibrationConfig, load_calibration
from loop.errors import CalloopError

EXIT_BAD_INPUT = 2


def worker_main(
    name: str,
    run: Callable[[CalibrationConfig, list[Path], Path, argparse.Namespace], None],
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the standard worker arguments and call ``run``; map errors to exit codes."""
    parser = argparse.ArgumentParser(prog=f"python -m workers.{name}")
    parser.add_argument("--calibration", type=Path, required=True, help="calibration YAML")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("inputs", nargs="+", type=Path)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        config = load_calibration(args.calibration)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        run(config, args.inputs, args.output_dir, args)
    except (CalloopError, OSError, ValueError, KeyError) as exc:
        print(f"workers.{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
