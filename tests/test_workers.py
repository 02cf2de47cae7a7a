"""reco -> alca -> harvest on simulated raw data equals the one-shot numpy reference,
whatever the batching and order."""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pytest

from loop.errors import ConfigError
from loop.jobconfig import freeze, load_frozen
from loop.manifest import read_manifest
from loop.rawformat import raw_path, write_raw_ls
from loop.sim.detector import generate_ls, make_truth
from loop.sim.scenario import DetectorSpec
from tests.badfiles import DAMAGE
from tests.helpers import calibration, reference_payload, workspace
from workers import alca, harvest, reco
from workers.algorithms import ChannelStatus

RUN = 500


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, object]:
    loop_config = workspace(tmp_path)
    spec = DetectorSpec(channels=256, events_per_ls=120, dead=2, noisy=2, hot=2)
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


def test_reco_rejects_each_bad_file_alone(raw: tuple[Path, object], tmp_path: Path) -> None:
    """Every kind of damaged raw file is rejected on its own with its reason in the
    manifest; the good files of the batch are processed."""
    raw_root, (loop_config, _truth) = raw  # type: ignore[misc]
    cal = calibration(loop_config, "EcalPedestals")
    config_path, config_sha256 = freeze(cal, tmp_path / "job")
    inputs = [raw_path(raw_root, "ecal", RUN, ls) for ls in range(1, 8)]
    damaged = dict(zip(DAMAGE, inputs[1:], strict=False))  # LS 1 and 7 stay good
    for kind, path in damaged.items():
        DAMAGE[kind][0](path)
    out = tmp_path / "out"
    code = reco.main(
        ["--calibration", str(config_path), "--output-dir", str(out), *map(str, inputs)]
    )
    assert code == 0
    manifest = read_manifest(out)
    assert manifest.config_sha256 == config_sha256
    assert [o.name for o in manifest.outputs] == [reco.OUTPUT]
    reasons = {b.input: b.reason for b in manifest.bad_inputs}
    assert set(reasons) == {str(p) for p in damaged.values()}
    for kind, path in damaged.items():
        assert DAMAGE[kind][1] in reasons[str(path)], (kind, reasons[str(path)])
    with h5py.File(out / reco.OUTPUT) as h5:
        assert list(h5.attrs["lumisections"]) == [1, 7]
        assert np.isfinite(h5["frames"][()]).all()


def test_worker_reads_only_its_frozen_configuration(
    raw: tuple[Path, object], tmp_path: Path
) -> None:
    """A frozen configuration that changed after the job was created is refused."""
    raw_root, (loop_config, _truth) = raw  # type: ignore[misc]
    cal = calibration(loop_config, "EcalPedestals")
    config_path, config_sha256 = freeze(cal, tmp_path / "job")
    assert load_frozen(config_path, config_sha256) == cal
    config_path.write_text(config_path.read_text().replace('"ecal"', '"other"'))
    with pytest.raises(ConfigError, match="differs from the job's"):
        load_frozen(config_path, config_sha256)
    (loop_config.calibrations_dir / "EcalPedestals.yaml").write_text("broken: [")
    config_path, _ = freeze(cal, tmp_path / "job2")  # the live YAML is never read
    code = reco.main(
        [
            "--calibration",
            str(config_path),
            "--output-dir",
            str(tmp_path / "o"),
            str(raw_path(raw_root, "ecal", RUN, 1)),
        ]
    )
    assert code == 0


def test_common_mode_subtraction() -> None:
    frames = np.array([[10.0, 12.0, 100.0, 104.0], [20.0, 22.0, 50.0, 54.0]])
    result = reco.common_mode(frames, 2)
    np.testing.assert_allclose(result, [[-1, 1, -2, 2], [-1, 1, -2, 2]])
