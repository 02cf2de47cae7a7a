"""Who may act in the control room, and the record of what they did.

Reads are open (bind to loopback, or put a reverse proxy with its own login in front:
README, "Web control room"). Actions need a conditions-DB token of role ``operator`` or
``admin`` (:mod:`loop.conddb.auth`), checked against the token table of the conditions
database (only hashes are stored there). A valid token opens a session: a random id in
an ``HttpOnly``, ``SameSite=Strict`` cookie, kept in memory for :data:`SESSION_S`.

Every form carries a CSRF value that must equal the ``calloop_csrf`` cookie (double
submit): another site can make a browser send the cookie but cannot read it to put it
in the form. Every action, refused or carried out, is one row of the audit log with
the user, the client address, the target, the reason and the outcome.
"""

from __future__ import annotations

import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loop.conddb.auth import Identity
from loop.conddb.db import ConditionsDatabase
from loop.conddb.models import ADMIN, OPERATOR

ACTING_ROLES = (OPERATOR, ADMIN)
SESSION_S = 8 * 3600.0  # one shift
SESSION_COOKIE, CSRF_COOKIE = "calloop_session", "calloop_csrf"

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, user TEXT NOT NULL,
    role TEXT NOT NULL, client TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    reason TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
"""


class Refused(Exception):
    """An action that may not be carried out: ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TokenChecker:
    """Checks tokens against the conditions database's token table (SQL URL)."""

    def __init__(self, database_url: str | None) -> None:
        self.database_url = database_url
        self._database = ConditionsDatabase(database_url) if database_url else None

    @property
    def enabled(self) -> bool:
        """False when no SQL conditions database is configured: the site is read-only."""
        return self._database is not None

    def identity(self, token: str) -> Identity | None:
        """The token's identity when it is valid and may act (operator or admin)."""
        if self._database is None:
            return None
        identity = self._database.authenticate(token.strip())
        if identity is None or identity.role not in ACTING_ROLES:
            return None
        return identity

    def close(self) -> None:
        """Release the database connection pool."""
        if self._database is not None:
            self._database.close()


@dataclass(frozen=True)
class Session:
    """A logged-in operator."""

    identity: Identity
    expires: float


class Sessions:
    """Sessions in memory: a restart of ``calloop web`` logs everyone out."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, identity: Identity) -> str:
        """A new session id for ``identity``."""
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[session_id] = Session(identity, now + SESSION_S)
        return session_id

    def get(self, session_id: str | None) -> Identity | None:
        """The identity of a live session."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.expires < time.time():
            return None
        return session.identity

    def close(self, session_id: str | None) -> None:
        """Log out."""
        with self._lock:
            self._sessions.pop(session_id or "", None)


def csrf_ok(cookie: str | None, field: str | None) -> bool:
    """The form's CSRF value equals the cookie's (compared in constant time)."""
    return bool(cookie) and bool(field) and hmac.compare_digest(str(cookie), str(field))


@dataclass(frozen=True)
class AuditEntry:
    """One action as the audit log keeps it."""

    id: int
    time: float
    user: str
    role: str
    client: str
    action: str
    target: str
    reason: str
    outcome: str
    detail: str


class AuditLog:
    """Append-only SQLite log of the control room's actions."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(AUDIT_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:  # one transaction: committed, or rolled back on error
                yield db
        finally:
            db.close()

    def record(
        self,
        identity: Identity | None,
        client: str,
        *,
        action: str,
        target: str,
        reason: str,
        outcome: str,
        detail: str,
    ) -> None:
        """Append one entry (``identity`` None: nobody logged in)."""
        user, role = (identity.user, identity.role) if identity else ("(anonymous)", "-")
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT INTO audit (time, user, role, client, action, target, reason, outcome, "
                "detail) VALUES (?,?,?,?,?,?,?,?,?)",
                (time.time(), user, role, client, action, target, reason, outcome, detail),
            )

    def entries(self, limit: int = 200) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [AuditEntry(*row) for row in rows]
