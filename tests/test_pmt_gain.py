"""The ``pmt_gain`` kind against the simulated PMT detector's truth: fitted gains within
their errors, out-of-range PMTs flagged and the scan refused by validation, merging and
the ALCA -> harvest workers giving the pure path's payload, the PMT simulation itself."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydantic
import pytest
from matplotlib.figure import Figure

from loop.config import CalibrationConfig, load_calibration
from loop.rawformat import TRIGGER_CODES, RawLS, raw_path, read_raw_ls, write_raw_ls
from loop.sim.player import Player, detector_seed
from loop.sim.pmt import (
    PmtTruth,
    gain_pulls,
    generate_pmt_ls,
    healthy_gain,
    load_pmt_truth,
    make_pmt_truth,
)
from loop.sim.scenario import DetectorSpec, Scenario
from tests.conftest import CONFIG_DIR
from tests.helpers import calibration, workspace
from workers import alca, harvest, reco
from workers.accumulators import Accumulators
from workers.kinds import get_kind
from workers.kinds.base import AlgorithmError, Payload, PlotContext
from workers.kinds.pmt_gain import (
    ROWS,
    ChargeModel,
    FitStatus,
    Flag,
    PmtGain,
    PmtGainParameters,
    Row,
    fit_spectrum,
)

PMTS = 240
OUT_OF_RANGE = 4
SPEC = DetectorSpec(type="pmt", channels=PMTS, events_per_ls=1500, out_of_range=OUT_OF_RANGE)
SEED = 11
RUN = 700
LUMIS = (1, 2, 3, 4)
KIND = PmtGain()


def _config() -> CalibrationConfig:
    """The shipped PmtGain calibration, sized to the simulated PMTs."""
    shipped = load_calibration(CONFIG_DIR / "calibrations" / "PmtGain.yaml")
    return shipped.model_copy(
        update={"raw_input": shipped.raw_input.model_copy(update={"channels": PMTS})}
    )


@pytest.fixture(scope="module")
def scan() -> tuple[PmtTruth, list[RawLS]]:
    truth = make_pmt_truth(SPEC, SEED)
    contents = [
        generate_pmt_ls(
            SPEC, truth, detector="pmt", run=RUN, ls=ls, seed=SEED, start_time=0, end_time=1
        )
        for ls in LUMIS
    ]
    return truth, contents


def _accumulate(contents: list[RawLS], params: PmtGainParameters) -> list[Accumulators]:
    return [KIND.accumulate(c.frames, c.trigger, params, _config()) for c in contents]


@pytest.fixture(scope="module")
def payload(scan: tuple[PmtTruth, list[RawLS]]) -> Payload:
    """The pure path: every LS accumulated in one go, then finalized."""
    _truth, contents = scan
    frames = np.concatenate([c.frames for c in contents])
    trigger = np.concatenate([c.trigger for c in contents])
    params = KIND.parameters(_config())
    return KIND.finalize(KIND.accumulate(frames, trigger, params, _config()), params, {})


def test_the_shipped_healthy_range_is_the_simulation_s() -> None:
    params = KIND.parameters(_config())
    assert params.healthy_gain == pytest.approx(healthy_gain(SPEC))
    assert isinstance(get_kind("pmt_gain"), PmtGain)


def test_fitted_gains_are_within_their_errors_of_the_truth(
    scan: tuple[PmtTruth, list[RawLS]], payload: Payload
) -> None:
    truth, _contents = scan
    array = payload.array
    assert array.shape == (ROWS + 256, PMTS)
    assert (array[Row.STATUS] == FitStatus.OK).all()
    healthy = np.setdiff1d(np.arange(PMTS), truth.out_of_range)
    assert healthy.size >= 200
    pull = gain_pulls(array, truth)
    assert np.mean(np.abs(pull[healthy]) < 3) >= 0.99
    assert 0.7 <= np.std(pull[healthy]) <= 1.3
    assert abs(np.mean(pull[healthy])) < 0.3
    # the errors are those of the statistics: well below the spread of the gains
    assert np.median(array[Row.GAIN_ERROR]) < 0.2 * SPEC.gain_spread
    pedestal_pull = np.abs(array[Row.PEDESTAL] - truth.pedestal)
    assert np.median(pedestal_pull) < 0.5  # ADC
    assert np.median(array[Row.MU]) == pytest.approx(SPEC.mu, rel=0.05)
    assert np.median(array[Row.CHI2_NDF]) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("mu", [0.2, 4.0])
def test_the_fit_holds_from_dim_to_bright_led_pulses(mu: float) -> None:
    """The start values find the pedestal whether it is most events or few of them."""
    spec = SPEC.model_copy(update={"channels": 40, "events_per_ls": 8000, "mu": mu})
    truth = make_pmt_truth(spec, SEED)
    content = generate_pmt_ls(
        spec, truth, detector="pmt", run=RUN, ls=1, seed=SEED, start_time=0, end_time=1
    )
    params = KIND.parameters(_config())
    accumulated = KIND.accumulate(content.frames, content.trigger, params, _config())
    array = KIND.finalize(accumulated, params, {}).array
    assert (array[Row.STATUS] == FitStatus.OK).all()
    assert np.abs(gain_pulls(array, truth)).max() < 4
    assert np.median(array[Row.MU]) == pytest.approx(mu, rel=0.05)


def test_out_of_range_pmts_are_flagged_and_no_healthy_one(
    scan: tuple[PmtTruth, list[RawLS]], payload: Payload
) -> None:
    truth, _contents = scan
    assert len(truth.out_of_range) == OUT_OF_RANGE
    assert payload.summary["flagged"] == truth.out_of_range
    assert payload.summary["outside_range"] == truth.out_of_range
    assert payload.summary["fit_failures"] == {}
    assert payload.summary["events"] == SPEC.events_per_ls * len(LUMIS)
    assert payload.summary["bad_fraction"] == pytest.approx(OUT_OF_RANGE / PMTS)
    flags = payload.array[Row.FLAG]
    assert set(np.flatnonzero(flags)) == set(truth.out_of_range)
    assert (flags[truth.out_of_range] == Flag.OUTSIDE).all()
    outside = KIND.outside(payload.array, None, KIND.parameters(_config()), None)
    assert [o.channel for o in outside] == truth.out_of_range
    assert all("gain outside the healthy range [31, 49]" in o.why for o in outside)


def test_validation_refuses_the_flagged_scan_and_passes_a_clean_one(payload: Payload) -> None:
    validation = _config().validation
    low, high = healthy_gain(SPEC)
    flagged = payload.summary["flagged"]
    assert KIND.validate(payload, None, validation) == [
        f"{len(flagged)} PMTs outside the healthy gain range [{low}, {high}]: {flagged}"
    ]
    checks = {c.name: c for c in KIND.checks(payload.array, payload.summary, None, validation)}
    assert not checks["PMTs outside the healthy gain range"].ok
    assert checks["failed gain fits"].ok
    clean = payload.array.copy()
    clean[Row.FLAG] = 0
    assert KIND.validate(Payload(clean, payload.summary), None, validation) == []


def test_merging_two_halves_equals_the_one_shot_payload(
    scan: tuple[PmtTruth, list[RawLS]], payload: Payload
) -> None:
    _truth, contents = scan
    params = KIND.parameters(_config())
    parts = _accumulate(contents, params)
    first, second = KIND.merge(parts[2:]), KIND.merge(parts[:2])  # any order, any grouping
    merged = KIND.finalize(KIND.merge([first, second]), params, {})
    np.testing.assert_array_equal(merged.array, payload.array)
    assert merged.summary == payload.summary


def test_the_workers_give_the_pure_payload(
    scan: tuple[PmtTruth, list[RawLS]], payload: Payload, tmp_path: Path
) -> None:
    """Simulated raw files -> reco -> ALCA (two jobs) -> harvest, in process."""
    _truth, contents = scan
    loop_config = workspace(tmp_path)
    shipped = calibration(loop_config, "PmtGain")
    cal = shipped.model_copy(
        update={"raw_input": shipped.raw_input.model_copy(update={"channels": PMTS})}
    )
    for content in contents:
        write_raw_ls(raw_path(loop_config.raw_root, "pmt", RUN, content.ls), content)
    outputs = []
    for index, lumis in enumerate([LUMIS[:1], LUMIS[1:]]):
        reco_dir, alca_dir = tmp_path / f"reco{index}", tmp_path / f"alca{index}"
        inputs = [raw_path(loop_config.raw_root, "pmt", RUN, ls) for ls in lumis]
        reco.run(cal, inputs, reco_dir, argparse.Namespace())
        alca.run(cal, [reco_dir / reco.OUTPUT], alca_dir, argparse.Namespace())
        outputs.append(alca_dir / alca.OUTPUT)
    out = tmp_path / "harvest"
    harvest.run(cal, outputs, out, argparse.Namespace(previous_state=None))
    np.testing.assert_array_equal(np.load(out / harvest.PAYLOAD), payload.array)


def test_a_pmt_with_too_few_entries_is_not_fitted_and_flagged(
    scan: tuple[PmtTruth, list[RawLS]],
) -> None:
    _truth, contents = scan
    params = PmtGainParameters(min_entries=SPEC.events_per_ls + 1)
    one_ls = KIND.finalize(_accumulate(contents[:1], params)[0], params, {})
    assert (one_ls.array[Row.STATUS] == FitStatus.FEW_ENTRIES).all()
    assert np.isnan(one_ls.array[Row.GAIN]).all()
    assert (one_ls.array[Row.FLAG] == Flag.FIT_FAILED).all()
    assert one_ls.summary["fit_failures"]["0"] == "few_entries"
    problems = KIND.validate(one_ls, None, _config().validation)
    assert problems == [
        "bad-channel fraction 1.000 exceeds validation.max_bad_fraction = 0.1",
        f"{PMTS} PMT gain fits failed: {list(range(20))} and {PMTS - 20} more",
    ]


def test_a_spectrum_the_model_does_not_describe_is_a_failed_fit(payload: Payload) -> None:
    params = PmtGainParameters()
    model = ChargeModel(params.bins, params.low, params.high, params.max_peaks)
    histogram = payload.array[ROWS:, 0].copy()
    assert fit_spectrum(histogram, model, params).status == FitStatus.OK
    histogram[200] += 300  # a spike far above every photoelectron peak
    spiked = fit_spectrum(histogram, model, params)
    assert spiked.status == FitStatus.POOR_FIT and spiked.chi2_ndf > params.max_chi2_ndf
    overflow = np.zeros_like(histogram)
    overflow[-1] = 10 * params.min_entries  # everything beyond the histogram: not fitted
    assert fit_spectrum(overflow, model, params).status == FitStatus.FEW_ENTRIES


def test_statistics_binned_otherwise_are_refused(scan: tuple[PmtTruth, list[RawLS]]) -> None:
    _truth, contents = scan
    accumulated = _accumulate(contents[:1], PmtGainParameters())[0]
    with pytest.raises(AlgorithmError, match="256 bins, the parameters want 128 bins"):
        KIND.finalize(accumulated, PmtGainParameters(bins=128, high=356), {})
    coarse = _accumulate(contents[:1], PmtGainParameters(bins=128, high=356))[0]
    with pytest.raises(AlgorithmError, match=r"histograms of \[128, 256\] bins cannot be merged"):
        KIND.merge([accumulated, coarse])
    with pytest.raises(AlgorithmError, match="no led-trigger events"):
        KIND.finalize({}, PmtGainParameters(), {})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bins": 400, "low": 100, "high": 300}, "bins narrower than 1 ADC count"),
        ({"healthy_gain": (49, 31)}, "must be [min, max] with 0 < min < max"),
        ({"max_peak": 3}, "Extra inputs are not permitted"),
    ],
)
def test_parameters_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message.replace("[", r"\[")):
        PmtGainParameters.model_validate(changes)


def test_the_plot_draws_the_flagged_spectra_with_their_fits(payload: Payload) -> None:
    figure = Figure()
    context = PlotContext(None, [("previous v1", payload.array)], [])
    KIND.plot(figure, payload.array, payload.summary, context)
    spectra = figure.axes[2]
    assert "flagged PMTs" in spectra.get_title()
    assert len(spectra.patches) == OUT_OF_RANGE  # one histogram each
    assert len(spectra.lines) == OUT_OF_RANGE  # and its fitted curve
    curve = spectra.lines[0].get_ydata()
    counts = payload.array[ROWS + 1 : -1, payload.summary["flagged"][0]]
    assert curve.sum() == pytest.approx(counts.sum(), rel=0.02)


# ----------------------------------------------------------------------- the simulation


def test_the_pmt_simulation_follows_its_truth(scan: tuple[PmtTruth, list[RawLS]]) -> None:
    truth, contents = scan
    again = generate_pmt_ls(
        SPEC, truth, detector="pmt", run=RUN, ls=1, seed=SEED, start_time=0, end_time=1
    )
    np.testing.assert_array_equal(again.frames, contents[0].frames)  # seeded
    assert (contents[0].trigger == TRIGGER_CODES["led"]).all()
    charge = np.concatenate([c.frames for c in contents]).astype(np.float64)
    # compound Poisson: mean pedestal + mu gain, variance width0^2 + mu (gain^2 + width1^2)
    mean = truth.pedestal + truth.mu * truth.gain
    variance = truth.pedestal_width**2 + truth.mu * (truth.gain**2 + truth.spe_width**2)
    error = np.sqrt(variance / charge.shape[0])
    assert np.mean(np.abs(charge.mean(0) - mean) < 3 * error) > 0.97
    np.testing.assert_allclose(charge.var(0), variance, rtol=0.15)
    low, high = truth.healthy
    outside = truth.gain[truth.out_of_range]
    assert ((outside < low / 1.1) | (outside > high * 1.1)).all()


@pytest.mark.parametrize(
    ("detector", "message"),
    [
        ({"type": "pmt", "dead": 2}, "dead do not apply to a detector of type pmt"),
        ({"gain_mean": 30.0, "mu": 2}, "gain_mean, mu do not apply to a detector of type adc"),
        ({"type": "pmt", "channels": 8, "out_of_range": 9}, "out_of_range exceeds"),
    ],
)
def test_detector_keys_of_the_other_type_are_errors(
    detector: dict[str, object], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DetectorSpec.model_validate(detector)


def test_a_healthy_range_below_zero_is_refused() -> None:
    spec = DetectorSpec(type="pmt", gain_mean=10.0, gain_spread=4.0)
    with pytest.raises(ValueError, match="healthy gain range must start above 0"):
        make_pmt_truth(spec, 1)


def test_the_player_writes_led_events_and_the_pmt_truth(tmp_path: Path) -> None:
    scenario = Scenario.model_validate(
        {
            "name": "pmt",
            "detectors": {
                "pmt": {"type": "pmt", "channels": 16, "events_per_ls": 50},
                "ecal": {"channels": 16, "dead": 1, "noisy": 0, "hot": 0},
            },
            "runs": [{"run_number": 9, "start": 0, "ls_seconds": 1, "ls_count": 2}],
        }
    )
    now = [1_700_000_000.0]

    def sleep(seconds: float) -> None:  # the play's clock, without waiting
        now[0] += seconds

    raw = tmp_path / "raw"
    Player(scenario, tmp_path / "state.json", raw, clock=lambda: now[0], sleep=sleep).play()
    truth = load_pmt_truth(raw / "pmt")
    made = make_pmt_truth(scenario.detectors["pmt"], detector_seed(scenario, "pmt"))
    for name in ("gain", "pedestal", "pedestal_width", "spe_width"):
        np.testing.assert_array_equal(getattr(truth, name), getattr(made, name))
    assert (truth.mu, truth.healthy) == (made.mu, made.healthy)
    assert len(truth.out_of_range) == 2  # the default out_of_range
    pmt = read_raw_ls(raw_path(raw, "pmt", 9, 2))
    assert pmt.frames.shape == (50, 16) and (pmt.trigger == TRIGGER_CODES["led"]).all()
    ecal = read_raw_ls(raw_path(raw, "ecal", 9, 2))
    assert set(np.unique(ecal.trigger)) <= {TRIGGER_CODES["pedestal"], TRIGGER_CODES["physics"]}
    assert (raw / "ecal" / "truth.npz").exists() and not (raw / "pmt" / "truth.npz").exists()
