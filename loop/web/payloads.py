"""A payload as an expert judges it: its versions around it (the previous one, the one
currently uploaded), its validation figures against the calibration's thresholds, and
the channels outside the healthy range (the PMT monitor's grid).

Pure reads of the store and the step-4 journal; the page (:mod:`loop.web.app`) and
``calloop plot`` both start here, and :mod:`loop.web.plots` draws what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from loop.config import CalibrationConfig, LoopConfig
from loop.errors import StoreError
from loop.store import CalibStore, Constants, VersionInfo
from loop.web.data import cached_reader, journal_path
from workers.kinds import get_kind
from workers.kinds.base import Check, Outside

__all__ = ["Check", "Outside", "PayloadView", "load_payload", "payload_kind", "uploaded_version"]

PEDESTALS, BAD_CHANNELS = "pedestals", "bad_channels"


@dataclass
class PayloadView:
    """One version of a payload with what it is compared to."""

    detector: str
    ctype: str
    kind: str  # the calibration kind, which draws and judges it
    constants: Constants
    config: CalibrationConfig | None
    params: BaseModel | None  # the kind's parameters (None without a calibration)
    previous: Constants | None
    uploaded: Constants | None
    versions: list[VersionInfo]
    noise_band: tuple[float, float] | None  # the kind's healthy range, if it has one
    checks: list[Check]
    outside: list[Outside]
    array: np.ndarray  # what the kind judges and draws (of a lumi payload: one LS group)
    summary: dict[str, Any]  # its quality summary
    part: str  # "" or, of a lumi payload, which LS group of how many


def judged(
    constants: Constants, config: CalibrationConfig | None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """(array, quality summary, which part) the kind judges of a stored payload: all of
    it, or of a ``time_type: lumi`` payload (its LS groups stacked, see
    :mod:`workers.lumi`) the newest group, with that group's own summary."""
    array = np.asarray(constants.array)
    quality = constants.metadata.get("quality") or {}
    if config is None or config.payload.time_type != "lumi":
        return array, quality, ""
    groups = [g for g in quality.get("lumi_groups", []) if g.get("file")]
    if len(groups) != len(array) or not groups:
        return array, quality, ""
    last = groups[-1]
    part = f"LS {last['first_ls']}-{last['last_ls']} (group {len(groups)} of {len(groups)})"
    return array[-1], last["summary"], part


def payload_kind(array: np.ndarray, config: CalibrationConfig | None) -> str:
    """The calibration's kind; for a store entry no calibration names, the built-in kind
    of its shape: ``pedestals`` (mean and noise rows) or ``bad_channels``."""
    if config is not None:
        return config.kind
    return PEDESTALS if array.ndim == 2 and array.shape[0] == 2 else BAD_CHANNELS


def load_payload(
    store: CalibStore,
    loop_config: LoopConfig,
    config: CalibrationConfig | None,
    *,
    detector: str,
    ctype: str,
    version: str | None = None,
) -> PayloadView:
    """The version (default: the newest) with its neighbours, checks and outliers;
    :class:`StoreError` names an unknown detector, type or version."""
    handle = store.detector(detector)
    versions = handle.versions(ctype)
    if not versions:
        raise StoreError(f"detector {detector}: no versions of {ctype}")
    wanted = version or versions[-1].version
    constants = handle.get(ctype, version=wanted)
    ids = [v.version for v in versions]
    index = ids.index(constants.version)
    previous = handle.get(ctype, version=ids[index - 1]) if index > 0 else None
    uploaded_id = uploaded_version(loop_config, config)
    uploaded = (
        handle.get(ctype, version=uploaded_id)
        if uploaded_id is not None and uploaded_id in ids
        else None
    )
    name = payload_kind(constants.array, config)
    kind = get_kind(name)
    params = None if config is None else kind.parameters(config)
    validation = None if config is None else config.validation
    array, quality, part = judged(constants, config)
    before = None if previous is None else judged(previous, config)[0]
    return PayloadView(
        detector=handle.name,
        ctype=ctype,
        kind=name,
        constants=constants,
        config=config,
        params=params,
        previous=previous,
        uploaded=uploaded,
        versions=versions,
        noise_band=kind.healthy_range(array, params),
        checks=[] if validation is None else kind.checks(array, quality, before, validation),
        outside=kind.outside(array, before, params, validation),
        array=array,
        summary=quality,
        part=part,
    )


def uploaded_version(loop_config: LoopConfig, config: CalibrationConfig | None) -> str | None:
    """The store version of the calibration's newest upload the conditions DB accepted."""
    if config is None:
        return None
    reader = cached_reader(journal_path(loop_config, config.name, "step4"))
    row = None if reader is None else reader.newest_upload("done")
    return None if row is None else row.version
