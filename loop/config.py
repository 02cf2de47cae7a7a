"""Configuration: the global ``loop.yaml`` and one ``calibrations/<Name>.yaml`` each.

Files are validated with pydantic models that forbid unknown keys, so a typo such as
``nThraeds`` is an error rather than a silently ignored setting. Every problem is
reported as ``<file>: <key.path> (line N): <message>``; the line comes from the YAML
node tree, so an admin can jump straight to it.

Relative paths in ``loop.yaml`` are resolved against the directory of that file;
``~`` and ``$VARS`` are expanded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from loop.callpolicy import CallPolicy, MiB
from loop.errors import ConfigError

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

TriggerType = Literal["pedestal", "physics", "led"]
RunType = Literal["collisions", "cosmics"]
"""The run types the run registry reports (and the simulator plays); a typo in
``run_selection.run_types`` would silently select nothing, so it is an error."""
Synchronization = Literal["any", "validation", "offline", "mc", "hlt", "express", "prompt", "pcl"]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- loop.yaml


class PollConfig(StrictModel):
    """How often the daemons look at the world."""

    registry_s: float = Field(30.0, gt=0, description="seconds between registry polls")
    observer: Literal["inotify", "polling"] = Field(
        "inotify", description="'polling' for network filesystems where inotify sees nothing"
    )
    polling_interval_s: float = Field(
        1.0, gt=0, description="seconds between directory scans with observer: polling"
    )
    tick_s: float = Field(
        0.2,
        gt=0,
        description="seconds between job status polls while jobs are in flight; an idle "
        "daemon does not tick, it sleeps until an event (file, command, signal) or a timer",
    )
    heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="seconds between status-file updates (calloop status); an unchanged "
        "status is only touched; also the longest sleep of an idle daemon",
    )


class TimeoutConfig(StrictModel):
    """Time limits for everything that talks to another process or service."""

    registry_s: float = Field(10.0, gt=0, description="per attempt, the whole reply included")
    registry_attempts: int = Field(3, ge=1, description="tries per registry call")
    registry_backoff_s: float = Field(0.5, ge=0, description="first backoff (jittered)")
    registry_deadline_s: float = Field(30.0, gt=0, description="all attempts of one call")
    conddb_s: float = Field(10.0, gt=0, description="per attempt, the whole reply included")
    conddb_attempts: int = Field(3, ge=1, description="tries per conditions-DB call")
    conddb_deadline_s: float = Field(60.0, gt=0, description="all attempts of one call")
    max_reply_mb: float = Field(64.0, gt=0, description="largest service reply read")
    store_lock_s: float = Field(
        30.0, gt=0, description="longest wait for the calibration store's lock"
    )
    job_s: float = Field(
        3600.0, gt=0, description="run time of one job attempt before it is killed as a timeout"
    )
    job_grace_s: float | None = Field(
        None,
        ge=0,
        description="seconds past job_s before the daemon kills an attempt itself; "
        "default max(10 s, 10 % of job_s)",
    )

    def registry_policy(self) -> CallPolicy:
        """The call policy of every registry request."""
        return CallPolicy(
            attempts=self.registry_attempts,
            timeout_s=self.registry_s,
            deadline_s=self.registry_deadline_s,
            backoff_s=self.registry_backoff_s,
            max_bytes=int(self.max_reply_mb * MiB),
        )

    def conddb_policy(self) -> CallPolicy:
        """The call policy of every conditions-DB request."""
        return CallPolicy(
            attempts=self.conddb_attempts,
            timeout_s=self.conddb_s,
            deadline_s=self.conddb_deadline_s,
            max_bytes=int(self.max_reply_mb * MiB),
        )


class LocalBackendConfig(StrictModel):
    """The local backend: a bounded pool of subprocesses."""

    max_parallel: int = Field(2, ge=1, description="jobs running at once, per daemon")
    warm_pool: bool = Field(
        True,
        description="fork jobs from a pre-imported server per daemon instead of starting "
        "a Python interpreter for each (same files, deadlines, isolation); false: "
        "subprocesses only",
    )


class SlurmConfig(StrictModel):
    """Slurm submission settings (see ``workers/backends/slurm.py``)."""

    partition: str | None = Field(None, description="sbatch --partition; null: the default")
    time_limit: str = Field("01:00:00", description="sbatch --time")
    mem: str = Field("1G", description="sbatch --mem")
    cpus: int = Field(1, ge=1, description="sbatch --cpus-per-task")
    extra_directives: list[str] = Field(
        default_factory=list, description="further sbatch options, passed as given"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="variables added to the environment of every Slurm command",
    )
    max_in_flight: int = Field(
        50, ge=1, description="jobs submitted and not yet finished, per daemon"
    )
    vanish_grace_s: float = Field(
        30.0, ge=0, description="a job gone from squeue with no record is lost after this"
    )
    command_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for one sbatch/squeue/sacct/scancel"
    )


class JobsConfig(StrictModel):
    """Job backend choice and retry policy."""

    backend: Literal["local", "slurm"] = Field(
        "local", description="where jobs run, unless a calibration sets its own backend"
    )
    max_attempts: int = Field(3, ge=1, description="attempts of a job before it fails for good")
    retry_backoff_s: float = Field(
        5.0,
        ge=0,
        description="wait before a job's 2nd attempt, doubled for each further one; "
        "also the first backoff of a failed upload",
    )
    local: LocalBackendConfig = LocalBackendConfig()
    slurm: SlurmConfig = SlurmConfig()


class LoopConfig(StrictModel):
    """The global settings shared by every calibration's daemons."""

    work_dir: Path = Field(description="job directories, journals and status files")
    raw_root: Path = Field(
        description="raw LS files: <raw_root>/<stream>/run<R>/run<R>_ls<NNNN>.h5"
    )
    log_dir: Path = Field(description="<log_dir>/<Calibration>/<step>_{ALL,INFO,...}.log")
    store_root: Path = Field(description="the versioned HDF5 calibration store")
    registry_url: str = Field(description="run registry base URL (http or https)")
    conddb_url: str = Field(
        description="conditions DB: sqlite:///..., postgresql+psycopg://... or http(s)://..."
    )
    conddb_token_file: Path | None = Field(
        None, description="file holding the upload token; null: no token"
    )
    calibrations_dir: Path = Field(
        Path("calibrations"), description="where the <Name>.yaml calibration files are"
    )
    lookback_hours: float = Field(
        8.0,
        gt=0,
        description="runs that started earlier are not picked up; a run never ended "
        "is closed after this",
    )
    registry_max_ls: int = Field(
        10_000, ge=1, le=2**31 - 1, description="largest LS number a registry record may carry"
    )
    poll: PollConfig = PollConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    jobs: JobsConfig = JobsConfig()

    @field_validator("registry_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    def conddb_token(self) -> str | None:
        """The upload token, read from ``conddb_token_file`` if one is configured."""
        path = self.conddb_token_file
        if path is None:
            return None
        try:
            mode = path.stat().st_mode
            if mode & 0o077:  # a secret others on the machine could read or change
                raise ConfigError(
                    [
                        f"conddb_token_file {path}: readable or writable by group or others "
                        f"(mode {mode & 0o777:o}); run: chmod 600 {path}"
                    ]
                )
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError([f"conddb_token_file {path}: cannot read ({exc.strerror})"]) from exc


# ----------------------------------------------------------------- calibrations/<Name>.yaml


class Expert(StrictModel):
    """Who to call when this calibration misbehaves."""

    name: str = Field(description="who or which on-call rota")
    email: str = Field(description="contact; also the author of stored payloads")


class RunSelection(StrictModel):
    """Which runs of the registry this calibration processes."""

    run_types: list[RunType] = Field(
        ["collisions"], min_length=1, description="run types to process"
    )
    stable_beam: bool | None = Field(
        None, description="process only runs with (true) or without (false); null: both"
    )
    min_ls: int = Field(1, ge=1, description="runs shorter than this are skipped at run end")


class RawInput(StrictModel):
    """Where the raw LS files of this calibration's stream appear (under raw_root)."""

    stream: str = Field(min_length=1, description="directory under raw_root that is watched")
    channels: int = Field(ge=1, description="the detector's channel count; other files are bad")


COMMAND_PLACEHOLDERS = ("inputs", "output_dir", "run", "batch", "calibration", "job_dir")
COMMAND_DESCRIPTION = "own program as an argv template with {placeholders}; null: built-in worker"


def check_command(command: list[str] | None) -> list[str] | None:
    """A step's own command template: an argv list (no shell) whose ``{placeholders}``
    are plain names from :data:`COMMAND_PLACEHOLDERS`; ``{inputs}`` (the input files) is
    an item of its own; ``{inputs}`` and ``{output_dir}`` are required."""
    if command is None:
        return None
    if not command:
        raise ValueError("must name a program")
    used: set[str] = set()
    for index, item in enumerate(command):
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(item)]
        except ValueError as exc:
            raise ValueError(
                f"item {index} {item!r}: {exc} (write {{{{ }}}} for a brace)"
            ) from None
        for name, spec, conv in fields:
            if name is None:
                continue
            if name not in COMMAND_PLACEHOLDERS or spec or conv:
                raise ValueError(
                    f"item {index} {item!r}: unknown placeholder {{{name}"
                    f"{'!' + conv if conv else ''}{':' + spec if spec else ''}}}; "
                    f"use one of {', '.join('{' + p + '}' for p in COMMAND_PLACEHOLDERS)}"
                )
            if name == "inputs" and item != "{inputs}":
                raise ValueError(f"item {index} {item!r}: {{inputs}} must be an item of its own")
            used.add(name)
    missing = [f"{{{name}}}" for name in ("inputs", "output_dir") if name not in used]
    if missing:
        raise ValueError(f"must contain {' and '.join(missing)}")
    return command


