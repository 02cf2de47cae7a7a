"""Helpers shared by the command groups: --json output and time formatting."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json`` for read commands: machine-readable output instead of a table."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    """Print ``data`` as JSON with --json, else the human text; returns exit code 0."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text())
    return 0


def when(stamp: float | None) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS`` UTC (``-`` for None)."""
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
