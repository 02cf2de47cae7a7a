"""One client API over ``sqlite://``, ``postgresql://`` and ``http(s)://`` conditions DBs.

``ConditionsDB.connect(url, token=None)`` returns a :class:`ConditionsDatabase` for SQL
URLs and an :class:`HttpConditions` for service URLs; both satisfy :class:`Conditions`.
Over HTTP, connection errors, timeouts and 5xx answers are retried with backoff, which
is safe because uploads are idempotent.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import requests

from loop.conddb.db import (
    ConditionsDatabase,
    ConditionsUnavailable,
    InvalidRequest,
    IOVInfo,
    NotFound,
    PayloadBlob,
    Resolved,
    TagInfo,
    UploadResult,
    encode_payload,
)
from loop.errors import ConditionsError
from loop.fsutil import retry_call


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
    def tags(self) -> list[TagInfo]: ...
    def upload(
        self,
        tag_name: str,
        since: int,
        value: np.ndarray | bytes,
        *,
        user_text: str = "",
        input_tag: str = "",
    ) -> UploadResult: ...
    def iovs(
        self, tag_name: str, *, snapshot: float | None = None, history: bool = False
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
    def global_tags(self) -> list[str]: ...
    def taglog(self, tag_name: str) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class _Retry(Exception):
    pass


class HttpConditions:
    """Client of ``calloop conddb serve``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}{path}"

        def attempt() -> requests.Response:
            try:
                response = self._session.request(method, url, timeout=self.timeout_s, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            if response.status_code >= 500:
                raise _Retry(f"HTTP {response.status_code}: {response.text[:200]}")
            return response

        try:
            response = retry_call(attempt, self.attempts, self.backoff_s, (_Retry,), self._sleep)
        except _Retry as exc:
            raise ConditionsUnavailable(
                f"conditions DB {self.url} unreachable after {self.attempts} attempts ({exc})"
            ) from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, path, **kwargs).json()

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

    def tags(self) -> list[TagInfo]:
        """Every tag."""
        return [TagInfo(**t) for t in self._json("GET", "/api/v1/tags")]

    def upload(
        self,
        tag_name: str,
        since: int,
        value: np.ndarray | bytes,
        *,
        user_text: str = "",
        input_tag: str = "",
    ) -> UploadResult:
        """Upload with a CMS-style metadata record; retried safely."""
        data, streamer = encode_payload(value)
        body = {
            "metadata": {
                "destinationTags": {tag_name: {}},
                "inputTag": input_tag,
                "since": since,
                "userText": user_text,
            },
            "streamer_info": streamer,
            "payload_b64": base64.b64encode(data).decode(),
        }
        return UploadResult(**self._json("POST", "/api/v1/upload", json=body)[0])

    def iovs(
        self, tag_name: str, *, snapshot: float | None = None, history: bool = False
    ) -> list[IOVInfo]:
        """IOVs of a tag."""
        params: dict[str, Any] = {"history": str(history).lower()}
        if snapshot is not None:
            params["snapshot"] = snapshot
        rows = self._json("GET", f"/api/v1/tags/{tag_name}/iovs", params=params)
        return [IOVInfo(**row) for row in rows]

    def payload(self, digest: str) -> PayloadBlob:
        """Payload bytes by hash."""
        response = self._call("GET", f"/api/v1/payloads/{digest}")
        return PayloadBlob(
            digest,
            response.headers["X-Object-Type"],
            response.content,
            response.headers["X-Streamer-Info"],
            float(response.headers["X-Insertion-Time"]),
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

    def global_tags(self) -> list[str]:
        """Global tag names."""
        return list(self._json("GET", "/api/v1/globaltags"))

    def taglog(self, tag_name: str) -> list[dict[str, Any]]:
        """A tag's audit trail."""
        return list(self._json("GET", f"/api/v1/tags/{tag_name}/log"))


def _error(response: requests.Response) -> ConditionsError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    message = f"conditions DB answered HTTP {response.status_code}: {detail}"
    if response.status_code == 404:
        return NotFound(message)
    if response.status_code in (400, 413, 422):
        return InvalidRequest(message)
    return ConditionsError(message)


class ConditionsDB:
    """Entry point: ``ConditionsDB.connect(url, token=None)``."""

    @staticmethod
    def connect(
        url: str,
        token: str | None = None,
        *,
        create: bool = True,
        timeout_s: float = 10.0,
        attempts: int = 3,
    ) -> Conditions:
        """Open a connection; SQL URLs get their schema created unless ``create=False``."""
        if url.startswith(("http://", "https://")):
            return HttpConditions(url, token, timeout_s=timeout_s, attempts=attempts)
        if not url.startswith(("sqlite:", "postgresql")):
            raise ConditionsError(
                f"unsupported conditions DB URL {url!r}: use sqlite:///path, "
                "postgresql+psycopg://... or http(s)://host:port"
            )
        database = ConditionsDatabase(url)
        if create:
            database.create_schema()
        return database
