"""``calloop demo``: an embedded end-to-end run of the whole loop."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from loop.logs import setup_logging

REPO_CONFIG = Path(__file__).resolve().parent.parent.parent / "config"


def register(subparsers: Any) -> None:
    """Add ``demo``."""
    demo = subparsers.add_parser(
        "demo",
        help="simulated registry, the daemons of every shipped calibration whose detector "
        "the scenario simulates, and the scenario player, end to end",
    )
    demo.add_argument("--scenario", type=Path, default=REPO_CONFIG / "scenarios" / "demo.yaml")
    demo.add_argument("--speed", type=float, default=50.0, help="scenario speed factor")
    demo.add_argument("--work-dir", type=Path, help="keep everything here (default: temp dir)")
    demo.add_argument("--timeout", type=float, default=110.0, help="seconds before giving up")
    demo.add_argument("--backend", choices=["local", "slurm"], default="local")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 only if every run was processed and matches the truth."""
    setup_logging(None, "demo", "demo", console=False)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.work_dir, keep=True)
    with tempfile.TemporaryDirectory(prefix="calloop-demo-") as tmp:
        return _run(args, Path(tmp), keep=False)


def _run(args: argparse.Namespace, root: Path, *, keep: bool) -> int:
    from loop.demo import format_table, run_demo

    print(
        f"calloop demo: scenario {args.scenario.name} at x{args.speed:g}, work dir {root}",
        flush=True,
    )
    rows, ok, seconds = run_demo(
        root, args.scenario, speed=args.speed, timeout_s=args.timeout, backend=args.backend
    )
    if args.json:
        print(
            json.dumps(
                {"ok": ok, "seconds": seconds, "rows": [dataclasses.asdict(r) for r in rows]},
                indent=2,
            )
        )
    else:
        print(format_table(rows))
        verdict = "every run processed, payloads match the truth" if ok else "FAILED"
        where = (
            f"logs: {root / 'logs'}"
            if keep
            else "logs were in a temporary directory; use --work-dir DIR to keep them"
        )
        print(f"\n{verdict} ({seconds:.1f} s); {where}")
    return 0 if ok else 1
