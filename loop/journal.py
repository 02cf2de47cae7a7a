"""A daemon's durable memory: SQLite in WAL mode under the work directory.

Runs and their FSM state, every input seen (raw LS files or upstream witnesses), the
batches they were grouped into, the jobs that process them (backend id, attempts, exit
code, timings) and, for step 4, the harvest uploads (the outbox). Every change is one
transaction, so a daemon killed at any point restarts exactly where it was; queries
are per run and indexed, so a cycle costs what is new, not everything seen.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from loop.errors import JournalError
from loop.fsutil import free_space
from loop.runrecord import RunRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY, state TEXT NOT NULL, info TEXT NOT NULL DEFAULT '{}',
    first_seen REAL NOT NULL, updated REAL NOT NULL, active INTEGER NOT NULL DEFAULT 1,
    inputs_seen INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS inputs (
    run INTEGER NOT NULL, name TEXT NOT NULL, seen REAL NOT NULL, batch INTEGER,
    ls INTEGER, bad TEXT, meta TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run, name));
CREATE INDEX IF NOT EXISTS inputs_by_ls ON inputs (run, ls);
CREATE INDEX IF NOT EXISTS inputs_by_batch ON inputs (run, batch, name);
CREATE TABLE IF NOT EXISTS batches (
    run INTEGER NOT NULL, batch INTEGER NOT NULL, final INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (run, batch));
CREATE TABLE IF NOT EXISTS jobs (
    run INTEGER NOT NULL, batch INTEGER NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, backend_id TEXT, job_dir TEXT NOT NULL,
    argv TEXT NOT NULL, exit_code INTEGER, submitted REAL, finished REAL,
    next_attempt REAL NOT NULL DEFAULT 0, detail TEXT NOT NULL DEFAULT '',
    config_sha256 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run, batch));
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_run_state ON jobs (run, state);
CREATE TABLE IF NOT EXISTS history (
    run INTEGER NOT NULL, state TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_run ON history (run, time);
CREATE TABLE IF NOT EXISTS uploads (
    run INTEGER NOT NULL, seq INTEGER NOT NULL, tag TEXT NOT NULL, since INTEGER NOT NULL,
    payload TEXT NOT NULL, version TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    payload_hash TEXT, detail TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    config_sha256 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run, seq));
CREATE INDEX IF NOT EXISTS uploads_by_state ON uploads (state, tag);
"""

HISTORY_INSERT = "INSERT INTO history (run, state, time) VALUES (?,?,?)"

# Columns added after the first release: (table, column, declaration). A journal written
# by an older calloop gets them on open, so an upgrade never needs a manual migration.
ADDED_COLUMNS = (
    ("inputs", "ls", "INTEGER"),
    ("inputs", "bad", "TEXT"),
    ("inputs", "meta", "TEXT NOT NULL DEFAULT '{}'"),
    ("jobs", "config_sha256", "TEXT NOT NULL DEFAULT ''"),
    ("uploads", "config_sha256", "TEXT NOT NULL DEFAULT ''"),
)


class JobPhase(StrEnum):
    """Where a job is in its lifecycle (see :mod:`loop.jobs`); stored as its value."""

    PENDING = "pending"
    RETRY = "retry"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    GIVEN_UP = "given_up"


OPEN_JOB_STATES = (
    JobPhase.PENDING,
    JobPhase.RETRY,
    JobPhase.SUBMITTING,
    JobPhase.SUBMITTED,
    JobPhase.RUNNING,
)
IN_FLIGHT_STATES = (JobPhase.SUBMITTING, JobPhase.SUBMITTED, JobPhase.RUNNING)


@dataclass(frozen=True)
class JobRow:
    """One job as the journal holds it."""

    run: int
    batch: int
    state: JobPhase
    attempts: int
    backend_id: str | None
    job_dir: Path
    argv: list[str]
    exit_code: int | None
    submitted: float | None
    finished: float | None
    next_attempt: float
    detail: str
    config_sha256: str


@dataclass(frozen=True)
class NewInput:
    """An input as it is recorded on arrival."""

    name: str
    ls: int | None = None  # step 2: the LS number
    bad: str | None = None  # rejected on arrival: why
    meta: dict[str, Any] | None = None  # step 2: size/mtime; steps 3, 4: verified outputs


@dataclass(frozen=True)
class UploadRow:
    """One outbox entry."""

    run: int
    seq: int
    tag: str
    since: int
    payload: Path
    version: str
    state: str
    attempts: int
    next_attempt: float
    payload_hash: str | None
    detail: str
    config_sha256: str
    created: float


