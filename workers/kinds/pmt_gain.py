"""The built-in kind ``pmt_gain``: the gain of each photomultiplier from the charge
spectrum of LED events (after the PMT live monitor: a charge distribution and a gain per
PMT, checked against a healthy range; a scan with a PMT outside it is flagged).

Accumulation: per PMT a histogram of the ADC charge of ``led``-trigger events
(:class:`~workers.accumulators.ChannelStats` with a histogram, merged by summing).

Fit, per PMT: the binned Poisson maximum likelihood of the model

    expected(bin) = N sum_{n=0}^{max_peaks} Poisson(n; mu) P(bin | Normal(pedestal + n gain,
                                                     sqrt(pedestal_width^2 + n spe_width^2)))

(a pedestal Gaussian and Poisson-weighted Gaussian photoelectron peaks; N the PMT's
entries; peaks above the histogram are left out, they fill only the overflow bin),
minimised with :func:`scipy.optimize.least_squares` on the Poisson deviance
residuals, so that its minimum is the likelihood's. Errors are those of the inverse Fisher
information at the minimum. Charges are whole ADC counts, so a bin holds the counts whose
value falls in it and the model integrates each Gaussian over exactly those values (the
counts +- 0.5). The first and last bins hold the under- and overflow and are not fitted.
Start values come from the histogram alone (integer counts, merged exactly), so the
payload does not depend on how the statistics were grouped; they find the pedestal as the
first peak from the left, which holds for the low LED intensities of gain scans (tested
with mu from 0.2 to 4 photoelectrons per event).

Payload: float64 ``[ROWS + bins, pmts]``: the rows of :class:`Row` (gain, its error,
pedestal, pedestal width, single-photoelectron width, mu, chi2/ndf, :class:`FitStatus`,
:class:`Flag` bits), then the charge histogram (one row per bin), so that the web page and
``calloop plot`` draw the spectra and the fitted curves from the payload alone; the
summary carries the binning and the healthy range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import OptimizeResult, least_squares
from scipy.special import gammaln, ndtr

from loop.config import CalibrationConfig, ValidationConfig
from loop.rawformat import TRIGGER_CODES
from workers.accumulators import Accumulators, ChannelStats, bin_index
from workers.kinds.base import (
    AlgorithmError,
    CalibrationKind,
    Check,
    Outside,
    Payload,
    PayloadSchema,
    PlotContext,
    differences,
    require,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRIGGER = "led"
HEALTHY_COLOUR = "#4caf50"
OUTSIDE_COLOUR = "#d81b60"
PLOTTED_SPECTRA = 4
"""At most this many flagged PMTs' spectra are drawn."""
LISTED = 20
"""At most this many PMT numbers are listed in a validation problem."""
MIN_EXPECTED = 5.0
"""chi2/ndf counts the bins expecting at least this many entries (Pearson's rule)."""
TINY = 1e-12
"""Floor of an expected bin content (a bin far from every peak expects 0 in float64)."""
BEYOND_SIGMAS = 8.0
"""A photoelectron peak this many widths above the last fitted bin is left out of the
model (its share of any fitted bin is below 1e-15)."""
START_PEAK_FRACTION = 0.05
"""The pedestal's start value is the top of the first peak from the left higher than
this fraction of the highest (with mu up to about 3 the pedestal is the highest peak or
not far from it; beyond, the photoelectron peaks dwarf it)."""
ADC_VALUES = np.arange(np.iinfo(np.uint16).max + 1, dtype=np.float64)


class Row(IntEnum):
    """The per-PMT rows of the payload array (the histogram follows them)."""

    GAIN = 0
    GAIN_ERROR = 1
    PEDESTAL = 2
    PEDESTAL_WIDTH = 3
    SPE_WIDTH = 4
    MU = 5
    CHI2_NDF = 6
    STATUS = 7
    FLAG = 8


ROWS = len(Row)


class FitStatus(IntEnum):
    """How a PMT's fit ended."""

    OK = 0
    FEW_ENTRIES = 1  # fewer than min_entries: not fitted, values NaN
    NOT_CONVERGED = 2  # (values NaN if the model could not be evaluated)
    AT_LIMIT = 3  # a parameter ended at its bound
    NO_ERROR = 4  # the Fisher information cannot be inverted: no error
    POOR_FIT = 5  # chi2/ndf above max_chi2_ndf: the model does not describe the spectrum


