"""``calloop tmux up|down|attach``: the daemons of one or more calibrations in tmux."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from loop.config import calibration_path, default_config_dir, load_calibration, load_loop_config
from loop.control.tmux import STOP_TIMEOUT_S, Launch, TmuxError, TmuxSession, down, up

DEFAULT_NAME = "calloop"


def register(subparsers: Any) -> None:
    """Add ``tmux up``, ``tmux down`` and ``tmux attach``."""
    tmux = subparsers.add_parser("tmux", help="run the daemons in a tmux session")
    actions = tmux.add_subparsers(dest="tmux_action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "up", help="a window per calibration, a pane per step daemon and one on the WARNING logs"
    )
    _add_calibrations(start, "default: every calibration YAML of calibrations_dir")
    start.add_argument("--config", type=Path, help="loop.yaml (default: config/loop.yaml)")
    _add_session(start)
    start.set_defaults(handler=cmd_up)
    stop = actions.add_parser("down", help="SIGTERM the daemons, wait, close their windows")
    _add_calibrations(stop, "default: every window, then the session is closed")
    stop.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        help=f"seconds to wait for the daemons to exit (default: {STOP_TIMEOUT_S:g})",
    )
    _add_session(stop)
    stop.set_defaults(handler=cmd_down)
    attach = actions.add_parser("attach", help="attach this terminal to the session")
    _add_session(attach)
    attach.set_defaults(handler=cmd_attach)


def _add_calibrations(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "-c",
        "--calibration",
        dest="calibrations",
        action="append",
        metavar="NAME",
        help=f"calibration name, repeatable ({default})",
    )


def _add_session(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--session", default=DEFAULT_NAME, help=f"tmux session name (default: {DEFAULT_NAME})"
    )
    parser.add_argument(
        "--socket",
        default=DEFAULT_NAME,
        help=f"tmux server socket name, tmux -L (default: {DEFAULT_NAME})",
    )


def _session(args: argparse.Namespace) -> TmuxSession:
    return TmuxSession(args.session, args.socket)


def cmd_up(args: argparse.Namespace) -> int:
    """Start what is missing; print one line per daemon, started or skipped."""
    config_path = (args.config or default_config_dir() / "loop.yaml").resolve()
    loop_config = load_loop_config(config_path)
    calibrations = args.calibrations or sorted(
        path.stem for path in loop_config.calibrations_dir.glob("*.yaml")
    )
    if not calibrations:
        raise TmuxError(f"{loop_config.calibrations_dir}: no calibration files (*.yaml) found")
    for name in calibrations:  # a bad file stops here, not in a pane nobody looks at
        load_calibration(calibration_path(loop_config, name))
    session = _session(args)
    for line in up(session, Launch(loop_config, config_path), calibrations):
        print(line)
    print(f"attach with: {_same_session('attach', args)}")
    return 0


def _same_session(action: str, args: argparse.Namespace) -> str:
    """The ``calloop tmux`` command line of ``action`` on the session of ``args``."""
    argv = ["calloop", "tmux", action]
    for option in ("session", "socket"):
        if getattr(args, option) != DEFAULT_NAME:
            argv += [f"--{option}", getattr(args, option)]
    return shlex.join(argv)


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the daemons and close their windows; print one line per daemon stopped."""
    session = _session(args)
    if not session.exists():
        print(f"no tmux session {args.session!r} on socket {args.socket!r}: nothing to stop")
        return 0
    for line in down(session, args.calibrations, args.timeout):
        print(line)
    return 0


def cmd_attach(args: argparse.Namespace) -> NoReturn:
    """Replace this process by ``tmux attach`` (a terminal is needed to show the session)."""
    session = _session(args)
    if not sys.stdout.isatty():
        raise TmuxError("tmux attach needs a terminal and stdout is not one")
    if not session.exists():
        raise TmuxError(
            f"no tmux session {args.session!r} on socket {args.socket!r}; start it with "
            "calloop tmux up"
        )
    argv = session.attach_argv()
    os.execvp(argv[0], argv)