class Step2Config(StrictModel):
    """Reco batching: raw LS files to reco jobs."""

    min_ls_per_job: int = Field(
        2, ge=1, description="smallest batch, unless the run ended or max_wait_s passed"
    )
    max_ls_per_job: int = Field(10, ge=1, description="largest batch")
    max_wait_s: float = Field(300.0, gt=0, description="launch a short batch after this wait")
    trigger_types: list[TriggerType] = Field(min_length=1, description="events reco keeps")
    common_mode_group: int | None = Field(
        None,
        ge=2,
        description="subtract each event's median of every group of N channels; null: off",
    )
    command: list[str] | None = Field(None, description=COMMAND_DESCRIPTION)

    _command = field_validator("command")(check_command)

    @model_validator(mode="after")
    def _min_le_max(self) -> Step2Config:
        if self.min_ls_per_job > self.max_ls_per_job:
            raise ValueError("min_ls_per_job must not exceed max_ls_per_job")
        return self


class Histogram(StrictModel):
    """Optional per-channel histogram accumulated by ALCA jobs."""

    bins: int = Field(64, ge=1, description="bins per channel")
    low: float = Field(0.0, description="lower edge (ADC)")
    high: float = Field(4096.0, description="upper edge (ADC)")


class Step3Config(StrictModel):
    """ALCA batching: reco outputs to mergeable per-channel accumulators."""

    min_files_per_job: int = Field(
        1, ge=1, description="smallest batch, unless the run ended or max_wait_s passed"
    )
    max_files_per_job: int = Field(5, ge=1, description="largest batch")
    max_wait_s: float = Field(300.0, gt=0, description="launch a short batch after this wait")
    occupancy_threshold: float = Field(
        400.0, description="ADC value above which a channel counts as occupied"
    )
    histogram: Histogram | None = Field(None, description="null: no histogram")
    command: list[str] | None = Field(None, description=COMMAND_DESCRIPTION)

    _command = field_validator("command")(check_command)

    @model_validator(mode="after")
    def _min_le_max(self) -> Step3Config:
        if self.min_files_per_job > self.max_files_per_job:
            raise ValueError("min_files_per_job must not exceed max_files_per_job")
        return self