class Flag(IntFlag):
    """Why a PMT is flagged (bits of the payload's flag row)."""

    OUTSIDE = 1  # the gain is outside the healthy range
    FIT_FAILED = 2  # the fit's status is not OK


class PmtGainParameters(BaseModel):
    """The parameters of a ``pmt_gain`` calibration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bins: int = Field(256, ge=16, le=4096, description="charge histogram bins per PMT")
    low: float = Field(100.0, ge=0, description="lower edge of the charge histogram (ADC)")
    high: float = Field(612.0, description="upper edge of the charge histogram (ADC)")
    healthy_gain: tuple[float, float] = Field(
        (31.0, 49.0), description="[min, max] healthy gain, ADC per photoelectron"
    )
    max_peaks: int = Field(
        20,
        ge=1,
        le=50,
        description="most photoelectron peaks in the fit model (beyond the pedestal); those "
        "above the histogram are left out: they fill only the overflow bin",
    )
    min_entries: int = Field(
        1000, ge=50, description="fewer entries in the fitted bins: the PMT is not fitted"
    )
    max_chi2_ndf: float = Field(
        3.0, gt=1, description="a fit with a larger chi2/ndf has failed (the PMT is flagged)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PmtGainParameters:
        if (self.high - self.low) / self.bins < 1:
            raise ValueError(
                "bins narrower than 1 ADC count ((high - low) / bins < 1): charges are whole "
                "counts, so some bins could never fill"
            )
        low, high = self.healthy_gain
        if not 0 < low < high:
            raise ValueError(f"healthy_gain {[low, high]} must be [min, max] with 0 < min < max")
        return self


@dataclass(frozen=True)
class FitResult:
    """One PMT's fit, in the order of :class:`Row` (without the flag)."""

    gain: float
    gain_error: float
    pedestal: float
    pedestal_width: float
    spe_width: float
    mu: float
    chi2_ndf: float
    status: FitStatus


NOT_FITTED = FitResult(
    gain=math.nan,
    gain_error=math.nan,
    pedestal=math.nan,
    pedestal_width=math.nan,
    spe_width=math.nan,
    mu=math.nan,
    chi2_ndf=math.nan,
    status=FitStatus.FEW_ENTRIES,
)


