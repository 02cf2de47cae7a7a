"""Per-lumisection payloads (``payload.time_type: lumi``): statistics kept per LS, and one
payload per group of ``payload.lumi_group`` LS.

ALCA keeps each LS's accumulation apart, under the name ``ls<N>:<name>`` (so the
harvest's merge and its saved state keep them apart too, and a re-harvest adds what is
new to each LS). The harvest then cuts the LS into fixed groups, ``[1, G]``,
``[G + 1, 2G]``, ..., and finalizes one payload per group that has data: the IOV of a
group starts at its first LS and ends where the next group's begins, so the ranges are
exact whatever LS are missing. Its outputs are ``lumi_<first LS>.npy`` per group (what
step 4 uploads, each as its own IOV) and, as ``payload.npy``, the groups' payloads
stacked (what the store keeps); ``summary.json`` lists the groups
(:class:`LumiGroup`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import h5py
import numpy as np

from workers.accumulators import Accumulators
from workers.reco import SELECTED

SEPARATOR = ":"


def lumi_key(ls: int, name: str) -> str:
    """The accumulation name of ``name`` (a trigger type) in LS ``ls``."""
    return f"ls{ls}{SEPARATOR}{name}"


def by_lumi(accumulated: Accumulators) -> dict[int, Accumulators]:
    """Per LS, its accumulations under their own names (pure); a name that is not
    per-LS is a ``ValueError`` (an ALCA output of a calibration that was not ``lumi``)."""
    split: dict[int, Accumulators] = {}
    for key, stats in accumulated.items():
        head, sep, name = key.partition(SEPARATOR)
        if not (sep and head.startswith("ls") and head[2:].isdigit()):
            raise ValueError(
                f"accumulation {key!r} is not per lumisection: was the ALCA output made "
                "before payload.time_type became lumi?"
            )
        split.setdefault(int(head[2:]), {})[name] = stats
    return split


def group_of(ls: int, size: int) -> int:
    """The first LS of the group of ``size`` LS that ``ls`` belongs to (pure)."""
    return (ls - 1) // size * size + 1


@dataclass(frozen=True)
class LumiGroup:
    """One payload of a lumi calibration: the LS group, the LS it has data of, the file
    of its payload and its summary (``error`` when the kind could not finalize it)."""

    first_ls: int
    last_ls: int  # the group's last LS (the IOV ends where the next group begins)
    ls: list[int]
    file: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Every LS of the group has data (it will not change unless an LS is redone)."""
        return len(self.ls) == self.last_ls - self.first_ls + 1

    def to_json(self) -> dict[str, Any]:
        """The form ``summary.json`` lists."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LumiGroup:
        """A group from ``summary.json``."""
        return cls(**data)


def groups(lumis: list[int], size: int) -> dict[int, list[int]]:
    """The LS of each group, by the group's first LS, ascending (pure)."""
    found: dict[int, list[int]] = {}
    for ls in sorted(lumis):
        found.setdefault(group_of(ls, size), []).append(ls)
    return found


def lumisections(h5: h5py.File) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(LS, frames, trigger) of each LS of a reco file with per-LS parts
    (:class:`workers.reco.RowWriter`), in file order; a ``ValueError`` for a file
    without them."""
    if SELECTED not in h5:
        if len(h5["trigger"]) == 0:
            return  # no event kept at all: no part was written
        raise ValueError("reco output without per-LS parts (written by an older calloop)")
    trigger = h5["trigger"][()]
    start = 0
    for name in sorted(h5[SELECTED]):
        part = h5[SELECTED][name]
        rows = part.shape[0]
        yield int(part.attrs["ls"]), part[()], trigger[start : start + rows]
        start += rows
