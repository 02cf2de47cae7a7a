"""Client of an OMS-style run registry (JSON:API over HTTP).

Endpoints used:

* ``GET /api/v1/runs?filter[<attr>][<OP>]=<value>&sort=-run_number&page[offset]=O&page[limit]=L``
* ``GET /api/v1/runs/<run_number>``
* ``GET /api/v1/lumisections?filter[run_number][EQ]=<R>``

Every failure (connection refused, timeout, HTTP error, malformed or schema-violating
JSON) raises :class:`~loop.errors.RegistryError` after bounded retries with exponential
backoff. Callers must treat that as "no information", never as "the run ended".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loop.errors import RegistryError
from loop.fsutil import retry_call

T = TypeVar("T", bound=BaseModel)

MAX_PAGES = 1000  # a registry that keeps paging forever is garbage, not data


class RunInfo(BaseModel):
    """One run as the registry describes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_number: int = Field(gt=0)
    start_time: datetime
    end_time: datetime | None = None
    run_type: str
    stable_beam: bool
    last_lumisection_number: int | None = Field(None, ge=0)

    @property
    def ended(self) -> bool:
        """True only when the registry positively reported an end time."""
        return self.end_time is not None


class LumiInfo(BaseModel):
    """One lumisection of a run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_number: int = Field(gt=0)
    lumisection_number: int = Field(gt=0)
    start_time: datetime
    end_time: datetime | None = None


class _Resource(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | int
    type: str
    attributes: dict[str, Any]


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: list[_Resource]


class _SingleEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: _Resource


class _Transient(Exception):
    """A failure worth retrying; converted to RegistryError after the last attempt."""


def iso(ts: datetime) -> str:
    """Registry time format: UTC, second precision, trailing Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RegistryClient:
    """Reads runs and lumisections; one HTTP session is reused across calls."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 10.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        page_size: int = 100,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.page_size = page_size
        self._sleep = sleep
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/json"

    def close(self) -> None:
        """Release the pooled connections."""
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ public API

    def runs(self, started_after: datetime, run_types: list[str] | None = None) -> list[RunInfo]:
        """Runs that started at or after ``started_after``, newest first, all pages."""
        params: dict[str, str] = {
            "filter[start_time][GE]": iso(started_after),
            "sort": "-run_number",
        }
        if run_types and len(run_types) == 1:
            params["filter[run_type][EQ]"] = run_types[0]
        runs = [self._model(RunInfo, res, "runs") for res in self._pages("/api/v1/runs", params)]
        if run_types:
            runs = [run for run in runs if run.run_type in run_types]
        return runs

    def run(self, run_number: int) -> RunInfo:
        """One run by number; ``RegistryError`` if the registry does not know it."""
        payload = self._get(f"/api/v1/runs/{run_number}", {})
        try:
            envelope = _SingleEnvelope.model_validate(payload)
        except ValidationError as exc:
            raise RegistryError(self._schema_message(f"/api/v1/runs/{run_number}", exc)) from None
        return self._model(RunInfo, envelope.data, "runs")

    def lumisections(self, run_number: int) -> list[LumiInfo]:
        """All lumisections the registry lists for a run, in LS order."""
        params = {"filter[run_number][EQ]": str(run_number), "sort": "lumisection_number"}
        return [
            self._model(LumiInfo, res, "lumisections")
            for res in self._pages("/api/v1/lumisections", params)
        ]

    # ---------------------------------------------------------------------------- plumbing

    def _pages(self, path: str, params: dict[str, str]) -> Iterator[_Resource]:
        for page in range(MAX_PAGES):
            query = {
                **params,
                "page[offset]": str(page * self.page_size),
                "page[limit]": str(self.page_size),
            }
            payload = self._get(path, query)
            try:
                envelope = _Envelope.model_validate(payload)
            except ValidationError as exc:
                raise RegistryError(self._schema_message(path, exc)) from None
            yield from envelope.data
            if len(envelope.data) < self.page_size:
                return
        raise RegistryError(f"run registry {self.base_url}{path}: more than {MAX_PAGES} pages")

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.base_url}{path}"

        def attempt() -> Any:
            try:
                response = self._session.get(url, params=params, timeout=self.timeout_s)
            except requests.Timeout as exc:
                raise _Transient(f"no answer within {self.timeout_s:g} s") from exc
            except requests.ConnectionError as exc:
                raise _Transient(f"cannot connect ({_root_cause(exc)})") from exc
            if response.status_code >= 500:
                raise _Transient(f"HTTP {response.status_code}: {response.text[:200]!r}")
            if response.status_code >= 400:
                raise RegistryError(
                    f"run registry {url}: HTTP {response.status_code}: {response.text[:200]!r}"
                )
            try:
                return response.json()
            except ValueError as exc:
                raise _Transient(f"malformed JSON ({exc}): {response.text[:120]!r}") from exc

        try:
            return retry_call(attempt, self.attempts, self.backoff_s, (_Transient,), self._sleep)
        except _Transient as exc:
            raise RegistryError(
                f"run registry {url}: {exc} (after {self.attempts} attempts); "
                "runs keep their last known state until it answers again"
            ) from None

    def _model(self, model: type[T], resource: _Resource, kind: str) -> T:
        try:
            return model.model_validate(resource.attributes)
        except ValidationError as exc:
            raise RegistryError(
                self._schema_message(f"/api/v1/{kind} resource id={resource.id}", exc)
            ) from None

    def _schema_message(self, what: str, exc: ValidationError) -> str:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"]) or "<document>"
        return (
            f"run registry {self.base_url}{what}: response violates the schema at {loc}: "
            f"{first['msg']} ({exc.error_count()} problem(s))"
        )


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")