class ChargeModel:
    """The charge spectrum model on one histogram binning: expected contents of the fitted
    (interior) bins and their derivatives in (pedestal, gain, pedestal_width, spe_width,
    mu)."""

    def __init__(self, bins: int, low: float, high: float, max_peaks: int) -> None:
        # the ADC counts in each bin, exactly as ChannelStats bins them: bin j holds the
        # counts from first[j] on; a Gaussian charge lands there from first[j] - 0.5 on
        index = bin_index(ADC_VALUES, (bins, low, high))
        first = np.searchsorted(index, np.arange(1, bins))
        self.edges = first - 0.5  # of the fitted bins 1 .. bins - 2
        self.centres = (self.edges[:-1] + self.edges[1:]) / 2
        self.peaks = np.arange(max_peaks + 1, dtype=np.float64)

    def expected(self, theta: np.ndarray, entries: float) -> tuple[np.ndarray, np.ndarray]:
        """Expected contents of the fitted bins and their Jacobian [bins, 5]."""
        pedestal, gain, width0, width1, mu = theta
        sigma = np.sqrt(width0**2 + self.peaks * width1**2)
        # peaks beyond the last fitted bin only fill the (unfitted) overflow: left out
        inside = pedestal + self.peaks * gain - BEYOND_SIGMAS * sigma < self.edges[-1]
        n, sigma = self.peaks[inside], sigma[inside]
        weight = np.exp(n * math.log(mu) - mu - gammaln(n + 1)) * entries
        z = (self.edges[None, :] - (pedestal + n * gain)[:, None]) / sigma[:, None]
        density = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        probability = np.diff(ndtr(z), axis=1)  # [peaks, bins]
        d_mean = -np.diff(density, axis=1) / sigma[:, None]  # d probability / d mean
        d_sigma = -np.diff(density * z, axis=1) / sigma[:, None]  # d probability / d sigma
        expected = weight @ probability
        jacobian = np.stack(
            [
                weight @ d_mean,
                (weight * n) @ d_mean,
                (weight * width0 / sigma) @ d_sigma,
                (weight * n * width1 / sigma) @ d_sigma,
                (weight * (n / mu - 1)) @ probability,
            ],
            axis=1,
        )
        return expected, jacobian

    def start(self, counts: np.ndarray) -> np.ndarray:
        """Start values from the fitted bins' counts: the pedestal at the top of the first
        peak from the left, its width from the bins left of it (the pedestal's lower half
        has no photoelectrons), mu from the fraction of entries within 3 widths of it (no
        photoelectron), gain and photoelectron width from the moments."""
        entries = counts.sum()
        smooth = np.convolve(counts, np.ones(3), mode="same")  # a fluctuation is no peak
        peak = int(np.argmax(smooth >= START_PEAK_FRACTION * smooth.max()))
        while peak + 1 < smooth.size and smooth[peak + 1] >= smooth[peak]:
            peak += 1
        pedestal = float(self.centres[peak])
        left = counts[:peak]
        spread = left @ (self.centres[:peak] - pedestal) ** 2 / left.sum() if left.any() else 0.0
        bin_width = float(self.edges[1] - self.edges[0])
        width0 = math.sqrt(max(spread, bin_width**2 / 4))
        near = np.abs(self.centres - pedestal) <= max(3 * width0, bin_width)
        zero = min(max(counts[near].sum() / entries, 1e-3), 0.999)
        mu = -math.log(zero)
        mean = counts @ self.centres / entries
        variance = counts @ (self.centres - mean) ** 2 / entries
        gain = max((mean - pedestal) / mu, bin_width)
        spe = (variance - width0**2) / mu - gain**2
        width1 = math.sqrt(min(max(spe, (0.05 * gain) ** 2), gain**2))
        return np.array([pedestal, gain, width0, width1, mu])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each parameter may go (a fit ending on one of them has failed)."""
        low, high = float(self.edges[0]), float(self.edges[-1])
        lower = np.array([low, 0.5, 0.05, 0.01, 1e-3])
        upper = np.array([high, high - low, high - low, high - low, 50.0])
        return lower, upper


def _deviance(counts: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """The signed Poisson deviance residuals: their squares sum to twice the negative
    log-likelihood ratio, so least squares on them is maximum likelihood."""
    ratio = np.divide(counts, expected, out=np.ones_like(expected), where=counts > 0)
    deviance = np.maximum(counts * np.log(ratio) - counts + expected, 0.0)
    return np.sign(counts - expected) * np.sqrt(2 * deviance)


def _deviance_slope(counts: np.ndarray, expected: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """d residual / d expected: (1 - counts / expected) / residual, whose limit where the
    residual vanishes (counts = expected) is -1 / sqrt(expected)."""
    limit = -1 / np.sqrt(expected)
    small = np.abs(residual) < 1e-6
    safe = np.where(small, 1.0, residual)
    return np.where(small, limit, (1 - counts / expected) / safe)


def _maximise_likelihood(
    data: np.ndarray, entries: float, model: ChargeModel
) -> OptimizeResult | None:
    """:func:`~scipy.optimize.least_squares` on the deviance residuals of the fitted bins'
    ``data`` from the histogram's start values; None if the model cannot be evaluated."""

    def residuals(theta: np.ndarray) -> np.ndarray:
        expected = np.maximum(model.expected(theta, entries)[0], TINY)
        return _deviance(data, expected)

    def jacobian(theta: np.ndarray) -> np.ndarray:
        expected, derivative = model.expected(theta, entries)
        expected = np.maximum(expected, TINY)
        slope = _deviance_slope(data, expected, _deviance(data, expected))
        return slope[:, None] * derivative

    lower, upper = model.bounds()
    start = np.clip(model.start(data), lower, upper)
    try:
        return least_squares(
            residuals, start, jac=jacobian, bounds=(lower, upper), x_scale="jac", method="trf"
        )
    except ValueError:  # non-finite residuals: one PMT's garbage must not stop the others
        return None


def _errors_and_chi2(
    theta: np.ndarray, data: np.ndarray, entries: float, model: ChargeModel
) -> tuple[np.ndarray, float]:
    """The parameters' variances (inverse Fisher information; NaN if singular) and the
    chi2/ndf of the bins expecting at least :data:`MIN_EXPECTED` entries."""
    expected, derivative = model.expected(theta, entries)
    expected = np.maximum(expected, TINY)
    fisher = derivative.T @ (derivative / expected[:, None])
    variance = np.full(len(theta), math.nan)
    if np.isfinite(fisher).all() and np.linalg.matrix_rank(fisher) == len(theta):
        variance = np.diag(np.linalg.inv(fisher))
    used = expected >= MIN_EXPECTED
    ndf = int(used.sum()) - len(theta)
    chi2 = float((_deviance(data, expected)[used] ** 2).sum())
    return variance, chi2 / ndf if ndf > 0 else math.nan