DependencyPolicy = Literal["use_previous", "wait", "fail"]
"""What step 4 does when a calibration of ``depends_on`` has no accepted payload for a run
(see :class:`Step4Config` and :mod:`states.dependencies`)."""


class Step4Config(StrictModel):
    """Harvest cadence: how often statistics are re-harvested and uploaded."""

    harvest_every_files: int = Field(1, ge=1, description="re-harvest after N new ALCA outputs")
    min_interval_s: float = Field(0.0, ge=0, description="least time between two harvests of a run")
    upload_intermediate: bool = Field(
        True, description="false: intermediate harvests are stored but only the final one uploaded"
    )
    on_dependency_missing: DependencyPolicy = Field(
        "use_previous",
        description="when a calibration of depends_on ends a run without an accepted payload "
        "(Failed, Skipped, Rejected, UploadRefused, no payload): 'use_previous' harvests with "
        "its newest accepted payload valid for the run (the run fails if there is none), "
        "'wait' waits until it has one (an operator retries or reruns it), 'fail' sends the "
        "run to Failed",
    )
    command: list[str] | None = Field(None, description=COMMAND_DESCRIPTION)

    _command = field_validator("command")(check_command)


class PayloadConfig(StrictModel):
    """What the harvest produces and where it goes."""

    ctype: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="calibration type name in the store (a safe store name, at most 64 chars)",
    )
    destination_tag: str = Field(min_length=1, description="conditions-DB tag uploaded to")
    time_type: Literal["run", "lumi", "time"] = Field(
        "run",
        description="the tag's IOV unit; lumi: one payload per group of lumi_group LS, each "
        "uploaded as its own IOV as soon as its LS are all in (or the run ended)",
    )
    lumi_group: int = Field(
        1, ge=1, le=10_000, description="LS per payload of a time_type lumi calibration"
    )
    synchronization: Synchronization = Field("prompt", description="the tag's synchronization type")
    object_type: str = Field(min_length=1, description="the tag's payload object type")


