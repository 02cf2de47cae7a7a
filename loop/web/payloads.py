"""A payload as an expert judges it: its versions around it (the previous one, the one
currently uploaded), its validation figures against the calibration's thresholds, and
the channels outside the healthy range (the PMT monitor's grid).

Pure reads of the store and the step-4 journal; the page (:mod:`loop.web.app`) and
``calloop plot`` both start here, and :mod:`loop.web.plots` draws what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loop.config import CalibrationConfig, LoopConfig
from loop.errors import StoreError
from loop.store import CalibStore, Constants, VersionInfo
from loop.web.data import cached_reader, journal_path
from workers.algorithms import ChannelStatus

PEDESTALS, BAD_CHANNELS = "pedestals", "bad_channels"


@dataclass(frozen=True)
class Check:
    """One validation figure against its threshold."""

    name: str
    value: str
    threshold: str
    ok: bool


@dataclass(frozen=True)
class Outside:
    """A channel outside the healthy range, and why."""

    channel: int
    values: str
    why: str


@dataclass
class PayloadView:
    """One version of a payload with what it is compared to."""

    detector: str
    ctype: str
    kind: str  # pedestals | bad_channels
    constants: Constants
    config: CalibrationConfig | None
    previous: Constants | None
    uploaded: Constants | None
    versions: list[VersionInfo]
    noise_band: tuple[float, float] | None
    checks: list[Check]
    outside: list[Outside]


def payload_kind(array: np.ndarray, config: CalibrationConfig | None) -> str:
    """``pedestals`` (mean and noise rows) or ``bad_channels`` (a status per channel)."""
    if config is not None:
        return config.payload.calibration_type
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
    kind = payload_kind(constants.array, config)
    band = noise_band(constants.array, config) if kind == PEDESTALS else None
    return PayloadView(
        detector=handle.name,
        ctype=ctype,
        kind=kind,
        constants=constants,
        config=config,
        previous=previous,
        uploaded=uploaded,
        versions=versions,
        noise_band=band,
        checks=checks(constants, previous, config, kind),
        outside=outside_channels(constants.array, previous, config, kind, band),
    )


def uploaded_version(loop_config: LoopConfig, config: CalibrationConfig | None) -> str | None:
    """The store version of the calibration's newest upload the conditions DB accepted."""
    if config is None:
        return None
    reader = cached_reader(journal_path(loop_config, config.name, "step4"))
    row = None if reader is None else reader.newest_upload("done")
    return None if row is None else row.version


def noise_band(array: np.ndarray, config: CalibrationConfig | None) -> tuple[float, float] | None:
    """The healthy noise range of the channel classification: above the dead limit,
    below ``noisy_noise_factor`` times the median noise of the live channels."""
    if config is None or array.ndim != 2:
        return None
    noise = array[1][np.isfinite(array[1])]
    alive = noise[noise >= config.algorithm.dead_max_noise]
    if not alive.size:
        return None
    high = config.algorithm.noisy_noise_factor * float(np.median(alive))
    return (config.algorithm.dead_max_noise, high)


def _mean_shift(array: np.ndarray, previous: Constants | None) -> np.ndarray | None:
    if previous is None or previous.array.shape != array.shape or array.ndim != 2:
        return None
    return np.asarray(np.abs(array[0] - previous.array[0]))


def checks(
    constants: Constants, previous: Constants | None, config: CalibrationConfig | None, kind: str
) -> list[Check]:
    """The validation figures of :func:`workers.algorithms.validate` against the
    thresholds of the calibration's ``validation`` section."""
    if config is None:
        return []
    rules = config.validation
    quality = constants.metadata.get("quality") or {}
    events = int(quality.get("events", 0))
    fraction = float(quality.get("bad_fraction", 0.0))
    nonfinite = len(quality.get("nonfinite_channels") or [])
    found = [
        Check("events", str(events), f">= {rules.min_events}", events >= rules.min_events),
        Check(
            "bad-channel fraction",
            f"{fraction:.4f}",
            f"<= {rules.max_bad_fraction}",
            fraction <= rules.max_bad_fraction,
        ),
        Check(
            "non-finite channels",
            str(nonfinite),
            "any" if rules.allow_nonfinite else "0",
            rules.allow_nonfinite or nonfinite == 0,
        ),
    ]
    shift = _mean_shift(constants.array, previous)
    if kind == PEDESTALS and rules.max_mean_shift is not None and shift is not None:
        largest = float(np.nanmax(shift)) if shift.size else 0.0
        found.append(
            Check(
                "pedestal shift from previous (ADC)",
                f"{largest:.2f}",
                f"<= {rules.max_mean_shift}",
                largest <= rules.max_mean_shift,
            )
        )
    return found


def outside_channels(
    array: np.ndarray,
    previous: Constants | None,
    config: CalibrationConfig | None,
    kind: str,
    band: tuple[float, float] | None,
) -> list[Outside]:
    """Channels an expert must look at: a status other than good, a noise outside the
    healthy band, a non-finite value, a pedestal shift beyond ``max_mean_shift``."""
    if kind == BAD_CHANNELS:
        codes = {int(s): s.name.lower() for s in ChannelStatus}
        return [
            Outside(
                int(c), codes.get(code, str(code)), "status" if code in codes else "unknown code"
            )
            for c in np.flatnonzero(array != ChannelStatus.GOOD)
            if (code := int(array[c])) is not None
        ]
    mean, noise = array[0], array[1]
    shift = _mean_shift(array, previous)
    limit = config.validation.max_mean_shift if config is not None else None
    found = []
    for channel in range(mean.size):
        why = []
        if not (np.isfinite(mean[channel]) and np.isfinite(noise[channel])):
            why.append("non-finite")
        elif band is not None and not band[0] <= noise[channel] <= band[1]:
            why.append(f"noise outside [{band[0]:.2f}, {band[1]:.2f}]")
        if shift is not None and limit is not None and shift[channel] > limit:
            why.append(f"pedestal shift {shift[channel]:.1f} > {limit}")
        if why:
            found.append(
                Outside(
                    channel, f"mean {mean[channel]:.2f}, noise {noise[channel]:.3f}", "; ".join(why)
                )
            )
    return found
