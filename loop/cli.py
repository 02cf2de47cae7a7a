"""``calloop`` command line: parses, loads config, sets up logging, builds, runs.

Each command group lives in :mod:`loop.commands`; every subcommand has ``--help``.
Domain errors print one line (``calloop: error: ...``) and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from loop import __version__
from loop.commands import COMMAND_GROUPS
from loop.errors import CalloopError

EXIT_DOMAIN_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="calloop",
        description="Prompt-calibration loop: simulated experiment, daemons, store, conditions DB.",
    )
    parser.add_argument("--version", action="version", version=f"calloop {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMAND_GROUPS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calloop`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except CalloopError as exc:
        print(f"calloop: error: {exc}", file=sys.stderr)
        return EXIT_DOMAIN_ERROR
    except KeyboardInterrupt:
        print("calloop: interrupted", file=sys.stderr)
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
