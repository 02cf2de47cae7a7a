"""Client of an OMS-style run registry (JSON:API over HTTP).

Endpoints used:

* ``GET /api/v1/runs?filter[<attr>][<OP>]=<value>&sort=-run_number&page[offset]=O&page[limit]=L``
* ``GET /api/v1/runs/<run_number>``
* ``GET /api/v1/lumisections?filter[run_number][EQ]=<R>``

Every request is bounded by a :class:`~loop.callpolicy.CallPolicy`: a timeout per attempt
(the whole reply included), a deadline over all attempts and their backoff, and a cap on
the reply's size. A refused connection, a timeout, a 5xx or malformed JSON is retried; a
4xx, an oversized reply or a document that is not JSON:API is not. Each failure raises
:class:`~loop.errors.RegistryError` naming the URL. Callers must treat that as "no
information", never as "the run ended".

Records are validated one by one and strictly, without coercion (``"1005"`` is no run
number, ``1`` is no ``true``). A listing returns the valid records and reports every
invalid one as :class:`RejectedRecord`: one bad record never holds back the other runs.
The bounds keep downstream work finite: run numbers fit 31 bits and LS numbers are at
most ``max_ls``. Timestamps are ISO-8601 strings with a zone (``Z`` or an offset); a
naive one is rejected, not assumed UTC, because a wrong guess moves a run's start by
hours and with it the look-back window.
"""

from __future__ import annotations

import json
import reprlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

import requests
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    ValidationError,
    ValidationInfo,
)

from loop.callpolicy import CallFailed, CallPolicy, bounded_request, call_with_policy
from loop.errors import RegistryError

MAX_PAGES = 1000  # a registry that keeps paging forever is garbage, not data
RUN_NUMBER_MAX = 2**31 - 1
DEFAULT_MAX_LS = 10_000
MAX_INT_DIGITS = 1000  # far wider than any valid number, cheap to convert; see _json_int
MAX_RUN_TYPE = 100  # records are kept across pages and logged: no megabyte strings
MAX_SHOWN = 40  # characters of a rejected value quoted back
UNAVAILABLE = "runs keep their last known state until it answers again"
DEFAULT_POLICY = CallPolicy()

_shown = reprlib.Repr()  # bounded size and depth: a hostile value cannot flood a log line
_shown.maxstring = _shown.maxother = _shown.maxlong = MAX_SHOWN