class ValidationConfig(StrictModel):
    """Checks a harvested payload must pass before it is uploaded."""

    min_events: int = Field(50, ge=1, description="fewest events a payload is derived from")
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="largest fraction of bad channels"
    )
    max_mean_shift: float | None = Field(
        None,
        gt=0,
        description="largest pedestal change vs the previous payload (ADC); null: unchecked",
    )
    allow_nonfinite: bool = Field(False, description="accept NaN/inf values")


class StatisticsConfig(StrictModel):
    """How many events one payload needs (per run, or accumulated over consecutive runs)."""

    min_events: int | None = Field(
        None,
        ge=1,
        description="events one payload needs: a harvest with fewer is held back (neither "
        "stored nor uploaded); null: every harvest is published",
    )
    across_runs: bool = Field(
        False,
        description="true: a run that ends short of min_events hands its statistics on to "
        "the next run of this calibration, until together they reach min_events; the "
        "payload is valid from the first run used, open-ended (time_type run only)",
    )

    @model_validator(mode="after")
    def _across_needs_a_target(self) -> StatisticsConfig:
        if self.across_runs and self.min_events is None:
            raise ValueError("across_runs needs min_events (the events to accumulate)")
        return self


class CalibrationConfig(StrictModel):
    """One calibration workflow: its run selection, batching, payload and validation."""

    name: str = Field(
        pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="must equal the file name (<name>.yaml)"
    )
    label: str = Field(description="short human name")
    description: str = Field(description="what is calibrated, from which events")
    detector: str = Field(
        pattern=r"^[a-z0-9]+-[A-Za-z0-9]+$", description="store detector name, <dettype>-<detid>"
    )
    kind: str = Field(
        description="the calibration kind: its algorithm, a plug-in of the entry-point group "
        "calloop.kinds (built in: pedestals, bad_channels, pmt_gain; calloop calibrations "
        "list)"
    )
    expert: Expert
    run_selection: RunSelection = RunSelection()
    raw_input: RawInput
    step2: Step2Config
    step3: Step3Config = Step3Config()
    step4: Step4Config = Step4Config()
    payload: PayloadConfig
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,  # an absent section gets the kind's defaults too
        description="the kind's own parameters, validated by its schema (for the built-in "
        "kinds: the parameters.* keys below); the effective values have defaults resolved",
    )
    validation: ValidationConfig = ValidationConfig()
    statistics: StatisticsConfig = StatisticsConfig()
    depends_on: list[str] = Field(
        default_factory=list,
        description="calibrations this one builds on (checked to exist and not to form a "
        "cycle): step 4 harvests a run once each has finished it, with their payloads as "
        "inputs (see step4.on_dependency_missing)",
    )
    backend: Literal["local", "slurm"] | None = Field(
        None, description="job backend of this calibration; null: jobs.backend"
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from workers.kinds import KindError, get_kind  # the registry imports this module

        try:
            get_kind(value)
        except KindError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("parameters")
    @classmethod
    def _kind_parameters(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validate ``parameters`` with the kind's schema; keep them with defaults resolved
        (the frozen copy and the config hash then carry the effective values)."""
        kind = info.data.get("kind")
        if kind is None:  # an unknown kind is reported on its own key
            return value
        from workers.kinds import get_kind

        try:
            params = get_kind(kind).Parameters.model_validate(value)
        except ValidationError as exc:
            raise kind_parameters_error(kind, exc) from None
        return params.model_dump(mode="json")

    @model_validator(mode="after")
    def _runs_accumulate_into_run_iovs(self) -> CalibrationConfig:
        if self.statistics.across_runs and self.payload.time_type != "run":
            raise ValueError(
                "statistics.across_runs needs payload.time_type run (the payload is valid "
                "from the first run it used)"
            )
        return self

    def canonical_json(self) -> bytes:
        """The effective configuration (defaults resolved) as canonical JSON bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    def config_hash(self) -> str:
        """SHA-256 of :meth:`canonical_json`: the hash a job's frozen copy carries."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


# --------------------------------------------------------------------------- YAML loading


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int], list[str]]:
    """Parse ``path``; return the data, a key-path -> line map and structural problems."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: YAML syntax error{where}: {problem}"]) from exc
    lines: dict[Loc, int] = {}
    problems: list[str] = []
    if node is not None:
        _index_lines(node, (), lines, problems, path)
    return data, lines, problems


