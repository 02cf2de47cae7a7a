"""Batching rules (pure): how pending inputs become jobs."""

from __future__ import annotations


def plan_batches(
    pending: list[str], min_size: int, max_size: int, *, final: bool
) -> list[list[str]]:
    """Group ``pending`` (in order) into batches of at most ``max_size``.

    A trailing group smaller than ``min_size`` is kept back for more inputs unless the
    batch is ``final`` (run ended, or the oldest input waited long enough).
    """
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"invalid batch sizes min={min_size} max={max_size}")
    groups = [pending[i : i + max_size] for i in range(0, len(pending), max_size)]
    if groups and len(groups[-1]) < min_size and not final:
        groups.pop()
    return groups


def ready(pending: int, min_size: int) -> bool:
    """A full batch can be formed."""
    return pending >= min_size


def due(pending: int, oldest_wait_s: float, max_wait_s: float, ended: bool) -> bool:
    """A short batch must be formed now: the run ended or the oldest input waited too long."""
    return pending > 0 and (ended or oldest_wait_s >= max_wait_s)
