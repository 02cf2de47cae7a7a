"""Calibration kinds: the registry of the Python entry-point group ``calloop.kinds``.

Every kind, the built-in ``pedestals`` and ``bad_channels`` included, is found through
the installed packages' metadata (:mod:`importlib.metadata`), so a separate package adds
a kind by declaring an entry point; the API is :mod:`workers.kinds.base`. Lookups read
the metadata afresh (a few milliseconds), so a package installed while a process runs is
seen by its next lookup.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, distribution, entry_points
from typing import Any

from loop.config import CalibrationConfig, did_you_mean
from workers.kinds.base import CalibrationKind

ENTRY_POINT_GROUP = "calloop.kinds"
DISTRIBUTION = "calloop"


class KindError(ValueError):
    """A kind is unknown, or its plug-in cannot be loaded."""


def _registered() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_kinds() -> list[str]:
    """The names of every installed kind, sorted."""
    return sorted(_registered())


def builtin_kinds() -> list[str]:
    """The kinds calloop itself registers (those the documentation describes), sorted."""
    return sorted(
        ep.name for ep in distribution(DISTRIBUTION).entry_points.select(group=ENTRY_POINT_GROUP)
    )


def get_kind(name: str) -> CalibrationKind[Any]:
    """The kind registered as ``name``; :class:`KindError` names an unknown kind and the
    known ones, or why a plug-in cannot be loaded."""
    registered = _registered()
    ep = registered.get(name)
    if ep is None:
        known = ", ".join(sorted(registered)) or "none: is calloop installed (pip install -e .)?"
        raise KindError(
            f"unknown calibration kind {name!r} (kinds are plug-ins of the entry-point group "
            f"{ENTRY_POINT_GROUP!r}); known kinds: {known}{did_you_mean(name, registered)}"
        )
    try:
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, CalibrationKind)):
            raise TypeError("not a workers.kinds.base.CalibrationKind subclass")
        kind: CalibrationKind[Any] = cls()
    except Exception as exc:  # a broken plug-in must not look like calloop's own bug
        raise KindError(f"calibration kind {name!r} ({ep.value}) cannot be loaded: {exc}") from exc
    return kind


def kind_of(config: CalibrationConfig) -> CalibrationKind[Any]:
    """The kind of a calibration."""
    return get_kind(config.kind)
