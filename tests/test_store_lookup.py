"""The lookup rule, as pure logic over range descriptors."""

from __future__ import annotations

import pytest

from loop.store.lookup import RangeEntry, RangeIndex, Validity


def _entry(name: str, default: str | None = "v1", **validity: float | None) -> RangeEntry:
    return RangeEntry(name, Validity(**validity), default)  # type: ignore[arg-type]


def test_latest_beginning_range_wins() -> None:
    index = RangeIndex([_entry("a", begin_run=10), _entry("b", begin_run=20)])
    assert index.select(run=15).name == "a"  # type: ignore[union-attr]
    assert index.select(run=20).name == "b"  # type: ignore[union-attr]
    assert index.select(run=9999).name == "b"  # type: ignore[union-attr]
    assert index.select(run=9) is None


def test_closed_range_ends_inclusive() -> None:
    index = RangeIndex([_entry("open", begin_run=10), _entry("short", begin_run=20, end_run=25)])
    assert index.select(run=25).name == "short"  # type: ignore[union-attr]
    assert index.select(run=26).name == "open"  # type: ignore[union-attr]


def test_ties_go_to_the_narrower_range() -> None:
    index = RangeIndex(
        [
            _entry("wide", begin_run=20, end_run=100),
            _entry("open", begin_run=20),
            _entry("narrow", begin_run=20, end_run=30),
        ]
    )
    assert index.select(run=25).name == "narrow"  # type: ignore[union-attr]
    assert index.select(run=50).name == "wide"  # type: ignore[union-attr]
    assert index.select(run=500).name == "open"  # type: ignore[union-attr]


def test_withdrawn_ranges_are_skipped() -> None:
    index = RangeIndex([_entry("a", begin_run=10), _entry("b", default=None, begin_run=20)])
    assert index.select(run=25).name == "a"  # type: ignore[union-attr]


def test_time_lookup_end_exclusive() -> None:
    index = RangeIndex([_entry("t", begin_time=100.0, end_time=200.0), _entry("r", begin_run=1)])
    assert index.select(time=150.0).name == "t"  # type: ignore[union-attr]
    assert index.select(time=200.0) is None
    assert index.select(time=50.0) is None


def test_nearest_for_messages() -> None:
    index = RangeIndex([_entry(str(b), begin_run=b, end_run=b + 5) for b in (10, 100, 1000)])
    assert [e.name for e in index.nearest(run=90, count=2)] == ["100", "10"]


def test_invalid_validities() -> None:
    with pytest.raises(ValueError, match="needs a begin"):
        Validity()
    with pytest.raises(ValueError, match="before begin run"):
        Validity(begin_run=10, end_run=5)
    with pytest.raises(ValueError, match="not after begin time"):
        Validity(begin_time=5.0, end_time=5.0)
    with pytest.raises(ValueError):
        RangeIndex([]).select(run=1, time=1.0)


def test_range_names_are_stable() -> None:
    assert Validity(begin_run=386001).name() == "run000386001-open"
    assert Validity(begin_run=1, end_run=2).name() == "run000000001-000000002"
    assert Validity(begin_time=1.5).name() == "time1.500-open"
