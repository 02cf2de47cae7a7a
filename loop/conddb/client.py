"""One client API over ``sqlite://``, ``postgresql://`` and ``http(s)://`` conditions DBs.

``ConditionsDB.connect(url, token=None)`` returns a :class:`ConditionsDatabase` for SQL
URLs and an :class:`HttpConditions` for service URLs; both satisfy :class:`Conditions`.

Over HTTP every call is bounded by a :class:`~loop.callpolicy.CallPolicy` (attempts,
per-attempt timeout, overall deadline, reply size cap). Reads and the idempotent writes
(tag and global-tag creation, mapping) are retried after a timeout, a connection
failure or a 5xx. An upload is not idempotent by itself and is never re-sent blindly:
see :meth:`HttpConditions.upload`.

Listings (tags, IOVs, logs, global tags) come from the service in pages; without a
``limit`` the client reads page after page until the last.

Errors: :class:`ConditionsUnavailable` is transient (try again later, with the same
key); :class:`NotAuthorized` needs another token; :class:`RuleRefused`,
:class:`InvalidRequest` and :class:`NotFound` are permanent for that request.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import numpy as np
import requests
from requests.structures import CaseInsensitiveDict

from loop.callpolicy import (
    BoundedResponse,
    CallFailed,
    CallPolicy,
    ResponseTooLarge,
    bounded_request,
    call_with_policy,
)
from loop.conddb.db import (
    ConditionsDatabase,
    ConditionsUnavailable,
    InvalidRequest,
    IOVInfo,
    NotAuthorized,
    NotFound,
    PayloadBlob,
    Resolved,
    TagInfo,
    UploadResult,
    encode_payload,
)
from loop.conddb.rules import RuleRefused
from loop.errors import ConditionsError
from loop.redact import redact, redact_url

T = TypeVar("T")
DEFAULT_POLICY = CallPolicy()
PAGE_SIZE = 1000  # rows per listing request; the service allows up to its MAX_PAGE


class Conditions(Protocol):
    """What every conditions-DB connection offers."""

    def create_tag(
        self,
        name: str,
        *,
        time_type: str,
        object_type: str,
        synchronization: str = "any",
        description: str = "",
    ) -> TagInfo: ...
    def tag(self, name: str) -> TagInfo: ...
    def tags(self, *, limit: int | None = None, offset: int = 0) -> list[TagInfo]: ...
    def upload(
        self,
        tag_name: str,
        since: int,
        value: np.ndarray | bytes,
        *,
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
        sequence: int | None = None,
    ) -> UploadResult: ...
    def upload_bulk(
        self,
        tag_name: str,
        rows: list[tuple[int, np.ndarray | bytes]],
        *,
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
    ) -> list[UploadResult]: ...
    def upload_result(self, key: str) -> UploadResult | None: ...
    def iovs(
        self,
        tag_name: str,
        *,
        snapshot: float | None = None,
        history: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[IOVInfo]: ...
    def payload(self, digest: str) -> PayloadBlob: ...
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
    ) -> Resolved: ...
    def create_global_tag(
        self,
        name: str,
        *,
        description: str = "",
        release: str = "",
        snapshot_time: float | None = None,
    ) -> dict[str, Any]: ...
    def map_global_tag(
        self, name: str, record: str, label: str, tag_name: str
    ) -> dict[str, Any]: ...
    def global_tag(self, name: str) -> dict[str, Any]: ...
    def global_tags(self, *, limit: int | None = None, offset: int = 0) -> list[str]: ...
    def taglog(
        self, tag_name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]: ...
    def global_tag_log(
        self, name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class HttpConditions:
    """Client of ``calloop conddb serve``, every call bounded by ``policy``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        policy: CallPolicy = DEFAULT_POLICY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._base = url.rstrip("/")
        self.url = redact_url(self._base)  # for messages: they reach logs and the journal
        self.policy = policy
        self._sleep = sleep
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def _attempt(self, method: str, path: str, timeout_s: float, **kwargs: Any) -> BoundedResponse:
        """One request; a 5xx is a failed attempt, any other answer is returned."""
        response = bounded_request(
            self._session,
            method,
            f"{self._base}{path}",
            timeout_s=timeout_s,
            max_bytes=self.policy.max_bytes,
            **kwargs,
        )
        if response.status_code >= 500:
            raise CallFailed(f"HTTP {response.status_code}: {response.excerpt()}")
        return response

    def _within_policy(
        self, attempt: Callable[[float], T], what: str, policy: CallPolicy | None = None
    ) -> T:
        """Run ``attempt`` under the policy; its failures become conditions errors."""
        try:
            return call_with_policy(
                attempt,
                policy or self.policy,
                what=f"conditions DB {self.url}: {what}",
                sleep=self._sleep,
            )
        # requests quotes the URL in its errors, credentials included if it has any
        except ResponseTooLarge as exc:
            raise ConditionsError(redact(str(exc))) from None
        except CallFailed as exc:
            raise ConditionsUnavailable(redact(str(exc))) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> BoundedResponse:
        """A read or an idempotent write, retried under the policy; 4xx raises."""
        return self._within_policy(
            lambda timeout_s: _ok(self._attempt(method, path, timeout_s, **kwargs)),
            f"{method} {path}",
        )

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`_call` for a JSON reply (an unreadable one is a failed attempt)."""
        return self._within_policy(
            lambda timeout_s: _decoded(_ok(self._attempt(method, path, timeout_s, **kwargs))),
            f"{method} {path}",
        )

    def create_tag(
        self,
        name: str,
        *,
        time_type: str,
        object_type: str,
        synchronization: str = "any",
        description: str = "",
    ) -> TagInfo:
        """Create a tag (idempotent)."""
        body = {
            "name": name,
            "time_type": time_type,
            "object_type": object_type,
            "synchronization": synchronization,
            "description": description,
        }
        return TagInfo(**self._json("POST", "/api/v1/tags", json=body))

    def tag(self, name: str) -> TagInfo:
        """One tag."""
        return TagInfo(**self._json("GET", f"/api/v1/tags/{name}"))

    def tags(self, *, limit: int | None = None, offset: int = 0) -> list[TagInfo]:
        """Tags by name (all of them without a ``limit``)."""
        return [TagInfo(**t) for t in self._listing("/api/v1/tags", {}, limit, offset)]

    def _listing(
        self, path: str, params: dict[str, Any], limit: int | None, offset: int
    ) -> list[Any]:
        """``limit`` rows of a paged listing from ``offset``; every row from there on
        without a limit, one page per request."""
        if limit is not None:
            return list(
                self._json("GET", path, params={**params, "limit": limit, "offset": offset})
            )
        rows: list[Any] = []
        while True:
            page = self._json(
                "GET", path, params={**params, "limit": PAGE_SIZE, "offset": offset + len(rows)}
            )
            rows.extend(page)
            if len(page) < PAGE_SIZE:
                return rows

    def upload(
        self,
        tag_name: str,
        since: int,
        value: np.ndarray | bytes,
        *,
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
        sequence: int | None = None,
    ) -> UploadResult:
        """Upload with a CMS-style metadata record.

        A POST that timed out may still land, so it is never re-sent blindly. Without
        a ``key`` it is sent once: any failure is :class:`ConditionsUnavailable` and the
        caller cannot know whether it landed. With a key, after a timeout, a connection
        failure or a 5xx the client asks the service for the key's stored outcome and
        returns it; only a 404 for the key (nothing applied) lets the POST go again,
        within the policy. If the service cannot tell, the outcome is unknown:
        :class:`ConditionsUnavailable`, and a later call with the same key is safe.
        """
        data, streamer = encode_payload(value)
        metadata: dict[str, Any] = {
            "destinationTags": {tag_name: {}},
            "inputTag": input_tag,
            "since": since,
            "userText": user_text,
        }
        if key is not None:
            metadata["idempotencyKey"] = key
        if sequence is not None:
            metadata["harvestSequence"] = sequence
        body = {
            "metadata": metadata,
            "streamer_info": streamer,
            "payload_b64": base64.b64encode(data).decode(),
        }
        if key is None:
            return self._within_policy(
                lambda timeout_s: self._post_upload(body, timeout_s),
                "upload (not re-sent: no idempotency key)",
                dataclasses.replace(self.policy, attempts=1),
            )
        deadline = time.monotonic() + self.policy.deadline_s

        def attempt(timeout_s: float) -> UploadResult:
            try:
                return self._post_upload(body, timeout_s)
            except CallFailed as failure:
                stored = self._stored_outcome(key, failure, deadline)
                if stored is None:
                    raise  # the service holds nothing for the key: the POST may go again
                return stored

        return self._within_policy(attempt, f"upload {key}")

    def upload_bulk(
        self,
        tag_name: str,
        rows: list[tuple[int, np.ndarray | bytes]],
        *,
        user_text: str = "",
        input_tag: str = "",
        key: str | None = None,
    ) -> list[UploadResult]:
        """Upload (since, payload) pairs of one tag in one request and one transaction
        (all or none). With a ``key`` the request is re-sent within the policy after a
        timeout, a connection failure or a 5xx: the service answers a repeat from the
        stored outcomes. Without one it is sent once, like :meth:`upload`."""
        iovs = []
        for since, value in rows:
            data, streamer = encode_payload(value)
            iovs.append(
                {
                    "since": since,
                    "streamer_info": streamer,
                    "payload_b64": base64.b64encode(data).decode(),
                }
            )
        body: dict[str, Any] = {"iovs": iovs, "inputTag": input_tag, "userText": user_text}
        if key is not None:
            body["idempotencyKey"] = key
        path = f"/api/v1/tags/{tag_name}/iovs"
        policy = self.policy if key else dataclasses.replace(self.policy, attempts=1)
        replies = self._within_policy(
            lambda timeout_s: _decoded(_ok(self._attempt("POST", path, timeout_s, json=body))),
            f"bulk upload of {len(rows)} IOVs to {tag_name}",
            policy,
        )
        return [UploadResult(**reply) for reply in replies]

    def _post_upload(self, body: dict[str, Any], timeout_s: float) -> UploadResult:
        return _outcome(_ok(self._attempt("POST", "/api/v1/upload", timeout_s, json=body)))

    def _stored_outcome(
        self, key: str, failure: CallFailed, deadline: float
    ) -> UploadResult | None:
        """After a failed POST: the key's stored outcome, None on the service's 404.
        Not knowing is :class:`ConditionsUnavailable`, which ends the upload call
        without another POST."""
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise ConditionsUnavailable("no time left to ask for the stored outcome")
            return self.upload_result(
                key, policy=dataclasses.replace(self.policy, deadline_s=remaining)
            )
        except ConditionsUnavailable as exc:
            raise ConditionsUnavailable(
                f"conditions DB {self.url}: upload {key} failed ({failure}) and its outcome "
                f"is unknown ({exc}); retry later with the same key"
            ) from None

    def upload_result(self, key: str, *, policy: CallPolicy | None = None) -> UploadResult | None:
        """The stored outcome of keyed upload ``key``; None if the service holds none."""
        path = f"/api/v1/uploads/{quote(key, safe='')}"

        def attempt(timeout_s: float) -> UploadResult | None:
            response = self._attempt("GET", path, timeout_s)
            # a 404 without the code is not the service's answer about the key
            if response.status_code == 404 and _code(response) == "not_found":
                return None
            return _outcome(_ok(response))

        return self._within_policy(attempt, f"GET {path}", policy)

    def iovs(
        self,
        tag_name: str,
        *,
        snapshot: float | None = None,
        history: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[IOVInfo]:
        """IOVs of a tag (all of them without a ``limit``)."""
        params: dict[str, Any] = {"history": str(history).lower()}
        if snapshot is not None:
            params["snapshot"] = snapshot
        rows = self._listing(f"/api/v1/tags/{tag_name}/iovs", params, limit, offset)
        return [IOVInfo(**row) for row in rows]

    def payload(self, digest: str) -> PayloadBlob:
        """Payload bytes by hash."""
        response = self._call("GET", f"/api/v1/payloads/{digest}")
        headers = CaseInsensitiveDict(response.headers)
        return PayloadBlob(
            digest,
            headers["X-Object-Type"],
            response.content,
            headers["X-Streamer-Info"],
            float(headers["X-Insertion-Time"]),
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
        """The IOV valid at a point."""
        params = {
            k: v
            for k, v in {
                "tag": tag,
                "global_tag": global_tag,
                "record": record,
                "label": label,
                "run": run,
                "ls": ls,
                "time": time_point,
                "snapshot": snapshot,
            }.items()
            if v is not None
        }
        return Resolved(**self._json("GET", "/api/v1/resolve", params=params))

    def create_global_tag(
        self,
        name: str,
        *,
        description: str = "",
        release: str = "",
        snapshot_time: float | None = None,
    ) -> dict[str, Any]:
        """Create a global tag."""
        body = {
            "name": name,
            "description": description,
            "release": release,
            "snapshot_time": snapshot_time,
        }
        result: dict[str, Any] = self._json("POST", "/api/v1/globaltags", json=body)
        return result

    def map_global_tag(self, name: str, record: str, label: str, tag_name: str) -> dict[str, Any]:
        """Map (record, label) -> tag in a global tag."""
        body = {"record": record, "label": label, "tag": tag_name}
        result: dict[str, Any] = self._json("POST", f"/api/v1/globaltags/{name}/map", json=body)
        return result

    def global_tag(self, name: str) -> dict[str, Any]:
        """A global tag and its map."""
        result: dict[str, Any] = self._json("GET", f"/api/v1/globaltags/{name}")
        return result

    def global_tags(self, *, limit: int | None = None, offset: int = 0) -> list[str]:
        """Global tag names (all of them without a ``limit``)."""
        return self._listing("/api/v1/globaltags", {}, limit, offset)

    def taglog(
        self, tag_name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """A tag's audit trail, oldest first."""
        return self._listing(f"/api/v1/tags/{tag_name}/log", {}, limit, offset)

    def global_tag_log(
        self, name: str, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """A global tag's audit trail, oldest first."""
        return self._listing(f"/api/v1/globaltags/{name}/log", {}, limit, offset)


def _ok(response: BoundedResponse) -> BoundedResponse:
    """The response, unless it is a 4xx: then its conditions error."""
    if response.status_code >= 400:
        raise _error(response)
    return response


def _decoded(response: BoundedResponse) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        raise CallFailed(f"unreadable JSON reply: {response.excerpt()!r}") from None


def _outcome(response: BoundedResponse) -> UploadResult:
    """The result in an upload's reply (a list) or a lookup's (an object). An unreadable
    one is a failed attempt, never a verdict: the outcome is then asked for by key."""
    body = _decoded(response)
    try:
        return UploadResult(**(body[0] if isinstance(body, list) else body))
    except (TypeError, LookupError) as exc:
        raise CallFailed(f"unreadable upload reply ({exc})") from None


def _body(response: BoundedResponse) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _code(response: BoundedResponse) -> str:
    """The service's error code (``not_found``, ``rule_refused``, ...), if any."""
    return str(_body(response).get("error", ""))


def _error(response: BoundedResponse) -> ConditionsError:
    """The conditions error of a 4xx answer."""
    detail = _body(response).get("detail", response.text)
    message = f"conditions DB answered HTTP {response.status_code}: {detail}"
    status = response.status_code
    if status in (401, 403):
        return NotAuthorized(message)
    if status in (408, 429):  # the service (or a proxy) asks us to come back later
        return ConditionsUnavailable(message)
    if status == 404:
        return NotFound(message)
    if status in (400, 413, 422):
        return InvalidRequest(message)
    if status == 409 and _code(response) == "rule_refused":
        return RuleRefused(message)
    return ConditionsError(message)


class ConditionsDB:
    """Entry point: ``ConditionsDB.connect(url, token=None)``."""

    @staticmethod
    def connect(
        url: str,
        token: str | None = None,
        *,
        create: bool = True,
        policy: CallPolicy | None = None,
    ) -> Conditions:
        """Open a connection; SQL URLs get their schema created unless ``create=False``.
        ``policy`` bounds the calls to an HTTP service (default :class:`CallPolicy`);
        direct SQL connections have the database driver's own timeouts."""
        if url.startswith(("http://", "https://")):
            return HttpConditions(url, token, policy=policy or DEFAULT_POLICY)
        if not url.startswith(("sqlite:", "postgresql")):
            raise ConditionsError(
                f"unsupported conditions DB URL {redact_url(url)!r}: use sqlite:///path, "
                "postgresql+psycopg://... or http(s)://host:port"
            )
        database = ConditionsDatabase(url)
        if create:
            database.create_schema()
        return database
