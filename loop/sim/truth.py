"""How a calibration's payload compares with the simulated truth, per kind (the demo's
table, and tests): what was compared, whether it is right, and whether the truth says
the payload must be refused (a PMT scan with PMTs outside the healthy range is flagged
and waits for an expert: its run is right to end Rejected).

A kind without a check here (a plug-in) is reported as such, not as a mismatch. A
``time_type: lumi`` payload is checked group by group (each row of the stacked array
with its group's summary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loop.config import CalibrationConfig
from loop.sim.detector import Truth, load_truth
from loop.sim.pmt import gain_pulls, load_pmt_truth
from workers.algorithms import ChannelStatus


@dataclass(frozen=True)
class Comparison:
    """A payload against the truth."""

    text: str  # what was compared
    ok: bool  # the payload says what the truth is
    refuse: bool = False  # the truth says the payload must not be uploaded as it is


Check = Callable[[CalibrationConfig, np.ndarray, dict[str, Any], Path], Comparison]


def compare(
    cal: CalibrationConfig, array: np.ndarray, summary: dict[str, Any], raw_root: Path
) -> Comparison:
    """A stored payload and its quality summary against the truth read from the stream's
    directory under ``raw_root``."""
    check = CHECKS.get(cal.kind)
    if check is None:
        return Comparison(f"no truth check for kind {cal.kind}", True)
    if cal.payload.time_type != "lumi":
        return check(cal, array, summary, raw_root)
    listed = [g for g in summary["lumi_groups"] if g["file"]]
    results = [
        check(cal, row, group["summary"], raw_root)
        for row, group in zip(array, listed, strict=True)
    ]
    ok = all(r.ok for r in results)
    shown = next((r for r in results if not r.ok), results[0])
    text = f"{len(results)} LS groups, {'e.g.' if ok else 'first mismatch:'} {shown.text}"
    return Comparison(text, ok, any(r.refuse for r in results))


def _adc_truth(cal: CalibrationConfig, raw_root: Path) -> Truth:
    return load_truth(raw_root / cal.raw_input.stream)


def _bad_channels(
    cal: CalibrationConfig, array: np.ndarray, _summary: dict[str, Any], raw_root: Path
) -> Comparison:
    truth = _adc_truth(cal, raw_root)
    true_bad = set(np.flatnonzero(truth.status != ChannelStatus.GOOD).tolist())
    found = set(np.flatnonzero(array != ChannelStatus.GOOD).tolist())
    same = bool(np.array_equal(array, truth.status))
    return Comparison(f"bad channels found {len(found)}/{len(true_bad)} true, exact={same}", same)


def _pedestals(
    cal: CalibrationConfig, array: np.ndarray, summary: dict[str, Any], raw_root: Path
) -> Comparison:
    truth = _adc_truth(cal, raw_root)
    visible = [ChannelStatus.DEAD, ChannelStatus.NOISY]  # pedestal events show these
    if "physics" in cal.step2.trigger_types:
        visible.append(ChannelStatus.HOT)  # and these, with physics events
    true_bad = set(np.flatnonzero(np.isin(truth.status, visible)).tolist())
    good = truth.status == ChannelStatus.GOOD
    events = max(int(summary.get("events", 1)), 1)
    pull = np.abs(array[0][good] - truth.pedestal[good]) / (truth.noise[good] / np.sqrt(events))
    noise_err = np.abs(array[1][good] / truth.noise[good] - 1)
    found = set(summary.get("bad_list", []))
    ok = bool(pull.max() < 6 and noise_err.max() < 0.3 and found == true_bad)
    return Comparison(
        f"pedestal max pull {pull.max():.1f}, noise max err {noise_err.max():.0%}, "
        f"bad {len(found & true_bad)}/{len(true_bad)}",
        ok,
    )


def _occupancy(
    cal: CalibrationConfig, array: np.ndarray, summary: dict[str, Any], raw_root: Path
) -> Comparison:
    """The hot channels found are exactly the simulated hot ones."""
    truth = _adc_truth(cal, raw_root)
    true_hot = set(np.flatnonzero(truth.status == ChannelStatus.HOT).tolist())
    found = set(summary.get("hot_channels", []))
    quiet = float(np.median(array))
    return Comparison(
        f"hot {len(found & true_hot)}/{len(true_hot)} (found {len(found)}), "
        f"median occupancy {quiet:.3f}",
        found == true_hot,
    )


def _pmt_gains(
    cal: CalibrationConfig, array: np.ndarray, summary: dict[str, Any], raw_root: Path
) -> Comparison:
    """Gains within their errors of the truth (pulls), and the PMTs flagged outside the
    healthy range exactly those the truth has there (then the scan must wait)."""
    truth = load_pmt_truth(raw_root / cal.raw_input.stream)
    pulls = gain_pulls(array, truth)
    fitted = np.isfinite(pulls)
    worst = float(np.abs(pulls[fitted]).max()) if fitted.any() else float("nan")
    flagged = set(summary.get("outside_range", []))
    true_out = set(truth.out_of_range)
    ok = bool(fitted.all() and worst < 5 and flagged == true_out)
    return Comparison(
        f"gain max |pull| {worst:.1f}, outside range flagged {len(flagged & true_out)}/"
        f"{len(true_out)} true" + (" (awaits an expert: calloop runs approve)" if flagged else ""),
        ok,
        refuse=bool(true_out),
    )


CHECKS: dict[str, Check] = {
    "pedestals": _pedestals,
    "bad_channels": _bad_channels,
    "occupancy": _occupancy,
    "pmt_gain": _pmt_gains,
}
