"""The conditions-database library: one implementation over SQLite and PostgreSQL.

Writes are serialized per database (SQLite: ``BEGIN IMMEDIATE``) or per tag (PostgreSQL:
``SELECT ... FOR UPDATE`` on the tag row), so the checks of an upload (its idempotency
key, its harvest sequence, "already present") and its insert cannot interleave with
another uploader's.

**Exactly once, in order.** An upload may carry an idempotency ``key`` and a harvest
``sequence``. The outcome of a keyed upload is stored with it (``upload_request``) and a
repeat of the key gets that same outcome, writing nothing: a request re-sent after a
timeout, or one that lands after its client gave up, cannot add an IOV. For one (tag,
requested since), an upload whose sequence is lower than one already applied is
``superseded``: a late older harvest can never bury a newer one.

**Audit.** Every write leaves an entry with its user, time, action and the before and
after of what it changed: tag writes in ``tag_log``, global-tag writes in
``global_tag_log``. Who may write is decided by :mod:`loop.conddb.auth` (the service
checks it; direct database access is administrator access).

Messages never quote the database URL's password (:mod:`loop.redact`): they end up in
logs, the journal and the outbox.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import io
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import (
    Engine,
    Row,
    TextClause,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from loop.conddb.auth import Identity
from loop.conddb.models import (
    IOV,
    ROLES,
    SYNCHRONIZATIONS,
    TIME_TYPES,
    UPLOADER,
    Base,
    GlobalTag,
    GlobalTagLog,
    GlobalTagMap,
    Payload,
    Setting,
    Tag,
    TagLog,
    Token,
    UploadRequest,
)
from loop.conddb.npy import BadPayload, load_npy
from loop.conddb.rules import decide, lumi_since
from loop.errors import ConditionsError
from loop.logs import get_logger
from loop.redact import redact, redact_url

NPY_STREAMER = "numpy-npy-v1"
RAW_STREAMER = "raw-bytes"
STREAMERS = (NPY_STREAMER, RAW_STREAMER)
INSERTED, PRESENT, SUPERSEDED = "inserted", "already present", "superseded"
APPLIED = (INSERTED, PRESENT)  # outcomes whose payload is (or was) the since's current one
MAX_SINCE = 2**63 - 1  # BIGINT, on SQLite and PostgreSQL alike
MAX_RUN = 2**31 - 1  # CMS run numbers are 32-bit signed
MAX_LS = 2**32 - 1  # a lumi since packs (run << 32 | ls) into a signed 64-bit since
MAX_TIME = 1e12
MAX_BULK = 10_000  # IOVs per bulk upload (one transaction)
MAX_BULK_KEY = 200 - len(f"#{MAX_BULK}")  # its items' keys fit upload_request.key
# pooled connections of the hot reads, no overflow: more concurrent readers wait for one
# (a read takes well under a millisecond) instead of opening and closing connections,
# and a service stays far below PostgreSQL's max_connections (100 by default)
LEAN_POOL = 16
# A snapshot this far in the past is settled: every IOV it can see is committed (an IOV's
# insertion time is its writer's clock when it was written, a moment before its commit),
# so a read at it never changes again. Covers transaction time and clock skew.
SETTLED_S = 60.0
# ASCII only: str.isdigit() accepts other scripts' digits, which int() may then refuse
TOKEN_PATTERN = re.compile(r"cdb_([0-9]{1,18})_([A-Za-z0-9_\-]{1,100})")

log = get_logger("calloop.conddb")

# The hot reads, one statement each. The IOV valid at the point of the tag's time type
# (each time type's point is a parameter; -1 where the arguments give none), as of the
# snapshot, in the order of every other read: latest since, insertion, id.
_IOV_AT = """
JOIN iov i ON i.id = (
    SELECT j.id FROM iov j
    WHERE j.tag_name = t.name
      AND j.since <= CASE t.time_type
          WHEN 'run' THEN CAST(:run_point AS BIGINT)
          WHEN 'lumi' THEN CAST(:lumi_point AS BIGINT)
          ELSE CAST(:time_point AS BIGINT) END
      AND j.insertion_time <= :snapshot{also}
    ORDER BY j.since DESC, j.insertion_time DESC, j.id DESC
    LIMIT 1)
