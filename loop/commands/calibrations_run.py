"""``calloop calibrations run <Name> --runs ... | --files ... --out DIR``: a calibration's
payload derived standalone, before (or beside) the automatic system.

The workers run in-process on existing files (:func:`workers.standalone.derive`): with
``--runs``, one payload per run from its raw LS files under ``raw_root``, as step 4 would
harvest it; with ``--files`` (raw LS or reco files), one payload of all of them. Each
goes to ``DIR`` (``DIR/run<R>/`` per run): ``payload.npy``, ``summary.json`` and
``provenance.json`` (calibration, kind, configuration hash, inputs, dependency payloads,
validation). ``--store`` adds it to the calibration store as a version (retired when it
fails validation, as the daemons do) and ``--upload`` sends a validated one to the
conditions DB under the calibration's tag, with an idempotency key, so a repeated command
changes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loop import __version__
from loop.conddb.client import ConditionsDB
from loop.conddb.rules import lumi_since
from loop.config import CalibrationConfig, LoopConfig
from loop.errors import CalloopError, StoreError
from loop.fsutil import atomic_path, atomic_write_json, sha256_file
from loop.rawformat import run_dir
from loop.store import CalibStore
from states.lumi import validate_groups
from workers.kinds import get_kind
from workers.standalone import Derived, derive

PAYLOAD, SUMMARY, PROVENANCE = "payload.npy", "summary.json", "provenance.json"


def run_numbers(text: str) -> list[int]:
    """``--runs``: ``R``, ``R1,R2,...`` or ``R1-R2`` (inclusive), ascending."""
    runs: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last or first)
            if not 0 < low <= high or high - low > 10_000:
                raise ValueError
            runs.update(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not R, R1,R2,... or R1-R2 (positive run numbers)"
        ) from None
    return sorted(runs)


@dataclass(frozen=True)
class Target:
    """One payload to derive: its inputs, where it goes, the run its validity starts at."""

    label: str  # "run386001" or "files"
    inputs: list[Path]
    out: Path
    run: int | None = None  # the run of a --runs target


def targets(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    runs: list[int] | None,
    files: list[Path] | None,
    out: Path,
) -> list[Target]:
    """What ``--runs`` / ``--files`` ask for; a run without raw files is an error naming
    the directory searched."""
    if files is not None:
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise CalloopError(f"no such file: {', '.join(missing)}")
        return [Target("files", list(files), out)]
    found = []
    for run in runs or []:
        directory = run_dir(loop_config.raw_root, config.raw_input.stream, run)
        raw = sorted(directory.glob(f"run{run}_ls*.h5"))
        if not raw:
            raise CalloopError(f"run {run}: no raw LS files in {directory}")
        found.append(Target(f"run{run}", raw, out / f"run{run}", run))
    return found


def derive_target(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    configs: dict[str, CalibrationConfig],
    target: Target,
    given: dict[str, Path],
    *,
    store: bool,
    upload: bool,
) -> dict[str, Any]:
    """Derive, validate and write one target; store and upload it when asked. Returns
    its provenance (also written as ``provenance.json``)."""
    target.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="calloop-run-") as tmp:
        work = Path(tmp)
        dependencies = _dependencies(loop_config, config, configs, target, given=given, work=work)
        derived = derive(config, target.inputs, work / "work", dependencies)
        with atomic_path(target.out / PAYLOAD, ".npy") as copy:
            shutil.copyfile(derived.payload_path, copy)
        atomic_write_json(target.out / SUMMARY, derived.payload.summary)
        problems = validation_problems(config, derived)
        record: dict[str, Any] = {
            "calibration": config.name,
            "kind": config.kind,
            "config_sha256": derived.config_sha256,
            "software": f"calloop {__version__}",
            "runs": derived.runs,
            "inputs": [str(path) for path in target.inputs],
            "rejected_inputs": [bad.model_dump() for bad in derived.rejected],
            "dependencies": {
                name: {"path": str(path), "sha256": sha256_file(path)}
                for name, path in sorted(dependencies.items())
            },
            "payload": {
                "path": str(target.out / PAYLOAD),
                "dtype": str(derived.payload.array.dtype),
                "shape": list(derived.payload.array.shape),
                "events": derived.payload.summary.get("events"),
            },
            "validation_problems": problems,
            "version": None,
            "upload": None,
        }
        if store:
            record["version"] = _store(loop_config, config, derived, target, problems)
        if upload and not problems:
            record["upload"] = _upload(loop_config, config, derived, target, record["version"])
    atomic_write_json(target.out / PROVENANCE, record)
    return record


def validation_problems(config: CalibrationConfig, derived: Derived) -> list[str]:
    """What the daemons' step 4 would say of the payload: the kind's checks (those of
    each LS group of a lumi calibration, as :mod:`states.lumi` does)."""
    if config.payload.time_type == "lumi":
        return validate_groups(config, derived.payload_path.parent, derived.payload.summary)[0]
    return get_kind(config.kind).validate(derived.payload, None, config.validation)


def _dependencies(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    configs: dict[str, CalibrationConfig],
    target: Target,
    *,
    given: dict[str, Path],
    work: Path,
) -> dict[str, Path]:
    """The payload file of each calibration of ``depends_on``: as given on the command
    line, else the store's payload of that calibration for the first run."""
    unknown = sorted(set(given) - set(config.depends_on))
    if unknown:
        raise CalloopError(
            f"--dependency {', '.join(unknown)}: {config.name} does not depend on it "
            f"(depends_on: {', '.join(config.depends_on) or 'none'})"
        )
    found = {}
    for name in config.depends_on:
        if name in given:
            found[name] = given[name]
            continue
        found[name] = _stored_dependency(loop_config, configs, name, target, work)
    return found


