"""The calibration-kind plug-in API: what a kind of calibration must tell calloop.

A *kind* is the algorithm of a calibration (``kind:`` in its YAML): how the events of one
reco output are reduced (:meth:`CalibrationKind.accumulate`, in the ALCA step), how two
reductions merge (:meth:`~CalibrationKind.merge`, in ALCA and harvest), how the merged
statistics become a payload (:meth:`~CalibrationKind.finalize`, in the harvest), which
payloads must not be uploaded (:meth:`~CalibrationKind.validate`, in step 4), and how an
expert sees one (:meth:`~CalibrationKind.plot`, :meth:`~CalibrationKind.outside`,
:meth:`~CalibrationKind.checks`: the web page and ``calloop plot``).

Writing a kind (a separate package, calloop untouched)::

    class Gains(CalibrationKind[GainParameters]):
        Parameters = GainParameters           # the YAML's ``parameters:``, validated
        schema = PayloadSchema("float64", "[channels]", "gain per channel")

        def accumulate(self, frames, trigger, params, config):
            return trigger_stats(frames, trigger, config.step3)

        def finalize(self, accumulated, params, dependencies):
            stats = require(accumulated, "pedestal")
            return Payload(stats.mean * params.scale, {"events": stats.count})

and register it in the package's metadata (``pyproject.toml``)::

    [project.entry-points."calloop.kinds"]
    gains = "mypackage.gains:Gains"

The entry-point name is the kind's name in the YAML. A kind that histograms names the
binning ``parameters.bins``, ``low`` and ``high``: those keys are restart-only (a SIGHUP
cannot change the layout of a run's accumulations, :mod:`loop.reload`). Accumulations are
:data:`~workers.accumulators.Accumulators` (mergeable :class:`ChannelStats` under names the
kind chooses, trigger types by convention), so they are stored in the ALCA outputs and the
harvest state like the built-ins'. Hooks must be deterministic: a re-harvest of the same
inputs must give the same payload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from loop.config import CalibrationConfig, Step3Config, ValidationConfig
from loop.rawformat import TRIGGER_CODES
from workers.accumulators import Accumulators, ChannelStats, merge_all

if TYPE_CHECKING:  # matplotlib is imported only by whoever draws
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRIGGER_NAMES = {code: name for name, code in TRIGGER_CODES.items()}


class AlgorithmError(ValueError):
    """The accumulations cannot produce this payload (e.g. a trigger type is missing)."""


@dataclass(frozen=True)
class Payload:
    """A computed payload and its quality summary (JSON-serialisable; ``events`` is the
    statistics it was derived from, read by validation and the pages)."""

    array: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PayloadSchema:
    """What a kind's payload array is, for the documentation and ``calibrations show``."""

    dtype: str
    shape: str
    description: str


@dataclass(frozen=True)
class Check:
    """One validation figure of a stored payload against its threshold (the web page)."""

    name: str
    value: str
    threshold: str
    ok: bool


@dataclass(frozen=True)
class Outside:
    """A channel outside the healthy range, and why (the web page's grid)."""

    channel: int
    values: str
    why: str


@dataclass(frozen=True)
class PlotContext:
    """What a plot shows besides the payload itself."""

    params: BaseModel | None  # the kind's parameters; None when no calibration names it
    compared: Sequence[tuple[str, np.ndarray]]  # (label, array) of other versions, same shape
    outside: Sequence[Outside]