"""
RESOLVE_TAG_SQL = text(
    "SELECT t.name AS tag_name, i.since, i.payload_hash, i.insertion_time FROM tag t"
    + _IOV_AT.format(also="")
    + "WHERE t.name = :tag"
)
RESOLVE_GT_SQL = text(
    "SELECT t.name AS tag_name, g.snapshot_time AS gt_snapshot, i.since, i.payload_hash, "
    "i.insertion_time FROM global_tag g "
    "JOIN global_tag_map m ON m.global_tag_name = g.name JOIN tag t ON t.name = m.tag_name"
    + _IOV_AT.format(also=" AND j.insertion_time <= g.snapshot_time")
    + "WHERE g.name = :global_tag AND m.record = :record AND m.label = :label"
)
PAYLOAD_SQL = text(
    "SELECT hash, object_type, data, streamer_info, insertion_time FROM payload WHERE hash = :hash"
)
HAS_PAYLOAD_SQL = text("SELECT 1 FROM payload WHERE hash = :hash")


class NotFound(ConditionsError):
    """A tag, payload, global tag or IOV does not exist (HTTP 404)."""


class InvalidRequest(ConditionsError):
    """Arguments that can never succeed (HTTP 400)."""


class ConditionsUnavailable(ConditionsError):
    """The database or service cannot be reached now; the same call may work later."""


class Conflict(ConditionsError):
    """A write that contradicts what exists (HTTP 409); the message says what exists."""


class NotAuthorized(ConditionsError):
    """The service refused the token (HTTP 401/403): neither an outage nor a verdict on
    the upload; it can succeed once the token (or its rights) is fixed."""


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TagInfo:
    """A tag as clients see it."""

    name: str
    time_type: str
    object_type: str
    synchronization: str
    description: str
    end_of_validity: int
    insertion_time: float
    modification_time: float


@dataclass(frozen=True)
class IOVInfo:
    """One IOV row."""

    since: int
    insertion_time: float
    payload_hash: str


@dataclass(frozen=True)
class UploadResult:
    """What an upload did: ``inserted``, ``already present`` or ``superseded`` (a newer
    harvest of the since was applied first; nothing written)."""

    tag: str
    since: int
    payload_hash: str
    status: str
    note: str = ""


@dataclass(frozen=True)
class _Offer:
    """What identifies an upload: tag, requested since, harvest sequence, payload hash."""

    tag: str
    since: int
    sequence: int | None
    digest: str


class _TagState:
    """What an upload's checks read about one tag, within its write transaction: the
    current payload per since, the last since, the IOV count, the FCSR, stored key
    outcomes and known payloads. Read once (for a bulk upload: a few queries for all
    its items, not a few per item) and kept up to date as IOVs are added, so that each
    item of a bulk upload sees the ones before it."""

    def __init__(self, session: Session, tag: Tag, sinces: list[int], keys: list[str]) -> None:
        self.session, self.tag = session, tag
        self._current: dict[int, str | None] = dict.fromkeys(sinces)
        # one query: the latest row of each since wins (ordered by insertion, id)
        for since, digest in session.execute(
            select(IOV.since, IOV.payload_hash)
            .where(IOV.tag_name == tag.name, IOV.since.in_(set(sinces)))
            .order_by(IOV.since, IOV.insertion_time, IOV.id)
        ):
            self._current[since] = digest
        self.requests: dict[str, UploadRequest] = {}
        if keys:
            found = session.scalars(select(UploadRequest).where(UploadRequest.key.in_(keys)))
            self.requests = {row.key: row for row in found}
        self._payloads: set[str] = set()
        self._last: tuple[int | None] | None = None  # (the value,) once read
        self._count: int | None = None
        self._fcsr: tuple[int | None] | None = None

    def current_hash(self, since: int) -> str | None:
        """The payload of the since's latest IOV (None: no IOV at that since)."""
        if since not in self._current:  # a since the rule moved to (the FCSR)
            self._current[since] = self.session.scalars(
                select(IOV.payload_hash)
                .where(IOV.tag_name == self.tag.name, IOV.since == since)
                .order_by(IOV.insertion_time.desc(), IOV.id.desc())
                .limit(1)
            ).first()
        return self._current[since]

    def last_since(self) -> int | None:
        """The tag's largest since (the offline rule)."""
        if self._last is None:
            self._last = (
                self.session.scalar(
                    select(func.max(IOV.since)).where(IOV.tag_name == self.tag.name)
                ),
            )
        return self._last[0]

    def count(self) -> int:
        """The tag's number of IOVs (the mc rule; O(IOVs), so only when asked)."""
        if self._count is None:
            self._count = (
                self.session.scalar(select(func.count()).where(IOV.tag_name == self.tag.name)) or 0
            )
        return self._count

    def fcsr(self) -> int | None:
        """The first condition-safe run, if configured."""
        if self._fcsr is None:
            row = self.session.get(Setting, "fcsr")
            self._fcsr = (None if row is None else int(row.value),)
        return self._fcsr[0]

    def store_payloads(self, encoded: list[tuple[bytes, str]], now: float | None = None) -> None:
        """Add the payloads not stored yet (one query for all), before the IOVs that
        point at them (their foreign key). A bulk upload stores every item's payload
        first: an item whose payload is new is never "already present", so none of
        them ends up unused (and a refusal rolls all of it back)."""
        rows = {
            payload_hash(self.tag.object_type, data): (data, streamer) for data, streamer in encoded
        }
        wanted = set(rows) - self._payloads
        if wanted:
            self._payloads |= set(
                self.session.scalars(select(Payload.hash).where(Payload.hash.in_(wanted)))
            )
        new = [h for h in rows if h not in self._payloads]
        if new:
            when = time.time() if now is None else now
            self.session.add_all(_payload_row(self.tag, h, *rows[h], when) for h in new)
            self.session.flush()
            self._payloads.update(new)

    def add_iov(self, since: int, digest: str, now: float) -> None:
        """Insert an IOV and remember what it changes."""
        self.session.add(
            IOV(tag_name=self.tag.name, since=since, insertion_time=now, payload_hash=digest)
        )
        self.tag.modification_time = now
        self._current[since] = digest
        if self._last is not None:
            self._last = (since if self._last[0] is None else max(self._last[0], since),)
        if self._count is not None:
            self._count += 1


@dataclass(frozen=True)
class Resolved:
    """The payload valid at a point of a tag (or global tag)."""

    tag: str
    since: int
    payload_hash: str
    insertion_time: float


@dataclass(frozen=True)
class Resolution:
    """A resolve's answer and the snapshot time it was read at; ``snapshot`` is None
    when the read follows the latest IOVs (the next upload may change it)."""

    resolved: Resolved
    snapshot: float | None

    def settled(self) -> bool:
        """True when no later write can change this answer (see :func:`settled`)."""
        return settled(self.snapshot)


def settled(snapshot: float | None) -> bool:
    """True when a read at ``snapshot`` can never change: the snapshot is more than
    ``SETTLED_S`` in the past (None, the latest, is never settled)."""
    return snapshot is not None and snapshot <= time.time() - SETTLED_S


@dataclass(frozen=True)
class PayloadBlob:
    """Payload bytes and how to decode them."""

    hash: str
    object_type: str
    data: bytes
    streamer_info: str
    insertion_time: float

    def array(self) -> np.ndarray:
        """Decode a numpy payload."""
        if self.streamer_info != NPY_STREAMER:
            raise ConditionsError(f"payload {self.hash} is {self.streamer_info}, not an array")
        return load_npy(self.data)


