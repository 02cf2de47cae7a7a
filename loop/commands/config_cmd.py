"""``calloop config check|show|schema|reference``: validate, inspect and document the
configuration (loop.yaml and every calibration YAML)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from loop.commands.common import add_json_flag, emit
from loop.commands.daemon_cmd import add_config_option, loop_config_from
from loop.config import (
    CalibrationConfig,
    LoopConfig,
    calibration_path,
    check_config_dir,
    default_config_dir,
    did_you_mean,
    load_calibration,
)
from loop.config_reference import REFERENCE_PATH, reference_markdown
from loop.errors import ConfigError
from loop.fsutil import atomic_write_text
from loop.redact import redact_url

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def register(subparsers: Any) -> None:
    """Add the ``config`` group."""
    group = subparsers.add_parser("config", help="validate, show and document configuration")
    sub = group.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="validate a config directory (loop.yaml + calibrations/) or one calibration file",
    )
    check.add_argument("path", nargs="?", type=Path, help="config dir or calibration YAML")
    check.set_defaults(handler=run_check)

    show = sub.add_parser("show", help="the effective configuration, defaults resolved")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("-c", "--calibration", help="calibration name")
    which.add_argument("--loop", action="store_true", help="loop.yaml")
    add_config_option(show)
    add_json_flag(show)
    show.set_defaults(handler=run_show)

    schema = sub.add_parser("schema", help="print the JSON Schema of a configuration file")
    kind = schema.add_mutually_exclusive_group()
    kind.add_argument("--calibration", action="store_true", help="a calibration YAML (the default)")
    kind.add_argument("--loop", action="store_true", help="loop.yaml")
    schema.set_defaults(handler=run_schema)

    reference = sub.add_parser("reference", help="print the key reference (config/REFERENCE.md)")
    reference.add_argument(
        "--write",
        nargs="?",
        type=Path,
        const=REFERENCE_PATH,
        metavar="PATH",
        help=f"write it to PATH (default: {REFERENCE_PATH})",
    )
    reference.set_defaults(handler=run_reference)


def run_check(args: argparse.Namespace) -> int:
    """Print every problem found; exit 0 when there are none."""
    path: Path = args.path or default_config_dir()
    if path.is_file():
        try:
            load_calibration(path)
            problems: list[str] = []
        except ConfigError as exc:
            problems = exc.problems
    elif path.is_dir():
        problems = check_config_dir(path)
    else:
        problems = [f"{path}: no such file or directory"]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    print(f"{path}: configuration is valid")
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print loop.yaml or one calibration as the daemons see it: YAML, or JSON with --json."""
    loop_config = loop_config_from(args)
    config: BaseModel = loop_config
    if args.calibration:
        path = _existing_calibration(loop_config, args.calibration)
        config = load_calibration(path)
        title = f"# {path}: effective configuration, config_sha256 {config.config_hash()}"
    else:
        title = f"# {args.config or default_config_dir() / 'loop.yaml'}: effective configuration"
    data = config.model_dump(mode="json")
    if "conddb_url" in data:
        data["conddb_url"] = redact_url(data["conddb_url"])  # never print a password
    text = f"{title}\n{yaml.safe_dump(data, sort_keys=False)}".rstrip()
    return emit(args, data, lambda: text)


def _existing_calibration(loop_config: LoopConfig, name: str) -> Path:
    path = calibration_path(loop_config, name)
    if not path.exists():
        names = [file.stem for file in loop_config.calibrations_dir.glob("*.yaml")]
        raise ConfigError(
            [f"{path}: no calibration '{name}' in calibrations_dir" + did_you_mean(name, names)]
        )
    return path


def run_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema generated from the model of the file."""
    model: type[BaseModel] = LoopConfig if args.loop else CalibrationConfig
    print(json.dumps({"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}, indent=2))
    return 0


def run_reference(args: argparse.Namespace) -> int:
    """Print the Markdown reference of every key, or write it with --write."""
    text = reference_markdown()
    if args.write is None:
        print(text, end="")
    else:
        atomic_write_text(args.write, text)
        print(f"{args.write}: written")
    return 0
