"""``calloop plot``: a payload's per-channel plots as a PNG or SVG file, for experts
without a browser (the same figure as the control room's payload page)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loop.commands.daemon_cmd import add_config_option, loop_config_from
from loop.errors import CalloopError
from loop.fsutil import atomic_write_bytes


def register(subparsers: Any) -> None:
    """Add ``plot``."""
    plot = subparsers.add_parser("plot", help="plot a payload of the store to a PNG or SVG file")
    plot.add_argument("detector", help="store detector name or alias, e.g. ecal-0001")
    plot.add_argument("ctype", help="calibration type, e.g. pedestals")
    plot.add_argument("--version", help="store version (default: the newest)")
    plot.add_argument("--out", type=Path, required=True, help="file.png or file.svg")
    add_config_option(plot)
    plot.set_defaults(handler=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw the payload; thresholds come from the calibration that owns the type."""
    from loop.store import CalibStore
    from loop.web.data import Site
    from loop.web.payloads import load_payload
    from loop.web.plots import FORMATS, render

    fmt = args.out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise CalloopError(f"--out {args.out}: use a .png or .svg file name")
    site = Site(loop_config_from(args))
    site.reload()
    loop_config = site.loop_config
    store = CalibStore(loop_config.store_root, lock_timeout_s=loop_config.timeouts.store_lock_s)
    try:
        detector = store.detector(args.detector).name
        owner = site.owner(detector, args.ctype)
        view = load_payload(
            store, loop_config, owner, detector=detector, ctype=args.ctype, version=args.version
        )
        atomic_write_bytes(args.out, render(view, fmt))
    finally:
        store.close()
    print(
        f"{detector} {args.ctype} {view.constants.version} written to {args.out} "
        f"({len(view.outside)} channel(s) outside the healthy range)"
    )
    return 0