def encode_payload(value: np.ndarray | bytes) -> tuple[bytes, str]:
    """Serialize an array (.npy, no pickle) or pass bytes through; returns (bytes, streamer)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value), RAW_STREAMER
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
    return buffer.getvalue(), NPY_STREAMER


def payload_hash(object_type: str, data: bytes) -> str:
    """SHA-256 over object type + bytes: the payload's identity."""
    return hashlib.sha256(object_type.encode() + data).hexdigest()


def as_dict(record: Any) -> dict[str, Any]:
    """A record dataclass as a JSON-ready dict."""
    return asdict(record)


def normalize_url(url: str) -> str:
    """``postgresql://`` defaults to the psycopg 3 driver."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


# ---------------------------------------------------------------------------- database


class ConditionsDatabase:
    """Direct access to a conditions DB by SQLAlchemy URL."""

    def __init__(self, url: str, *, user: str | None = None) -> None:
        self._connect_url = normalize_url(url)
        self.url = redact_url(self._connect_url)  # without the password: safe to print
        self.user = user or _local_user()
        self.is_sqlite = self._connect_url.startswith("sqlite")
        try:
            self._read = self._engine(immediate=False)
            self._write = self._engine(immediate=True) if self.is_sqlite else self._read
            self._lean = self._lean_engine()
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConditionsError(
                f"conditions DB {self.url}: cannot open ({redact(str(exc))})"
            ) from None

    def _engine(self, *, immediate: bool | None, **pool: Any) -> Engine:
        """The engine of ORM sessions; ``immediate=None`` (SQLite): no BEGIN at all."""
        if not self.is_sqlite:
            # hide_parameters: a failed statement's message would quote uploaded values
            return create_engine(self._connect_url, pool_pre_ping=True, hide_parameters=True)
        engine = create_engine(
            self._connect_url,
            connect_args={"timeout": 30, "isolation_level": None},
            hide_parameters=True,
            **pool,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        if immediate is not None:

            @event.listens_for(engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _lean_engine(self) -> Engine:
        """The engine of the hot reads (:meth:`resolve`, :meth:`payload`): one statement
        each, so no transaction (a single statement reads one consistent snapshot on
        both databases) and no ping at checkout (a connection the server dropped is
        retried once instead, see :meth:`_one_row`). PostgreSQL prepares each statement
        on its first use on a connection; SQLite's driver keeps them prepared too."""
        pool = {"pool_size": LEAN_POOL, "max_overflow": 0}
        if self.is_sqlite:
            return self._engine(immediate=None, **pool)
        return create_engine(
            self._connect_url,
            isolation_level="AUTOCOMMIT",
            connect_args={"prepare_threshold": 0},
            hide_parameters=True,
            **pool,
        )

    def create_schema(self) -> None:
        """Create every table, and add the columns a newer release defines to the tables
        of an older one (idempotent)."""
        try:
            Base.metadata.create_all(self._write)
            self._add_missing_columns()
        except SQLAlchemyError as exc:
            raise ConditionsError(
                f"conditions DB {self.url}: schema creation failed: "
                f"{redact(str(exc).splitlines()[0])}"
            ) from None

    def _add_missing_columns(self) -> None:
        """``create_all`` skips existing tables; columns added since (each with a server
        default, e.g. ``token.role``) are added here so that old rows get the default."""
        with self._write.begin() as conn:
            inspector = inspect(conn)
            for table in Base.metadata.sorted_tables:
                present = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present:
                        continue
                    kind = column.type.compile(conn.dialect)
                    # every added column has a plain string default (see models._Audit)
                    default = getattr(column.server_default, "arg", "")
                    # PostgreSQL: two services upgrading at once must not fail; SQLite's
                    # BEGIN IMMEDIATE already serializes them (and lacks IF NOT EXISTS)
                    guard = "" if self.is_sqlite else "IF NOT EXISTS "
                    conn.exec_driver_sql(
                        f'ALTER TABLE {table.name} ADD COLUMN {guard}"{column.name}" {kind} '
                        f"NOT NULL DEFAULT '{default}'"
                    )

    def close(self) -> None:
        """Dispose of the connection pools."""
        self._read.dispose()
        self._write.dispose()
        self._lean.dispose()

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        try:
            engine = self._write if write else self._read
            with Session(engine, expire_on_commit=False) as session, session.begin():
                yield session
        except ConditionsError:
            raise
        except SQLAlchemyError as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: SQLAlchemyError) -> ConditionsError:
        """The conditions error of a database error, without the URL's password."""
        first_line = redact(str(exc).splitlines()[0])
        if isinstance(exc, OperationalError):  # server down, database locked, network
            return ConditionsUnavailable(f"conditions DB {self.url} unavailable: {first_line}")
        return ConditionsError(f"conditions DB {self.url}: {type(exc).__name__}: {first_line}")

    def _one_row(self, statement: TextClause, params: dict[str, Any]) -> Row[Any] | None:
        """The first row of one read statement on the lean engine. A pooled connection
        the server has dropped (restart, idle timeout) fails its first statement; the
        pool then discards it and every older one, and the read is retried once."""
        try:
            return self._first(statement, params)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise self._failure(exc) from None
        except SQLAlchemyError as exc:
            raise self._failure(exc) from None
        try:
            return self._first(statement, params)
        except SQLAlchemyError as exc:
            raise self._failure(exc) from None

    def _first(self, statement: TextClause, params: dict[str, Any]) -> Row[Any] | None:
        with self._lean.connect() as conn:
            return conn.execute(statement, params).first()

    # ------------------------------------------------------------------------------ tags

    def create_tag(
        self,
        name: str,
        *,
        time_type: str,
        object_type: str,
        synchronization: str = "any",
        description: str = "",
        user: str | None = None,
        host: str = "",
    ) -> TagInfo:
        """Create a tag; creating an identical one again is a no-op."""
        if time_type not in TIME_TYPES:
            raise InvalidRequest(f"time_type must be one of {TIME_TYPES}, got {time_type!r}")
        if synchronization not in SYNCHRONIZATIONS:
            raise InvalidRequest(
                f"synchronization must be one of {SYNCHRONIZATIONS}, got {synchronization!r}"
            )
        now = time.time()
        wanted = _tag_definition(time_type, object_type, synchronization)
        with self._session(write=True) as session:
            existing = session.get(Tag, name)
            if existing is not None:
                defined = _tag_definition(
                    existing.time_type, existing.object_type, existing.synchronization
                )
                if defined != wanted:
                    raise Conflict(f"tag {name} exists with {defined}")
                return _tag_info(existing)
            tag = Tag(
                name=name,
                time_type=time_type,
                object_type=object_type,
                synchronization=synchronization,
                description=description,
                end_of_validity=0,
                insertion_time=now,
                modification_time=now,
            )
            session.add(tag)
            session.add(_tag_log(name, "create_tag", (user or self.user, host), after=wanted))
            return _tag_info(tag)

    def tag(self, name: str) -> TagInfo:
        """One tag; ``ConditionsError`` if unknown."""
        with self._session() as session:
            return _tag_info(self._get_tag(session, name))

    def tags(self, *, limit: int | None = None, offset: int = 0) -> list[TagInfo]:
        """Tags by name: ``limit`` of them (default all) after the first ``offset``."""
        with self._session() as session:
            query = _page(select(Tag).order_by(Tag.name), limit, offset)
            return [_tag_info(t) for t in session.scalars(query)]

    @staticmethod
    def _get_tag(session: Session, name: str, *, lock: bool = False) -> Tag:
        query = select(Tag).where(Tag.name == name)
        tag = session.scalars(query.with_for_update() if lock else query).first()
        if tag is None:
            raise NotFound(f"unknown tag {name!r}")
        return tag

    # ---------------------------------------------------------------------------- upload

    def upload(
        self,
        tag_name: str,
        since: int,
        value: np.ndarray | bytes,
        *,
        user: str | None = None,
        host: str = "",
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
        sequence: int | None = None,
    ) -> UploadResult:
        """Store the payload and insert an IOV under the tag's synchronization rule.

        Idempotent: if the current IOV at the (possibly moved) since already points at
        the same payload, nothing is written and the status is ``already present``.
        With a ``key``, a repeat returns the first call's result and writes nothing;
        with a ``sequence`` (which needs a key), a harvest older than one already
        applied to the same (tag, since) is not applied: status ``superseded``.
        """
        data, streamer = encode_payload(value)
        return self.upload_encoded(
            tag_name,
            since,
            data,
            streamer,
            user=user,
            host=host,
            user_text=user_text,
            input_tag=input_tag,
            key=key,
            sequence=sequence,
        )

    def upload_encoded(
        self,
        tag_name: str,
        since: int,
        data: bytes,
        streamer: str,
        *,
        user: str | None = None,
        host: str = "",
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
        sequence: int | None = None,
    ) -> UploadResult:
        """:meth:`upload` for bytes already serialized with ``streamer`` (HTTP uploads)."""
        [result] = self.upload_many(
            [tag_name],
            since,
            data,
            streamer,
            user=user,
            host=host,
            user_text=user_text,
            input_tag=input_tag,
            key=key,
            sequence=sequence,
        )
        return result

    def upload_many(
        self,
        tag_names: list[str],
        since: int,
        data: bytes,
        streamer: str,
        *,
        user: str | None = None,
        host: str = "",
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
        sequence: int | None = None,
    ) -> list[UploadResult]:
        """One serialized payload at one since in several tags, all or nothing: one
        transaction, so a refusal in any tag writes nothing in the others. A keyed
        upload names a single tag (one key, one stored outcome)."""
        _check_upload(tag_names, since, (data, streamer), key=key, sequence=sequence)
        # One transaction from the key lookup to the insert of its outcome. PostgreSQL:
        # the tag rows' FOR UPDATE locks serialize the uploads of a tag (taken in name
        # order, so two multi-tag uploads cannot deadlock). SQLite ignores FOR UPDATE,
        # but the write engine begins every transaction with BEGIN IMMEDIATE, which
        # takes the database's write lock before the first read, so no other writer
        # runs between these checks and the insert either.
        with self._session(write=True) as session:
            tags = {name: self._get_tag(session, name, lock=True) for name in sorted(tag_names)}
            audit = (user, host, f"input={input_tag} {user_text}")
            return [
                self._upload_one(
                    _TagState(session, tags[name], [since], [] if key is None else [key]),
                    _Offer(name, since, sequence, payload_hash(tags[name].object_type, data)),
                    (data, streamer),
                    key=key,
                    audit=audit,
                )
                for name in tag_names
            ]

    def upload_bulk(
        self,
        tag_name: str,
        rows: list[tuple[int, np.ndarray | bytes]],
        *,
        user: str | None = None,
        host: str = "",
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
    ) -> list[UploadResult]:
        """Many (since, payload) pairs of one tag in one transaction: see
        :meth:`upload_bulk_encoded`."""
        items = [(since, *encode_payload(value)) for since, value in rows]
        return self.upload_bulk_encoded(
            tag_name, items, user=user, host=host, user_text=user_text, input_tag=input_tag, key=key
        )

    def upload_bulk_encoded(
        self,
        tag_name: str,
        items: list[tuple[int, bytes, str]],
        *,
        user: str | None = None,
        host: str = "",
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
    ) -> list[UploadResult]:
        """(since, bytes, streamer) items of one tag, all or nothing in one transaction,
        each applied as :meth:`upload` would, one after the other in the given order
        (synchronization rule, "already present", audit entry). With a ``key``, item
        ``i`` keeps its outcome under ``<key>#<i>`` (``#`` is never in a client's key),
        so the same request sent again, e.g. after a timeout, is answered from the
        stored outcomes and writes nothing."""
        if not 1 <= len(items) <= MAX_BULK:
            raise InvalidRequest(f"a bulk upload has 1..{MAX_BULK} IOVs, got {len(items)}")
        if key is not None and len(key) > MAX_BULK_KEY:
            raise InvalidRequest(f"a bulk upload's key has at most {MAX_BULK_KEY} characters")
        for since, data, streamer in items:
            _check_upload([tag_name], since, (data, streamer), key=key, sequence=None)
        keys = [None if key is None else f"{key}#{index}" for index in range(len(items))]
        with self._session(write=True) as session:
            tag = self._get_tag(session, tag_name, lock=True)
            sinces = [since for since, _, _ in items]
            # what the items' checks need, read in a few queries, not a few per item
            state = _TagState(session, tag, sinces, [k for k in keys if k is not None])
            state.store_payloads([(data, streamer) for _, data, streamer in items])
            audit = (user, host, f"input={input_tag} {user_text}")
            return [
                self._upload_one(
                    state,
                    _Offer(tag_name, since, None, payload_hash(tag.object_type, data)),
                    (data, streamer),
                    key=item_key,
                    audit=audit,
                )
                for (since, data, streamer), item_key in zip(items, keys, strict=True)
            ]

    def _upload_one(
        self,
        state: _TagState,
        offer: _Offer,
        encoded: tuple[bytes, str],
        *,
        key: str | None,
        audit: tuple[str | None, str, str],
    ) -> UploadResult:
        """One tag's part of an upload: replay, supersede or apply, then its outcome."""
        data, streamer = encoded
        if key is not None:
            replayed = self._replay(state.requests.get(key), key, offer)
            if replayed is not None:
                return replayed
        result = self._superseded(state.session, offer)
        if result is None:
            result = self._apply(state, offer, data, streamer=streamer, audit=audit)
        if key is not None:
            state.session.add(_request_row(key, offer, result))
        return result

    def upload_result(self, key: str) -> UploadResult | None:
        """The stored outcome of the keyed upload ``key``; None when the database holds
        none (never received, or refused with an error)."""
        with self._session() as session:
            row = session.get(UploadRequest, key)
            return None if row is None else _request_result(row)

    @staticmethod
    def _replay(row: UploadRequest | None, key: str, offer: _Offer) -> UploadResult | None:
        """The stored outcome ``row`` of a repeated key; a key reused for another upload
        is a client bug, refused rather than answered with the wrong outcome."""
        if row is None:
            return None
        if _Offer(row.tag_name, row.since, row.sequence, row.payload_hash) != offer:
            raise InvalidRequest(
                f"idempotency key {key!r} belongs to another upload (tag {row.tag_name}, "
                f"since {row.since}, harvest {row.sequence}, payload {row.payload_hash[:12]})"
            )
        log.info("repeated upload answered from its key", key=key, status=row.status)
        return _request_result(row)

    @staticmethod
    def _superseded(session: Session, offer: _Offer) -> UploadResult | None:
        """A ``superseded`` result when a newer harvest of (tag, since) was applied."""
        if offer.sequence is None:
            return None
        applied = session.scalar(
            select(func.max(UploadRequest.sequence)).where(
                UploadRequest.tag_name == offer.tag,
                UploadRequest.since == offer.since,
                UploadRequest.status.in_(APPLIED),
            )
        )
        if applied is None or offer.sequence >= applied:
            return None
        log.info(
            "older harvest not applied", tag=offer.tag, since=offer.since, harvest=offer.sequence
        )
        return UploadResult(
            offer.tag,
            offer.since,
            offer.digest,
            SUPERSEDED,
            f"harvest {offer.sequence} is older than harvest {applied}, already applied",
        )

    def _apply(
        self,
        state: _TagState,
        offer: _Offer,
        data: bytes,
        *,
        streamer: str,
        audit: tuple[str | None, str, str],
    ) -> UploadResult:
        """Insert the IOV under the synchronization rule, unless already present;
        ``audit`` is the tag log's (user, host, text)."""
        tag, since, digest = state.tag, offer.since, offer.digest
        if state.current_hash(since) == digest:
            return UploadResult(tag.name, since, digest, PRESENT)
        # only the rules that need them pay for these queries (count is O(IOVs))
        decision = decide(
            tag.synchronization,
            tag.time_type,
            since,
            last_since=state.last_since() if tag.synchronization == "offline" else None,
            iov_count=state.count() if tag.synchronization == "mc" else 0,
            fcsr_run=state.fcsr(),
        )
        before = state.current_hash(decision.since)
        if decision.since != since and before == digest:
            return UploadResult(tag.name, decision.since, digest, PRESENT, decision.note)
        now = time.time()
        state.store_payloads([(data, streamer)], now)
        state.add_iov(decision.since, digest, now)
        user, host, text = audit
        state.session.add(
            _tag_log(
                tag.name,
                "upload",
                (user or self.user, host),
                text.strip(),
                before=f"since={decision.since} hash={before}" if before else "",
                after=f"since={decision.since} hash={digest}",
            )
        )
        return UploadResult(tag.name, decision.since, digest, INSERTED, decision.note)

    def import_iovs(self, tag_name: str, rows: list[tuple[int, np.ndarray | bytes]]) -> int:
        """Bulk-load (since, payload) pairs in one transaction, bypassing the rules
        (migrations and benchmarks); returns the number of IOVs inserted."""
        with self._session(write=True) as session:
            tag = self._get_tag(session, tag_name, lock=True)
            now, payloads, iovs = time.time(), {}, []
            for since, value in rows:
                data, streamer = encode_payload(value)
                digest = payload_hash(tag.object_type, data)
                payloads[digest] = _payload_row(tag, digest, data, streamer, now)
                iovs.append(
                    {
                        "tag_name": tag_name,
                        "since": since,
                        "insertion_time": now,
                        "payload_hash": digest,
                    }
                )
            known = set(
                session.scalars(select(Payload.hash).where(Payload.hash.in_(list(payloads))))
            )
            session.add_all(p for h, p in payloads.items() if h not in known)
            session.flush()
            session.execute(insert(IOV), iovs)
            return len(iovs)

    # ------------------------------------------------------------------------------ reads

    def iovs(
        self,
        tag_name: str,
        *,
        snapshot: float | None = None,
        history: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[IOVInfo]:
        """IOVs of a tag as of ``snapshot`` (default now), by since: the latest row per
        since, or every row with ``history``; ``limit`` rows (default all) after the
        first ``offset``."""
        with self._session() as session:
            self._get_tag(session, tag_name)
            visible = IOV.tag_name == tag_name
            if snapshot is not None:
                visible &= IOV.insertion_time <= snapshot
            # rank 1 is a since's current row; the database picks it, so that a page of
            # the latest rows is one query whatever the length of the history
            rank = (
                func.row_number()
                .over(partition_by=IOV.since, order_by=(IOV.insertion_time.desc(), IOV.id.desc()))
                .label("rank")
            )
            ranked = select(IOV.id, rank).where(visible).subquery()
            query = select(IOV).join(ranked, ranked.c.id == IOV.id)
            if not history:
                query = query.where(ranked.c.rank == 1)
            query = query.order_by(IOV.since, IOV.insertion_time, IOV.id)
            rows = session.scalars(_page(query, limit, offset)).all()
        return [IOVInfo(r.since, r.insertion_time, r.payload_hash) for r in rows]

    def payload(self, digest: str) -> PayloadBlob:
        """Payload by hash (one statement)."""
        row = self._one_row(PAYLOAD_SQL, {"hash": digest})
        if row is None:
            raise NotFound(f"unknown payload {digest!r}")
        return PayloadBlob(
            row.hash, row.object_type, row.data, row.streamer_info, row.insertion_time
        )

    def has_payload(self, digest: str) -> bool:
        """True when a payload with this hash exists (without reading its bytes)."""
        return self._one_row(HAS_PAYLOAD_SQL, {"hash": digest}) is not None

    def resolve(
        self,
        *,
        tag: str | None = None,
        global_tag: str | None = None,
        record: str | None = None,
        label: str = "",
        run: int | None = None,
        ls: int | None = None,
        time_point: float | None = None,
        snapshot: float | None = None,
    ) -> Resolved:
        """The IOV valid at a run (lumi: run + ls) or a time, in a tag or through a global
        tag's (record, label) map at the global tag's snapshot time."""
        return self.resolve_at(
            tag=tag,
            global_tag=global_tag,
            record=record,
            label=label,
            run=run,
            ls=ls,
            time_point=time_point,
            snapshot=snapshot,
        ).resolved

    def resolve_at(
        self,
        *,
        tag: str | None = None,
        global_tag: str | None = None,
        record: str | None = None,
        label: str = "",
        run: int | None = None,
        ls: int | None = None,
        time_point: float | None = None,
        snapshot: float | None = None,
    ) -> Resolution:
        """:meth:`resolve` with the snapshot it was read at (whether it can change).

        One statement (global tag, map, tag and IOV joined; the point for each time
        type is a parameter). Only when it finds nothing do the step-by-step queries
        run, to say what is missing or which argument the tag's time type needs."""
        points = {kind: _point_or_none(kind, run, ls, time_point) for kind in TIME_TYPES}
        params: dict[str, Any] = {
            f"{kind}_point": -1 if p is None else p for kind, p in points.items()
        }
        params["snapshot"] = MAX_TIME if snapshot is None else snapshot
        if global_tag is not None:
            params.update(global_tag=global_tag, record=record or "", label=label)
            row = self._one_row(RESOLVE_GT_SQL, params)
        elif tag is not None:
            row = self._one_row(RESOLVE_TAG_SQL, {**params, "tag": tag})
        else:
            raise InvalidRequest("resolve needs a tag or a global tag with a record")
        if row is None:
            return self._resolve_by_steps(
                tag, global_tag, (record, label), (run, ls, time_point), snapshot
            )
        seen_at = min(row._mapping.get("gt_snapshot", MAX_TIME), params["snapshot"])
        return Resolution(
            Resolved(row.tag_name, row.since, row.payload_hash, row.insertion_time),
            None if seen_at >= MAX_TIME else seen_at,
        )

    def _resolve_by_steps(
        self,
        tag: str | None,
        global_tag: str | None,
        key: tuple[str | None, str],
        at: tuple[int | None, int | None, float | None],
        snapshot: float | None,
    ) -> Resolution:
        """:meth:`resolve_at` one query at a time, after the single statement found
        nothing: raises the error that says what is missing (unknown global tag,
        unmapped record, unknown tag, a point the tag's time type cannot use, no IOV);
        returns a resolution only if an IOV was committed between the two reads."""
        run, ls, time_point = at
        with self._session() as session:
            if global_tag is not None:
                tag, snapshot = self._map_tag(session, global_tag, *key, snapshot)
            if tag is None:
                raise InvalidRequest("resolve needs a tag or a global tag with a record")
            tag_row = self._get_tag(session, tag)
            point = _point(tag_row.time_type, run, ls, time_point)
            query = select(IOV).where(IOV.tag_name == tag, IOV.since <= point)
            if snapshot is not None:
                query = query.where(IOV.insertion_time <= snapshot)
            row = session.scalars(
                query.order_by(IOV.since.desc(), IOV.insertion_time.desc(), IOV.id.desc()).limit(1)
            ).first()
            if row is None:
                raise NotFound(f"tag {tag} has no IOV valid at {tag_row.time_type} {point}")
            return Resolution(
                Resolved(tag, row.since, row.payload_hash, row.insertion_time),
                None if snapshot is None or snapshot >= MAX_TIME else snapshot,
            )

    def _map_tag(
        self,
        session: Session,
        global_tag: str,
        record: str | None,
        label: str,
        snapshot: float | None,
    ) -> tuple[str, float]:
        gt = session.get(GlobalTag, global_tag)
        if gt is None:
            raise NotFound(f"unknown global tag {global_tag!r}")
        entry = session.get(GlobalTagMap, (global_tag, record or "", label))
        if entry is None:
            raise NotFound(f"global tag {global_tag} maps no record {record!r} label {label!r}")
        return entry.tag_name, gt.snapshot_time if snapshot is None else min(
            gt.snapshot_time, snapshot
        )

    def taglog(
        self, tag_name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The audit trail of a tag, oldest first (paged like :meth:`iovs`)."""
        query = select(TagLog).where(TagLog.tag_name == tag_name).order_by(TagLog.id)
        return self._audit_entries(query, limit, offset)

    def global_tag_log(
        self, name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The audit trail of a global tag, oldest first (paged like :meth:`iovs`)."""
        query = (
            select(GlobalTagLog)
            .where(GlobalTagLog.global_tag_name == name)
            .order_by(GlobalTagLog.id)
        )
        return self._audit_entries(query, limit, offset)

    def _audit_entries(self, query: Any, limit: int | None, offset: int) -> list[dict[str, Any]]:
        with self._session() as session:
            return [
                {
                    "time": r.time,
                    "action": r.action,
                    "user": r.user,
                    "host": r.host,
                    "text": r.text,
                    "before": r.before,
                    "after": r.after,
                }
                for r in session.scalars(_page(query, limit, offset))
            ]

    # ------------------------------------------------------------------------ global tags

    def create_global_tag(
        self,
        name: str,
        *,
        description: str = "",
        release: str = "",
        snapshot_time: float | None = None,
        user: str | None = None,
        host: str = "",
    ) -> dict[str, Any]:
        """Create a global tag; an identical one again is a no-op, another definition
        under an existing name a :class:`Conflict` naming what exists. Without a
        ``snapshot_time`` the global tag follows its tags' latest IOVs."""
        snapshot = MAX_TIME if snapshot_time is None else snapshot_time
        wanted = _gt_definition(description, release, snapshot)
        with self._session(write=True) as session:
            existing = session.get(GlobalTag, name)
            if existing is not None:
                defined = _gt_definition(
                    existing.description, existing.release, existing.snapshot_time
                )
                if defined != wanted:
                    raise Conflict(f"global tag {name} exists with {defined}")
            else:
                session.add(
                    GlobalTag(
                        name=name,
                        description=description,
                        release=release,
                        snapshot_time=snapshot,
                        insertion_time=time.time(),
                    )
                )
                session.add(_gt_log(name, "create_gt", (user or self.user, host), after=wanted))
        return self.global_tag(name)

    def map_global_tag(
        self,
        name: str,
        record: str,
        label: str,
        tag_name: str,
        *,
        user: str | None = None,
        host: str = "",
    ) -> dict[str, Any]:
        """Extend a global tag with (record, label) -> tag; remapping is refused."""
        with self._session(write=True) as session:
            if session.get(GlobalTag, name) is None:
                raise NotFound(f"unknown global tag {name!r}")
            self._get_tag(session, tag_name)
            entry = session.get(GlobalTagMap, (name, record, label))
            if entry is not None and entry.tag_name != tag_name:
                raise Conflict(
                    f"global tag {name} already maps {record}/{label} to {entry.tag_name}"
                )
            if entry is None:
                session.add(
                    GlobalTagMap(
                        global_tag_name=name, record=record, label=label, tag_name=tag_name
                    )
                )
                after = f"{record}/{label} -> {tag_name}"
                session.add(_gt_log(name, "map", (user or self.user, host), after=after))
        return self.global_tag(name)

    def global_tag(self, name: str) -> dict[str, Any]:
        """A global tag with its map."""
        with self._session() as session:
            gt = session.get(GlobalTag, name)
            if gt is None:
                raise NotFound(f"unknown global tag {name!r}")
            entries = session.scalars(
                select(GlobalTagMap)
                .where(GlobalTagMap.global_tag_name == name)
                .order_by(GlobalTagMap.record)
            )
            return {
                "name": gt.name,
                "description": gt.description,
                "release": gt.release,
                "snapshot_time": gt.snapshot_time,
                "map": [{"record": e.record, "label": e.label, "tag": e.tag_name} for e in entries],
            }

    def global_tags(self, *, limit: int | None = None, offset: int = 0) -> list[str]:
        """Names of global tags (paged like :meth:`tags`)."""
        with self._session() as session:
            query = _page(select(GlobalTag.name).order_by(GlobalTag.name), limit, offset)
            return list(session.scalars(query))

    # ---------------------------------------------------------------------- tokens, fcsr

    def create_token(self, user: str, tag_patterns: list[str], *, role: str = UPLOADER) -> str:
        """A new bearer token ``cdb_<id>_<secret>``; only the secret's hash is stored.
        ``role`` is ``uploader`` or ``admin`` (see :mod:`loop.conddb.auth`)."""
        if not tag_patterns or not all(p.strip() for p in tag_patterns):
            raise InvalidRequest("a token needs at least one non-empty tag pattern")
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {ROLES}, got {role!r}")
        secret = secrets.token_urlsafe(24)
        with self._session(write=True) as session:
            token = Token(
                user=user,
                tag_patterns=",".join(p.strip() for p in tag_patterns),
                secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
                created=time.time(),
                revoked=False,
                role=role,
            )
            session.add(token)
            session.flush()
            return f"cdb_{token.id}_{secret}"

    def revoke_token(self, token_id: int) -> None:
        """Revoke a token by id."""
        with self._session(write=True) as session:
            token = session.get(Token, token_id)
            if token is None:
                raise NotFound(f"unknown token id {token_id}")
            token.revoked = True

    def tokens(self) -> list[dict[str, Any]]:
        """Tokens without their secrets."""
        with self._session() as session:
            return [
                {
                    "id": t.id,
                    "user": t.user,
                    "tags": t.tag_patterns,
                    "role": t.role,
                    "created": t.created,
                    "revoked": t.revoked,
                }
                for t in session.scalars(select(Token))
            ]

    def authenticate(self, token: str) -> Identity | None:
        """The identity of a valid, unrevoked token; None otherwise (also for anything
        not shaped like a token, which never reaches the database)."""
        match = TOKEN_PATTERN.fullmatch(token)
        if match is None:
            return None
        token_id, secret = int(match[1]), match[2]
        with self._session() as session:
            row = session.get(Token, token_id)
            if row is None or row.revoked:
                return None
            if not hmac.compare_digest(
                row.secret_hash, hashlib.sha256(secret.encode()).hexdigest()
            ):
                return None
            return Identity(row.user, row.role, tuple(row.tag_patterns.split(",")), row.id)

    def set_fcsr(self, run: int | None) -> None:
        """Configure (or clear) the first condition-safe run."""
        with self._session(write=True) as session:
            row = session.get(Setting, "fcsr")
            if run is None:
                if row is not None:
                    session.delete(row)
            elif row is None:
                session.add(Setting(key="fcsr", value=str(run)))
            else:
                row.value = str(run)


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "calloop"


def _point(time_type: str, run: int | None, ls: int | None, time_point: float | None) -> int:
    if time_type == "time":
        if time_point is None or not 0 <= time_point <= MAX_TIME:
            raise InvalidRequest(f"this tag is time-based: give a time in 0..{MAX_TIME:.0f}")
        return int(time_point)
    if run is None or not 1 <= run <= MAX_RUN:
        raise InvalidRequest(f"this tag is {time_type}-based: give a run in 1..{MAX_RUN}")
    if ls is not None and not 1 <= ls <= MAX_LS:
        raise InvalidRequest(f"a lumi section is in 1..{MAX_LS}, got {ls}")
    return lumi_since(run, ls or 1) if time_type == "lumi" else run


def _point_or_none(
    time_type: str, run: int | None, ls: int | None, time_point: float | None
) -> int | None:
    """:func:`_point`, or None where the arguments give no point for ``time_type``."""
    try:
        return _point(time_type, run, ls, time_point)
    except InvalidRequest:
        return None


def _check_upload(
    tag_names: list[str],
    since: int,
    encoded: tuple[bytes, str],
    *,
    key: str | None,
    sequence: int | None,
) -> None:
    """Refuse what no database state could accept, before a transaction starts."""
    data, streamer = encoded
    if not tag_names:
        raise InvalidRequest("an upload names at least one tag")
    if not 0 <= since <= MAX_SINCE:
        raise InvalidRequest(f"since must be in 0..{MAX_SINCE}, got {since}")
    if streamer not in STREAMERS:
        raise InvalidRequest(f"unknown streamer {streamer!r}; expected one of {STREAMERS}")
    if sequence is not None and key is None:
        raise InvalidRequest("a harvest sequence needs an idempotency key")
    if key is not None and len(tag_names) != 1:
        raise InvalidRequest("an upload with an idempotency key names exactly one tag")
    if streamer == NPY_STREAMER:
        try:
            load_npy(data)
        except BadPayload as exc:
            raise InvalidRequest(str(exc)) from None


def _page(query: Any, limit: int | None, offset: int) -> Any:
    """``query`` restricted to one page; ``limit=None`` is every row."""
    if (limit is not None and limit < 1) or offset < 0:
        raise InvalidRequest(f"a page needs limit >= 1 and offset >= 0, got {limit}, {offset}")
    return query.limit(limit).offset(offset)


def _tag_definition(time_type: str, object_type: str, synchronization: str) -> str:
    return f"time_type={time_type}, object_type={object_type}, synchronization={synchronization}"


def _gt_definition(description: str, release: str, snapshot_time: float) -> str:
    return f"description={description!r}, release={release!r}, snapshot_time={snapshot_time}"


def _payload_row(tag: Tag, digest: str, data: bytes, streamer: str, now: float) -> Payload:
    return Payload(
        hash=digest,
        object_type=tag.object_type,
        data=data,
        size=len(data),
        streamer_info=streamer,
        insertion_time=now,
    )


def _tag_info(tag: Tag) -> TagInfo:
    return TagInfo(
        tag.name,
        tag.time_type,
        tag.object_type,
        tag.synchronization,
        tag.description,
        tag.end_of_validity,
        tag.insertion_time,
        tag.modification_time,
    )


def _request_row(key: str, offer: _Offer, result: UploadResult) -> UploadRequest:
    return UploadRequest(
        key=key,
        tag_name=offer.tag,
        since=offer.since,
        sequence=offer.sequence,
        result_since=result.since,
        payload_hash=result.payload_hash,
        status=result.status,
        note=result.note,
        time=time.time(),
    )


def _request_result(row: UploadRequest) -> UploadResult:
    return UploadResult(row.tag_name, row.result_since, row.payload_hash, row.status, row.note)


def _tag_log(
    tag: str,
    action: str,
    who: tuple[str, str],
    text: str = "",
    *,
    before: str = "",
    after: str = "",
) -> TagLog:
    """A tag's audit entry; ``who`` is (user, client host)."""
    return TagLog(tag_name=tag, **_audit(action, who, text, before, after))


def _gt_log(
    name: str,
    action: str,
    who: tuple[str, str],
    text: str = "",
    *,
    before: str = "",
    after: str = "",
) -> GlobalTagLog:
    """A global tag's audit entry; ``who`` is (user, client host)."""
    return GlobalTagLog(global_tag_name=name, **_audit(action, who, text, before, after))


def _audit(action: str, who: tuple[str, str], text: str, before: str, after: str) -> dict[str, Any]:
    user, host = who
    return {
        "time": time.time(),
        "action": action,
        "user": user,
        "host": host or socket.gethostname(),
        "text": text,
        "before": before,
        "after": after,
    }
