"""Which configuration keys may change while a daemon runs (SIGHUP).

A reload is all or nothing: if any changed key is not live, the whole reload is refused
with one ERROR naming the keys, and the running configuration stays; a restart applies
them. Live keys take effect at once for new decisions, batches and jobs; a job that
exists keeps its frozen copy (:mod:`loop.jobconfig`).

Keys are listed as live (an allow-list), so a key added later is restart-only until
someone decides otherwise here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

LIVE_CALIBRATION_KEYS = (
    "label",
    "description",
    "expert",
    "run_selection",
    "step2",
    "step3",
    "step4",
    "parameters",
    "validation",
)
"""Calibration keys read afresh for every decision or new job. Restart-only: ``name``,
``detector``, ``kind`` (a run's accumulations must all come from one kind), ``raw_input``
(watched directory), ``payload`` (a run's harvests go to one tag and store type),
``backend`` and ``depends_on``."""

ACCUMULATION_LAYOUT_KEYS = (
    "step3.histogram",
    "parameters.bins",
    "parameters.low",
    "parameters.high",
)
"""Keys under a live section that are restart-only all the same: they fix the layout of
the accumulations (histogram binning: ``step3.histogram``, and by the kinds' convention
``parameters.bins/low/high``), and a run's accumulations made before and after a change
could not be merged (or would merge into a wrong histogram without an error)."""

LIVE_LOOP_KEYS = (
    "lookback_hours",
    "poll.registry_s",
    "poll.tick_s",
    "poll.heartbeat_s",
    "timeouts.job_s",
    "timeouts.job_grace_s",
    "jobs.max_attempts",
    "jobs.retry_backoff_s",
)
"""loop.yaml keys read afresh each cycle or for each new job. Everything else (paths,
URLs, the observer, backend settings, service timeouts) is built into long-lived
objects at start-up and needs a restart."""


def changed_keys(old: BaseModel, new: BaseModel) -> list[str]:
    """Dotted keys whose values differ between two configurations (pure)."""
    return _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "")


def _diff(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new)):
            keys += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def restart_keys(changed: list[str], live: tuple[str, ...]) -> list[str]:
    """The changed keys that are not live (pure): outside the ``live`` sections, or an
    accumulation layout key (:data:`ACCUMULATION_LAYOUT_KEYS`) within one."""
    return [
        k
        for k in changed
        if not any(_under(k, p) for p in live)
        or any(_under(k, p) for p in ACCUMULATION_LAYOUT_KEYS)
    ]


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")
