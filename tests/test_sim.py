"""The simulated experiment: scenarios, detector content, the conditions-DB fault proxy,
and real end-to-end plays."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests

from loop.conddb.db import ConditionsDatabase
from loop.config import load_all_calibrations, load_loop_config
from loop.demo import format_table, run_demo
from loop.errors import ScenarioError
from loop.rawformat import TRIGGER_CODES, RawFileError, raw_path, read_raw_ls
from loop.registry import RegistryClient
from loop.sim.detector import generate_ls, load_truth, make_truth
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import DetectorSpec, load_scenario, timeline
from loop.sim.state import RegistryState
from loop.store import CalibStore
from tests.conftest import CONFIG_DIR, run_cli
from tests.test_upload_exactly_once import Stack, serve_behind_proxy, wait_for

QUICKSTART = CONFIG_DIR / "scenarios" / "quickstart.yaml"
CONDDB_FAULTS = CONFIG_DIR / "scenarios" / "conddb_faults.yaml"


def test_shipped_scenarios_are_valid() -> None:
    for path in (CONFIG_DIR / "scenarios").glob("*.yaml"):
        assert load_scenario(path).runs
    assert load_scenario(CONFIG_DIR / "scenarios" / "faults.yaml").faults_of("registry")
    assert load_scenario(CONDDB_FAULTS).faults_of("conddb")


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


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("{kind: hang, start: 0, duration: 1}", "registry faults are"),
        ("{target: conddb, kind: malformed, start: 0, duration: 1}", "conddb faults are"),
        ("{target: oms, kind: refuse, start: 0, duration: 1}", r"faults\.0\.target"),
    ],
    ids=["hang-is-not-a-registry-fault", "malformed-is-not-a-conddb-fault", "unknown-target"],
)
def test_fault_kind_must_fit_its_target(tmp_path: Path, fault: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndetectors: {ecal: {}}\nruns: [{run_number: 1, start: 0, ls_count: 1}]\n"
        f"faults: [{fault}]\n"
    )
    with pytest.raises(ScenarioError, match=message):
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
    result = run_cli("sim", "play", str(CONDDB_FAULTS), "--dry-run")
    assert "conddb fault hang for 80 s" in result.stdout
    assert "conddb fault http_error (HTTP 503)" in result.stdout


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
            listing = client.runs(datetime.now(UTC) - timedelta(hours=1))
            assert listing.rejected == []
            runs = {r.run_number: r for r in listing.records}
            assert set(runs) == {r.run_number for r in scenario.runs}
            for spec in scenario.runs:
                run = runs[spec.run_number]
                assert run.ended and run.run_type == spec.run_type
                assert run.last_lumisection_number == spec.ls_count
                assert len(client.lumisections(spec.run_number).records) == spec.ls_count
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


# --------------------------------------------------------------- conditions-DB proxy


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with serve_behind_proxy(tmp_path) as served:
        yield served


def _upload(stack: Stack, key: str, timeout: float = 10) -> requests.Response:
    body = {
        "metadata": {
            "destinationTags": {stack.tag: {}},
            "since": 386001,
            "idempotencyKey": key,
            "harvestSequence": 1,
        },
        "streamer_info": "raw-bytes",
        "payload_b64": "AAEC",
    }
    headers = {"Authorization": f"Bearer {stack.token}"}
    return requests.post(
        f"{stack.proxy.url}/api/v1/upload", json=body, headers=headers, timeout=timeout
    )


def test_proxy_answers_http_error_and_auth_faults_itself(stack: Stack) -> None:
    tags = f"{stack.proxy.url}/api/v1/tags"
    assert requests.get(tags, timeout=10).status_code == 200  # no fault: forwarded
    stack.fault("http_error", 30)
    assert requests.get(tags, timeout=10).status_code == 503
    assert _upload(stack, "k1").status_code == 503
    stack.fault("auth", 30)
    refused = _upload(stack, "k2")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(tags, timeout=10).status_code == 200  # reads are open
    assert stack.reached("POST") == [] and stack.history() == []


def test_proxy_refuses_connections_during_the_window(stack: Stack) -> None:
    end = stack.fault("refuse", 1.0)
    time.sleep(0.3)  # the serving loop closes the socket within its check period
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{stack.proxy.url}/api/v1/tags", timeout=5)
    wait_for(lambda: time.time() > end + 0.3)
    assert _upload(stack, "k1").status_code == 200
    assert len(stack.history()) == 1


def test_proxy_timeout_holds_then_loses_the_request(stack: Stack) -> None:
    stack.fault("timeout", 0.6)
    started = time.monotonic()
    assert _upload(stack, "k1").status_code == 504
    assert time.monotonic() - started > 0.5
    assert stack.reached("POST") == [] and stack.history() == []


def test_proxy_hang_forwards_late_and_in_arrival_order(stack: Stack) -> None:
    """A held upload reaches the service after its window; a look-up sent after it
    waits behind it, so it finds the upload applied."""
    stack.fault("hang", 0.8)
    started = time.monotonic()
    replies: dict[str, requests.Response] = {}

    def post() -> None:
        replies["post"] = _upload(stack, "k1")

    poster = threading.Thread(target=post)
    poster.start()
    time.sleep(0.2)
    lookup = requests.get(f"{stack.proxy.url}/api/v1/uploads/k1", timeout=10)
    poster.join(timeout=10)
    assert replies["post"].status_code == 200 and time.monotonic() - started > 0.7
    assert lookup.status_code == 200 and lookup.json() == replies["post"].json()[0]
    [post_at] = stack.reached("POST /api/v1/upload")
    [lookup_at] = stack.reached("GET /api/v1/uploads/")
    assert post_at - started > 0.7 and post_at < lookup_at


def test_registry_and_proxy_ignore_each_others_faults(stack: Stack) -> None:
    registry = RegistryServer(stack.state_file).start_background()
    try:
        now = time.time()
        for target in ("conddb", "registry"):
            RegistryState(
                faults=[{"target": target, "kind": "refuse", "start": now, "end": now + 30}]
            ).save(stack.state_file)
            time.sleep(0.3)  # both serving loops look at the state file
            other = registry.url if target == "conddb" else stack.proxy.url
            assert requests.get(f"{other}/api/v1/runs", timeout=5).status_code < 500
    finally:
        registry.stop()


@pytest.mark.slow
def test_conddb_faults_through_the_demo(tmp_path: Path) -> None:
    """The demo with step 4 uploading through the fault proxy: every run processed and
    matching the truth, each IOV from one keyed upload, the IOVs of a run in harvest
    order, and the newest harvest resolving."""
    rows, ok, _seconds = run_demo(tmp_path, CONDDB_FAULTS, speed=25, timeout_s=100)
    assert ok, format_table(rows)
    proxy_log = (tmp_path / "processes" / "conddb-proxy.out").read_text()
    assert "kind=auth" in proxy_log  # run 388002's final upload always meets it
    path = tmp_path / "conddb.sqlite"
    db = ConditionsDatabase(f"sqlite:///{path}")
    loop_config = load_loop_config(tmp_path / "config" / "loop.yaml")
    store = CalibStore(loop_config.store_root)
    with sqlite3.connect(path) as raw:
        outcomes = raw.execute(
            "SELECT tag_name, result_since, payload_hash, sequence FROM upload_request "
            "WHERE status = 'inserted'"
        ).fetchall()
    for cal in load_all_calibrations(loop_config.calibrations_dir)[0].values():
        tag = cal.payload.destination_tag
        history = db.iovs(tag, history=True)
        sequence = {(since, h): seq for t, since, h, seq in outcomes if t == tag}
        assert len(sequence) == len(history), (tag, sequence, history)  # one key each
        assert max(Counter((i.since, i.payload_hash) for i in history).values()) == 1
        for spec in load_scenario(CONDDB_FAULTS).runs:
            run = spec.run_number
            order = [sequence[run, i.payload_hash] for i in history if i.since == run]
            assert order == sorted(order), (tag, run, order)  # never an older one after
            resolved = db.resolve(tag=tag, run=run)
            final = store.detector(cal.detector).get(cal.payload.ctype, run=run)
            assert np.array_equal(db.payload(resolved.payload_hash).array(), final.array)
    store.close()
    db.close()