def _index_lines(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[str], path: Path
) -> None:
    """Record the line of every key and flag duplicate keys (YAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*loc, key)
            line = key_node.start_mark.line + 1
            if child in lines:
                problems.append(f"{path}: {_dotted(child)} (line {line}): duplicate key")
            lines[child] = line
            _index_lines(value_node, child, lines, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _index_lines(item, (*loc, index), lines, problems, path)


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def _line_of(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def location(path: Path, loc: Loc, lines: dict[Loc, int]) -> str:
    """Where a key is, as ``<file>: <key.path> (line N)``."""
    line = _line_of(loc, lines)
    where = f" (line {line})" if line else ""
    return f"{path}: {_dotted(loc)}{where}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` when ``word`` is close to one of ``choices``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _literal_message(err: ErrorDetails) -> str:
    expected = str((err.get("ctx") or {}).get("expected", ""))
    # pydantic names the allowed values only as text ("'a', 'b' or 'c'"); ours are plain words
    choices = re.findall(r"'([^']*)'", expected)
    return f"{err['input']!r} is not one of {expected}" + did_you_mean(str(err["input"]), choices)


KIND_PARAMETERS_ERROR = "kind_parameters"


def kind_parameters_error(kind: str, exc: ValidationError) -> PydanticCustomError:
    """The error of ``parameters`` invalid for the kind's schema; it carries each of the
    schema's errors, so a file's problems name every bad key below ``parameters``."""
    errors = exc.errors(include_url=False)
    details = "; ".join(f"{_dotted(tuple(e['loc']))}: {e['msg']}" for e in errors)
    return PydanticCustomError(
        KIND_PARAMETERS_ERROR,
        "invalid for kind {kind}: {details}",
        {"kind": kind, "details": details, "errors": errors},
    )


REPLACED_KEYS: dict[Loc, str] = {
    ("payload", "calibration_type"): "replaced by the top-level key 'kind' (write: kind: {value})",
    ("algorithm",): "replaced by 'parameters' (the kind's own parameters; same keys for the "
    "built-in kinds)",
}
"""Keys of earlier versions, and what to write instead."""


def _flat_errors(exc: ValidationError) -> Iterable[ErrorDetails]:
    """The errors of ``exc``, those of a kind's parameters expanded below ``parameters``."""
    for err in exc.errors():
        if err["type"] != KIND_PARAMETERS_ERROR:
            yield err
            continue
        inner_errors: list[ErrorDetails] = (err.get("ctx") or {})["errors"]
        for inner in inner_errors:
            yield {**inner, "loc": (*err["loc"], *inner["loc"])}