def _stored_dependency(
    loop_config: LoopConfig,
    configs: dict[str, CalibrationConfig],
    name: str,
    target: Target,
    work: Path,
) -> Path:
    dependency = configs.get(name)
    run = target.run
    if dependency is None or run is None:
        raise CalloopError(f"give the payload of {name} with --dependency {name}=PATH")
    try:
        array = (
            _store_of(loop_config)
            .detector(dependency.detector)
            .get(dependency.payload.ctype, run=run)
            .array
        )
    except StoreError as exc:
        raise CalloopError(
            f"{name} has no payload for run {run} in {loop_config.store_root} ({exc}); "
            f"give it with --dependency {name}=PATH"
        ) from None
    path = work / f"{name}.npy"
    np.save(path, np.asarray(array), allow_pickle=False)
    return path


def _store_of(loop_config: LoopConfig) -> CalibStore:
    return CalibStore(loop_config.store_root, lock_timeout_s=loop_config.timeouts.store_lock_s)


def _begin(derived: Derived) -> int:
    if not derived.runs or derived.runs[0] <= 0:
        raise CalloopError("the inputs name no run: the payload's validity cannot start")
    return derived.runs[0]


def _store(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    derived: Derived,
    target: Target,
    problems: list[str],
) -> str:
    """A store version of the payload, valid from its first run (retired: failed)."""
    detector = _store_of(loop_config).detector(config.detector, create=True)
    return detector.add(
        config.payload.ctype,
        derived.payload.array,
        begin=_begin(derived),
        retired=bool(problems),
        allow_nonfinite=config.validation.allow_nonfinite,
        comment=f"calloop calibrations run ({target.label})",
        metadata={
            "source_runs": derived.runs,
            "config_sha256": derived.config_sha256,
            "software": f"calloop {__version__}",
            "author": f"calloop calibrations run ({config.expert.email})",
            "quality": derived.payload.summary,
            "validation_problems": problems,
            "standalone_inputs": [str(path) for path in target.inputs],
        },
    )


def _upload(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    derived: Derived,
    target: Target,
    version: str | None,
) -> dict[str, Any]:
    """Upload under the calibration's tag, keyed by the payload's hash (idempotent)."""
    payload = config.payload
    if payload.time_type == "time":
        raise CalloopError(
            f"{config.name}: time_type time needs the run's start from the registry; "
            "upload it through the daemons"
        )
    begin = _begin(derived)
    since = lumi_since(begin, 1) if payload.time_type == "lumi" else begin
    conditions = ConditionsDB.connect(
        loop_config.conddb_url,
        loop_config.conddb_token(),
        policy=loop_config.timeouts.conddb_policy(),
    )
    conditions.create_tag(
        payload.destination_tag,
        time_type=payload.time_type,
        object_type=payload.object_type,
        synchronization=payload.synchronization,
        description=f"calloop {config.name}",
    )
    digest = sha256_file(derived.payload_path)[:16]
    result = conditions.upload(
        payload.destination_tag,
        since,
        derived.payload.array,
        input_tag=version or "",
        user_text=f"calloop calibrations run {config.name} {target.label} "
        f"config_sha256 {derived.config_sha256}",
        key=f"calloop:{config.name}:{payload.destination_tag}:standalone:{since}:{digest}",
    )
    return {
        "tag": result.tag,
        "since": result.since,
        "status": result.status,
        "hash": result.payload_hash,
    }
