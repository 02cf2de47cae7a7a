"""Run selection (pure): whether a calibration processes a run, and the rule that
decided. The reason is what the operator reads in the one INFO line of a skipped run."""

from __future__ import annotations

from loop.config import RunSelection
from loop.runrecord import RunRecord


def excluded_by(rules: RunSelection, record: RunRecord) -> str | None:
    """The run-type or stable-beam rule that excludes the run, if any."""
    if record.run_type not in rules.run_types:
        return f"run type {record.run_type!r} is not in run_selection.run_types {rules.run_types}"
    if rules.stable_beam is not None and record.stable_beam != rules.stable_beam:
        return (
            f"stable_beam is {record.stable_beam}; "
            f"run_selection.stable_beam requires {rules.stable_beam}"
        )
    return None


def select(rules: RunSelection, record: RunRecord, seen: int) -> tuple[bool | None, str]:
    """(True, why) selected, (False, rule) skipped, (None, why) not decided yet.

    ``seen`` is the number of LS files seen; the length of a run is the larger of that
    and the registry's last LS, so neither a slow registry nor slow files delay it.
    """
    rule = excluded_by(rules, record)
    if rule is not None:
        return False, rule
    length = max(seen, record.last_ls)
    if length >= rules.min_ls:
        return True, "selected"
    if not record.ended:
        return None, f"waiting for run_selection.min_ls = {rules.min_ls} LS"
    if length == 0:
        return False, "the run ended with zero LS"
    return False, f"only {length} LS (run_selection.min_ls = {rules.min_ls})"
