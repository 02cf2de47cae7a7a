"""``calloop web``: the calibration control room (:mod:`loop.web`)."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
from pathlib import Path
from typing import Any

from loop.commands.daemon_cmd import add_config_option, loop_config_from
from loop.fsutil import atomic_write_text
from loop.logs import setup_logging


def register(subparsers: Any) -> None:
    """Add ``web``."""
    web = subparsers.add_parser(
        "web", help="serve the calibration control room (live overview, runs, payloads)"
    )
    add_config_option(web)
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    web.add_argument("--port", type=int, default=8090)
    web.add_argument("--port-file", type=Path, help="write the bound port here (for --port 0)")
    web.add_argument(
        "--auth-db",
        help="SQL URL of the conditions DB whose operator/admin tokens may act "
        "(default: conddb_url of loop.yaml when it is SQL; else the site is read-only)",
    )
    web.set_defaults(handler=cmd_web)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_web(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    import uvicorn

    from loop.web.app import create_app

    loop_config = loop_config_from(args)
    setup_logging(None, "web", "serve")
    app = create_app(loop_config, auth_db_url=args.auth_db)
    # bound here, not by uvicorn, so that the port of --port 0 is known before serving
    listener = socket.create_server((args.host, args.port))
    port = listener.getsockname()[1]
    if args.port_file:
        atomic_write_text(args.port_file, f"{port}\n")
    print(f"calloop control room on http://{args.host}:{port}", flush=True)
    if not _loopback(args.host):
        print(
            "WARNING: not bound to loopback: every page is readable from the network; put "
            "a reverse proxy with TLS and its own login in front (README, Web control room)",
            flush=True,
        )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[listener])
    return 0
