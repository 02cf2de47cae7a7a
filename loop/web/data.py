"""What the control room shows, read from where the loop keeps it: each daemon's journal
(opened read-only), its status file (:func:`loop.commands.daemon_cmd.collect_status`,
the reader behind ``calloop status``), ``summary.json`` and the job directories.

Every query is per run or bounded (``LIMIT``), so a page costs the same with ten runs
in the journals as with ten thousand (``benchmarks/web_bench.py``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.commands.daemon_cmd import LIVE_STATES, collect_status, needs_operator
from loop.commands.runs_cmd import CLOSED, FAILED
from loop.config import CalibrationConfig, LoopConfig, load_all_calibrations
from loop.control.runcontrol import Command
from loop.errors import JournalError
from loop.journal import JobRow, Journal, UploadRow
from loop.runrecord import RunRecord
from states import STEPS

FINAL_STEP4 = ("Done", "Rejected", "UploadRefused")
UPLOAD_STATES = ("pending", "done", "superseded", "refused")
MAX_IN_FLIGHT = 50  # runs listed per calibration on the overview; the rest are counted
LOG_TAIL_BYTES = 2048


class JournalReader(Journal):
    """A daemon's journal opened read-only: every reader of :class:`Journal`, no write.

    The page never takes a write lock a daemon could wait for, and skips the integrity
    check the daemon itself runs at start (it reads every page: too slow per request).
    """

    def __init__(self, path: Path) -> None:  # replaces Journal's opening on purpose
        self.path = path
        try:
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise JournalError(f"journal {path} cannot be read: {exc}") from None

    def latest(
        self, states: tuple[str, ...], limit: int
    ) -> list[tuple[int, str, float, RunRecord]]:
        """(run, state, last change, record) of the newest ``limit`` runs in ``states``."""
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT run, state, updated, info FROM runs WHERE state IN ({marks}) "
            "ORDER BY run DESC LIMIT ?",
            (*states, limit),
        )
        return [
            (int(r[0]), str(r[1]), float(r[2]), RunRecord.from_json(json.loads(r[3]))) for r in rows
        ]

    def updated(self, run: int) -> float | None:
        """When the run's row last changed."""
        row = self._db.execute("SELECT updated FROM runs WHERE run=?", (run,)).fetchone()
        return None if row is None else float(row[0])

    def runs_page(self, limit: int, offset: int) -> list[tuple[int, str, float]]:
        """(run, state, last change) of a page of runs, newest first."""
        rows = self._db.execute(
            "SELECT run, state, updated FROM runs ORDER BY run DESC LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [(int(r[0]), str(r[1]), float(r[2])) for r in rows]

    def commands(self, run: int) -> list[Command]:
        """The operator commands given for the run (none before a daemon made the table)."""
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='commands'"
        ).fetchone()
        if not exists:
            return []
        rows = self._db.execute("SELECT * FROM commands WHERE run=? ORDER BY id", (run,))
        return [Command(*row) for row in rows]

    def count_runs(self) -> int:
        """How many runs the journal holds."""
        return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def newest_upload(self, state: str) -> UploadRow | None:
        """The most recently queued outbox entry in ``state``."""
        rows = self._db.execute(
            "SELECT * FROM uploads WHERE state=? ORDER BY created DESC LIMIT 1", (state,)
        ).fetchall()
        return None if not rows else self.uploads(states=(state,), run=int(rows[0][0]))[-1]


def journal_path(loop_config: LoopConfig, calibration: str, step: str) -> Path:
    """Where a step's journal lives (the layout of :mod:`loop.commands.runs_cmd`)."""
    return loop_config.work_dir / calibration / f"{step}.journal.sqlite"


_THREAD = threading.local()


def cached_reader(path: Path) -> JournalReader | None:
    """This thread's read-only connection to a journal (None: no journal there).

    A connection's first query costs milliseconds (schema, shared memory); a page and
    every live update read several journals, so each server thread keeps its own
    connection per journal (SQLite connections stay in their thread), reopened when
    the file was replaced (a journal moved aside and started anew).
    """
    try:
        inode = path.stat().st_ino
    except OSError:
        return None
    cache: dict[Path, tuple[int, JournalReader]] = _THREAD.__dict__.setdefault("readers", {})
    hit = cache.get(path)
    if hit is not None and hit[0] == inode:
        return hit[1]
    if hit is not None:
        hit[1].close()
    reader = JournalReader(path)
    cache[path] = (inode, reader)
    return reader


