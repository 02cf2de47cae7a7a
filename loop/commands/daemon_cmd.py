"""``calloop step2|step3|step4 -c <Calibration>`` (or ``--all``), ``calloop status`` and
``calloop graph``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from loop.commands.common import add_json_flag, emit, when
from loop.config import LoopConfig, default_config_dir, load_loop_config
from loop.errors import CalloopError, ConfigError
from loop.logs import setup_hosted_logging, setup_logging
from states import STEPS

# sysexits.h EX_CONFIG: restarting cannot help until someone fixes the file, so the
# units name it in RestartPreventExitStatus= (any other failure is restarted)
EXIT_CONFIG = 78


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config loop.yaml`` (default: the config directory's loop.yaml)."""
    parser.add_argument("--config", type=Path, help="loop.yaml (default: config/loop.yaml)")


def loop_config_from(args: argparse.Namespace) -> LoopConfig:
    """The loop configuration named on the command line."""
    return load_loop_config(args.config or default_config_dir() / "loop.yaml")


def register(subparsers: Any) -> None:
    """Add the daemon commands, ``status`` and ``graph``."""
    for step in STEPS:
        parser = subparsers.add_parser(
            step, help=f"run the {step} daemon of one calibration, or of every one (--all)"
        )
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("-c", "--calibration", help="calibration name")
        which.add_argument(
            "--all",
            action="store_true",
            help="one process hosting the daemon of every calibration YAML of the "
            "calibrations directory (SIGHUP hosts added ones and stops removed ones)",
        )
        add_config_option(parser)
        parser.add_argument(
            "--quiet",
            action="store_true",
            help="only CRITICAL lines on stderr; the log files get all (the systemd units "
            "leave it off: the journal is where an operator looks first)",
        )
        parser.set_defaults(handler=run_daemon, step=step)
    status = subparsers.add_parser(
        "status", help="each daemon: runs, jobs, uploads, services; exit 1 if it needs an operator"
    )
    add_config_option(status)
    add_json_flag(status)
    status.set_defaults(handler=cmd_status)
    graph = subparsers.add_parser("graph", help="draw a step's state machine")
    graph.add_argument("step", choices=STEPS)
    graph.add_argument("--out", type=Path, required=True, help="file.svg, file.png or file.md")
    graph.set_defaults(handler=cmd_graph)


def run_daemon(args: argparse.Namespace) -> int:
    """Run one daemon (or with ``--all`` the host of every calibration's daemon of the
    step, :mod:`loop.hosting`) in the foreground (tmux or systemd) until SIGTERM, then
    end the process at once (see :func:`exit_now`). An invalid loop.yaml, or the
    calibration YAML of a single daemon, at start is one line and :data:`EXIT_CONFIG`,
    which the units exclude from restarts; a host reports an invalid calibration YAML
    in that calibration's log and status, and retries it."""
    from loop.daemon import Daemon
    from loop.hosting import Host

    path = args.config or default_config_dir() / "loop.yaml"
    try:
        loop_config = load_loop_config(path)
        level = logging.CRITICAL if args.quiet else logging.INFO
        if args.all:
            router = setup_hosted_logging(loop_config.log_dir, args.step, console_level=level)
            host = Host(
                args.step,
                loop_config,
                loop_config_path=path,
                on_removed=router.close_calibration if router is not None else lambda _name: None,
            )
            exit_now(host.run_forever())
        setup_logging(loop_config.log_dir, args.calibration, args.step, console_level=level)
        daemon = Daemon(args.step, loop_config, args.calibration, loop_config_path=path)
        code = daemon.run_forever()
    except ConfigError as exc:
        print(f"calloop: error: {exc}", file=sys.stderr)  # the one line of loop.cli
        return EXIT_CONFIG
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End a daemon that has shut down (journal closed, status written, lock released)
    without the interpreter's teardown, which took 0.2-2 s after "daemon stopped" (numpy,
    h5py, SQLAlchemy, ... on a loaded machine) and would wait for any non-daemon thread
    (a service call stuck in a hung service). Log files and std streams are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
            stream.flush()
    os._exit(code)


