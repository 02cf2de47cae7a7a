"""Calibration kinds as plug-ins: the registry (entry-point group ``calloop.kinds``), the
YAML's ``kind`` and ``parameters`` with file:key:line errors, and a kind from a package
installed by the test (a module and a real ``*.dist-info``) run through the three daemons
and the harvest worker's ``--dependency``."""

from __future__ import annotations

import importlib
import os
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.conddb.client import ConditionsDB
from loop.config import CalibrationConfig, dump_yaml, load_calibration
from loop.errors import ConfigError
from loop.jobconfig import freeze
from loop.rawformat import TRIGGER_CODES, parse_raw_name, raw_path, read_raw_ls
from loop.sim.scenario import RunSpec
from loop.store import CalibStore
from loop.web.payloads import load_payload
from loop.web.plots import render
from tests.conftest import CONFIG_DIR
from tests.daemon_harness import harness, scenario
from tests.helpers import calibration
from workers import harvest
from workers.accumulators import ChannelStats, save_accumulators
from workers.kinds import ENTRY_POINT_GROUP, KindError, builtin_kinds, get_kind, known_kinds
from workers.kinds.bad_channels import BadChannels
from workers.kinds.base import CalibrationKind
from workers.kinds.pedestals import Pedestals

PLUGIN = "calloop_test_scaled"
KIND = "scaled_mean"
RUN = 9501
SCALE = 2.5

PLUGIN_SOURCE = '''
"""A calibration kind from outside calloop: the pedestal mean times ``scale``, plus row 0
of every dependency's payload."""

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from workers.kinds.base import CalibrationKind, Payload, PayloadSchema, require, trigger_stats


class ScaleParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = Field(gt=0)


class ScaledMean(CalibrationKind[ScaleParameters]):
    Parameters = ScaleParameters
    schema = PayloadSchema("float64", "[channels]", "pedestal mean x scale")

    def accumulate(self, frames, trigger, params, config):
        return trigger_stats(frames, trigger, config.step3)

    def finalize(self, accumulated, params, dependencies):
        stats = require(accumulated, "pedestal")
        array = stats.mean * params.scale
        for name in sorted(dependencies):
            array = array + np.atleast_2d(dependencies[name])[0]
        return Payload(array, {"events": stats.count, "scale": params.scale,
                               "dependencies": sorted(dependencies)})
'''


def install_plugin(root: Path) -> Path:
    """Install the plug-in package as pip would (module + dist-info) under ``root``."""
    root.mkdir(parents=True)
    (root / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = root / f"{PLUGIN}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{KIND} = {PLUGIN}:ScaledMean\n")
    (info / "RECORD").write_text("")
    return root


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plug-in on this process's sys.path and on the PYTHONPATH of every process it
    starts (the daemons' job servers and jobs)."""
    root = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    inherited = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), inherited])))
    importlib.invalidate_caches()
    return root


def _calibration_yaml(directory: Path, name: str, **changes: object) -> Path:
    """A copy of the shipped EcalPedestals as ``name`` with its own store entry and tag."""
    data = yaml.safe_load((CONFIG_DIR / "calibrations" / "EcalPedestals.yaml").read_text())
    data["name"] = name
    data["payload"].update(ctype=name.lower(), destination_tag=f"{name}_v1")
    data.update(changes)
    path = directory / f"{name}.yaml"
    dump_yaml(path, data)
    return path


def _line(path: Path, text: str) -> int:
    """The line number of the first line of ``path`` containing ``text``."""
    lines = path.read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


# ------------------------------------------------------------------------------ registry


def test_the_builtin_kinds_resolve_through_the_entry_point_group() -> None:
    entry_points = distribution("calloop").entry_points.select(group=ENTRY_POINT_GROUP)
    assert {ep.name: ep.value for ep in entry_points} == {
        "pedestals": "workers.kinds.pedestals:Pedestals",
        "bad_channels": "workers.kinds.bad_channels:BadChannels",
        "pmt_gain": "workers.kinds.pmt_gain:PmtGain",
        "occupancy": "workers.kinds.occupancy:Occupancy",
    }
    assert builtin_kinds() == ["bad_channels", "occupancy", "pedestals", "pmt_gain"]
    assert isinstance(get_kind("pedestals"), Pedestals)
    assert isinstance(get_kind("bad_channels"), BadChannels)
    for name in ("pedestals", "bad_channels"):
        kind = get_kind(name)
        assert kind.Parameters().model_dump() == {  # both classify channels
            "dead_max_noise": 0.5,
            "noisy_noise_factor": 2.5,
            "hot_occupancy_factor": 10.0,
            "hot_min_occupancy": 0.05,
        }
        assert kind.schema.dtype in ("float64", "uint8")


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(KindError) as caught:
        get_kind("pedestal")
    message = str(caught.value)
    assert "unknown calibration kind 'pedestal'" in message
    assert "known kinds: bad_channels, occupancy, pedestals, pmt_gain" in message
    assert "did you mean 'pedestals'?" in message


