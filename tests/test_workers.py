"""reco -> alca -> harvest on simulated raw data equals the one-shot numpy reference,
whatever the batching and order."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec
from tests.helpers import calibration, reference_payload, workspace
from workers import alca, harvest, reco
from workers.algorithms import ChannelStatus

RUN = 500


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, object]:
    loop_config = workspace(tmp_path)
    spec = DetectorSpec(channels=128, events_per_ls=120, dead=2, noisy=2, hot=2)
    for stream in ("ecal", "sistrip"):
        truth = make_truth(spec, seed=9)
        for ls in range(1, 8):
            content = generate_ls(
                spec, truth, detector=stream, run=RUN, ls=ls, seed=9, start_time=0, end_time=1
            )
            write_raw_ls(raw_path(loop_config.raw_root, stream, RUN, ls), content)
    return loop_config.raw_root, (loop_config, truth)


def _ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


@pytest.mark.parametrize("name", ["EcalPedestals", "SiStripBad"])
@pytest.mark.parametrize(
    "grouping",
    [[[1, 2, 3, 4, 5, 6, 7]], [[1, 2], [3], [4, 5, 6, 7]], [[7, 6], [1], [5, 3], [2, 4]]],
    ids=["one-batch", "uneven", "shuffled"],
)
def test_harvest_equals_one_shot(
    raw: tuple[Path, object], tmp_path: Path, name: str, grouping: list[list[int]]
) -> None:
    raw_root, (loop_config, truth) = raw  # type: ignore[misc]
    cal = calibration(loop_config, name)
    alca_outputs = []
    for i, lumis in enumerate(grouping):
        reco_dir, alca_dir = tmp_path / f"reco{i}", tmp_path / f"alca{i}"
        inputs = [raw_path(raw_root, cal.raw_input.stream, RUN, ls) for ls in lumis]
        reco.run(cal, inputs, reco_dir, _ns())
        alca.run(cal, [reco_dir / reco.OUTPUT], alca_dir, _ns())
        alca_outputs.append(alca_dir / alca.OUTPUT)
    previous = None  # chained harvests: each merges the previous state with new outputs
    for i, output in enumerate(reversed(alca_outputs)):
        out = tmp_path / f"harvest{i}"
        harvest.run(cal, [output], out, _ns(previous_state=previous))
        previous = out / harvest.STATE
    array = np.load(out / harvest.PAYLOAD)
    expected, _events = reference_payload(raw_root, cal, RUN)
    if name == "EcalPedestals":
        np.testing.assert_allclose(array, expected, rtol=1e-9)
    else:
        np.testing.assert_array_equal(array, expected)
        np.testing.assert_array_equal(array, truth.status)  # type: ignore[attr-defined]
        assert (array == ChannelStatus.HOT).sum() == 2


def test_reco_rejects_corrupt_input(raw: tuple[Path, object], tmp_path: Path) -> None:
    raw_root, (loop_config, _truth) = raw  # type: ignore[misc]
    bad = raw_root / "ecal" / f"run{RUN}" / f"run{RUN}_ls0099.h5"
    bad.write_bytes(b"not hdf5")
    cal_file = loop_config.calibrations_dir / "EcalPedestals.yaml"
    code = reco.main(
        ["--calibration", str(cal_file), "--output-dir", str(tmp_path / "o"), str(bad)]
    )
    assert code == 2


def test_common_mode_subtraction() -> None:
    frames = np.array([[10.0, 12.0, 100.0, 104.0], [20.0, 22.0, 50.0, 54.0]])
    result = reco.common_mode(frames, 2)
    np.testing.assert_allclose(result, [[-1, 1, -2, 2], [-1, 1, -2, 2]])
