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
(``rule_refused``, permanent) from other conflicts. ``POST /api/v1/tags/{name}/iovs``
uploads many IOVs of a tag in one transaction (:meth:`ConditionsDatabase.upload_bulk_encoded`).

Reads carry validators and cache headers (:class:`HttpCache`), so that a standard HTTP
cache in front of the service (README: "Behind an HTTP cache") answers repeated reads.
The hot reads (resolve, payload by hash) are one SQL statement each and skip the
worker-thread hand-off where it costs more than the read (:func:`_inline`).
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the local Annotated
# dependency aliases (Writer) from real annotation objects, not strings.

import base64
import binascii
import hashlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from loop import __version__
from loop.conddb import DEFAULT_MAX_BODY
from loop.conddb.auth import Forbidden, Identity, check_global_tag_edit, check_tags
from loop.conddb.db import (
    MAX_BULK,
    MAX_BULK_KEY,
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
    settled,
)
from loop.conddb.rules import RuleRefused
from loop.errors import ConditionsError

MAX_SEQUENCE = 2**63 - 1
IMMUTABLE_MAX_AGE = 365 * 24 * 3600  # RFC 9111 advises at most a year
P = ParamSpec("P")
T = TypeVar("T")
DEFAULT_PAGE, MAX_PAGE = 1000, 10000
KEY_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"  # ASCII, bounded, safe in a URL path segment
BULK_KEY_PATTERN = rf"^[A-Za-z0-9_.:\-]{{1,{MAX_BULK_KEY}}}$"
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


class BulkIOV(_Strict):
    """One IOV of a bulk upload."""

    since: int = Field(ge=0, le=MAX_SINCE)
    streamer_info: Literal["numpy-npy-v1", "raw-bytes"] = "numpy-npy-v1"
    payload_b64: str = Field(min_length=1)


