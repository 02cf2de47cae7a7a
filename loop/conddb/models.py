"""SQLAlchemy 2 schema of the conditions database (after the CMS conditions model).

Tags hold IOVs; an IOV points at a content-addressed payload. Re-inserting a since keeps
the older row (history); reads at a snapshot time see only rows inserted before it.
Times are Unix seconds (float) so SQLite and PostgreSQL order them identically.
Keyed uploads leave their outcome in ``upload_request``, which makes them idempotent
and orders the harvests of one since. Writes are audited in ``tag_log`` (tags) and
``global_tag_log`` (global tags), with the before and after of each change.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TIME_TYPES = ("run", "lumi", "time")
SYNCHRONIZATIONS = ("any", "validation", "offline", "mc", "hlt", "express", "prompt", "pcl")
UPLOADER, ADMIN = "uploader", "admin"
OPERATOR = "operator"  # acts in the web control room; writes nothing here
ROLES = (UPLOADER, ADMIN, OPERATOR)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Tag(Base):
    """A named sequence of IOVs of one object type."""

    __tablename__ = "tag"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    time_type: Mapped[str] = mapped_column(String(8))
    object_type: Mapped[str] = mapped_column(String(100))
    synchronization: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, default="")
    end_of_validity: Mapped[int] = mapped_column(BigInteger, default=0)
    insertion_time: Mapped[float] = mapped_column(Float)
    modification_time: Mapped[float] = mapped_column(Float)


class Payload(Base):
    """Content-addressed payload: hash = SHA-256 over object type + bytes."""

    __tablename__ = "payload"
    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_type: Mapped[str] = mapped_column(String(100))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    streamer_info: Mapped[str] = mapped_column(Text, default="")
    insertion_time: Mapped[float] = mapped_column(Float)


class IOV(Base):
    """Interval of validity: from ``since`` until the next since of the tag."""

    __tablename__ = "iov"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tag_name: Mapped[str] = mapped_column(ForeignKey("tag.name"))
    since: Mapped[int] = mapped_column(BigInteger)
    insertion_time: Mapped[float] = mapped_column(Float)
    payload_hash: Mapped[str] = mapped_column(ForeignKey("payload.hash"))
    __table_args__ = (Index("ix_iov_tag_since_time", "tag_name", "since", "insertion_time"),)


class GlobalTag(Base):
    """A consistent set of tags, read as of ``snapshot_time``."""

    __tablename__ = "global_tag"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    release: Mapped[str] = mapped_column(String(100), default="")
    snapshot_time: Mapped[float] = mapped_column(Float)
    insertion_time: Mapped[float] = mapped_column(Float)


class GlobalTagMap(Base):
    """Which tag a global tag uses for a (record, label)."""

    __tablename__ = "global_tag_map"
    global_tag_name: Mapped[str] = mapped_column(ForeignKey("global_tag.name"), primary_key=True)
    record: Mapped[str] = mapped_column(String(100), primary_key=True)
    label: Mapped[str] = mapped_column(String(100), primary_key=True)
    tag_name: Mapped[str] = mapped_column(ForeignKey("tag.name"))


class _Audit:
    """Columns of an audit entry. Columns added after the first release carry a server
    default, so that ``create_schema`` can add them to an existing table."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(100))
    host: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text, default="")
    before: Mapped[str] = mapped_column(Text, default="", server_default="")
    after: Mapped[str] = mapped_column(Text, default="", server_default="")


class TagLog(_Audit, Base):
    """Audit trail of every write to a tag."""

    __tablename__ = "tag_log"
    tag_name: Mapped[str] = mapped_column(String(100), index=True)


class GlobalTagLog(_Audit, Base):
    """Audit trail of every write to a global tag (its creation and its map)."""

    __tablename__ = "global_tag_log"
    global_tag_name: Mapped[str] = mapped_column(String(100), index=True)


class Token(Base):
    """A bearer token: only a SHA-256 of its secret is stored. ``tag_patterns`` scope the
    tags it may write; the ``admin`` role may also create and edit global tags."""

    __tablename__ = "token"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(100))
    tag_patterns: Mapped[str] = mapped_column(Text)  # comma-separated fnmatch patterns
    secret_hash: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    role: Mapped[str] = mapped_column(String(16), default=UPLOADER, server_default=UPLOADER)


class Setting(Base):
    """Service settings, e.g. the first condition-safe run (``fcsr``)."""

    __tablename__ = "setting"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class UploadRequest(Base):
    """The outcome of one keyed upload: a repeat of the key is answered from this row.

    ``since`` is the since the client asked for (the IOV's may have moved up to the
    FCSR: ``result_since``); ``sequence`` orders the harvests that target one
    (tag, since). ``payload_hash`` is not a foreign key: a superseded upload stores no
    payload.
    """

    __tablename__ = "upload_request"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tag_name: Mapped[str] = mapped_column(ForeignKey("tag.name"))
    since: Mapped[int] = mapped_column(BigInteger)
    sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_since: Mapped[int] = mapped_column(BigInteger)
    payload_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text, default="")
    time: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_upload_request_tag_since", "tag_name", "since", "sequence"),)