class NoParameters(BaseModel):
    """The schema of a kind without parameters (``Parameters = NoParameters``): the
    YAML's ``parameters:`` must then be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=BaseModel)


class CalibrationKind(ABC, Generic[P]):
    """A kind of calibration. Subclasses set :attr:`Parameters` and :attr:`schema` and
    implement :meth:`accumulate` and :meth:`finalize`; the other hooks have defaults.
    Instances are stateless (one per process serves every calibration of the kind)."""

    Parameters: type[P]
    """The pydantic model of the YAML's ``parameters:`` (unknown keys should be errors)."""
    schema: PayloadSchema
    """The payload array's dtype and shape."""

    def parameters(self, config: CalibrationConfig) -> P:
        """The calibration's parameters as :attr:`Parameters` (validated at config load)."""
        return self.Parameters.model_validate(config.parameters)

    @abstractmethod
    def accumulate(
        self, frames: np.ndarray, trigger: np.ndarray, params: P, config: CalibrationConfig
    ) -> Accumulators:
        """What the events of one reco output contribute: ``frames`` [events x channels]
        (ADC counts or, after common-mode subtraction, floats) and the trigger code of
        each event (:data:`loop.rawformat.TRIGGER_CODES`)."""

    def merge(self, parts: Sequence[Accumulators]) -> Accumulators:
        """The accumulation of all ``parts`` together (any order and grouping)."""
        return merge_all(list(parts))

    @abstractmethod
    def finalize(
        self, accumulated: Accumulators, params: P, dependencies: Mapping[str, np.ndarray]
    ) -> Payload:
        """The payload of the merged accumulation. ``dependencies`` holds the payload of
        each calibration named in ``depends_on``, by name. Raise :class:`AlgorithmError`
        when the statistics cannot give a payload."""

    def validate(
        self, payload: Payload, previous: np.ndarray | None, validation: ValidationConfig
    ) -> list[str]:
        """Reasons the payload must not be uploaded (empty when it passes); ``previous``
        is the payload in force before it, if any. The default checks the ``validation``
        keys every kind shares: statistics, bad fraction, non-finite values."""
        problems = []
        events = int(payload.summary.get("events", 0))
        if events < validation.min_events:
            problems.append(
                f"only {events} events (validation.min_events = {validation.min_events})"
            )
        fraction = float(payload.summary.get("bad_fraction", 0.0))
        if fraction > validation.max_bad_fraction:
            problems.append(
                f"bad-channel fraction {fraction:.3f} exceeds "
                f"validation.max_bad_fraction = {validation.max_bad_fraction}"
            )
        if not validation.allow_nonfinite:
            nonfinite = payload.summary.get("nonfinite_channels") or []
            if payload.array.dtype.kind == "f" and not np.isfinite(payload.array).all():
                problems.append("payload has NaN/inf values (validation.allow_nonfinite is false)")
            elif nonfinite:
                problems.append(
                    f"derived from non-finite statistics in {len(nonfinite)} channels, "
                    f"e.g. {nonfinite[:10]} (validation.allow_nonfinite is false)"
                )
        return problems

    def checks(
        self,
        array: np.ndarray,
        quality: Mapping[str, Any],
        previous: np.ndarray | None,
        validation: ValidationConfig,
    ) -> list[Check]:
        """The figures :meth:`validate` judges, of a stored payload whose summary is
        ``quality``, against their thresholds."""
        events = int(quality.get("events", 0))
        fraction = float(quality.get("bad_fraction", 0.0))
        nonfinite = len(quality.get("nonfinite_channels") or [])
        return [
            Check(
                "events",
                str(events),
                f">= {validation.min_events}",
                events >= validation.min_events,
            ),
            Check(
                "bad-channel fraction",
                f"{fraction:.4f}",
                f"<= {validation.max_bad_fraction}",
                fraction <= validation.max_bad_fraction,
            ),
            Check(
                "non-finite channels",
                str(nonfinite),
                "any" if validation.allow_nonfinite else "0",
                validation.allow_nonfinite or nonfinite == 0,
            ),
        ]

    def healthy_range(self, array: np.ndarray, params: P | None) -> tuple[float, float] | None:
        """The healthy range of the payload's per-channel figure, if the kind has one."""
        return None

    def outside(
        self,
        array: np.ndarray,
        previous: np.ndarray | None,
        params: P | None,
        validation: ValidationConfig | None,
    ) -> list[Outside]:
        """Channels an expert must look at (default: those with a non-finite value)."""
        values = np.atleast_2d(array)
        if values.dtype.kind not in "fc":
            return []
        bad = ~np.isfinite(values).all(axis=0)
        return [Outside(int(c), "", "non-finite") for c in np.flatnonzero(bad)]

    def plot(
        self, figure: Figure, array: np.ndarray, summary: Mapping[str, Any], context: PlotContext
    ) -> None:
        """Draw the payload into ``figure`` (default: each row of the array per channel,
        and its difference to the compared versions)."""
        values = np.atleast_2d(np.asarray(array, dtype=np.float64))
        ax_values, ax_diff = figure.subplots(1, 2)
        for row, series in enumerate(values):
            ax_values.plot(np.arange(series.size), series, ".", ms=3, label=f"row {row}")
        if len(values) > 1:
            ax_values.legend(loc="upper right", fontsize="small")
        ax_values.set(title=self.schema.description, xlabel="channel")
        differences(
            ax_diff,
            context.compared,
            lambda other: values[0] - np.atleast_2d(other)[0],
            "row 0 - other",
        )


def differences(
    ax: Axes,
    compared: Sequence[tuple[str, np.ndarray]],
    delta: Callable[[np.ndarray], np.ndarray],
    label: str,
) -> None:
    """Plot ``delta(other)`` per channel for each compared version, or say there is none."""
    for name, other in compared:
        values = delta(other)
        ax.plot(np.arange(values.size), values, ".", ms=3, label=name)
    if compared:
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no other version to compare", ha="center", transform=ax.transAxes)
    ax.set(title="difference to previous / uploaded", xlabel="channel", ylabel=label)


def trigger_stats(frames: np.ndarray, trigger: np.ndarray, step3: Step3Config) -> Accumulators:
    """:class:`ChannelStats` per trigger type of one set of events, with ``step3``'s
    occupancy threshold and histogram (pure). Each trigger type's events are read from
    ``frames`` by row index, block by block, not copied out whole."""
    histogram = None
    if step3.histogram is not None:
        h = step3.histogram
        histogram = (h.bins, h.low, h.high)
    codes = np.unique(trigger)
    return {
        TRIGGER_NAMES[int(code)]: ChannelStats.from_frames(
            frames,
            step3.occupancy_threshold,
            histogram,
            rows=None if len(codes) == 1 else np.flatnonzero(trigger == code),
        )
        for code in codes
    }


def require(accumulated: Accumulators, trigger: str) -> ChannelStats:
    """The statistics of ``trigger`` events; :class:`AlgorithmError` if there are none."""
    stats = accumulated.get(trigger)
    if stats is None or stats.count == 0:
        raise AlgorithmError(f"no {trigger}-trigger events in the accumulated statistics")
    return stats