def fit_spectrum(histogram: np.ndarray, model: ChargeModel, params: PmtGainParameters) -> FitResult:
    """The fit of one PMT's charge ``histogram`` (deterministic in its counts): not
    fitted if its fitted bins hold fewer than ``min_entries``. The model is normalised to
    every entry, the under- and overflow bins included."""
    entries = float(histogram.sum())
    data = histogram[1:-1].astype(np.float64)
    if data.sum() < params.min_entries:
        return NOT_FITTED
    result = _maximise_likelihood(data, entries, model)
    if result is None:
        return replace(NOT_FITTED, status=FitStatus.NOT_CONVERGED)
    variance, chi2_ndf = _errors_and_chi2(result.x, data, entries, model)
    status = FitStatus.OK
    if result.status <= 0:
        status = FitStatus.NOT_CONVERGED
    elif np.any(result.active_mask != 0):
        status = FitStatus.AT_LIMIT
    elif not (variance > 0).all():
        status = FitStatus.NO_ERROR
    elif not chi2_ndf <= params.max_chi2_ndf:  # NaN (no degree of freedom) fails too
        status = FitStatus.POOR_FIT
    pedestal, gain, width0, width1, mu = (float(v) for v in result.x)
    return FitResult(
        gain=gain,
        gain_error=math.sqrt(variance[1]) if variance[1] > 0 else math.nan,
        pedestal=pedestal,
        pedestal_width=width0,
        spe_width=width1,
        mu=mu,
        chi2_ndf=chi2_ndf,
        status=status,
    )


def _flags(fits: Sequence[FitResult], healthy: tuple[float, float]) -> np.ndarray:
    """The :class:`Flag` bits of each PMT."""
    gain = np.array([f.gain for f in fits])
    outside = np.isfinite(gain) & ((gain < healthy[0]) | (gain > healthy[1]))
    failed = np.array([f.status != FitStatus.OK for f in fits])
    return np.where(outside, int(Flag.OUTSIDE), 0) | np.where(failed, int(Flag.FIT_FAILED), 0)


def _flagged(array: np.ndarray, flag: Flag) -> list[int]:
    """The PMTs of a payload with ``flag`` set."""
    bits = np.nan_to_num(array[Row.FLAG]).astype(np.int64)
    return [int(i) for i in np.flatnonzero(bits & int(flag))]


def _listed(pmts: list[int]) -> str:
    more = f" and {len(pmts) - LISTED} more" if len(pmts) > LISTED else ""
    return f"{pmts[:LISTED]}{more}"


