"""``calloop config check``: validate loop.yaml and every calibration YAML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loop.config import check_config_dir, default_config_dir, load_calibration
from loop.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``config`` group."""
    group = subparsers.add_parser("config", help="validate configuration files")
    sub = group.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="validate a config directory (loop.yaml + calibrations/) or one calibration file",
    )
    check.add_argument("path", nargs="?", type=Path, help="config dir or calibration YAML")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Print every problem found; exit 0 when there are none."""
    path: Path = args.path or default_config_dir()
    if path.is_file():
        try:
            load_calibration(path)
            problems: list[str] = []
        except ConfigError as exc:
            problems = exc.problems
    elif path.is_dir():
        problems = check_config_dir(path)
    else:
        problems = [f"{path}: no such file or directory"]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    print(f"{path}: configuration is valid")
    return 0