class Journals:
    """The read-only journals of one calibration's steps (those that exist)."""

    def __init__(self, loop_config: LoopConfig, calibration: str) -> None:
        self.readers: dict[str, JournalReader] = {}
        for step in STEPS:
            reader = cached_reader(journal_path(loop_config, calibration, step))
            if reader is not None:
                self.readers[step] = reader

    def __enter__(self) -> Journals:
        return self

    def __exit__(self, *_exc: object) -> None:
        """The connections stay cached for the thread's next page."""

    def states(self, run: int) -> dict[str, str | None]:
        """The run's state in every step (None: not seen, or no journal yet)."""
        return {
            step: (self.readers[step].run_state(run) if step in self.readers else None)
            for step in STEPS
        }


# ------------------------------------------------------------------------ the site


@dataclass
class Site:
    """The loop the control room looks at: loop.yaml and the calibrations' YAML, read at
    start and again on "reload configuration"."""

    loop_config: LoopConfig
    calibrations: dict[str, CalibrationConfig] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    loaded_at: float = 0.0

    def reload(self) -> None:
        """Read every calibration YAML again (an invalid file is listed, not fatal)."""
        self.calibrations, self.problems = load_all_calibrations(self.loop_config.calibrations_dir)
        self.loaded_at = time.time()

    def owner(self, detector: str, ctype: str) -> CalibrationConfig | None:
        """The calibration that writes (detector, ctype) (config check keeps it unique)."""
        return next(
            (
                c
                for c in self.calibrations.values()
                if c.detector == detector and c.payload.ctype == ctype
            ),
            None,
        )

    def fingerprint(self, bucket_s: float = 2.0) -> tuple[Any, ...]:
        """Changes whenever anything the overview shows may have changed: a journal or
        status file written, a YAML edited; and every ``bucket_s`` at least, so that a
        dead daemon's heartbeat age keeps growing on the page."""
        marks: list[Any] = [int(time.time() // bucket_s), self.loaded_at]
        for name in self.calibrations:
            directory = self.loop_config.work_dir / name
            for step in STEPS:
                for suffix in (".journal.sqlite", ".journal.sqlite-wal", ".status.json"):
                    marks.append(_stamp(directory / f"{step}{suffix}"))
        return tuple(marks)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size)


# ------------------------------------------------------------------------ overview


@dataclass
class StepView:
    """One daemon as the overview shows it."""

    step: str
    state: str  # running, degraded, stopped, DEAD, or "never started"
    ok: bool
    heartbeat_age_s: float | None
    pid: int | None
    detail: str = ""


@dataclass
class PayloadRef:
    """A run's payload as the overview links it."""

    run: int
    state: str
    time: float
    version: str | None
    accepted_version: str | None
    problems: list[str]

    @property
    def validation(self) -> str:
        """One word for the validation result."""
        if self.version is None:
            return "no payload"
        return "failed" if self.problems else "passed"


@dataclass
class CalibrationView:
    """Everything the overview shows of one calibration."""

    config: CalibrationConfig
    steps: list[StepView]
    in_flight: list[tuple[int, dict[str, str | None]]]
    in_flight_total: int
    last: PayloadRef | None
    last_ok: PayloadRef | None
    attention: list[tuple[str, str, str]]  # (step, run, why)
    uploads_waiting: list[dict[str, Any]]
    services: dict[str, dict[str, Any]]
    runs_total: int

    @property
    def needs_operator(self) -> bool:
        """A daemon down or degraded, a run needing attention or a service unreachable."""
        return (
            any(not s.ok for s in self.steps)
            or bool(self.attention)
            or any(s.get("reachable") is False for s in self.services.values())
        )


def overview(site: Site) -> dict[str, list[CalibrationView]]:
    """The calibrations grouped by detector type (``ecal``, ``sistrip``, ...)."""
    statuses: dict[tuple[str, str], dict[str, Any]] = {
        (row.get("calibration", ""), row.get("step", "")): row
        for row in collect_status(site.loop_config)
    }
    groups: dict[str, list[CalibrationView]] = {}
    for _name, config in sorted(site.calibrations.items()):
        view = calibration_view(site.loop_config, config, statuses)
        groups.setdefault(config.detector.partition("-")[0], []).append(view)
    return dict(sorted(groups.items()))


def calibration_view(
    loop_config: LoopConfig,
    config: CalibrationConfig,
    statuses: dict[tuple[str, str], dict[str, Any]],
) -> CalibrationView:
    """One calibration's card: daemons, runs in flight, last payloads, attention."""
    rows = {step: statuses.get((config.name, step)) for step in STEPS}
    with Journals(loop_config, config.name) as journals:
        active = sorted(
            {run for reader in journals.readers.values() for run, _ in reader.active_runs()},
            reverse=True,
        )
        in_flight = [(run, journals.states(run)) for run in active[:MAX_IN_FLIGHT]]
        step4 = journals.readers.get("step4")
        last = _payload_refs(step4, FINAL_STEP4, 1)
        last_ok = [p for p in _payload_refs(step4, ("Done",), 20) if p.accepted_version]
        runs_total = max((r.count_runs() for r in journals.readers.values()), default=0)
    attention = [
        (step, run, why)
        for step, row in rows.items()
        if row is not None
        for run, why in (row.get("runs_needing_attention") or {}).items()
    ]
    services = {
        service: row[service]
        for row in rows.values()
        if row is not None
        for service in ("registry", "conditions_db")
        if isinstance(row.get(service), dict)
    }
    waiting = list((rows.get("step4") or {}).get("uploads_waiting") or [])
    return CalibrationView(
        config=config,
        steps=[_step_view(step, rows[step]) for step in STEPS],
        in_flight=in_flight,
        in_flight_total=len(active),
        last=last[0] if last else None,
        last_ok=last_ok[0] if last_ok else None,
        attention=attention,
        uploads_waiting=waiting,
        services=services,
        runs_total=runs_total,
    )


def _step_view(step: str, row: dict[str, Any] | None) -> StepView:
    if row is None:
        return StepView(step, "never started", False, None, None)
    state = str(row.get("state", "?"))
    if state in LIVE_STATES and not row.get("alive"):
        state = "DEAD"
    detail = str(row.get("degraded_reason") or "")
    ok = state == "running" and not needs_operator({**row, "runs_needing_attention": {}})
    return StepView(step, state, ok, row.get("heartbeat_age_s"), row.get("pid"), detail)


def _payload_refs(
    reader: JournalReader | None, states: tuple[str, ...], limit: int
) -> list[PayloadRef]:
    if reader is None:
        return []
    return [
        PayloadRef(
            run, state, updated, record.last_version, record.accepted_version, record.last_problems
        )
        for run, state, updated, record in reader.latest(states, limit)
    ]


# ------------------------------------------------------------------------- run page


@dataclass
class JobView:
    """A job with the tail of its newest attempt's logs."""

    job: JobRow
    stderr_tail: str
    stdout_tail: str


@dataclass
class StepDetail:
    """One step of one run: the run page's section."""

    step: str
    state: str
    history: list[tuple[str, float, float | None]]  # (state, entered, seconds in it)
    record: RunRecord
    jobs: list[JobView]
    bad_inputs: dict[str, str]
    uploads: list[UploadRow]
    commands: list[Command]
    summary: dict[str, Any] | None

    @property
    def failed(self) -> bool:
        """The run is Failed in this step (a retry applies here)."""
        return self.state == FAILED

    @property
    def closed(self) -> bool:
        """The run is finished in this step (nothing to skip)."""
        return self.state in CLOSED


def run_detail(loop_config: LoopConfig, calibration: str, run: int) -> dict[str, StepDetail]:
    """The run in every step that has seen it (empty: unknown run)."""
    details: dict[str, StepDetail] = {}
    with Journals(loop_config, calibration) as journals:
        for step, reader in journals.readers.items():
            detail = _step_detail(loop_config, calibration, step, reader, run)
            if detail is not None:
                details[step] = detail
    return details


def _step_detail(
    loop_config: LoopConfig, calibration: str, step: str, reader: JournalReader, run: int
) -> StepDetail | None:
    state = reader.run_state(run)
    if state is None:
        return None
    entered = reader.history(run)
    # the current state has no duration yet: the fragment stays the same until it changes
    history = [
        (name, at, entered[i + 1][1] - at if i + 1 < len(entered) else None)
        for i, (name, at) in enumerate(entered)
    ]
    jobs = [
        JobView(
            job,
            tail(job.job_dir / f"stderr.{job.attempts}.log"),
            tail(job.job_dir / f"stdout.{job.attempts}.log"),
        )
        for job in reader.jobs(run=run)
    ]
    summary_path = loop_config.work_dir / calibration / f"run{run}" / step / "summary.json"
    return StepDetail(
        step=step,
        state=state,
        history=history,
        record=reader.info(run),
        jobs=jobs,
        bad_inputs=reader.bad_inputs(run),
        uploads=reader.uploads(states=UPLOAD_STATES, run=run),
        commands=reader.commands(run),
        summary=_read_json(summary_path),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log file, from a line start ("" when absent)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - limit))
            data = handle.read()
    except OSError:
        return ""
    if len(data) == limit and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace")


def first_failed_step(states: dict[str, str | None]) -> str | None:
    """The step a retry applies to: the first where the run is Failed."""
    return next((step for step, state in states.items() if state == FAILED), None)


def open_steps(states: dict[str, str | None]) -> list[str]:
    """The steps a skip applies to: every one that has not closed the run."""
    return [step for step, state in states.items() if state not in CLOSED]
