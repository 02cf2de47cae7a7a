"""Subcommand groups of the ``calloop`` CLI; each module exposes ``register(subparsers)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loop.commands import (
    calibrations_cmd,
    conddb_cmd,
    config_cmd,
    daemon_cmd,
    demo_cmd,
    plot_cmd,
    runs_cmd,
    sim_cmd,
    store_cmd,
    systemd_cmd,
    tmux_cmd,
    web_cmd,
)

COMMAND_GROUPS: list[Callable[[Any], None]] = [
    config_cmd.register,
    calibrations_cmd.register,
    sim_cmd.register,
    store_cmd.register,
    conddb_cmd.register,
    daemon_cmd.register,
    demo_cmd.register,
    runs_cmd.register,
    systemd_cmd.register,
    tmux_cmd.register,
    web_cmd.register,
    plot_cmd.register,
]