def test_an_installed_plugin_is_found_without_touching_calloop(plugin: Path) -> None:
    assert KIND in known_kinds() and KIND not in builtin_kinds()
    kind = get_kind(KIND)
    assert isinstance(kind, CalibrationKind) and kind.schema.shape == "[channels]"


def test_a_plugin_that_is_not_a_kind_is_refused_with_its_entry_point(tmp_path: Path) -> None:
    root = install_plugin(tmp_path / "site")
    (root / f"{PLUGIN}-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbroken = {PLUGIN}:ScaleParameters\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        with pytest.raises(KindError, match=rf"'broken' \({PLUGIN}:ScaleParameters\) cannot be"):
            get_kind("broken")


# ---------------------------------------------------------------------------- the YAML


def test_an_unknown_kind_in_a_calibration_names_file_line_and_known_kinds(tmp_path: Path) -> None:
    path = _calibration_yaml(tmp_path, "EcalOther", kind="nosuch")
    with pytest.raises(ConfigError) as caught:
        load_calibration(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: kind (line {_line(path, 'kind: nosuch')}): ")
    assert "unknown calibration kind 'nosuch'" in problem
    assert "known kinds: bad_channels, occupancy, pedestals, pmt_gain" in problem


def test_a_parameter_error_names_file_key_and_line(tmp_path: Path) -> None:
    path = _calibration_yaml(
        tmp_path,
        "EcalOther",
        parameters={"noisy_noise_factor": 0.5, "dead_max_noise": 0.2, "hot_min_occupanccy": 0.1},
    )
    with pytest.raises(ConfigError) as caught:
        load_calibration(path)
    assert sorted(caught.value.problems) == sorted(
        [
            f"{path}: parameters.noisy_noise_factor (line "
            f"{_line(path, 'noisy_noise_factor')}): Input should be greater than 1",
            f"{path}: parameters.hot_min_occupanccy (line {_line(path, 'hot_min_occupanccy')}): "
            "unknown key (check the spelling against the documented keys)",
        ]
    )


def test_a_plugin_kind_validates_its_own_parameters(plugin: Path, tmp_path: Path) -> None:
    path = _calibration_yaml(tmp_path, "EcalScaled", kind=KIND, parameters={"scale": -1})
    with pytest.raises(ConfigError) as caught:
        load_calibration(path)
    assert caught.value.problems == [
        f"{path}: parameters.scale (line {_line(path, 'scale:')}): Input should be greater than 0"
    ]
    good = _calibration_yaml(tmp_path, "EcalScaled", kind=KIND, parameters={"scale": 3})
    assert load_calibration(good).parameters == {"scale": 3.0}


@pytest.mark.parametrize("given", [None, {"dead_max_noise": 0.25}])
def test_the_parameters_are_kept_with_defaults_resolved(
    tmp_path: Path, given: dict[str, float] | None
) -> None:
    path = _calibration_yaml(tmp_path, "EcalOther")  # the shipped file has no parameters
    if given is not None:
        path = _calibration_yaml(tmp_path, "EcalOther", parameters=given)
    config = load_calibration(path)
    assert config.parameters == {  # in the frozen copy and its hash
        "dead_max_noise": 0.25 if given else 0.5,
        "noisy_noise_factor": 2.5,
        "hot_occupancy_factor": 10.0,
        "hot_min_occupancy": 0.05,
    }
    again = CalibrationConfig.model_validate_json(config.canonical_json())
    assert again.canonical_json() == config.canonical_json()


def test_the_replaced_keys_say_what_replaced_them(tmp_path: Path) -> None:
    data = yaml.safe_load((CONFIG_DIR / "calibrations" / "SiStripBad.yaml").read_text())
    data["payload"]["calibration_type"] = data.pop("kind")
    data["algorithm"] = data.pop("parameters")
    path = tmp_path / "SiStripBad.yaml"
    dump_yaml(path, data)
    with pytest.raises(ConfigError) as caught:
        load_calibration(path)
    problems = caught.value.problems
    assert (
        f"{path}: payload.calibration_type (line {_line(path, 'calibration_type')}): "
        "replaced by the top-level key 'kind' (write: kind: bad_channels)"
    ) in problems
    assert any(
        p.startswith(
            f"{path}: algorithm (line {_line(path, 'algorithm:')}): replaced by 'parameters'"
        )
        for p in problems
    )


# ------------------------------------------------------------------ harvest dependencies


def _harvest_inputs(tmp_path: Path, config: CalibrationConfig) -> tuple[Path, Path, np.ndarray]:
    """A frozen configuration and one ALCA output of known pedestal events."""
    frames = np.random.default_rng(3).integers(90, 110, size=(40, 8)).astype(np.uint16)
    alca = tmp_path / "alca.h5"
    save_accumulators(alca, {"pedestal": ChannelStats.from_frames(frames, 400.0)}, {"run": RUN})
    job = tmp_path / "job"
    job.mkdir()
    frozen, _sha = freeze(config, job)
    return frozen, alca, frames.astype(np.float64).mean(axis=0)


def test_harvest_passes_dependency_payloads_to_the_kind(plugin: Path, tmp_path: Path) -> None:
    path = _calibration_yaml(
        tmp_path, "EcalScaled", kind=KIND, parameters={"scale": SCALE}, depends_on=["EcalBase"]
    )
    frozen, alca, mean = _harvest_inputs(tmp_path, load_calibration(path))
    base = np.stack([np.arange(8.0), np.ones(8)])  # a pedestals payload: row 0 is used
    np.save(tmp_path / "base.npy", base)
    out = tmp_path / "out"
    argv = ["--calibration", str(frozen), "--output-dir", str(out), str(alca)]
    code = harvest.main([*argv, "--dependency", f"EcalBase={tmp_path / 'base.npy'}"])
    assert code == 0
    payload = np.load(out / harvest.PAYLOAD)
    np.testing.assert_allclose(payload, mean * SCALE + base[0], rtol=1e-12)


def test_harvest_refuses_a_dependency_not_in_depends_on(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _calibration_yaml(tmp_path, "EcalScaled", kind=KIND, parameters={"scale": SCALE})
    frozen, alca, _mean = _harvest_inputs(tmp_path, load_calibration(path))
    np.save(tmp_path / "base.npy", np.zeros(8))
    argv = ["--calibration", str(frozen), "--output-dir", str(tmp_path / "out"), str(alca)]
    code = harvest.main([*argv, "--dependency", f"EcalBase={tmp_path / 'base.npy'}"])
    assert code == 2
    assert "--dependency EcalBase: EcalScaled does not depend on it" in capsys.readouterr().err
    assert not (tmp_path / "out" / harvest.PAYLOAD).exists()


# -------------------------------------------------------------------------- end to end


def _expected(raw_root: Path, stream: str, run: int) -> tuple[np.ndarray, int]:
    """SCALE x the mean of every pedestal event of the run, from the raw files (numpy)."""
    directory = raw_path(raw_root, stream, run, 1).parent
    files = sorted(p for p in directory.glob("*.h5") if parse_raw_name(p) is not None)
    contents = [read_raw_ls(f) for f in files]
    frames = np.concatenate([c.frames for c in contents]).astype(np.float64)
    trigger = np.concatenate([c.trigger for c in contents])
    pedestal = frames[trigger == TRIGGER_CODES["pedestal"]]
    return pedestal.mean(axis=0) * SCALE, len(pedestal)


def test_an_external_kind_runs_through_the_three_daemons(plugin: Path, tmp_path: Path) -> None:
    h = harness(tmp_path, scenario(RunSpec(run_number=RUN, start=0, ls_seconds=1.0, ls_count=4)))
    name = "EcalScaled"
    _calibration_yaml(
        h.loop_config.calibrations_dir,
        name,
        kind=KIND,
        parameters={"scale": SCALE},
        raw_input={"stream": "ecal", "channels": 64},
        validation={"min_events": 1, "max_bad_fraction": 0.05, "allow_nonfinite": False},
    )
    try:
        daemons = [h.start(step, name) for step in ("step2", "step3", "step4")]
        h.play()
        step4 = daemons[2].step
        assert step4 is not None
        h.run_until(lambda: step4.journal.run_state(RUN) == "Done", timeout=120)
    finally:
        h.stop()
    cal = calibration(h.loop_config, name)
    expected, events = _expected(h.loop_config.raw_root, "ecal", RUN)
    store = CalibStore(h.loop_config.store_root)
    try:
        stored = store.detector(cal.detector).get(cal.payload.ctype, run=RUN)
        np.testing.assert_allclose(stored.array, expected, rtol=1e-9)
        assert stored.metadata["quality"] == {"events": events, "scale": SCALE, "dependencies": []}
        # the payload page and `calloop plot` judge and draw it through the kind
        view = load_payload(
            store, h.loop_config, cal, detector=cal.detector, ctype=cal.payload.ctype
        )
        assert (view.kind, view.noise_band, view.outside) == (KIND, None, [])
        assert all(c.ok for c in view.checks) and view.checks[0].name == "events"
        assert render(view).startswith(b"\x89PNG")
    finally:
        store.close()
    conditions = ConditionsDB.connect(h.loop_config.conddb_url)
    try:
        resolved = conditions.resolve(tag=cal.payload.destination_tag, run=RUN)
        uploaded = conditions.payload(resolved.payload_hash).array()
        np.testing.assert_allclose(uploaded, expected, rtol=1e-9)
    finally:
        conditions.close()