class PmtGain(CalibrationKind[PmtGainParameters]):
    """The gain of each PMT from the charge spectrum of LED events."""

    Parameters = PmtGainParameters
    schema = PayloadSchema(
        "float64",
        f"[{ROWS} + bins, pmts]",
        "per PMT: gain, gain error (ADC/pe), pedestal, pedestal width, single-pe width (ADC), "
        "mu, chi2/ndf, fit status, flag bits (1 outside the healthy range, 2 fit failed); "
        "then the charge histogram, one row per bin",
    )

    def accumulate(
        self,
        frames: np.ndarray,
        trigger: np.ndarray,
        params: PmtGainParameters,
        config: CalibrationConfig,
    ) -> Accumulators:
        """The charge histogram of the LED events, per PMT."""
        led = np.flatnonzero(trigger == TRIGGER_CODES[TRIGGER])
        stats = ChannelStats.from_frames(
            frames,
            config.step3.occupancy_threshold,
            (params.bins, params.low, params.high),
            rows=None if led.size == len(trigger) else led,
        )
        return {TRIGGER: stats}

    def merge(self, parts: Sequence[Accumulators]) -> Accumulators:
        """The parts' histograms summed; histograms of different binnings (the parameters
        changed during the run) are an :class:`AlgorithmError` saying so."""
        bins = {
            stats.histogram.shape[1]
            for part in parts
            if (stats := part.get(TRIGGER)) is not None and stats.histogram is not None
        }
        if len(bins) > 1:
            raise AlgorithmError(
                f"charge histograms of {sorted(bins)} bins cannot be merged: were "
                "parameters.bins, low or high changed during the run?"
            )
        return super().merge(parts)

    def finalize(
        self,
        accumulated: Accumulators,
        params: PmtGainParameters,
        dependencies: Mapping[str, np.ndarray],
    ) -> Payload:
        """Fit every PMT's spectrum; flag those outside the healthy range or not fitted."""
        stats = require(accumulated, TRIGGER)
        histogram = stats.histogram
        if histogram is None or histogram.shape[1] != params.bins:
            found = "no histogram" if histogram is None else f"{histogram.shape[1]} bins"
            raise AlgorithmError(
                f"the LED statistics have {found}, the parameters want {params.bins} bins: "
                "were the parameters changed during the run?"
            )
        model = ChargeModel(params.bins, params.low, params.high, params.max_peaks)
        fits = [fit_spectrum(row, model, params) for row in histogram]
        flags = _flags(fits, params.healthy_gain)
        rows = np.array([astuple(f) for f in fits], dtype=np.float64).T
        array = np.vstack([rows, flags[None, :], histogram.T.astype(np.float64)])
        return Payload(array, self._summary(array, stats.count, params))

    @staticmethod
    def _summary(array: np.ndarray, events: int, params: PmtGainParameters) -> dict[str, Any]:
        """The payload's quality summary (what validation and the pages read)."""
        flagged = [int(i) for i in np.flatnonzero(array[Row.FLAG])]
        status = array[Row.STATUS].astype(int)
        gain = array[Row.GAIN][status == FitStatus.OK]
        return {
            "events": int(events),
            "pmts": int(array.shape[1]),
            "flagged": flagged,
            "outside_range": _flagged(array, Flag.OUTSIDE),
            "fit_failures": {
                str(i): FitStatus(int(status[i])).name.lower() for i in np.flatnonzero(status)
            },
            "bad_fraction": len(flagged) / array.shape[1] if array.shape[1] else 0.0,
            "median_gain": float(np.median(gain)) if gain.size else None,
            "healthy_gain": list(params.healthy_gain),
            "histogram": {"bins": params.bins, "low": params.low, "high": params.high},
            "max_peaks": params.max_peaks,
        }

    def validate(
        self, payload: Payload, previous: np.ndarray | None, validation: ValidationConfig
    ) -> list[str]:
        """The shared checks, PMTs outside the healthy gain range, failed fits: a flagged
        scan is stored but not uploaded until an expert approves it."""
        problems = super().validate(payload, previous, validation)
        outside = _flagged(payload.array, Flag.OUTSIDE)
        if outside:
            low, high = payload.summary.get("healthy_gain", ("?", "?"))
            problems.append(
                f"{len(outside)} PMTs outside the healthy gain range [{low}, {high}]: "
                f"{_listed(outside)}"
            )
        failed = _flagged(payload.array, Flag.FIT_FAILED)
        if failed:
            problems.append(f"{len(failed)} PMT gain fits failed: {_listed(failed)}")
        return problems

    def checks(
        self,
        array: np.ndarray,
        quality: Mapping[str, Any],
        previous: np.ndarray | None,
        validation: ValidationConfig,
    ) -> list[Check]:
        """The shared figures, the PMTs outside the healthy range and the failed fits."""
        found = super().checks(array, quality, previous, validation)
        for name, flag in (
            ("PMTs outside the healthy gain range", Flag.OUTSIDE),
            ("failed gain fits", Flag.FIT_FAILED),
        ):
            count = len(_flagged(array, flag))
            found.append(Check(name, str(count), "0", count == 0))
        return found

    def healthy_range(
        self, array: np.ndarray, params: PmtGainParameters | None
    ) -> tuple[float, float] | None:
        """The configured healthy gain range."""
        return None if params is None else params.healthy_gain

    def outside(
        self,
        array: np.ndarray,
        previous: np.ndarray | None,
        params: PmtGainParameters | None,
        validation: ValidationConfig | None,
    ) -> list[Outside]:
        """Every flagged PMT, with its gain and why."""
        band = "" if params is None else " [{:g}, {:g}]".format(*params.healthy_gain)
        found = []
        for pmt in np.flatnonzero(np.nan_to_num(array[Row.FLAG])):
            bits = Flag(int(array[Row.FLAG, pmt]))
            why = []
            if Flag.OUTSIDE in bits:
                why.append(f"gain outside the healthy range{band}")
            if Flag.FIT_FAILED in bits:
                why.append(f"fit {FitStatus(int(array[Row.STATUS, pmt])).name.lower()}")
            values = (
                f"gain {array[Row.GAIN, pmt]:.2f} +- {array[Row.GAIN_ERROR, pmt]:.2f} ADC/pe, "
                f"chi2/ndf {array[Row.CHI2_NDF, pmt]:.2f}"
            )
            found.append(Outside(int(pmt), values, "; ".join(why)))
        return found

    def plot(
        self, figure: Figure, array: np.ndarray, summary: Mapping[str, Any], context: PlotContext
    ) -> None:
        """Gain per PMT (healthy band shaded, flagged PMTs ringed), the gain distribution,
        the charge spectra of flagged PMTs (or of the worst fit) with the fitted curves,
        and the gain's change from the compared versions."""
        gain, error = array[Row.GAIN], array[Row.GAIN_ERROR]
        pmts = np.arange(gain.size)
        band = summary.get("healthy_gain")
        flagged = np.flatnonzero(np.nan_to_num(array[Row.FLAG]))
        (ax_gain, ax_hist), (ax_spectra, ax_diff) = figure.subplots(2, 2)
        ax_gain.errorbar(pmts, gain, yerr=error, fmt=".", ms=3, elinewidth=0.8)
        if band is not None:
            ax_gain.axhspan(*band, color=HEALTHY_COLOUR, alpha=0.15, label="healthy")
            ax_hist.axvspan(*band, color=HEALTHY_COLOUR, alpha=0.15)
        if flagged.size:
            ax_gain.plot(
                flagged, gain[flagged], "o", mfc="none", color=OUTSIDE_COLOUR, label="flagged"
            )
        ax_gain.set(title="gain", xlabel="PMT", ylabel="ADC / photoelectron")
        if band is not None or flagged.size:
            ax_gain.legend(loc="upper right", fontsize="small")
        ax_hist.hist(gain[np.isfinite(gain)], bins=40, color="#1e88e5")
        ax_hist.set(title="gain distribution", xlabel="ADC / photoelectron", ylabel="PMTs")
        _spectra(ax_spectra, array, summary, flagged)
        differences(
            ax_diff,
            context.compared,
            lambda other: gain - other[Row.GAIN],
            "gain - other (ADC/pe)",
        )


