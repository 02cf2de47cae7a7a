"""What a daemon remembers about one run besides its FSM state: a typed record, persisted
as JSON in the journal's ``runs.info`` column.

Fields are grouped by the step that writes them; a field a step does not use keeps its
default. Unknown keys in a stored record (a newer calloop wrote it) are ignored on read,
and writing an unknown field is a programming error (``TypeError``), so a typo can never
silently create a second spelling of a fact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunRecord:
    """The persisted facts of one run in one step."""

    # step 2: the registry's view of the run
    run_type: str | None = None
    stable_beam: bool | None = None
    start_time: float | None = None
    ended: bool = False
    last_ls: int = 0
    ended_seen_at: float | None = None
    # step 2: how the run was decided and closed
    skip_reason: str | None = None
    lookback_closed: bool = False
    missing_ls: list[int] | None = None  # None until the run closed with LS missing
    rewritten: list[str] = field(default_factory=list)  # LS files changed after processing
    # steps 3 and 4: the upstream completion marker
    upstream_witnesses: list[str] | None = None  # None until the marker was read
    upstream_failed: list[int] = field(default_factory=list)
    upstream_bad: dict[str, str] = field(default_factory=dict)  # input -> reason, whole chain
    upstream_complete: bool = False
    # step 4: harvests and their publication
    last_harvest_at: float = 0.0
    published: list[int] = field(default_factory=list)
    last_version: str | None = None  # the newest harvest's store version
    last_problems: list[str] = field(default_factory=list)  # its validation problems
    last_config_sha256: str | None = None  # its frozen configuration
    accepted_harvest: int | None = None  # the newest harvest that passed validation
    accepted_version: str | None = None
    chain_start: int = 0  # a rerun's harvest starts a new chain at this batch (0: none)
    # step 4, statistics.min_events: the newest harvest held back (its events), and the
    # statistics a run short of them hands on (states.accumulation.Carry as JSON)
    held_events: int | None = None
    carry: dict[str, Any] | None = None
    # step 4, time_type lumi: the payload SHA-256 uploaded for each LS group (first LS)
    lumi_uploaded: dict[str, str] = field(default_factory=dict)
    # every step: why the run was quarantined in Failed (step, state, exception, message)
    failure: dict[str, str] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record from its stored form (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return asdict(self)

    @classmethod
    def check_fields(cls, names: set[str]) -> None:
        """Raise ``TypeError`` for names that are not fields of the record."""
        unknown = names - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"RunRecord has no field(s) {sorted(unknown)}")
