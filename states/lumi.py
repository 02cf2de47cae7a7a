"""Step 4 of a per-lumisection calibration (``payload.time_type: lumi``): which LS groups
of a harvest pass validation, and which are ready to upload.

A harvest of such a calibration has one payload per group of LS (:mod:`workers.lumi`).
Each group is validated on its own with the kind's checks; a group that fails (or that
the kind could not finalize) is not uploaded, and the harvest's store version lists it
under ``rejected_lumi_groups``. The version itself fails validation only when no group
passes. A passing group is uploaded as its own IOV (since = its first LS) once it is
*ready*: all its LS are in, or the run has ended (its last group may be short, and a
lost LS will not come). A group already uploaded with the same payload is not sent
again; one whose payload changed (an LS redone) is sent again and supersedes it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import CalibrationConfig
from loop.fsutil import sha256_file
from workers.kinds import kind_of
from workers.kinds.base import Payload
from workers.lumi import LumiGroup


def lumi_groups(summary: dict[str, Any]) -> list[LumiGroup]:
    """The groups a lumi harvest's summary lists."""
    return [LumiGroup.from_json(g) for g in summary.get("lumi_groups", [])]


def validate_groups(
    cal: CalibrationConfig, out: Path, summary: dict[str, Any]
) -> tuple[list[str], dict[str, list[str]]]:
    """(the version's problems, the problems of each rejected group by its first LS):
    the version fails only when no group passes."""
    kind = kind_of(cal)
    rejected: dict[str, list[str]] = {}
    for group in lumi_groups(summary):
        if group.file is None:
            rejected[str(group.first_ls)] = [group.error or "no payload"]
            continue
        array = np.load(out / group.file, allow_pickle=False)
        problems = kind.validate(Payload(array, group.summary), None, cal.validation)
        if problems:
            rejected[str(group.first_ls)] = problems
    passing = len(lumi_groups(summary)) - len(rejected)
    if passing:
        return [], rejected
    described = "; ".join(f"LS {first}: {', '.join(p)}" for first, p in rejected.items())
    return [f"no LS group passes validation ({described})"], rejected


def ready_groups(
    summary: dict[str, Any],
    rejected: Collection[str],
    out: Path,
    *,
    ended: bool,
    uploaded: dict[str, str],
) -> list[tuple[LumiGroup, str]]:
    """The groups to upload now, with their payload's SHA-256: not ``rejected`` (first
    LS), ready (complete, or the run ended) and not uploaded with this payload yet."""
    found = []
    for group in lumi_groups(summary):
        key = str(group.first_ls)
        if group.file is None or key in rejected or not (group.complete or ended):
            continue
        digest = sha256_file(out / group.file)
        if uploaded.get(key) != digest:
            found.append((group, digest))
    return found