def _spectra(ax: Axes, array: np.ndarray, summary: Mapping[str, Any], flagged: np.ndarray) -> None:
    """Charge histograms and fitted curves of the flagged PMTs, or of the worst fit."""
    binning = summary.get("histogram")
    if binning is None or array.shape[0] <= ROWS:
        ax.text(0.5, 0.5, "no charge histogram in the payload", ha="center", transform=ax.transAxes)
        return
    chosen = flagged[:PLOTTED_SPECTRA]
    what = "flagged PMTs"
    if not chosen.size:
        chi2 = np.nan_to_num(array[Row.CHI2_NDF], nan=-1.0)
        chosen, what = np.array([int(np.argmax(chi2))]), "worst fit (no PMT flagged)"
    model = ChargeModel(binning["bins"], binning["low"], binning["high"], int(summary["max_peaks"]))
    for pmt in chosen:
        histogram = array[ROWS:, pmt]
        ax.stairs(histogram[1:-1], model.edges, label=f"PMT {pmt}")
        theta = array[[Row.PEDESTAL, Row.GAIN, Row.PEDESTAL_WIDTH, Row.SPE_WIDTH, Row.MU], pmt]
        if np.isfinite(theta).all():
            curve = model.expected(theta, histogram.sum())[0]
            ax.plot(model.centres, curve, "-", lw=1, color="k")
    filled = np.flatnonzero(array[ROWS + 1 : -1, chosen].sum(axis=1))
    if filled.size:  # the charges seen, and down to one event (the log scale's floor)
        ax.set_xlim(model.edges[filled[0]], model.edges[filled[-1] + 1])
    ax.set(title=f"charge spectra, {what}", xlabel="ADC", ylabel="events", yscale="log")
    ax.set_ylim(bottom=0.5)
    ax.legend(loc="upper right", fontsize="small")
