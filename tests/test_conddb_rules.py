"""Synchronization rules, as pure logic."""

from __future__ import annotations

import pytest

from loop.conddb.rules import RuleRefused, decide, lumi_since, split_lumi
from loop.errors import ConditionsError


def _decide(
    sync: str,
    since: int,
    *,
    last: int | None = None,
    count: int = 0,
    fcsr: int | None = None,
    time_type: str = "run",
) -> int:
    return decide(sync, time_type, since, last_since=last, iov_count=count, fcsr_run=fcsr).since


@pytest.mark.parametrize("sync", ["any", "validation"])
def test_any_and_validation_accept_anything(sync: str) -> None:
    assert _decide(sync, 5, last=100, count=3, fcsr=200) == 5


def test_offline_needs_a_later_since() -> None:
    assert _decide("offline", 101, last=100) == 101
    assert _decide("offline", 1) == 1
    with pytest.raises(ConditionsError, match="after the last one"):
        _decide("offline", 100, last=100)


def test_mc_single_iov() -> None:
    assert _decide("mc", 1) == 1
    with pytest.raises(ConditionsError, match="single IOV"):
        _decide("mc", 1, last=1, count=1)


def test_pcl_refuses_below_fcsr() -> None:
    assert _decide("pcl", 300, fcsr=200) == 300
    assert _decide("pcl", 100) == 100  # no FCSR source configured
    with pytest.raises(ConditionsError, match="first condition-safe run 200"):
        _decide("pcl", 199, fcsr=200)


@pytest.mark.parametrize("sync", ["express", "prompt", "hlt"])
def test_express_prompt_hlt_move_up(sync: str) -> None:
    assert _decide(sync, 150, fcsr=200) == 200
    assert _decide(sync, 250, fcsr=200) == 250
    assert _decide(sync, 150, fcsr=200, time_type="lumi") == lumi_since(200, 1)


def test_lumi_encoding() -> None:
    since = lumi_since(386001, 17)
    assert since == (386001 << 32) | 17 and split_lumi(since) == (386001, 17)


@pytest.mark.parametrize(
    ("sync", "kwargs"),
    [("offline", {"last": 100}), ("mc", {"count": 1}), ("pcl", {"fcsr": 200})],
)
def test_refusals_are_permanent_rule_refusals(sync: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(RuleRefused):
        _decide(sync, 100, **kwargs)


def test_unknown_synchronization_is_not_a_rule_refusal() -> None:
    with pytest.raises(ConditionsError) as raised:
        _decide("bogus", 100, fcsr=200)
    assert not isinstance(raised.value, RuleRefused)
