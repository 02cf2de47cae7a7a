"""One policy for every call to another service: the registry, the conditions DB, the
batch system's commands.

A :class:`CallPolicy` bounds a call four ways: a number of attempts, a per-attempt
timeout, an overall deadline that includes the backoff sleeps, and a cap on the bytes
read. Backoff is exponential with full jitter so that six daemons retrying the same
service after an outage do not hammer it in lockstep. :func:`call_with_policy` runs the
attempts; :func:`bounded_request` reads one HTTP reply as a stream so that a trickling
or oversized answer ends the attempt instead of the daemon's memory or patience.
"""

from __future__ import annotations

import contextlib
import io
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
import urllib3

T = TypeVar("T")

MiB = 1 << 20
READ_CHUNK = 64 * 1024
MAX_DOUBLINGS = 60  # 2**60 backoff windows exceed any max_backoff_s; more overflows a float


class CallFailed(Exception):
    """Raised by an attempt for a failure of the call (timeouts, 5xx, refused)."""

    retryable = True


class DeadlineExceeded(CallFailed):
    """The overall deadline ran out before an attempt succeeded."""


class ResponseTooLarge(CallFailed):
    """A reply larger than the policy's cap; it is not read further, nor asked again."""

    retryable = False


@dataclass(frozen=True)
class CallPolicy:
    """Attempts, per-attempt timeout, overall deadline, backoff with jitter, size cap."""

    attempts: int = 3
    timeout_s: float = 10.0
    deadline_s: float = 30.0
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        # a policy that allows no attempt, no time or no byte would fail every call with
        # a message about the service, hiding the configuration mistake
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.timeout_s <= 0 or self.deadline_s <= 0:
            raise ValueError(
                f"timeout_s and deadline_s must be > 0, got {self.timeout_s}, {self.deadline_s}"
            )
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(
                f"backoff_s and max_backoff_s must be >= 0, got {self.backoff_s}, "
                f"{self.max_backoff_s}"
            )
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The sleep after failed attempt ``attempt`` (0-based): full jitter over an
        exponentially growing, capped window."""
        window = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, MAX_DOUBLINGS))
        return window * rng()


def call_with_policy(
    fn: Callable[[float], T],
    policy: CallPolicy,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> T:
    """Call ``fn(timeout_s)`` until it returns, within the policy's limits.

    ``fn`` receives the time it may take (the per-attempt timeout, shortened to what
    is left of the deadline) and raises :class:`CallFailed` for a failed attempt;
    anything else propagates at once. A non-retryable failure, or the last allowed
    attempt's, is re-raised with its type; when the deadline leaves no time for the next
    attempt (its backoff included) :class:`DeadlineExceeded` is raised. Either message
    starts with ``what`` and counts the attempts made.
    """
    deadline = clock() + policy.deadline_s
    made = 0
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        made += 1
        try:
            return fn(min(policy.timeout_s, remaining))
        except CallFailed as exc:
            last = exc
            _drop_locals(exc)
        if not last.retryable or made == policy.attempts:
            raise type(last)(f"{what}: {last} (after {made} attempt(s))") from last
        delay = policy.delay(made - 1, rng)
        if clock() + delay >= deadline:
            break
        sleep(delay)
    if made == 0:
        raise DeadlineExceeded(f"{what}: no attempt within the {policy.deadline_s:g} s deadline")
    raise DeadlineExceeded(
        f"{what}: {last} (after {made} attempt(s); the {policy.deadline_s:g} s deadline "
        "left no time for another)"
    ) from last


def _drop_locals(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames in ``exc``'s traceback and chain: they
    hold the failed attempt's reply, which would stay alive through the next attempt
    (twice the size cap) while the exception is kept for the final message."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


@dataclass(frozen=True)
class BoundedResponse:
    """A complete HTTP reply read within a time and size budget."""

    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        """The body as text (invalid UTF-8 replaced)."""
        return self.content.decode("utf-8", errors="replace")

    def excerpt(self, limit: int = 200) -> str:
        """The body's first ``limit`` bytes as text, for messages: ``text[:limit]``
        would decode all of a large body to quote its start."""
        return self.content[:limit].decode("utf-8", errors="replace")


def bounded_request(
    session: requests.Session,
    method: str,
    url: str,
    *,
    timeout_s: float,
    max_bytes: int,
    **kwargs: Any,
) -> BoundedResponse:
    """One HTTP request whose reply must arrive within ``timeout_s`` and ``max_bytes``;
    connection errors, timeouts and oversize become :class:`CallFailed`.

    ``requests``' own timeout bounds each socket read, so a server that trickles one
    byte per second would never trip it. The body is therefore read as it arrives, at
    most ``max_bytes`` of it, and a watchdog shuts the socket down when ``timeout_s``
    (counted from the request) runs out. The status line and headers are bounded per
    read only: ``requests`` gives no handle on the socket before they are parsed.
    """
    started = time.monotonic()
    try:
        with session.request(method, url, timeout=timeout_s, stream=True, **kwargs) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(
                    f"reply of {int(declared)} bytes exceeds the {max_bytes} byte cap"
                )
            left_s = timeout_s - (time.monotonic() - started)
            content = _read_body(response.raw, left_s, max_bytes, timeout_s)
            return BoundedResponse(response.status_code, dict(response.headers), content)
    except requests.Timeout as exc:
        raise CallFailed(f"no answer within {timeout_s:.3g} s") from exc
    except requests.RequestException as exc:
        raise CallFailed(f"cannot connect ({root_cause(exc)})") from exc


def _read_body(raw: urllib3.HTTPResponse, left_s: float, max_bytes: int, timeout_s: float) -> bytes:
    """The decoded body, read chunk by chunk as it arrives, until ``left_s`` runs out."""
    cut = threading.Event()

    def shutdown() -> None:
        cut.set()
        # the read may have ended (and the connection gone back to the pool) meanwhile
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            raw.shutdown()

    watchdog = threading.Timer(max(left_s, 0.0), shutdown)
    watchdog.daemon = True
    watchdog.start()
    body = io.BytesIO()
    try:
        # read1 returns what has arrived; read would wait for a whole chunk
        while chunk := raw.read1(READ_CHUNK, decode_content=True):
            if body.tell() + len(chunk) > max_bytes:
                raise ResponseTooLarge(f"reply exceeds the {max_bytes} byte cap")
            body.write(chunk)
    except urllib3.exceptions.HTTPError as exc:
        if not cut.is_set():
            raise CallFailed(f"reply broken off ({root_cause(exc)})") from exc
    finally:
        watchdog.cancel()
    if cut.is_set():  # a shut-down socket reads as the end of a reply without a length
        raise CallFailed(f"reply not complete within {timeout_s:.3g} s")
    return body.getvalue()  # hands over the buffer: the reply is not held twice


def root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: message``."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")