def _open_failure(path: Path, exc: sqlite3.Error) -> str:
    """What went wrong opening the journal at ``path``, and what the operator can do."""
    if not isinstance(exc, sqlite3.OperationalError):  # not a database, or a damaged one
        return (
            f"journal {path} is not a valid SQLite database ({exc}): move it aside, with "
            "its -wal and -shm files, and restart the daemon; it starts with an empty "
            "journal, finds its runs again (step 2: the runs the registry lists within the "
            "look-back window, with their raw LS files; steps 3 and 4: every upstream "
            "witness and marker under the work directory) and processes them again, "
            "finished runs included"
        )
    return (
        f"journal {path} cannot be opened ({exc}): check that the daemon's user can read "
        "and write the file and its directory and that the disk is neither full nor "
        f"failing ({free_space(path)})"
    )


class Journal:
    """The journal of one daemon (one step of one calibration)."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the journal; a file that is not a sound SQLite database, or
        that cannot be opened, is a :class:`JournalError` naming it and what to do."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        db: sqlite3.Connection | None = None
        try:
            db = self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._prepare()
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            raise JournalError(_open_failure(path, exc)) from None

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
        self._check_integrity()
        self._migrate()
        self._db.executescript(SCHEMA)

    def _check_integrity(self) -> None:
        """A damaged journal stops the daemon at start: read on, it would answer with
        wrong runs and jobs, or fail in the middle of a cycle. ``quick_check`` reads
        every page once (well under a second for a daemon's journal)."""
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        problems = [" ".join(str(row[0]).split()) for row in rows]  # one line each
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"damaged: {'; '.join(problems[:3])}")

    def _migrate(self) -> None:
        for table, column, declaration in ADDED_COLUMNS:
            exists = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
            ).fetchone()
            if not exists:
                continue  # created whole by SCHEMA
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            # SQLite rolls back by itself on some errors (a full disk mid-statement);
            # a second ROLLBACK would then hide the real error
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:  # a failed COMMIT leaves the transaction open
                self._db.execute("ROLLBACK")
            raise

    # --------------------------------------------------------------------------- runs

    def ensure_run(self, run: int, state: str, now: float) -> bool:
        """Record a run the first time it is seen; True if it is new."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO runs (run, state, first_seen, updated) VALUES (?,?,?,?)",
                (run, state, now, now),
            )
            if cursor.rowcount == 1:
                db.execute(
                    "INSERT INTO history (run, state, time) VALUES (?,?,?)", (run, state, now)
                )
            return cursor.rowcount == 1

    def set_state(self, run: int, state: str, *, active: bool = True) -> None:
        """Persist a run's FSM state (and whether it still needs attention); every
        change of state is kept in the run's history."""
        now = time.time()
        with self._tx() as db:
            previous = db.execute("SELECT state FROM runs WHERE run=?", (run,)).fetchone()
            db.execute(
                "UPDATE runs SET state=?, active=?, updated=? WHERE run=?",
                (state, int(active), now, run),
            )
            if previous is None or previous[0] != state:
                db.execute(
                    "INSERT INTO history (run, state, time) VALUES (?,?,?)", (run, state, now)
                )

    def history(self, run: int) -> list[tuple[str, float]]:
        """The run's states with the time each was entered, oldest first."""
        rows = self._db.execute(
            "SELECT state, time FROM history WHERE run=? ORDER BY time, rowid", (run,)
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    def run_state(self, run: int) -> str | None:
        """The persisted state of a run."""
        row = self._db.execute("SELECT state FROM runs WHERE run=?", (run,)).fetchone()
        return None if row is None else str(row[0])

    def first_seen(self, run: int) -> float | None:
        """When the run was first recorded."""
        row = self._db.execute("SELECT first_seen FROM runs WHERE run=?", (run,)).fetchone()
        return None if row is None else float(row[0])

    def info(self, run: int) -> RunRecord:
        """The run's recorded facts (registry view, markers, harvests, ...)."""
        row = self._db.execute("SELECT info FROM runs WHERE run=?", (run,)).fetchone()
        return RunRecord() if row is None else RunRecord.from_json(json.loads(row[0]))

    def update_info(self, run: int, **values: Any) -> RunRecord:
        """Set fields of the run's record; returns the new record."""
        RunRecord.check_fields(set(values))
        with self._tx() as db:
            row = db.execute("SELECT info FROM runs WHERE run=?", (run,)).fetchone()
            stored = {} if row is None else dict(json.loads(row[0]))
            stored.update(values)
            db.execute(
                "UPDATE runs SET info=?, updated=? WHERE run=?",
                (json.dumps(stored, sort_keys=True), time.time(), run),
            )
            return RunRecord.from_json(stored)

    def active_runs(self) -> list[tuple[int, str]]:
        """(run, state) of every run still being processed."""
        rows = self._db.execute("SELECT run, state FROM runs WHERE active=1 ORDER BY run")
        return [(int(r[0]), str(r[1])) for r in rows]

    def all_runs(self) -> list[tuple[int, str]]:
        """(run, state) of every run ever seen."""
        return [
            (int(r[0]), str(r[1]))
            for r in self._db.execute("SELECT run, state FROM runs ORDER BY run")
        ]

    def runs_in_states(self, states: tuple[str, ...], limit: int = 50) -> dict[int, str]:
        """The newest ``limit`` runs in one of ``states`` (e.g. those needing attention)."""
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            f"SELECT run, state FROM runs WHERE state IN ({marks}) ORDER BY run DESC LIMIT ?",
            (*states, limit),
        )
        return {int(r[0]): str(r[1]) for r in rows}

    # ------------------------------------------------------------------------- inputs

    def add_inputs(self, run: int, inputs: list[NewInput], now: float) -> int:
        """Record inputs (idempotent); returns how many were new.

        An input recorded ``bad`` counts as seen (the run can complete) but is never
        batched.
        """
        if not inputs:
            return 0
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO inputs (run, name, seen, ls, bad, meta) "
                "VALUES (?,?,?,?,?,?)",
                [(run, i.name, now, i.ls, i.bad, json.dumps(i.meta or {})) for i in inputs],
            )
            added = db.total_changes - before
            # a counter, so the FSM facts never count a run's inputs (O(1) per cycle)
            db.execute("UPDATE runs SET inputs_seen = inputs_seen + ? WHERE run=?", (added, run))
            return added

    def input_meta(self, run: int, name: str) -> dict[str, Any] | None:
        """What was recorded with an input (None if it was never seen)."""
        row = self._db.execute(
            "SELECT meta FROM inputs WHERE run=? AND name=?", (run, name)
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def input_batch(self, run: int, name: str) -> int | None:
        """The batch an input was grouped into (None: not yet, or never seen)."""
        row = self._db.execute(
            "SELECT batch FROM inputs WHERE run=? AND name=?", (run, name)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def set_input_meta(self, run: int, name: str, meta: dict[str, Any]) -> None:
        """Replace what was recorded with an input (e.g. a rewritten file's new size)."""
        with self._tx() as db:
            db.execute(
                "UPDATE inputs SET meta=? WHERE run=? AND name=?", (json.dumps(meta), run, name)
            )

    def mark_bad(self, run: int, name: str, reason: str) -> None:
        """Record that an input was rejected (by a job, or at arrival)."""
        with self._tx() as db:
            db.execute("UPDATE inputs SET bad=? WHERE run=? AND name=?", (reason, run, name))

    def bad_inputs(self, run: int) -> dict[str, str]:
        """Rejected inputs of the run and why."""
        rows = self._db.execute(
            "SELECT name, bad FROM inputs WHERE run=? AND bad IS NOT NULL ORDER BY name", (run,)
        )
        return {str(r[0]): str(r[1]) for r in rows}

    def seen_ls(self, run: int, last: int) -> set[int]:
        """The LS numbers 1..``last`` recorded for the run (step 2)."""
        rows = self._db.execute(
            "SELECT ls FROM inputs WHERE run=? AND ls BETWEEN 1 AND ?", (run, last)
        )
        return {int(r[0]) for r in rows}

    def count_ls(self, run: int, last: int) -> int:
        """How many of the LS numbers 1..``last`` were recorded (an index range count)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM inputs WHERE run=? AND ls BETWEEN 1 AND ?", (run, last)
        ).fetchone()
        return int(row[0])

    def pending_inputs(self, run: int) -> list[tuple[str, float]]:
        """(name, seen) of good inputs not yet in a batch, in name order."""
        rows = self._db.execute(
            "SELECT name, seen FROM inputs WHERE run=? AND batch IS NULL AND bad IS NULL "
            "ORDER BY name",
            (run,),
        )
        return [(str(r[0]), float(r[1])) for r in rows]

    def input_count(self, run: int) -> int:
        """How many inputs of the run were seen."""
        row = self._db.execute("SELECT inputs_seen FROM runs WHERE run=?", (run,)).fetchone()
        return 0 if row is None else int(row[0])

    def inputs_of(self, run: int, batch: int) -> list[str]:
        """The inputs of one batch."""
        rows = self._db.execute(
            "SELECT name FROM inputs WHERE run=? AND batch=? ORDER BY name", (run, batch)
        )
        return [str(r[0]) for r in rows]

    def metas_of(self, run: int, batch: int) -> list[dict[str, Any]]:
        """What was recorded with each input of one batch, in name order."""
        rows = self._db.execute(
            "SELECT meta FROM inputs WHERE run=? AND batch=? ORDER BY name", (run, batch)
        )
        return [dict(json.loads(r[0])) for r in rows]

    def has_input(self, run: int, name: str) -> bool:
        """True when the input was recorded."""
        return (
            self._db.execute("SELECT 1 FROM inputs WHERE run=? AND name=?", (run, name)).fetchone()
            is not None
        )

    # ------------------------------------------------------------------------ batches

    def create_batches(
        self, run: int, groups: list[list[str]], *, final: bool, now: float
    ) -> list[int]:
        """Assign each group of pending inputs to a new batch; returns the batch numbers.

        Inputs already batched are skipped, so repeating a call after a crash is safe.
        """
        created = []
        with self._tx() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(batch), 0) FROM batches WHERE run=?", (run,)
            ).fetchone()
            number = int(row[0])
            for group in groups:
                pending = [
                    name
                    for name in group
                    if db.execute(
                        "SELECT 1 FROM inputs WHERE run=? AND name=? AND batch IS NULL", (run, name)
                    ).fetchone()
                ]
                if not pending:
                    continue
                number += 1
                db.execute(
                    "INSERT INTO batches (run, batch, final, created) VALUES (?,?,?,?)",
                    (run, number, int(final), now),
                )
                db.executemany(
                    "UPDATE inputs SET batch=? WHERE run=? AND name=?",
                    [(number, run, name) for name in pending],
                )
                created.append(number)
        return created

    def add_empty_batch(self, run: int, *, now: float) -> int:
        """A new final batch holding no input of its own (a step-4 rerun: its harvest
        takes every input of the run); returns its number."""
        with self._tx() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(batch), 0) FROM batches WHERE run=?", (run,)
            ).fetchone()
            number = int(row[0]) + 1
            db.execute(
                "INSERT INTO batches (run, batch, final, created) VALUES (?,?,1,?)",
                (run, number, now),
            )
        return number

    def batches_without_job(self, run: int) -> list[int]:
        """Batches whose job was not created yet.

        Jobs are created in batch order, so only batches after the newest job can lack
        one: an index seek, not a join over the whole run.
        """
        rows = self._db.execute(
            "SELECT batch FROM batches WHERE run=? AND batch > "
            "(SELECT COALESCE(MAX(batch), 0) FROM jobs WHERE run=?) ORDER BY batch",
            (run, run),
        )
        return [int(r[0]) for r in rows]

    def batch_count(self, run: int) -> int:
        """How many batches the run has."""
        row = self._db.execute("SELECT COUNT(*) FROM batches WHERE run=?", (run,)).fetchone()
        return int(row[0])

    # --------------------------------------------------------------------------- jobs

    def add_job(
        self, run: int, batch: int, job_dir: Path, argv: list[str], config_sha256: str
    ) -> None:
        """Create a pending job for a batch (idempotent), with the hash of its frozen
        configuration (provenance)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (run, batch, state, job_dir, argv, config_sha256) "
                "VALUES (?,?,?,?,?,?)",
                (run, batch, JobPhase.PENDING, str(job_dir), json.dumps(argv), config_sha256),
            )

    def update_job(self, run: int, batch: int, **fields: Any) -> None:
        """Set columns of one job."""
        columns = ", ".join(f"{name}=?" for name in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET {columns} WHERE run=? AND batch=?", (*fields.values(), run, batch)
            )

    def jobs(
        self, *, states: tuple[JobPhase, ...] | None = None, run: int | None = None
    ) -> list[JobRow]:
        """Jobs filtered by state and/or run, in (run, batch) order."""
        query, args = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if states is not None:
            query += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        if run is not None:
            query += " AND run=?"
            args.append(run)
        rows = self._db.execute(query + " ORDER BY run, batch", args).fetchall()
        return [_job(row) for row in rows]

    def due_jobs(self, now: float, limit: int) -> list[JobRow]:
        """Up to ``limit`` pending or retrying jobs due at ``now``, oldest first across
        runs: a short run that starts during a long one waits only for the jobs created
        before its own, not for every job the long run creates meanwhile.

        Oldest is by the table's implicit rowid: creation order, kept by a retry (an
        UPDATE); jobs are never deleted, so no newer job can take a freed rowid.
        """
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN (?,?) AND next_attempt<=? ORDER BY rowid LIMIT ?",
            (JobPhase.PENDING, JobPhase.RETRY, now, limit),
        ).fetchall()
        return [_job(row) for row in rows]

    def job(self, run: int, batch: int) -> JobRow | None:
        """One job."""
        row = self._db.execute(
            "SELECT * FROM jobs WHERE run=? AND batch=?", (run, batch)
        ).fetchone()
        return None if row is None else _job(row)

    def open_jobs(self, run: int) -> int:
        """Jobs of a run not yet finished (an index range count, not a scan of the run)."""
        marks = ",".join("?" * len(OPEN_JOB_STATES))
        row = self._db.execute(
            f"SELECT COUNT(*) FROM jobs WHERE run=? AND state IN ({marks})", (run, *OPEN_JOB_STATES)
        ).fetchone()
        return int(row[0])

    def job_timers(self) -> tuple[bool, float | None]:
        """What the daemon's sleep depends on: whether a job is in flight (its status
        must be polled) and the earliest next attempt of a job waiting to be submitted
        (None: no job waits). One indexed query."""
        in_flight, waiting = ",".join("?" * len(IN_FLIGHT_STATES)), "?,?"
        row = self._db.execute(
            f"SELECT EXISTS(SELECT 1 FROM jobs WHERE state IN ({in_flight})), "
            f"(SELECT MIN(next_attempt) FROM jobs WHERE state IN ({waiting}))",
            (*IN_FLIGHT_STATES, JobPhase.PENDING, JobPhase.RETRY),
        ).fetchone()
        return bool(row[0]), None if row[1] is None else float(row[1])

    def job_counts(self, run: int | None = None) -> dict[str, int]:
        """Number of jobs per state (of one run, or all)."""
        query = "SELECT state, COUNT(*) FROM jobs"
        rows = self._db.execute(
            query + (" WHERE run=?" if run is not None else "") + " GROUP BY state",
            () if run is None else (run,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    # ------------------------------------------------------------------------ uploads

    def add_upload(
        self,
        run: int,
        seq: int,
        *,
        tag: str,
        since: int,
        payload: Path,
        version: str,
        now: float,
        config_sha256: str = "",
    ) -> None:
        """Queue a payload upload (idempotent per harvest)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO uploads (run, seq, tag, since, payload, version, "
                "state, created, config_sha256) VALUES (?,?,?,?,?,?,?,?,?)",
                (run, seq, tag, since, str(payload), version, "pending", now, config_sha256),
            )

    def uploads(self, *, states: tuple[str, ...], run: int | None = None) -> list[UploadRow]:
        """Outbox entries by state, in (tag, since, run, seq) order."""
        query = f"SELECT * FROM uploads WHERE state IN ({','.join('?' * len(states))})"
        args: list[Any] = list(states)
        if run is not None:
            query += " AND run=?"
            args.append(run)
        rows = self._db.execute(query + " ORDER BY tag, since, run, seq", args).fetchall()
        return [_upload(row) for row in rows]

    def update_upload(self, run: int, seq: int, **fields: Any) -> None:
        """Set columns of one outbox entry."""
        columns = ", ".join(f"{name}=?" for name in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE uploads SET {columns} WHERE run=? AND seq=?", (*fields.values(), run, seq)
            )


def _job(row: tuple[Any, ...]) -> JobRow:
    (
        run,
        batch,
        state,
        attempts,
        backend_id,
        job_dir,
        argv,
        exit_code,
        submitted,
        finished,
        next_attempt,
        detail,
        config_sha256,
    ) = row
    return JobRow(
        int(run),
        int(batch),
        JobPhase(state),
        int(attempts),
        backend_id,
        Path(job_dir),
        list(json.loads(argv)),
        exit_code,
        submitted,
        finished,
        float(next_attempt),
        str(detail),
        str(config_sha256),
    )


def _upload(row: tuple[Any, ...]) -> UploadRow:
    (
        run,
        seq,
        tag,
        since,
        payload,
        version,
        state,
        attempts,
        next_attempt,
        payload_hash,
        detail,
        created,
        config_sha256,
    ) = row
    return UploadRow(
        int(run),
        int(seq),
        str(tag),
        int(since),
        Path(payload),
        str(version),
        str(state),
        int(attempts),
        float(next_attempt),
        payload_hash,
        str(detail),
        str(config_sha256),
        float(created),
    )
