"""Operator commands on runs (``calloop runs retry|skip|rerun|approve``), queued where the
daemon that must act will find them: a ``commands`` table in that step's journal database.

``retry`` puts a Failed run back where it failed; ``skip`` closes a run on purpose in
every step that has not; ``rerun`` (the one-click recalibration) makes step 4 harvest a
finished run again from all its ALCA outputs, with the configuration as it is now: a new
store version and, if it passes validation, a new upload; ``approve`` is an expert's
override of a Rejected run's validation (e.g. a PMT gain scan with PMTs flagged outside
their healthy range): step 4 stores the payload again as an accepted version naming the
approval and the problems it overrides, and uploads it.

The CLI writes a command with who, when and why, then rings the step's doorbell (a
file beside the journal, replaced by a rename: its watcher wakes the daemon at once,
which otherwise sleeps while idle); the daemon applies pending commands at the start of
a cycle, reading the table only when the database changed (``data_version``), and
acknowledges each one (``done`` or ``refused``, with what it
did or why not). Asking again while the same command is pending returns the pending
one, so a command is idempotent; with the daemon stopped it simply waits for the next
start. The table is the audit trail: nothing is ever deleted from it.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from loop.fsutil import atomic_write_text

ACTIONS = ("retry", "skip", "rerun", "approve")
RERUN_STEP = "step4"  # a recalibration is a new harvest: step 4's (an approval is step 4's too)
RERUN_FROM = ("Done", "Rejected", "UploadRefused")  # a run is rerun once step 4 finished it
APPROVE_FROM = "Rejected"  # what an expert approves: a final payload that failed validation
PENDING, DONE, REFUSED = "pending", "done", "refused"

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run INTEGER NOT NULL, action TEXT NOT NULL,
    batch INTEGER, reason TEXT NOT NULL, user TEXT NOT NULL, host TEXT NOT NULL,
    created REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    result TEXT NOT NULL DEFAULT '', settled REAL);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state, id);
"""


def rerun_refusal(state: str | None) -> str | None:
    """Why a run in ``state`` in step 4 cannot be rerun (None: it can)."""
    if state in RERUN_FROM:
        return None
    return (
        f"run is {state or 'not seen'} in {RERUN_STEP}; a rerun needs it finished "
        f"({', '.join(RERUN_FROM)}): retry a Failed run instead, or wait for it to finish"
    )


def approve_refusal(state: str | None) -> str | None:
    """Why a run in ``state`` in step 4 cannot be approved (None: it can)."""
    if state == APPROVE_FROM:
        return None
    return (
        f"run is {state or 'not seen'} in {RERUN_STEP}; only a {APPROVE_FROM} run's final "
        "payload (stored retired after failing validation) can be approved"
    )


def doorbell_path(journal_path: Path) -> Path:
    """The file whose replacement tells the daemon of ``journal_path`` that a command
    waits (``step2.journal.sqlite`` -> ``step2.journal.commands``)."""
    return journal_path.with_suffix(".commands")


@dataclass(frozen=True)
class Command:
    """One operator command and its acknowledgement."""

    id: int
    run: int
    action: str
    batch: int | None
    reason: str
    user: str
    host: str
    created: float
    state: str
    result: str
    settled: float | None


class CommandQueue:
    """The operator commands of one step (one journal database file)."""

    def __init__(self, journal_path: Path) -> None:
        self.path = journal_path
        self._db = sqlite3.connect(journal_path, timeout=30, isolation_level=None)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def submit(self, run: int, action: str, *, reason: str, batch: int | None = None) -> Command:
        """Queue a command, or return the identical one still pending."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute(
                "SELECT * FROM commands WHERE run=? AND action=? AND batch IS ? AND state=?",
                (run, action, batch, PENDING),
            ).fetchone()
            if row is None:
                cursor = self._db.execute(
                    "INSERT INTO commands (run, action, batch, reason, user, host, created) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (run, action, batch, reason, _user(), socket.gethostname(), time.time()),
                )
                row = self._db.execute(
                    "SELECT * FROM commands WHERE id=?", (cursor.lastrowid,)
                ).fetchone()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        command = _command(row)
        self.ring(command.id)
        return command

    def ring(self, command_id: int) -> None:
        """Wake the daemon: replace its doorbell file (a rename, which its watcher sees
        as a file moved into place). Without a running daemon, the file just stays. A
        doorbell that cannot be written only delays the answer: the daemon reads the
        queue at its next timed cycle anyway (at most ``poll.heartbeat_s`` later)."""
        with contextlib.suppress(OSError):
            atomic_write_text(doorbell_path(self.path), f"{command_id}\n")

    def data_version(self) -> int:
        """SQLite's ``data_version`` of this connection: it changes whenever another
        connection (the CLI, or the daemon's journal) committed to the database."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def pending(self) -> list[Command]:
        """Commands not yet applied, oldest first."""
        rows = self._db.execute("SELECT * FROM commands WHERE state=? ORDER BY id", (PENDING,))
        return [_command(r) for r in rows]

    def get(self, command_id: int) -> Command | None:
        """One command by id."""
        row = self._db.execute("SELECT * FROM commands WHERE id=?", (command_id,)).fetchone()
        return None if row is None else _command(row)

    def of_run(self, run: int) -> list[Command]:
        """Every command given for a run, oldest first."""
        rows = self._db.execute("SELECT * FROM commands WHERE run=? ORDER BY id", (run,))
        return [_command(r) for r in rows]

    def settle(self, command_id: int, state: str, result: str) -> None:
        """Acknowledge a command: ``done`` or ``refused``, with what happened."""
        self._db.execute(
            "UPDATE commands SET state=?, result=?, settled=? WHERE id=?",
            (state, result, time.time(), command_id),
        )


def _command(row: tuple[object, ...]) -> Command:
    ident, run, action, batch, reason, user, host, created, state, result, settled = row
    return Command(
        int(ident),  # type: ignore[call-overload]
        int(run),  # type: ignore[call-overload]
        str(action),
        None if batch is None else int(batch),  # type: ignore[call-overload]
        str(reason),
        str(user),
        str(host),
        float(created),  # type: ignore[arg-type]
        str(state),
        str(result),
        None if settled is None else float(settled),  # type: ignore[arg-type]
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"
