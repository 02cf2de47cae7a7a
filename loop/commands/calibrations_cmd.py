"""``calloop calibrations list|show|check|run``: the calibrations of a configuration, what
each needs and produces, whether one is ready for the automatic system, and its payload
derived standalone (:mod:`loop.commands.calibrations_run`).

``check`` reports each check PASS or FAIL with the reason and exits 1 when any fails:

- ``config``: the calibration file is valid;
- ``kind``: its kind is known;
- ``dependencies``: every calibration it builds on (directly or not) exists and is
  valid, and ``depends_on`` forms no cycle (the cycle is named);
- ``dry run``: a tiny run of its raw stream is simulated (:mod:`loop.sim.detector`) into
  a temporary directory and the reco, ALCA and harvest workers run in-process on it with
  the frozen configuration, as the daemons' jobs would (its dependencies are dry-run
  first and their payloads passed on); the payload must pass the calibration's
  validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loop.commands.calibrations_run import (
    derive_target,
    run_numbers,
    targets,
    validation_problems,
)
from loop.commands.common import add_json_flag, emit
from loop.commands.daemon_cmd import add_config_option, loop_config_from
from loop.config import (
    CalibrationConfig,
    dependency_chain,
    did_you_mean,
    find_cycle,
    load_all_calibrations,
)
from loop.errors import CalloopError
from loop.logs import setup_logging
from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_detector_ls, make_detector_truth
from loop.sim.scenario import DetectorSpec
from workers.harvest import dependency_option
from workers.kinds import KindError, get_kind
from workers.kinds.base import Payload
from workers.standalone import StandaloneError, derive

EXIT_FAILED = 1
DRY_RUN = 1  # the simulated run's number
DRY_RUN_LS = 3
PASS, FAIL = "PASS", "FAIL"


@dataclass(frozen=True)
class Catalogue:
    """The calibrations of a configuration: the valid ones, every file's name, and the
    problems found loading them (each names its file)."""

    directory: Path
    configs: dict[str, CalibrationConfig]
    names: set[str]
    problems: list[str]

    def problems_of(self, name: str) -> list[str]:
        """The problems found in the file of calibration ``name``."""
        path = str(self.directory / f"{name}.yaml")
        return [p for p in self.problems if p.startswith(f"{path}:")]

    def config_problems_of(self, name: str) -> list[str]:
        """:meth:`problems_of` but those of ``depends_on`` (the dependency check's)."""
        key = f"{self.directory / f'{name}.yaml'}: depends_on"
        return [p for p in self.problems_of(name) if not p.startswith(key)]

    def get(self, name: str) -> CalibrationConfig:
        """A valid calibration, or a clear error (unknown name, invalid file)."""
        if name in self.configs:
            return self.configs[name]
        if name in self.names:
            raise CalloopError(
                f"calibration {name} is invalid: {'; '.join(self.problems_of(name))}"
            )
        raise CalloopError(
            f"no calibration '{name}' in {self.directory}" + did_you_mean(name, self.names)
        )


def register(subparsers: Any) -> None:
    """Add the ``calibrations`` group."""
    group = subparsers.add_parser(
        "calibrations", help="list, show and check calibrations before they go live"
    )
    sub = group.add_subparsers(dest="calibrations_command", required=True, metavar="ACTION")

    listing = sub.add_parser(
        "list", help="every calibration: kind, expert, inputs, depends_on, statistics needed"
    )
    _common(listing)
    listing.set_defaults(handler=cmd_list)

    show = sub.add_parser(
        "show", help="one calibration: description, dependency chain, effective configuration"
    )
    show.add_argument("name", help="calibration name")
    _common(show)
    show.set_defaults(handler=cmd_show)

    check = sub.add_parser(
        "check",
        help="config, kind, dependency graph and a dry run on simulated data; "
        "exit 1 when a check fails",
    )
    check.add_argument("name", nargs="?", help="calibration name (default: every one)")
    _common(check)
    check.set_defaults(handler=cmd_check)

    run = sub.add_parser(
        "run",
        help="derive payloads standalone from existing raw or reco files (no daemon); "
        "exit 1 when one fails validation",
    )
    run.add_argument("name", help="calibration name")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--runs",
        type=run_numbers,
        help="R[,R...] or R1-R2: one payload per run, from its raw LS files under raw_root",
    )
    source.add_argument(
        "--files", type=Path, nargs="+", help="raw LS or reco files: one payload of all of them"
    )
    run.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory for payload.npy, summary.json and provenance.json (per run: run<R>/)",
    )
    run.add_argument(
        "--store",
        action="store_true",
        help="also add each payload to the calibration store as a version (retired when "
        "it fails validation)",
    )
    run.add_argument(
        "--upload",
        action="store_true",
        help="also upload each payload that passes validation to the conditions DB "
        "(the calibration's tag; idempotent; needs the loop's token)",
    )
    run.add_argument(
        "--dependency",
        type=dependency_option,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="the payload (.npy) of calibration NAME of depends_on (default: the store's "
        "payload of NAME for the run)",
    )
    _common(run)
    run.set_defaults(handler=cmd_run)


