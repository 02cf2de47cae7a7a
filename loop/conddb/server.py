"""The conditions-DB HTTP service (FastAPI): ``calloop conddb serve --db URL --port P``.

Reads are open unless ``read_token_required``; writes need a bearer token with the
right for them (:mod:`loop.conddb.auth`: tag patterns for tags and uploads, the admin
role for global tags). Every write lands in the tag log or the global-tag log with the
token's user and the client's address. Request bodies are capped and every input is
bounded (names ASCII, runs 1..2^31-1, lumi sections 1..2^32-1, listings paged with at
most ``MAX_PAGE`` rows); invalid input gets a 4xx with a message, never a 500. The
OpenAPI spec is served at ``/openapi.json``.

An upload's metadata may carry an ``idempotencyKey`` and a ``harvestSequence`` (see
:mod:`loop.conddb.db`); ``GET /api/v1/uploads/{key}`` answers a keyed upload's stored
outcome, so a client whose request timed out can learn whether it landed. Error bodies
are ``{"detail": text, "error": code}``; the code tells a synchronization-rule refusal
(``rule_refused``, permanent) from other conflicts.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the local Annotated
# dependency aliases (Writer) from real annotation objects, not strings.

import base64
import binascii
import threading
import time
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from loop import __version__
from loop.conddb import DEFAULT_MAX_BODY
from loop.conddb.auth import Forbidden, Identity, check_global_tag_edit, check_tags
from loop.conddb.db import (
    MAX_LS,
    MAX_RUN,
    MAX_SINCE,
    MAX_TIME,
    ConditionsDatabase,
    ConditionsUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    as_dict,
)
from loop.conddb.rules import RuleRefused
from loop.errors import ConditionsError

MAX_SEQUENCE = 2**63 - 1
DEFAULT_PAGE, MAX_PAGE = 1000, 10000
KEY_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"  # ASCII, bounded, safe in a URL path segment
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,100}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{0,100}$")]
# free text, bounded; no NUL, which PostgreSQL refuses in text columns
Text = Annotated[str, StringConstraints(max_length=4000, pattern=r"^[^\x00]*$")]
PathName = Annotated[str, Path(pattern=NAME_PATTERN)]
QueryName = Annotated[str | None, Query(pattern=NAME_PATTERN)]
Run = Annotated[int | None, Query(ge=1, le=MAX_RUN)]
LumiSection = Annotated[int | None, Query(ge=1, le=MAX_LS)]
Instant = Annotated[float | None, Query(ge=0, le=MAX_TIME)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=MAX_SINCE)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TagCreate(_Strict):
    """Body of ``POST /api/v1/tags``."""

    name: Name
    time_type: Literal["run", "lumi", "time"]
    object_type: Name
    synchronization: Literal[
        "any", "validation", "offline", "mc", "hlt", "express", "prompt", "pcl"
    ] = "any"
    description: Text = ""


class UploadMetadata(_Strict):
    """The CMS-style metadata record of an upload."""

    destinationTags: dict[Name, dict[str, Any]] = Field(min_length=1, max_length=20)
    inputTag: Text = ""
    since: int = Field(ge=0, le=MAX_SINCE)
    userText: Text = ""
    idempotencyKey: Annotated[str, StringConstraints(pattern=KEY_PATTERN)] | None = None
    harvestSequence: int | None = Field(None, ge=0, le=MAX_SEQUENCE)

    @model_validator(mode="after")
    def _keyed(self) -> "UploadMetadata":
        if self.harvestSequence is not None and self.idempotencyKey is None:
            raise ValueError("harvestSequence needs an idempotencyKey")
        # one key, one stored outcome: a keyed upload names a single tag
        if self.idempotencyKey is not None and len(self.destinationTags) != 1:
            raise ValueError("an upload with an idempotencyKey names exactly one tag")
        return self


class UploadRequest(_Strict):
    """Body of ``POST /api/v1/upload``: metadata plus the base64 payload."""

    metadata: UploadMetadata
    streamer_info: Literal["numpy-npy-v1", "raw-bytes"] = "numpy-npy-v1"
    payload_b64: str = Field(min_length=1)


class GlobalTagCreate(_Strict):
    """Body of ``POST /api/v1/globaltags``."""

    name: Name
    description: Text = ""
    release: Annotated[str, StringConstraints(max_length=100, pattern=r"^[^\x00]*$")] = ""
    snapshot_time: float | None = Field(None, ge=0, le=MAX_TIME)


class GlobalTagMapEntry(_Strict):
    """Body of ``POST /api/v1/globaltags/{name}/map``."""

    record: Name
    label: Label = ""
    tag: Name


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware answering 413 to bodies over ``limit`` bytes (streamed or not)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Any, receive: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body exceeds {self.limit} bytes"}, status_code=413
        )
        await response(scope, receive, send)


def create_app(
    db: ConditionsDatabase,
    *,
    read_token_required: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """Build the service around an open database."""
    app = FastAPI(title="calloop conditions DB", version=__version__)
    bearer = HTTPBearer(auto_error=False)

    def writer(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Identity:
        if credentials is None:
            raise HTTPException(
                401,
                "a bearer token is required for this request",
                headers={"WWW-Authenticate": "Bearer"},
            )
        identity = db.authenticate(credentials.credentials)
        if identity is None:
            raise HTTPException(
                401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"}
            )
        return identity

    def reader(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if read_token_required:
            writer(credentials)

    Writer = Annotated[Identity, Depends(writer)]
    _add_read_routes(app, db, Depends(reader))
    _add_write_routes(app, db, Writer)
    app.add_exception_handler(ConditionsError, _conditions_error)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


# most specific first; anything else is a refused write (a conflicting definition)
ERROR_CODES: tuple[tuple[type[ConditionsError], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (InvalidRequest, 400, "invalid_request"),
    (Forbidden, 403, "forbidden"),
    (RuleRefused, 409, "rule_refused"),
    (Conflict, 409, "conflict"),
    (ConditionsUnavailable, 503, "unavailable"),
)


async def _conditions_error(_request: Request, exc: ConditionsError) -> JSONResponse:
    status, code = next(
        ((status, code) for kind, status, code in ERROR_CODES if isinstance(exc, kind)),
        (409, "conflict"),
    )
    return JSONResponse({"detail": str(exc), "error": code}, status_code=status)


def _add_read_routes(app: FastAPI, db: ConditionsDatabase, Reader: Any) -> None:
    """Tags, IOVs, payloads, resolve, global tags, audit logs: open unless a read token
    is required. Listings are paged: ``limit`` (default DEFAULT_PAGE, at most MAX_PAGE)
    rows after ``offset``; a page shorter than its limit is the last."""

    @app.get("/api/v1/tags", dependencies=[Reader])
    def list_tags(limit: Limit = DEFAULT_PAGE, offset: Offset = 0) -> list[dict[str, Any]]:
        return [as_dict(t) for t in db.tags(limit=limit, offset=offset)]

    @app.get("/api/v1/tags/{name}", dependencies=[Reader])
    def get_tag(name: PathName) -> dict[str, Any]:
        return as_dict(db.tag(name))

    @app.get("/api/v1/tags/{name}/iovs", dependencies=[Reader])
    def get_iovs(
        name: PathName,
        snapshot: Instant = None,
        history: bool = False,
        limit: Limit = DEFAULT_PAGE,
        offset: Offset = 0,
    ) -> list[dict[str, Any]]:
        iovs = db.iovs(name, snapshot=snapshot, history=history, limit=limit, offset=offset)
        return [as_dict(i) for i in iovs]

    @app.get("/api/v1/tags/{name}/log", dependencies=[Reader])
    def get_log(
        name: PathName, limit: Limit = DEFAULT_PAGE, offset: Offset = 0
    ) -> list[dict[str, Any]]:
        return db.taglog(name, limit=limit, offset=offset)

    @app.get("/api/v1/payloads/{digest}", dependencies=[Reader])
    def get_payload(digest: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]) -> Response:
        blob = db.payload(digest)
        return Response(
            blob.data,
            media_type="application/octet-stream",
            headers={
                "X-Object-Type": blob.object_type,
                "X-Streamer-Info": blob.streamer_info,
                "X-Insertion-Time": repr(blob.insertion_time),
            },
        )

    @app.get("/api/v1/resolve", dependencies=[Reader])
    def resolve(
        *,
        tag: QueryName = None,
        global_tag: QueryName = None,
        record: QueryName = None,
        label: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.\-]{0,100}$")] = "",
        run: Run = None,
        ls: LumiSection = None,
        time: Instant = None,
        snapshot: Instant = None,
    ) -> dict[str, Any]:
        return as_dict(
            db.resolve(
                tag=tag,
                global_tag=global_tag,
                record=record,
                label=label,
                run=run,
                ls=ls,
                time_point=time,
                snapshot=snapshot,
            )
        )

    @app.get("/api/v1/globaltags", dependencies=[Reader])
    def list_global_tags(limit: Limit = DEFAULT_PAGE, offset: Offset = 0) -> list[str]:
        return db.global_tags(limit=limit, offset=offset)

    @app.get("/api/v1/uploads/{key}", dependencies=[Reader])
    def get_upload(key: Annotated[str, Path(pattern=KEY_PATTERN)]) -> dict[str, Any]:
        result = db.upload_result(key)
        if result is None:
            raise NotFound(f"no upload with key {key!r}")
        return as_dict(result)

    @app.get("/api/v1/globaltags/{name}", dependencies=[Reader])
    def get_global_tag(name: PathName) -> dict[str, Any]:
        return db.global_tag(name)

    @app.get("/api/v1/globaltags/{name}/log", dependencies=[Reader])
    def get_global_tag_log(
        name: PathName, limit: Limit = DEFAULT_PAGE, offset: Offset = 0
    ) -> list[dict[str, Any]]:
        return db.global_tag_log(name, limit=limit, offset=offset)


def _add_write_routes(app: FastAPI, db: ConditionsDatabase, Writer: Any) -> None:
    """Tag creation and uploads (tags within the token's patterns), global-tag creation
    and mapping (admin tokens): see :mod:`loop.conddb.auth`."""

    @app.post("/api/v1/tags", status_code=201)
    def create_tag(body: TagCreate, identity: Writer, request: Request) -> dict[str, Any]:
        check_tags(identity, [body.name])
        return as_dict(
            db.create_tag(
                body.name,
                time_type=body.time_type,
                object_type=body.object_type,
                synchronization=body.synchronization,
                description=body.description,
                user=identity.user,
                host=_client(request),
            )
        )

    @app.post("/api/v1/upload")
    def upload(body: UploadRequest, identity: Writer, request: Request) -> list[dict[str, Any]]:
        tags = list(body.metadata.destinationTags)
        check_tags(identity, tags)
        results = db.upload_many(
            tags,
            body.metadata.since,
            _decode(body.payload_b64),
            body.streamer_info,
            user=identity.user,
            host=_client(request),
            user_text=body.metadata.userText,
            input_tag=body.metadata.inputTag,
            key=body.metadata.idempotencyKey,
            sequence=body.metadata.harvestSequence,
        )
        return [as_dict(r) for r in results]

    @app.post("/api/v1/globaltags", status_code=201)
    def create_global_tag(
        body: GlobalTagCreate, identity: Writer, request: Request
    ) -> dict[str, Any]:
        check_global_tag_edit(identity, body.name)
        return db.create_global_tag(
            body.name,
            description=body.description,
            release=body.release,
            snapshot_time=body.snapshot_time,
            user=identity.user,
            host=_client(request),
        )

    @app.post("/api/v1/globaltags/{name}/map")
    def map_global_tag(
        name: PathName, body: GlobalTagMapEntry, identity: Writer, request: Request
    ) -> dict[str, Any]:
        check_global_tag_edit(identity, name)
        return db.map_global_tag(
            name, body.record, body.label, body.tag, user=identity.user, host=_client(request)
        )


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _decode(payload_b64: str) -> bytes:
    """The payload bytes; whether they are what the streamer says is the database's
    check (:func:`loop.conddb.npy.load_npy` for arrays), the same for every client."""
    try:
        return base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("payload_b64 is not valid base64") from None


class ServiceThread:
    """Run the service with uvicorn in a background thread (tests, demo, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 10.0) -> "ServiceThread":
        """Start and wait until the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("conditions DB service did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        """Base URL of the running service."""
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout=10)
