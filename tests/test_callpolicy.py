"""CallPolicy's backoff and call_with_policy's limits, on an injected clock (no sleeping)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from loop.callpolicy import (
    CallFailed,
    CallPolicy,
    DeadlineExceeded,
    ResponseTooLarge,
    call_with_policy,
)


class FakeClock:
    """A monotonic clock that only moves when slept on or told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(
    clock: FakeClock, takes_s: float = 0.0, error: CallFailed | None = None
) -> tuple[Callable[[float], str], list[float]]:
    """An attempt that uses ``takes_s`` (at most its timeout) and fails; and the
    timeouts it was given."""
    given: list[float] = []

    def attempt(timeout_s: float) -> str:
        given.append(timeout_s)
        clock.now += min(takes_s, timeout_s)
        raise error or CallFailed("HTTP 503")

    return attempt, given


def _call(fn: Callable[[float], str], policy: CallPolicy, clock: FakeClock) -> str:
    return call_with_policy(fn, policy, what="svc", sleep=clock.sleep, clock=clock, rng=lambda: 0.5)


def test_delay_window_doubles_up_to_the_cap() -> None:
    policy = CallPolicy(backoff_s=0.5, max_backoff_s=10.0)
    windows = [policy.delay(attempt, rng=lambda: 1.0) for attempt in range(7)]
    assert windows == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(5000, rng=lambda: 1.0) == 10.0  # no float overflow


def test_delay_is_full_jitter_within_the_window() -> None:
    policy = CallPolicy(backoff_s=0.5, max_backoff_s=10.0)
    rng = random.Random(7).random
    for attempt in range(8):
        window = min(10.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d < window for d in delays)
        assert min(delays) < 0.1 * window and max(delays) > 0.9 * window  # spread, not fixed


@pytest.mark.parametrize(
    "bad",
    [
        {"attempts": 0},
        {"timeout_s": 0},
        {"deadline_s": -1},
        {"backoff_s": -0.1},
        {"max_bytes": 0},
    ],
)
def test_policy_refuses_impossible_limits(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        CallPolicy(**bad)  # type: ignore[arg-type]


def test_returns_the_first_success() -> None:
    clock = FakeClock()
    calls: list[float] = []

    def attempt(timeout_s: float) -> str:
        calls.append(timeout_s)
        if len(calls) < 3:
            raise CallFailed("HTTP 502")
        return "ok"

    assert _call(attempt, CallPolicy(attempts=3, backoff_s=1.0), clock) == "ok"
    assert len(calls) == 3 and clock.sleeps == [0.5, 1.0]  # rng 0.5 of windows 1 and 2


def test_stops_after_the_allowed_attempts() -> None:
    clock = FakeClock()
    attempt, given = _failing(clock)
    with pytest.raises(CallFailed, match=r"^svc: HTTP 503 \(after 3 attempt\(s\)\)$"):
        _call(attempt, CallPolicy(attempts=3, deadline_s=1000), clock)
    assert len(given) == 3 and len(clock.sleeps) == 2


def test_non_retryable_failure_is_not_repeated_and_keeps_its_type() -> None:
    clock = FakeClock()
    attempt, given = _failing(clock, error=ResponseTooLarge("reply exceeds the 10 byte cap"))
    with pytest.raises(ResponseTooLarge, match=r"10 byte cap.*after 1 attempt"):
        _call(attempt, CallPolicy(attempts=5), clock)
    assert len(given) == 1 and clock.sleeps == []


def test_other_exceptions_propagate_at_once() -> None:
    clock = FakeClock()
    calls = 0

    def attempt(_timeout_s: float) -> str:
        nonlocal calls
        calls += 1
        raise KeyError("not a call failure")

    with pytest.raises(KeyError):
        _call(attempt, CallPolicy(attempts=5), clock)
    assert calls == 1


def test_deadline_bounds_attempts_and_their_timeouts() -> None:
    clock = FakeClock()
    attempt, given = _failing(clock, takes_s=3.0)  # every attempt times out
    policy = CallPolicy(attempts=100, timeout_s=3.0, deadline_s=10.0, backoff_s=0.2)
    start = clock.now
    with pytest.raises(DeadlineExceeded, match=r"after \d attempt\(s\); the 10 s deadline"):
        _call(attempt, policy, clock)
    assert clock.now - start <= 10.0
    assert given[:3] == [3.0, 3.0, 3.0] and given[-1] < 3.0  # the last one gets what is left
    assert 3 <= len(given) < 100


def test_no_sleep_that_would_cross_the_deadline() -> None:
    clock = FakeClock()
    attempt, given = _failing(clock, takes_s=1.0)
    policy = CallPolicy(attempts=5, timeout_s=1.0, deadline_s=3.0, backoff_s=4.0)
    with pytest.raises(DeadlineExceeded, match="left no time for another"):
        _call(attempt, policy, clock)  # the first backoff (2 s, rng 0.5) would end at 3 s
    assert len(given) == 1 and clock.sleeps == []


def test_no_time_at_all_is_a_deadline_error() -> None:
    clock = FakeClock()
    attempt, given = _failing(clock)

    def late_clock() -> float:
        clock.now += 5.0  # every reading finds the deadline further gone
        return clock.now

    with pytest.raises(DeadlineExceeded, match="no attempt within the 1 s deadline"):
        call_with_policy(attempt, CallPolicy(deadline_s=1.0), what="svc", clock=late_clock)
    assert given == []
