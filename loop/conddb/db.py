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
"""

from __future__ import annotations

import fnmatch
import getpass
import hashlib
import hmac
import io
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, event, func, insert, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from loop.conddb.models import (
    IOV,
    SYNCHRONIZATIONS,
    TIME_TYPES,
    Base,
    GlobalTag,
    GlobalTagMap,
    Payload,
    Setting,
    Tag,
    TagLog,
    Token,
    UploadRequest,
)
from loop.conddb.rules import decide, lumi_since
from loop.errors import ConditionsError
from loop.logs import get_logger

NPY_STREAMER = "numpy-npy-v1"
RAW_STREAMER = "raw-bytes"
STREAMERS = (NPY_STREAMER, RAW_STREAMER)
INSERTED, PRESENT, SUPERSEDED = "inserted", "already present", "superseded"
APPLIED = (INSERTED, PRESENT)  # outcomes whose payload is (or was) the since's current one

log = get_logger("calloop.conddb")


class NotFound(ConditionsError):
    """A tag, payload, global tag or IOV does not exist (HTTP 404)."""


class InvalidRequest(ConditionsError):
    """Arguments that can never succeed (HTTP 400)."""


class ConditionsUnavailable(ConditionsError):
    """The database or service cannot be reached now; the same call may work later."""


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


@dataclass(frozen=True)
class Resolved:
    """The payload valid at a point of a tag (or global tag)."""

    tag: str
    since: int
    payload_hash: str
    insertion_time: float


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
        return np.load(io.BytesIO(self.data), allow_pickle=False)


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
        self.url = normalize_url(url)
        self.user = user or _local_user()
        self.is_sqlite = self.url.startswith("sqlite")
        try:
            self._read = self._engine(immediate=False)
            self._write = self._engine(immediate=True) if self.is_sqlite else self._read
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConditionsError(f"conditions DB {url}: cannot open ({exc})") from None

    def _engine(self, *, immediate: bool) -> Engine:
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True)
        engine = create_engine(self.url, connect_args={"timeout": 30, "isolation_level": None})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def create_schema(self) -> None:
        """Create every table (idempotent)."""
        try:
            Base.metadata.create_all(self._write)
        except SQLAlchemyError as exc:
            raise ConditionsError(
                f"conditions DB {self.url}: schema creation failed: {exc}"
            ) from None

    def close(self) -> None:
        """Dispose of the connection pools."""
        self._read.dispose()
        self._write.dispose()

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        try:
            engine = self._write if write else self._read
            with Session(engine, expire_on_commit=False) as session, session.begin():
                yield session
        except ConditionsError:
            raise
        except OperationalError as exc:  # server down, database locked, network trouble
            raise ConditionsUnavailable(
                f"conditions DB {self.url} unavailable: {str(exc).splitlines()[0]}"
            ) from None
        except SQLAlchemyError as exc:
            raise ConditionsError(
                f"conditions DB {self.url}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from None

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
        with self._session(write=True) as session:
            existing = session.get(Tag, name)
            if existing is not None:
                if (existing.time_type, existing.object_type, existing.synchronization) != (
                    time_type,
                    object_type,
                    synchronization,
                ):
                    raise ConditionsError(
                        f"tag {name} exists with time_type={existing.time_type}, "
                        f"object_type={existing.object_type}, "
                        f"synchronization={existing.synchronization}"
                    )
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
            session.add(
                _log(name, "create_tag", user or self.user, host, f"{time_type}/{synchronization}")
            )
            return _tag_info(tag)

    def tag(self, name: str) -> TagInfo:
        """One tag; ``ConditionsError`` if unknown."""
        with self._session() as session:
            return _tag_info(self._get_tag(session, name))

    def tags(self) -> list[TagInfo]:
        """Every tag, by name."""
        with self._session() as session:
            return [_tag_info(t) for t in session.scalars(select(Tag).order_by(Tag.name))]

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
        if streamer not in STREAMERS:
            raise InvalidRequest(f"unknown streamer {streamer!r}; expected one of {STREAMERS}")
        if sequence is not None and key is None:
            raise InvalidRequest("a harvest sequence needs an idempotency key")
        # One transaction from the key lookup to the insert of its outcome. PostgreSQL:
        # the tag row's FOR UPDATE lock serializes the uploads of a tag. SQLite ignores
        # FOR UPDATE, but the write engine begins every transaction with BEGIN
        # IMMEDIATE, which takes the database's write lock before the first read, so no
        # other writer runs between these checks and the insert either.
        with self._session(write=True) as session:
            tag = self._get_tag(session, tag_name, lock=True)
            offer = _Offer(tag_name, since, sequence, payload_hash(tag.object_type, data))
            if key is not None:
                replayed = self._replay(session, key, offer)
                if replayed is not None:
                    return replayed
            result = self._superseded(session, offer)
            if result is None:
                text = f"input={input_tag} {user_text}"
                result = self._apply(
                    session, tag, offer, data, streamer=streamer, audit=(user, host, text)
                )
            if key is not None:
                session.add(_request_row(key, offer, result))
            return result

    def upload_result(self, key: str) -> UploadResult | None:
        """The stored outcome of the keyed upload ``key``; None when the database holds
        none (never received, or refused with an error)."""
        with self._session() as session:
            row = session.get(UploadRequest, key)
            return None if row is None else _request_result(row)

    @staticmethod
    def _replay(session: Session, key: str, offer: _Offer) -> UploadResult | None:
        """The stored outcome of a repeated key; a key reused for another upload is a
        client bug, refused rather than answered with the wrong outcome."""
        row = session.get(UploadRequest, key)
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
        session: Session,
        tag: Tag,
        offer: _Offer,
        data: bytes,
        *,
        streamer: str,
        audit: tuple[str | None, str, str],
    ) -> UploadResult:
        """Insert the IOV under the synchronization rule, unless already present;
        ``audit`` is the tag log's (user, host, text)."""
        since, digest = offer.since, offer.digest
        if self._current_hash(session, tag.name, since) == digest:
            return UploadResult(tag.name, since, digest, PRESENT)
        # only the rules that need them pay for these queries (count is O(IOVs))
        last = count = None
        if tag.synchronization == "offline":
            last = session.scalar(select(func.max(IOV.since)).where(IOV.tag_name == tag.name))
        if tag.synchronization == "mc":
            count = session.scalar(select(func.count()).where(IOV.tag_name == tag.name))
        decision = decide(
            tag.synchronization,
            tag.time_type,
            since,
            last_since=last,
            iov_count=count or 0,
            fcsr_run=self._fcsr(session),
        )
        if (
            decision.since != since
            and self._current_hash(session, tag.name, decision.since) == digest
        ):
            return UploadResult(tag.name, decision.since, digest, PRESENT, decision.note)
        now = time.time()
        if session.get(Payload, digest) is None:
            session.add(_payload_row(tag, digest, data, streamer, now))
            session.flush()  # the IOV's foreign key needs the payload row first
        session.add(
            IOV(tag_name=tag.name, since=decision.since, insertion_time=now, payload_hash=digest)
        )
        tag.modification_time = now
        user, host, text = audit
        text = f"since={decision.since} hash={digest[:12]} {text}"
        session.add(_log(tag.name, "upload", user or self.user, host, text.strip()))
        return UploadResult(tag.name, decision.since, digest, INSERTED, decision.note)

    @staticmethod
    def _current_hash(session: Session, tag_name: str, since: int) -> str | None:
        return session.scalars(
            select(IOV.payload_hash)
            .where(IOV.tag_name == tag_name, IOV.since == since)
            .order_by(IOV.insertion_time.desc(), IOV.id.desc())
            .limit(1)
        ).first()

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
        self, tag_name: str, *, snapshot: float | None = None, history: bool = False
    ) -> list[IOVInfo]:
        """IOVs of a tag as of ``snapshot`` (default now): the latest row per since, or
        every row with ``history``."""
        with self._session() as session:
            self._get_tag(session, tag_name)
            query = select(IOV).where(IOV.tag_name == tag_name)
            if snapshot is not None:
                query = query.where(IOV.insertion_time <= snapshot)
            rows = session.scalars(query.order_by(IOV.since, IOV.insertion_time, IOV.id)).all()
        infos = [IOVInfo(r.since, r.insertion_time, r.payload_hash) for r in rows]
        if history:
            return infos
        latest: dict[int, IOVInfo] = {}
        for info in infos:
            latest[info.since] = info
        return list(latest.values())

    def payload(self, digest: str) -> PayloadBlob:
        """Payload by hash."""
        with self._session() as session:
            row = session.get(Payload, digest)
            if row is None:
                raise NotFound(f"unknown payload {digest!r}")
            return PayloadBlob(
                row.hash, row.object_type, row.data, row.streamer_info, row.insertion_time
            )

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
        with self._session() as session:
            if global_tag is not None:
                tag, snapshot = self._map_tag(session, global_tag, record, label, snapshot)
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
            return Resolved(tag, row.since, row.payload_hash, row.insertion_time)

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
        return entry.tag_name, min(gt.snapshot_time, snapshot or gt.snapshot_time)

    def taglog(self, tag_name: str) -> list[dict[str, Any]]:
        """The audit trail of a tag, oldest first."""
        with self._session() as session:
            rows = session.scalars(
                select(TagLog).where(TagLog.tag_name == tag_name).order_by(TagLog.id)
            )
            return [
                {"time": r.time, "action": r.action, "user": r.user, "host": r.host, "text": r.text}
                for r in rows
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
        """Create a global tag (idempotent for an identical one)."""
        with self._session(write=True) as session:
            existing = session.get(GlobalTag, name)
            if existing is None:
                now = time.time()
                session.add(
                    GlobalTag(
                        name=name,
                        description=description,
                        release=release,
                        snapshot_time=snapshot_time or 1e12,
                        insertion_time=now,
                    )
                )
                session.add(_log(name, "create_gt", user or self.user, host, description))
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
                raise ConditionsError(
                    f"global tag {name} already maps {record}/{label} to {entry.tag_name}"
                )
            if entry is None:
                session.add(
                    GlobalTagMap(
                        global_tag_name=name, record=record, label=label, tag_name=tag_name
                    )
                )
                session.add(
                    _log(tag_name, "map_gt", user or self.user, host, f"{name}:{record}/{label}")
                )
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

    def global_tags(self) -> list[str]:
        """Names of every global tag."""
        with self._session() as session:
            return list(session.scalars(select(GlobalTag.name).order_by(GlobalTag.name)))

    # ---------------------------------------------------------------------- tokens, fcsr

    def create_token(self, user: str, tag_patterns: list[str]) -> str:
        """A new bearer token ``cdb_<id>_<secret>``; only the secret's hash is stored."""
        if not tag_patterns or not all(p.strip() for p in tag_patterns):
            raise InvalidRequest("a token needs at least one non-empty tag pattern")
        secret = secrets.token_urlsafe(24)
        with self._session(write=True) as session:
            token = Token(
                user=user,
                tag_patterns=",".join(p.strip() for p in tag_patterns),
                secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
                created=time.time(),
                revoked=False,
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
                    "created": t.created,
                    "revoked": t.revoked,
                }
                for t in session.scalars(select(Token))
            ]

    def authenticate(self, token: str) -> tuple[str, list[str]] | None:
        """(user, tag patterns) of a valid, unrevoked token; None otherwise."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "cdb" or not parts[1].isdigit():
            return None
        with self._session() as session:
            row = session.get(Token, int(parts[1]))
            if row is None or row.revoked:
                return None
            if not hmac.compare_digest(
                row.secret_hash, hashlib.sha256(parts[2].encode()).hexdigest()
            ):
                return None
            return row.user, row.tag_patterns.split(",")

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

    @staticmethod
    def _fcsr(session: Session) -> int | None:
        row = session.get(Setting, "fcsr")
        return None if row is None else int(row.value)


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "calloop"


def tag_allowed(patterns: list[str], tag: str) -> bool:
    """True when ``tag`` matches one of a token's patterns."""
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in patterns)


def _point(time_type: str, run: int | None, ls: int | None, time_point: float | None) -> int:
    if time_type == "time":
        if time_point is None:
            raise InvalidRequest("this tag is time-based: give a time")
        return int(time_point)
    if run is None:
        raise InvalidRequest(f"this tag is {time_type}-based: give a run")
    return lumi_since(run, ls or 1) if time_type == "lumi" else run


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


def _log(tag: str, action: str, user: str, host: str, text: str) -> TagLog:
    return TagLog(
        tag_name=tag,
        time=time.time(),
        action=action,
        user=user,
        host=host or socket.gethostname(),
        text=text,
    )