def _timestamp(value: object) -> datetime:
    """An ISO-8601 string with a zone, as an aware UTC datetime (see the module doc)."""
    if not isinstance(value, str):
        raise ValueError("expected an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        raise ValueError("timestamp without a time zone (expected Z or an offset)")
    return parsed.astimezone(UTC)


def _within_max_ls(value: int, info: ValidationInfo) -> int:
    """The client's ``max_ls`` arrives as validation context (DEFAULT_MAX_LS without)."""
    limit = (info.context or {}).get("max_ls", DEFAULT_MAX_LS)
    if value > limit:
        raise ValueError(f"above max_ls = {limit}, the largest LS number accepted")
    return value


Timestamp = Annotated[datetime, PlainValidator(_timestamp)]
RunNumber = Annotated[int, Field(strict=True, ge=1, le=RUN_NUMBER_MAX)]
LsNumber = Annotated[int, Field(strict=True, ge=1), AfterValidator(_within_max_ls)]
LsCount = Annotated[int, Field(strict=True, ge=0), AfterValidator(_within_max_ls)]


class RunInfo(BaseModel):
    """One run as the registry describes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_number: RunNumber
    start_time: Timestamp
    end_time: Timestamp | None = None
    run_type: Annotated[str, Field(strict=True, max_length=MAX_RUN_TYPE)]
    stable_beam: StrictBool
    last_lumisection_number: LsCount | None = None

    @property
    def ended(self) -> bool:
        """True only when the registry positively reported an end time."""
        return self.end_time is not None


class LumiInfo(BaseModel):
    """One lumisection of a run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_number: RunNumber
    lumisection_number: LsNumber
    start_time: Timestamp
    end_time: Timestamp | None = None


T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class RejectedRecord:
    """A record left out of a listing, one per invalid field.

    ``run`` is the run number as the registry gave it (else the resource id, else
    ``?``), ``field`` the dotted location in the resource (``attributes.run_number``),
    ``reason`` what is wrong with it.
    """

    run: str
    field: str
    reason: str


@dataclass(frozen=True)
class Listing(Generic[T]):
    """The valid records of a listing, in the registry's order, and the rejected ones."""

    records: list[T]
    rejected: list[RejectedRecord]


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: list[Any]


class _SingleEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: Any


E = TypeVar("E", _Envelope, _SingleEnvelope)


class _Invalid(Exception):
    """One resource failed validation; carries what to report."""

    def __init__(self, rejected: list[RejectedRecord]) -> None:
        self.rejected = rejected
        super().__init__("; ".join(f"{r.field}: {r.reason}" for r in rejected))


def iso(ts: datetime) -> str:
    """Registry time format: UTC, second precision, trailing Z."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RegistryClient:
    """Reads runs and lumisections; one HTTP session is reused across calls.

    ``policy`` bounds every request (see :mod:`loop.callpolicy`); ``max_ls`` is the
    largest LS number a record may carry; ``page_size`` records are asked per page.
    """

    def __init__(
        self,
        base_url: str,
        *,
        policy: CallPolicy = DEFAULT_POLICY,
        max_ls: int = DEFAULT_MAX_LS,
        page_size: int = 100,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= max_ls <= RUN_NUMBER_MAX:
            raise ValueError(f"max_ls must be in 1..{RUN_NUMBER_MAX}, got {max_ls}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.base_url = base_url.rstrip("/")
        self.policy = policy
        self.max_ls = max_ls
        self.page_size = page_size
        self._sleep = sleep
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/vnd.api+json, application/json"

    def close(self) -> None:
        """Release the pooled connections."""
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ public API

    def runs(self, started_after: datetime, run_types: list[str] | None = None) -> Listing[RunInfo]:
        """Runs that started at or after ``started_after``, newest first, all pages;
        invalid records are in ``rejected``, not raised."""
        params: dict[str, str] = {
            "filter[start_time][GE]": iso(started_after),
            "sort": "-run_number",
        }
        if run_types and len(run_types) == 1:
            params["filter[run_type][EQ]"] = run_types[0]
        listing = self._listing(RunInfo, "runs", self._pages("/api/v1/runs", params))
        if not run_types:
            return listing
        wanted = [run for run in listing.records if run.run_type in run_types]
        return Listing(wanted, listing.rejected)

    def run(self, run_number: int) -> RunInfo:
        """One run by number; ``RegistryError`` if the registry does not know it or
        describes it invalidly."""
        path = f"/api/v1/runs/{run_number}"
        envelope = self._envelope(_SingleEnvelope, path, self._get(path, {}))
        try:
            info = self._record(RunInfo, "runs", envelope.data)
        except _Invalid as exc:
            raise self._failure(path, f"invalid run record: {exc}") from None
        if info.run_number != run_number:
            raise self._failure(path, f"answered with run {info.run_number}")
        return info

    def lumisections(self, run_number: int) -> Listing[LumiInfo]:
        """All lumisections the registry lists for a run, in LS order; invalid records
        are in ``rejected``, not raised."""
        params = {"filter[run_number][EQ]": str(run_number), "sort": "lumisection_number"}
        return self._listing(LumiInfo, "lumisections", self._pages("/api/v1/lumisections", params))

    # ---------------------------------------------------------------------------- records

    def _listing(self, model: type[T], kind: str, items: Iterator[Any]) -> Listing[T]:
        records: list[T] = []
        rejected: list[RejectedRecord] = []
        for item in items:
            try:
                records.append(self._record(model, kind, item))
            except _Invalid as exc:
                rejected.extend(exc.rejected)
        return Listing(records, rejected)

    def _record(self, model: type[T], kind: str, item: Any) -> T:
        """One JSON:API resource of type ``kind`` as ``model``; :class:`_Invalid` if not."""
        run = _run_label(item)
        if not isinstance(item, dict):
            raise _Invalid([RejectedRecord(run, "resource", f"not an object: {_shown.repr(item)}")])
        if item.get("type") != kind:
            reason = f"expected {kind!r}, got {_shown.repr(item.get('type'))}"
            raise _Invalid([RejectedRecord(run, "type", reason)])
        attributes = item.get("attributes")
        if not isinstance(attributes, dict):
            reason = f"not an object: {_shown.repr(attributes)}"
            raise _Invalid([RejectedRecord(run, "attributes", reason)])
        try:
            return model.model_validate(attributes, context={"max_ls": self.max_ls})
        except ValidationError as exc:
            raise _Invalid(
                [
                    RejectedRecord(run, _dotted(("attributes", *error["loc"])), _reason(error))
                    for error in exc.errors()
                ]
            ) from None

    # ---------------------------------------------------------------------------- plumbing

    def _pages(self, path: str, params: dict[str, str]) -> Iterator[Any]:
        for page in range(MAX_PAGES):
            query = {
                **params,
                "page[offset]": str(page * self.page_size),
                "page[limit]": str(self.page_size),
            }
            data = self._envelope(_Envelope, path, self._get(path, query)).data
            yield from data
            if len(data) < self.page_size:
                return
        raise self._failure(path, f"more than {MAX_PAGES} pages")

    def _failure(self, path: str, problem: str) -> RegistryError:
        return _failure(f"{self.base_url}{path}", problem)

    def _envelope(self, model: type[E], path: str, payload: Any) -> E:
        """The JSON:API document; a wrong one fails the whole call (not retried: the
        registry answered, and asking again gets the same)."""
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _dotted(first["loc"]) or "<document>"
            raise self._failure(
                path, f"reply is not a JSON:API document: {where}: {first['msg']}"
            ) from None

    def _get(self, path: str, params: dict[str, str]) -> Any:
        """The decoded JSON reply of one GET, within the policy."""
        url = f"{self.base_url}{path}"
        try:
            return call_with_policy(
                lambda timeout_s: self._attempt(url, params, timeout_s),
                self.policy,
                what=f"run registry {url}",
                sleep=self._sleep,
            )
        except CallFailed as exc:
            raise RegistryError(f"{exc}; {UNAVAILABLE}") from None

    def _attempt(self, url: str, params: dict[str, str], timeout_s: float) -> Any:
        """One GET: a 5xx or malformed JSON is a failed attempt, a 4xx the answer."""
        response = bounded_request(
            self._session,
            "GET",
            url,
            params=params,
            timeout_s=timeout_s,
            max_bytes=self.policy.max_bytes,
        )
        if response.status_code >= 500:
            raise CallFailed(f"HTTP {response.status_code}: {response.excerpt()!r}")
        if response.status_code >= 400:
            # the registry's answer to this request: asking again gets the same
            raise _failure(url, f"HTTP {response.status_code}: {response.excerpt()!r}")
        try:
            return json.loads(response.content, parse_int=_json_int)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            problem = f"malformed JSON ({exc}): {response.excerpt(120)!r}"
        # raised outside the handler: a JSONDecodeError holds the whole reply as text
        raise CallFailed(problem)


def _failure(url: str, problem: str) -> RegistryError:
    return RegistryError(f"run registry {url}: {problem}; {UNAVAILABLE}")


def _json_int(text: str) -> int | str:
    """Python refuses to convert more than 4300 digits (the cost is quadratic), which
    would lose the whole reply for one record; a number that long is out of every range
    anyway, so it stays text and fails its own record's validation."""
    return int(text) if len(text) <= MAX_INT_DIGITS else text


def _run_label(item: Any) -> str:
    """How a rejected record is named: its run number as given, else its resource id."""
    if not isinstance(item, dict):
        return "?"
    attributes = item.get("attributes")
    given = attributes.get("run_number") if isinstance(attributes, dict) else None
    for value in (given, item.get("id")):
        if isinstance(value, str | int):
            text = str(value)
            return text if len(text) <= MAX_SHOWN else f"{text[: MAX_SHOWN - 3]}..."
    return "?"


def _reason(error: Any) -> str:
    """Pydantic's message, with the offending value unless the field is missing."""
    if error["type"] == "missing":
        return str(error["msg"])
    return f"{error['msg']} (got {_shown.repr(error['input'])})"


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)