class BulkUpload(_Strict):
    """Body of ``POST /api/v1/tags/{name}/iovs``: many IOVs of one tag, applied in the
    given order in one transaction (all or none). With an ``idempotencyKey`` the same
    request sent again is answered from the stored outcomes and writes nothing."""

    iovs: list[BulkIOV] = Field(min_length=1, max_length=MAX_BULK)
    inputTag: Text = ""
    userText: Text = ""
    idempotencyKey: Annotated[str, StringConstraints(pattern=BULK_KEY_PATTERN)] | None = None


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

    async def reader(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        # async: an open read costs no hand-off to a worker thread; the token check
        # (a database read) runs on one
        if read_token_required:
            await run_in_threadpool(writer, credentials)

    Writer = Annotated[Identity, Depends(writer)]
    lean = _inline if db.is_sqlite else run_in_threadpool
    # behind a token, a shared cache must not keep a read for the next client
    cache = HttpCache(scope="private" if read_token_required else "public")
    _add_read_routes(app, db, Depends(reader), cache, lean)
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
    # an error may not last (a record mapped, an IOV uploaded, the database back): no
    # cache may keep it
    return JSONResponse(
        {"detail": str(exc), "error": code},
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


class HttpCache:
    """Validators and cache headers of read responses (RFC 9110/9111).

    Every read answer has a strong ``ETag`` (a hash of its bytes) and a request whose
    ``If-None-Match`` names it gets ``304 Not Modified`` without a body. What cannot
    change (a payload by hash, a read at a settled snapshot: :meth:`Resolution.settled`)
    is ``max-age`` one year, ``immutable``; everything else is ``no-cache``: a cache
    may keep it but asks again (a conditional request) before each use. ``scope`` is
    ``public`` when reads are open (the answer is the same for everybody) and
    ``private`` when they need a token, so that no shared cache serves one client's
    authorized read to another (the client's own cache still may).
    """

    def __init__(self, scope: Literal["public", "private"]) -> None:
        self.scope = scope

    def headers(self, etag: str, *, immutable: bool) -> dict[str, str]:
        """ETag and Cache-Control of one answer."""
        policy = f"max-age={IMMUTABLE_MAX_AGE}, immutable" if immutable else "no-cache"
        return {"ETag": etag, "Cache-Control": f"{self.scope}, {policy}"}

    def answer(
        self,
        request: Request,
        body: bytes,
        *,
        immutable: bool,
        media_type: str = "application/json",
        etag: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> Response:
        """``body`` with its validators, or a 304 if the client holds it already."""
        etag = etag or f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = {**self.headers(etag, immutable=immutable), **(extra or {})}
        if holds(request, etag):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    def json(self, request: Request, data: Any, *, immutable: bool = False) -> Response:
        """:meth:`answer` for a JSON value."""
        return self.answer(request, _json_bytes(data), immutable=immutable)


async def _inline(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a hot read on the event loop. For SQLite: a WAL read never waits for a
    writer and takes about 0.1 ms, less than handing it to a worker thread and back.
    PostgreSQL reads (a network round trip, which must not stall every other client's
    request) go to a worker thread (``run_in_threadpool``)."""
    return call(*args, **kwargs)


def holds(request: Request, etag: str) -> bool:
    """True when the request's ``If-None-Match`` names ``etag`` (or is ``*``); weak
    comparison, as RFC 9110 asks for If-None-Match."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _add_read_routes(
    app: FastAPI,
    db: ConditionsDatabase,
    Reader: Any,
    cache: "HttpCache",
    lean: Callable[..., Awaitable[Any]],
) -> None:
    """Tags, IOVs, payloads, resolve, global tags, audit logs: open unless a read token
    is required, each with validators and cache headers (:class:`HttpCache`). Listings
    are paged: ``limit`` (default DEFAULT_PAGE, at most MAX_PAGE) rows after
    ``offset``; a page shorter than its limit is the last."""

    @app.get("/api/v1/tags", dependencies=[Reader])
    def list_tags(request: Request, limit: Limit = DEFAULT_PAGE, offset: Offset = 0) -> Response:
        return cache.json(request, [as_dict(t) for t in db.tags(limit=limit, offset=offset)])

    @app.get("/api/v1/tags/{name}", dependencies=[Reader])
    def get_tag(request: Request, name: PathName) -> Response:
        return cache.json(request, as_dict(db.tag(name)))

    @app.get("/api/v1/tags/{name}/iovs", dependencies=[Reader])
    def get_iovs(
        request: Request,
        name: PathName,
        *,
        snapshot: Instant = None,
        history: bool = False,
        limit: Limit = DEFAULT_PAGE,
        offset: Offset = 0,
    ) -> Response:
        iovs = db.iovs(name, snapshot=snapshot, history=history, limit=limit, offset=offset)
        return cache.json(request, [as_dict(i) for i in iovs], immutable=settled(snapshot))

    @app.get("/api/v1/tags/{name}/log", dependencies=[Reader])
    def get_log(
        request: Request, name: PathName, limit: Limit = DEFAULT_PAGE, offset: Offset = 0
    ) -> Response:
        return cache.json(request, db.taglog(name, limit=limit, offset=offset))

    @app.get(
        "/api/v1/payloads/{digest}",
        dependencies=[Reader],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 304: {}},
    )
    async def get_payload(
        request: Request, digest: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
    ) -> Response:
        # content-addressed, never rewritten: the hash is the validator, and a client
        # that holds it only needs to hear that the payload (still) exists
        etag = f'"{digest}"'
        if holds(request, etag) and await lean(db.has_payload, digest):
            return Response(status_code=304, headers=cache.headers(etag, immutable=True))
        blob = await lean(db.payload, digest)
        extra = {
            "X-Object-Type": blob.object_type,
            "X-Streamer-Info": blob.streamer_info,
            "X-Insertion-Time": repr(blob.insertion_time),
        }
        return cache.answer(
            request,
            blob.data,
            immutable=True,
            media_type="application/octet-stream",
            etag=etag,
            extra=extra,
        )

    @app.get("/api/v1/resolve", dependencies=[Reader], responses={304: {}})
    async def resolve(
        request: Request,
        *,
        tag: QueryName = None,
        global_tag: QueryName = None,
        record: QueryName = None,
        label: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.\-]{0,100}$")] = "",
        run: Run = None,
        ls: LumiSection = None,
        time: Instant = None,
        snapshot: Instant = None,
    ) -> Response:
        resolution = await lean(
            partial(
                db.resolve_at,
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
        return cache.json(request, as_dict(resolution.resolved), immutable=resolution.settled())

    @app.get("/api/v1/globaltags", dependencies=[Reader])
    def list_global_tags(
        request: Request, limit: Limit = DEFAULT_PAGE, offset: Offset = 0
    ) -> Response:
        return cache.json(request, db.global_tags(limit=limit, offset=offset))

    @app.get("/api/v1/uploads/{key}", dependencies=[Reader])
    def get_upload(request: Request, key: Annotated[str, Path(pattern=KEY_PATTERN)]) -> Response:
        result = db.upload_result(key)
        if result is None:
            raise NotFound(f"no upload with key {key!r}")
        return cache.json(request, as_dict(result))

    @app.get("/api/v1/globaltags/{name}", dependencies=[Reader])
    def get_global_tag(request: Request, name: PathName) -> Response:
        return cache.json(request, db.global_tag(name))

    @app.get("/api/v1/globaltags/{name}/log", dependencies=[Reader])
    def get_global_tag_log(
        request: Request, name: PathName, limit: Limit = DEFAULT_PAGE, offset: Offset = 0
    ) -> Response:
        return cache.json(request, db.global_tag_log(name, limit=limit, offset=offset))


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

    @app.post("/api/v1/tags/{name}/iovs")
    def upload_bulk(
        name: PathName, body: BulkUpload, identity: Writer, request: Request
    ) -> list[dict[str, Any]]:
        check_tags(identity, [name])
        results = db.upload_bulk_encoded(
            name,
            [(i.since, _decode(i.payload_b64), i.streamer_info) for i in body.iovs],
            user=identity.user,
            host=_client(request),
            user_text=body.userText,
            input_tag=body.inputTag,
            key=body.idempotencyKey,
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


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn (``port`` 0: any free port).

    Made with ``IPPROTO_TCP`` spelt out: asyncio sets ``TCP_NODELAY`` only on sockets
    whose protocol says TCP, and an accepted socket inherits its listener's.
    ``socket.create_server`` leaves it 0, and every answer, sent as headers then body,
    then waits for the client's delayed ACK (about 40 ms on Linux)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


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