def _format_validation(path: Path, exc: ValidationError, lines: dict[Loc, int]) -> list[str]:
    problems = []
    for err in _flat_errors(exc):
        loc: Loc = tuple(part for part in err["loc"] if isinstance(part, (str, int)))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc in REPLACED_KEYS:
            message = REPLACED_KEYS[loc].format(value=err["input"])
        elif err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against the documented keys)"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif err["type"] == "literal_error":
            message = _literal_message(err)
        problems.append(f"{location(path, loc, lines)}: {message}")
    return problems


def validate_model(
    model: type[M], path: Path, data: Any, lines: dict[Loc, int], problems: list[str]
) -> M:
    if not isinstance(data, dict):
        raise ConfigError([*problems, f"{path}: top level must be a mapping of keys"])
    try:
        result = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems + _format_validation(path, exc, lines)) from None
    if problems:
        raise ConfigError(problems)
    return result


def _resolve_path(value: Any, base: Path) -> Any:
    if not isinstance(value, str):
        return value
    expanded = Path(os.path.expandvars(os.path.expanduser(value)))
    return expanded if expanded.is_absolute() else (base / expanded).resolve()


_LOOP_PATH_KEYS = (
    "work_dir",
    "raw_root",
    "log_dir",
    "store_root",
    "conddb_token_file",
    "calibrations_dir",
)


def load_loop_config(path: Path) -> LoopConfig:
    """Load and validate ``loop.yaml``; relative paths resolve against its directory."""
    data, lines, problems = read_yaml(path)
    if isinstance(data, dict):
        data = dict(data)
        data.setdefault("calibrations_dir", "calibrations")
        for key in _LOOP_PATH_KEYS:
            if key in data:
                data[key] = _resolve_path(data[key], path.parent.resolve())
        if isinstance(data.get("conddb_url"), str) and data["conddb_url"].startswith("sqlite:///"):
            db = _resolve_path(data["conddb_url"].removeprefix("sqlite:///"), path.parent.resolve())
            data["conddb_url"] = f"sqlite:///{db}"
    return validate_model(LoopConfig, path, data, lines, problems)


def load_calibration(path: Path) -> CalibrationConfig:
    """Load and validate one calibration YAML; its ``name`` must equal the file stem."""
    return _load_calibration(path)[0]


def _load_calibration(path: Path) -> tuple[CalibrationConfig, dict[Loc, int]]:
    data, lines, problems = read_yaml(path)
    config = validate_model(CalibrationConfig, path, data, lines, problems)
    if config.name != path.stem:
        line = lines.get(("name",))
        raise ConfigError(
            [f"{path}: name (line {line}): '{config.name}' must equal the file name '{path.stem}'"]
        )
    return config, lines


def calibration_path(loop_config: LoopConfig, name: str) -> Path:
    """Where the YAML of calibration ``name`` lives."""
    return loop_config.calibrations_dir / f"{name}.yaml"