def _common(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_json_flag(parser)


def catalogue(args: argparse.Namespace) -> Catalogue:
    """Every calibration of the configuration named on the command line."""
    directory = loop_config_from(args).calibrations_dir
    configs, problems = load_all_calibrations(directory)
    names = {path.stem for path in directory.glob("*.yaml")} if directory.is_dir() else set()
    return Catalogue(directory, configs, names, problems)


def summary(config: CalibrationConfig) -> dict[str, Any]:
    """What ``list`` shows of one calibration."""
    return {
        "name": config.name,
        "label": config.label,
        "kind": config.kind,
        "expert": config.expert.model_dump(),
        "inputs": {
            "raw_stream": config.raw_input.stream,
            "trigger_types": list(config.step2.trigger_types),
        },
        "depends_on": list(config.depends_on),
        # the events a payload needs: statistics.min_events gates the harvest (over
        # consecutive runs with across_runs); else validation.min_events rejects it
        "min_events": config.statistics.min_events or config.validation.min_events,
        "across_runs": config.statistics.across_runs,
    }


# ----------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    """One line per calibration; invalid files are named after the table."""
    cat = catalogue(args)
    rows = [summary(cat.configs[name]) for name in sorted(cat.configs)]
    invalid = sorted(cat.names - set(cat.configs))

    def text() -> str:
        lines = [
            f"{'name':<20} {'kind':<14} {'inputs':<26} {'min events':>10}  "
            f"{'depends on':<24} expert"
        ]
        for row in rows:
            inputs = f"{row['inputs']['raw_stream']}: {','.join(row['inputs']['trigger_types'])}"
            needed = f"{row['min_events']}{' (runs)' if row['across_runs'] else ''}"
            lines.append(
                f"{row['name']:<20} {row['kind']:<14} {inputs:<26} {needed:>10}  "
                f"{', '.join(row['depends_on']) or '-':<24} {row['expert']['email']}"
            )
        lines += [f"{name}: INVALID (calloop calibrations check {name})" for name in invalid]
        return "\n".join(lines)

    data = {"calibrations": rows, "invalid": invalid}
    return emit(args, data, text)


# ----------------------------------------------------------------------------- show


def cmd_show(args: argparse.Namespace) -> int:
    """Everything about one calibration, its effective configuration included."""
    cat = catalogue(args)
    config = cat.get(args.name)
    data = {
        **summary(config),
        "description": config.description.strip(),
        "file": str(cat.directory / f"{config.name}.yaml"),
        "detector": config.detector,
        "payload": config.payload.model_dump(mode="json"),
        "payload_schema": _schema(config),
        "dependency_chain": dependency_chain(config.name, cat.configs),
        "dependents": sorted(n for n, c in cat.configs.items() if config.name in c.depends_on),
        "on_dependency_missing": config.step4.on_dependency_missing,
        "config_sha256": config.config_hash(),
        "effective_config": config.model_dump(mode="json"),
    }
    return emit(args, data, lambda: _show_text(data))


def _schema(config: CalibrationConfig) -> dict[str, str] | None:
    """The kind's description of its payload array (None: the kind cannot be loaded)."""
    try:
        return asdict(get_kind(config.kind).schema)
    except KindError:
        return None


def _show_text(data: dict[str, Any]) -> str:
    chain = " -> ".join([*data["dependency_chain"], data["name"]])
    payload = data["payload"]
    lines = [
        f"{data['name']}: {data['label']} ({data['file']})",
        f"  {data['description']}",
        f"  kind:          {data['kind']}",
        f"  expert:        {data['expert']['name']} <{data['expert']['email']}>",
        f"  inputs:        raw stream {data['inputs']['raw_stream']}, trigger types "
        f"{', '.join(data['inputs']['trigger_types'])}",
        f"  statistics:    at least {data['min_events']} events per payload"
        + (", accumulated over consecutive runs" if data["across_runs"] else ""),
        f"  payload:       detector {data['detector']}, ctype {payload['ctype']}, tag "
        f"{payload['destination_tag']} ({payload['time_type']})",
        f"  payload array: {_schema_text(data['payload_schema'])}",
        f"  depends on:    {', '.join(data['depends_on']) or '-'}",
        f"  chain:         {chain} (a missing dependency payload: {data['on_dependency_missing']})",
        f"  needed by:     {', '.join(data['dependents']) or '-'}",
        f"  config_sha256: {data['config_sha256']}",
        "  effective configuration:",
        *(f"    {line}" for line in json.dumps(data["effective_config"], indent=2).splitlines()),
    ]
    return "\n".join(lines)


def _schema_text(schema: dict[str, str] | None) -> str:
    if schema is None:
        return "unknown (the kind cannot be loaded)"
    return f"{schema['dtype']} {schema['shape']}: {schema['description']}"


# ---------------------------------------------------------------------------- check


@dataclass(frozen=True)
class CheckResult:
    """One check of one calibration."""

    calibration: str
    check: str
    status: str  # PASS or FAIL
    reason: str


def cmd_check(args: argparse.Namespace) -> int:
    """Run every check of one calibration (or of all); exit 1 when one fails."""
    cat = catalogue(args)
    if args.name is not None and args.name not in cat.names:
        cat.get(args.name)  # raises, naming the close match
    names = [args.name] if args.name is not None else sorted(cat.names)
    if not names:
        raise CalloopError(f"{cat.directory}: no calibration files (*.yaml) found")
    results = [result for name in names for result in check_calibration(cat, name)]

    def text() -> str:
        lines = [
            f"{r.status} {r.calibration:<20} {r.check:<13} {r.reason}".rstrip() for r in results
        ]
        failed = sum(r.status == FAIL for r in results)
        lines.append(f"{failed} check(s) failed" if failed else "every check passed")
        return "\n".join(lines)

    emit(args, [asdict(r) for r in results], text)
    return EXIT_FAILED if any(r.status == FAIL for r in results) else 0


def check_calibration(cat: Catalogue, name: str) -> list[CheckResult]:
    """The checks of one calibration, in order; a dry run needs the others to pass."""
    results: list[CheckResult] = []

    def record(check: str, problems: list[str], ok: str) -> bool:
        results.append(
            CheckResult(name, check, FAIL if problems else PASS, "; ".join(problems) or ok)
        )
        return not problems

    config = cat.configs.get(name)
    valid = record("config", cat.config_problems_of(name), "valid") and config is not None
    if not valid or config is None:
        return results
    known = record("kind", kind_problems(config), f"{config.kind} is known")
    graph = record(
        "dependencies",
        dependency_problems(cat, name),
        "none"
        if not config.depends_on
        else "chain " + " -> ".join([*dependency_chain(name, cat.configs), name]),
    )
    if known and graph:
        record("dry run", *dry_run_outcome(cat, name))
    else:
        record("dry run", ["not attempted: a check above failed"], "")
    return results


def kind_problems(config: CalibrationConfig) -> list[str]:
    """Why the calibration's kind cannot run (empty: it is known)."""
    try:
        get_kind(config.kind)
    except KindError as exc:
        return [str(exc)]
    return []


def dependency_problems(cat: Catalogue, name: str) -> list[str]:
    """Dependencies (direct or not) that are missing or invalid, and a cycle."""
    problems = []
    for dep in dependency_chain(name, cat.configs):
        if dep not in cat.names:
            problems.append(
                f"depends on unknown calibration '{dep}'" + did_you_mean(dep, cat.names)
            )
        elif dep not in cat.configs:
            problems.append(f"depends on '{dep}', whose file is invalid")
    cycle = find_cycle(name, cat.configs)
    if cycle:
        problems.append(f"circular depends_on: {' -> '.join(cycle)}")
    return problems


# -------------------------------------------------------------------------- dry run


def dry_run_outcome(cat: Catalogue, name: str) -> tuple[list[str], str]:
    """(problems, what passed) of a dry run of ``name`` after its dependencies."""
    with tempfile.TemporaryDirectory(prefix="calloop-check-") as tmp:
        payloads: dict[str, Path] = {}
        for step in [*dependency_chain(name, cat.configs), name]:
            try:
                payloads[step], payload = dry_run(cat.configs[step], Path(tmp), payloads)
            except StandaloneError as exc:
                where = "" if step == name else f"dependency {step}: "
                return [f"{where}{exc}"], ""
        return [], (
            f"{DRY_RUN_LS} simulated LS -> payload {payload.array.dtype}"
            f"{list(payload.array.shape)} from {payload.summary.get('events')} events, "
            "passes validation"
        )


def dry_run(
    config: CalibrationConfig, root: Path, dependencies: dict[str, Path]
) -> tuple[Path, Payload]:
    """Simulate a tiny run of the calibration's stream under ``root``, derive its payload
    in-process (:func:`workers.standalone.derive`) and validate it; returns the payload's
    path (for the calibrations depending on it) and the payload."""
    raw = simulate(config, root / "raw")
    needed = {dep: dependencies[dep] for dep in config.depends_on}
    derived = derive(config, raw, root / config.name, needed)
    problems = validation_problems(config, derived)
    if problems:
        raise StandaloneError(f"the payload fails validation: {'; '.join(problems)}")
    return derived.payload_path, derived.payload


def simulate(config: CalibrationConfig, raw_root: Path) -> list[Path]:
    """A clean detector's run (no bad channel; PMTs, all healthy, for a calibration of
    LED events) with enough events for the calibration's ``validation.min_events``;
    returns its LS files."""
    events = max(80, config.validation.min_events)
    channels = config.raw_input.channels
    if "led" in config.step2.trigger_types:
        spec = DetectorSpec(type="pmt", channels=channels, events_per_ls=events, out_of_range=0)
    else:
        spec = DetectorSpec(channels=channels, events_per_ls=events, dead=0, noisy=0, hot=0)
    truth = make_detector_truth(spec, seed=DRY_RUN)
    paths = []
    for ls in range(1, DRY_RUN_LS + 1):
        content = generate_detector_ls(
            spec,
            truth,
            detector=config.raw_input.stream,
            run=DRY_RUN,
            ls=ls,
            seed=DRY_RUN,
            start_time=float(ls - 1),
            end_time=float(ls),
        )
        path = raw_path(raw_root, config.raw_input.stream, DRY_RUN, ls)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_raw_ls(path, content)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ run


def cmd_run(args: argparse.Namespace) -> int:
    """Derive each asked payload standalone (:mod:`loop.commands.calibrations_run`);
    exit 1 when one fails validation."""
    loop_config = loop_config_from(args)
    cat = catalogue(args)
    config = cat.get(args.name)
    # the services' warnings (a retried upload) on stderr; stdout is the result
    setup_logging(None, config.name, "calibrations-run", console_level=logging.WARNING)
    given = dict(args.dependency)
    records = [
        derive_target(
            loop_config,
            config,
            cat.configs,
            target,
            given,
            store=args.store,
            upload=args.upload,
        )
        for target in targets(loop_config, config, args.runs, args.files, args.out)
    ]

    def text() -> str:
        return "\n".join(_run_line(record) for record in records)

    emit(args, records, text)
    return EXIT_FAILED if any(r["validation_problems"] for r in records) else 0


def _run_line(record: dict[str, Any]) -> str:
    """One line per payload: what, from what, where, and its validation."""
    payload = record["payload"]
    runs = ",".join(map(str, record["runs"]))
    line = (
        f"{record['calibration']} runs {runs}: {payload['dtype']}{payload['shape']} from "
        f"{payload['events']} events -> {payload['path']}"
    )
    problems = record["validation_problems"]
    line += "; FAILS validation: " + "; ".join(problems) if problems else "; passes validation"
    if record["version"]:
        line += f"; stored as {record['version']}" + (" (retired)" if problems else "")
    if record["upload"]:
        upload = record["upload"]
        line += f"; upload to {upload['tag']} since {upload['since']}: {upload['status']}"
    if record["rejected_inputs"]:
        line += f"; {len(record['rejected_inputs'])} input(s) rejected (provenance.json)"
    return line
