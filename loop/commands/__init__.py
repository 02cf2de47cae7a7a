"""Subcommand groups of the ``calloop`` CLI; each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from loop.commands import config_cmd, sim_cmd

Subparsers = Any  # argparse's _SubParsersAction is private; typed loosely on purpose
COMMAND_GROUPS: list[Callable[[Subparsers], None]] = [
    config_cmd.register,
    sim_cmd.register,
]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json`` for read commands: machine-readable output instead of a table."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