LIVE_STATES = ("running", "degraded")  # a status file in these states claims a live daemon


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def beat_time(path: Path, status: dict[str, Any]) -> float:
    """When the daemon of a status file last beat: its ``heartbeat`` field, or the
    file's modification time when later (an unchanged status is only touched)."""
    beat = float(status.get("heartbeat", 0))
    with contextlib.suppress(OSError):
        beat = max(beat, path.stat().st_mtime)
    return beat


def collect_status(loop_config: LoopConfig) -> list[dict[str, Any]]:
    """Every daemon's status file under the work directory, with heartbeat age (an
    idle daemon whose status did not change only touches its file: the beat is the
    later of the ``heartbeat`` field and the file's modification time)."""
    now = time.time()
    rows = []
    for path in sorted(loop_config.work_dir.glob("*/step*.status.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status["heartbeat"] = beat_time(path, status)
        status["heartbeat_age_s"] = round(now - float(status.get("heartbeat", 0)), 1)
        live = status.get("state") in LIVE_STATES
        status["alive"] = live and _alive(int(status.get("pid", 0)))
        rows.append(status)
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status table."""
    rows = collect_status(loop_config_from(args))

    def text() -> str:
        lines = [
            f"{'calibration':<16} {'step':<6} {'pid':>7} {'state':<8} {'beat':>6} "
            f"{'run':>6} {'fail':>5} runs in flight / last upload"
        ]
        for r in rows:
            runs = ", ".join(f"{k}:{v}" for k, v in r.get("runs_in_flight", {}).items()) or "-"
            upload = r.get("last_upload")
            extra = f" | last upload run {upload['run']} {upload['status']}" if upload else ""
            attention = r.get("runs_needing_attention") or {}
            if attention:
                extra += " | NEEDS ATTENTION " + ", ".join(f"{k}:{v}" for k, v in attention.items())
            if r.get("state") == "failed":
                extra += f" | FAILED {r.get('error', '')}"
            if r.get("degraded_reason"):
                extra += f" | DEGRADED {r['degraded_reason']}"
            for service in ("registry", "conditions_db"):
                health = r.get(service) or {}
                if health.get("reachable") is False:
                    extra += (
                        f" | {service.upper()} UNREACHABLE since {when(health['last_error_at'])}"
                    )
            waiting = r.get("uploads_waiting") or []
            if waiting:
                oldest = max(w["age_s"] for w in waiting)
                extra += f" | {len(waiting)} upload(s) waiting, oldest {oldest} s"
            state = r["state"] if r["alive"] or r["state"] not in LIVE_STATES else "DEAD"
            lines.append(
                f"{r['calibration']:<16} {r['step']:<6} {r['pid']:>7} {state:<8} "
                f"{r['heartbeat_age_s']:>5}s {r.get('jobs_running', 0):>6} "
                f"{r.get('jobs_failed', 0):>5} {runs}{extra}"
            )
        return "\n".join(lines) if rows else "(no daemon has run under this work directory)"

    emit(args, rows, text)
    return 1 if any(needs_operator(r) for r in rows) else 0


def needs_operator(row: dict[str, Any]) -> bool:
    """A daemon's status that an operator must look at (the exit status of ``status``,
    for monitoring scripts): dead, degraded or failed (a hosted calibration that does
    not run, :mod:`loop.hosting`), runs needing attention, a service down."""
    dead = row.get("state") in LIVE_STATES and not row.get("alive")
    unreachable = any(
        (row.get(service) or {}).get("reachable") is False
        for service in ("registry", "conditions_db")
    )
    return (
        dead
        or row.get("state") in ("degraded", "failed")
        or bool(row.get("runs_needing_attention"))
        or unreachable
    )


def cmd_graph(args: argparse.Namespace) -> int:
    """Draw the step's machine with transitions' diagram support."""
    from states.graph import draw

    suffix = args.out.suffix.lower()
    if suffix not in (".svg", ".png", ".md"):
        raise CalloopError(f"--out {args.out}: use a .svg, .png or .md file name")
    draw(args.step, args.out)
    print(f"{args.step} state machine written to {args.out}")
    return 0
