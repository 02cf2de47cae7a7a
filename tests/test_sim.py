"""The simulated experiment: scenarios, detector content, and a real end-to-end play."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from loop.errors import ScenarioError
from loop.rawformat import TRIGGER_CODES, RawFileError, raw_path, read_raw_ls
from loop.registry import RegistryClient
from loop.sim.detector import generate_ls, load_truth, make_truth
from loop.sim.scenario import DetectorSpec, load_scenario, timeline
from tests.conftest import CONFIG_DIR, run_cli

QUICKSTART = CONFIG_DIR / "scenarios" / "quickstart.yaml"


def test_shipped_scenarios_are_valid() -> None:
    for path in (CONFIG_DIR / "scenarios").glob("*.yaml"):
        assert load_scenario(path).runs
    assert load_scenario(CONFIG_DIR / "scenarios" / "faults.yaml").faults


def test_overlapping_runs_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndetectors: {ecal: {}}\nruns:\n"
        "  - {run_number: 1, start: 0, ls_seconds: 10, ls_count: 5}\n"
        "  - {run_number: 2, start: 20, ls_seconds: 10, ls_count: 5}\n"
    )
    with pytest.raises(ScenarioError, match="runs 1 and 2 overlap in time"):
        load_scenario(path)


def test_unknown_fault_kind_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndetectors: {ecal: {}}\nruns: [{run_number: 1, start: 0, ls_count: 1}]\n"
        "faults: [{kind: meteor, start: 0, duration: 1}]\n"
    )
    with pytest.raises(ScenarioError, match=r"faults\.0\.kind \(line 4\)"):
        load_scenario(path)


def test_timeline_order() -> None:
    events = timeline(load_scenario(QUICKSTART))
    assert [e.at for e in events] == sorted(e.at for e in events)
    first_run = [e for e in events if e.run == 386001]
    assert first_run[0].kind == "run_start" and first_run[-1].kind == "run_end"
    assert [e.ls for e in first_run if e.kind == "ls_close"] == list(range(1, 9))
    # the last LS is written before the run end is published
    assert first_run[-2].kind == "ls_close" and first_run[-2].at == first_run[-1].at


def test_dry_run_prints_timeline() -> None:
    result = run_cli("sim", "play", str(CONFIG_DIR / "scenarios" / "faults.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "registry fault refuse" in result.stdout
    assert "run 387001 LS 10 closes" in result.stdout


def test_invalid_scenario_cli_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nruns: []\n")
    result = run_cli("sim", "play", str(path), "--dry-run")
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "Traceback" not in result.stderr


def test_detector_content_matches_truth() -> None:
    spec = DetectorSpec(channels=64, events_per_ls=4000, dead=2, noisy=2, hot=2)
    truth = make_truth(spec, seed=1)
    content = generate_ls(
        spec, truth, detector="ecal", run=1, ls=1, seed=1, start_time=0, end_time=1
    )
    again = generate_ls(spec, truth, detector="ecal", run=1, ls=1, seed=1, start_time=0, end_time=1)
    assert np.array_equal(content.frames, again.frames)  # seeded: reproducible
    pedestal = content.frames[content.trigger == TRIGGER_CODES["pedestal"]].astype(float)
    good = truth.status == 0
    assert np.allclose(pedestal.mean(0)[good], truth.pedestal[good], atol=0.5)
    assert np.allclose(pedestal.std(0)[good], truth.noise[good], rtol=0.1, atol=0.3)
    physics = content.frames[content.trigger == TRIGGER_CODES["physics"]]
    occupancy = (physics > 400).mean(0)
    assert occupancy[truth.status == 3].min() > 0.3 and np.median(occupancy) < 0.02


def test_corrupt_raw_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "run1_ls0001.h5"
    bad.write_bytes(b"\x89HDF garbage")
    with pytest.raises(RawFileError, match=str(bad)):
        read_raw_ls(bad)


@pytest.mark.slow
def test_quickstart_play_end_to_end_over_http(tmp_path: Path) -> None:
    """`calloop registry serve` + `calloop sim play quickstart --speed 50`, real processes."""
    state, port_file, raw = tmp_path / "state.json", tmp_path / "port", tmp_path / "raw"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loop.cli",
            "registry",
            "serve",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--state",
            str(state),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        played = run_cli(
            "sim",
            "play",
            str(QUICKSTART),
            "--speed",
            "50",
            "--state",
            str(state),
            "--raw-root",
            str(raw),
            timeout=120,
        )
        assert played.returncode == 0, played.stderr
        scenario = load_scenario(QUICKSTART)
        with RegistryClient(url) as client:
            runs = {r.run_number: r for r in client.runs(datetime.now(UTC) - timedelta(hours=1))}
            assert set(runs) == {r.run_number for r in scenario.runs}
            for spec in scenario.runs:
                run = runs[spec.run_number]
                assert run.ended and run.run_type == spec.run_type
                assert run.last_lumisection_number == spec.ls_count
                assert len(client.lumisections(spec.run_number)) == spec.ls_count
                for detector, det_spec in scenario.detectors.items():
                    for ls in range(1, spec.ls_count + 1):
                        content = read_raw_ls(raw_path(raw, detector, spec.run_number, ls))
                        assert content.frames.shape == (det_spec.events_per_ls, det_spec.channels)
                        assert (content.run, content.ls, content.detector) == (
                            spec.run_number,
                            ls,
                            detector,
                        )
        for detector, det_spec in scenario.detectors.items():
            truth = load_truth(raw / detector)
            assert int((truth.status == 1).sum()) == det_spec.dead
            assert not list((raw / detector).rglob("*.tmp"))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    assert server.returncode == 0
    assert os.path.exists(state)
