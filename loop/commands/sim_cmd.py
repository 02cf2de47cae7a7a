"""``calloop registry serve``, ``calloop sim play`` and ``calloop sim conddb-proxy``: the
simulated experiment."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from loop.errors import CalloopError, ScenarioError
from loop.fsutil import atomic_write_text
from loop.logs import setup_logging
from loop.sim.faultserver import FaultServer
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import FaultSpec, JobFaultSpec, load_scenario, timeline

DEFAULT_STATE = Path("sim/registry_state.json")
DEFAULT_RAW = Path("sim/raw")


def register(subparsers: Any) -> None:
    """Add the ``registry`` and ``sim`` groups."""
    registry = subparsers.add_parser("registry", help="the simulated run registry")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    serve = registry_sub.add_parser("serve", help="serve the OMS-style API from a state file")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--state", type=Path, default=DEFAULT_STATE, help="registry state file")
    serve.add_argument("--port-file", type=Path, help="write the bound port here (for --port 0)")
    serve.set_defaults(handler=run_serve)

    sim = subparsers.add_parser("sim", help="simulated detector and scenario player")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    play = sim_sub.add_parser("play", help="play a scenario: raw LS files + registry updates")
    play.add_argument("scenario", type=Path, help="scenario YAML (config/scenarios/*.yaml)")
    play.add_argument("--speed", type=float, default=1.0, help="x real time (default 1)")
    play.add_argument("--state", type=Path, default=DEFAULT_STATE, help="registry state file")
    play.add_argument("--raw-root", type=Path, default=DEFAULT_RAW, help="raw data root")
    play.add_argument(
        "--work-dir",
        type=Path,
        help="the loop's work_dir: the scenario's job faults are written there, in "
        ".sim/job_faults.json, for its jobs to play (needed if the scenario has job faults)",
    )
    play.add_argument("--dry-run", action="store_true", help="print the timeline and exit")
    play.set_defaults(handler=run_play)

    proxy = sim_sub.add_parser(
        "conddb-proxy", help="fault-injecting proxy in front of the conditions DB service"
    )
    proxy.add_argument("--upstream", required=True, help="conditions DB service URL")
    proxy.add_argument("--port", type=int, default=8082, help="TCP port (0: any free port)")
    proxy.add_argument("--host", default="127.0.0.1")
    proxy.add_argument("--state", type=Path, default=DEFAULT_STATE, help="registry state file")
    proxy.add_argument("--port-file", type=Path, help="write the bound port here (for --port 0)")
    proxy.set_defaults(handler=run_proxy)


def run_serve(args: argparse.Namespace) -> int:
    """Serve the registry until SIGTERM/SIGINT."""
    setup_logging(None, "sim", "registry")
    server = RegistryServer(args.state, host=args.host, port=args.port)
    return _serve(server, args, "run registry")


def run_proxy(args: argparse.Namespace) -> int:
    """Proxy the conditions DB, playing its faults, until SIGTERM/SIGINT."""
    from loop.sim.conddb_proxy import ConddbProxy

    setup_logging(None, "sim", "conddb-proxy")
    try:
        server = ConddbProxy(args.upstream, args.state, host=args.host, port=args.port)
    except ValueError as exc:
        raise CalloopError(f"--upstream: {exc}") from None
    return _serve(server, args, f"conditions DB fault proxy to {args.upstream}")


def _serve(server: FaultServer, args: argparse.Namespace, what: str) -> int:
    if args.port_file:
        atomic_write_text(args.port_file, f"{server.port}\n")
    print(f"{what} listening on {server.url} (state {args.state})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def run_play(args: argparse.Namespace) -> int:
    """Play the scenario (or print it with --dry-run)."""
    scenario = load_scenario(args.scenario)
    if args.dry_run:
        print(f"scenario {scenario.name}: {scenario.description}")
        listed: list[FaultSpec | JobFaultSpec] = [*scenario.service_faults()]
        for fault in listed + scenario.job_faults():
            print(fault.describe())  # raw-file faults show in the timeline, where they happen
        for event in timeline(scenario):
            print(event.describe())
        return 0
    if args.speed <= 0:
        raise ScenarioError(f"--speed must be positive, got {args.speed:g}")
    from loop.sim.player import Player

    setup_logging(None, "sim", "player")
    player = Player(scenario, args.state, args.raw_root, work_dir=args.work_dir, speed=args.speed)
    report = player.play()
    print(
        f"played {scenario.name}: {report.raw_files} raw files, "
        f"{report.raw_bytes / 1e6:.1f} MB, runs {report.runs_started}, "
        f"ended {report.runs_ended}, {report.elapsed_s:.1f} s"
    )
    return 0