def load_all_calibrations(directory: Path) -> tuple[dict[str, CalibrationConfig], list[str]]:
    """Load every ``*.yaml`` in ``directory``; return the valid ones and every problem found,
    including those between files (:func:`cross_calibration_problems`)."""
    configs: dict[str, CalibrationConfig] = {}
    lines: dict[str, dict[Loc, int]] = {}
    problems: list[str] = []
    files = sorted(directory.glob("*.yaml")) if directory.is_dir() else []
    if not files:
        problems.append(f"{directory}: no calibration files (*.yaml) found")
    for file in files:
        try:
            configs[file.stem], lines[file.stem] = _load_calibration(file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    names = {file.stem for file in files}  # an invalid file is reported, not "unknown"
    problems.extend(cross_calibration_problems(configs, lines, directory, names))
    return configs, problems


SHARED_TARGETS: tuple[tuple[Loc, Callable[[CalibrationConfig], str]], ...] = (
    (("payload", "destination_tag"), lambda c: f"destination tag '{c.payload.destination_tag}'"),
    (
        ("payload", "ctype"),
        lambda c: f"store entry detector '{c.detector}', ctype '{c.payload.ctype}'",
    ),
)
"""What two calibrations must not share: each would overwrite the other's payloads."""


def cross_calibration_problems(
    configs: dict[str, CalibrationConfig],
    lines: dict[str, dict[Loc, int]],
    directory: Path,
    names: set[str],
) -> list[str]:
    """What no single file shows: ``depends_on`` naming a calibration not in ``names`` or
    forming a cycle (A -> B -> A), and a :data:`SHARED_TARGETS` entry written twice."""
    where = _locator(directory, lines)
    problems = []
    for name, config in configs.items():
        for index, dep in enumerate(config.depends_on):
            if dep not in names:
                message = f"unknown calibration '{dep}'" + did_you_mean(dep, names)
                problems.append(f"{where(name, ('depends_on', index))}: {message}")
        cycle = find_cycle(name, configs)
        if cycle and cycle[0] == min(cycle[:-1]):  # report each cycle once
            first_step = ("depends_on", config.depends_on.index(cycle[1]))
            problems.append(f"{where(name, first_step)}: circular depends_on: {' -> '.join(cycle)}")
    for loc, target in SHARED_TARGETS:
        owners: dict[str, str] = {}
        for name, config in configs.items():
            first = owners.setdefault(target(config), name)
            if first != name:
                problems.append(
                    f"{where(name, loc)}: {target(config)} is also that of {where(first, loc)}; "
                    "give each calibration its own"
                )
    return problems


def _locator(directory: Path, lines: dict[str, dict[Loc, int]]) -> Callable[[str, Loc], str]:
    """``<file>: <key.path> (line N)`` of a key in the calibration file of ``name``."""
    return lambda name, loc: location(directory / f"{name}.yaml", loc, lines[name])


def find_cycle(start: str, configs: dict[str, CalibrationConfig]) -> list[str] | None:
    """A ``depends_on`` cycle through ``start`` as ``[start, ..., start]``, or None."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    while stack:
        node, trail = stack.pop()
        for dep in configs[node].depends_on if node in configs else []:
            if dep == start:
                return [*trail, dep]
            if dep not in trail:
                stack.append((dep, [*trail, dep]))
    return None


def dependency_chain(name: str, configs: dict[str, CalibrationConfig]) -> list[str]:
    """Every calibration ``name`` builds on, directly or not, each after its own
    dependencies (the order their payloads become final); ``name`` itself is not listed.
    Names missing from ``configs`` are listed but not followed; a cycle is not followed
    twice (:func:`cross_calibration_problems` reports it)."""
    order: list[str] = []
    visiting = {name}

    def visit(node: str) -> None:
        for dep in configs[node].depends_on if node in configs else []:
            if dep in visiting or dep in order:
                continue
            visiting.add(dep)
            visit(dep)
            order.append(dep)

    visit(name)
    return order


def check_config_dir(config_dir: Path) -> list[str]:
    """Validate ``loop.yaml`` and every calibration below ``config_dir``; list all problems."""
    problems: list[str] = []
    calibrations_dir = config_dir / "calibrations"
    try:
        loop_config = load_loop_config(config_dir / "loop.yaml")
        calibrations_dir = loop_config.calibrations_dir
    except ConfigError as exc:
        problems.extend(exc.problems)
    _configs, calibration_problems = load_all_calibrations(calibrations_dir)
    return problems + calibration_problems


def default_config_dir() -> Path:
    """``$CALLOOP_CONFIG_DIR``, else ``./config`` if present, else the repository's ``config/``."""
    env = os.environ.get("CALLOOP_CONFIG_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "config"
    if (local / "loop.yaml").exists():
        return local
    return Path(__file__).resolve().parent.parent / "config"


def dump_yaml(path: Path, data: dict[str, Any]) -> None:
    """Write a config mapping as YAML atomically (used by the demo and tests)."""
    from loop.fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
