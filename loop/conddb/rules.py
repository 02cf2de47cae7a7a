"""Synchronization rules for new IOVs (pure; the one place they are decided).

===========  ==========================================================================
any          accepted as given
validation   accepted as given
offline      only a since greater than the tag's last since
mc           a single IOV per tag
pcl          refused below the first condition-safe run (FCSR) when one is configured
express,     moved up to the FCSR when below it (the payload still lands, for the
prompt, hlt  first run reconstruction has not yet started)
===========  ==========================================================================

Re-uploading an identical (tag, since, payload) is detected before these rules and is
a no-op. A refusal is :class:`RuleRefused`: permanent for that (tag, since), so an
uploader settles it instead of retrying.
"""

from __future__ import annotations

from dataclasses import dataclass

from loop.errors import ConditionsError

MOVE_UP = ("express", "prompt", "hlt")


class RuleRefused(ConditionsError):
    """The tag's synchronization rule refuses the since; sending it again cannot help."""


@dataclass(frozen=True)
class Decision:
    """The since to insert and a note for the upload report."""

    since: int
    note: str = ""


def fcsr_since(fcsr_run: int, time_type: str) -> int:
    """The FCSR expressed in a tag's since units (None for time-based tags is handled
    by the caller: FCSR rules apply to run and lumi tags only)."""
    return fcsr_run << 32 | 1 if time_type == "lumi" else fcsr_run


def decide(
    synchronization: str,
    time_type: str,
    since: int,
    *,
    last_since: int | None,
    iov_count: int,
    fcsr_run: int | None,
) -> Decision:
    """Apply the rule of ``synchronization`` to a proposed since."""
    if synchronization in ("any", "validation"):
        return Decision(since)
    if synchronization == "offline":
        if last_since is not None and since <= last_since:
            raise RuleRefused(
                f"synchronization 'offline' accepts only a since after the last one "
                f"({last_since}); got {since}"
            )
        return Decision(since)
    if synchronization == "mc":
        if iov_count:
            raise RuleRefused("synchronization 'mc' takes a single IOV; the tag has one")
        return Decision(since)
    if fcsr_run is None or time_type == "time":
        return Decision(since)
    floor = fcsr_since(fcsr_run, time_type)
    if since >= floor:
        return Decision(since)
    if synchronization == "pcl":
        raise RuleRefused(
            f"synchronization 'pcl' refuses since {since}: below the first condition-safe "
            f"run {fcsr_run}"
        )
    if synchronization in MOVE_UP:
        return Decision(floor, f"since moved up from {since} to the FCSR {floor}")
    raise ConditionsError(f"unknown synchronization {synchronization!r}")


def lumi_since(run: int, ls: int) -> int:
    """Encode a lumi-based since: ``(run << 32) | ls``."""
    return run << 32 | ls


def split_lumi(since: int) -> tuple[int, int]:
    """Decode a lumi-based since into (run, ls)."""
    return since >> 32, since & 0xFFFFFFFF
