"""``calloop stepN --all``: one process hosting one step of every calibration, with the
failures and the log files of each calibration kept to itself."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from loop.commands.systemd_cmd import TARGET
from loop.config import LoopConfig, dump_yaml, load_loop_config
from loop.daemon import Daemon, daemon_lock, status_path
from loop.demo import ProcessGroup, is_complete, set_registry_url, start_registry, write_workspace
from loop.hosting import Backoff, Host
from loop.logs import HOST_LOG_DIR, get_logger, setup_hosted_logging, setup_logging
from loop.sim.scenario import load_scenario
from states.step3 import Step3
from tests.conftest import have, require, run_cli
from tests.helpers import workspace

STEPS = ("step2", "step3", "step4")
SCENARIO = {
    "name": "hosted",
    "description": "one short collision run",
    "seed": 7,
    "detectors": {
        stream: {"channels": 64, "events_per_ls": 60, "dead": 1, "noisy": 1, "hot": 1}
        for stream in ("ecal", "sistrip")
    },
    "runs": [{"run_number": 1001, "start": 1, "ls_seconds": 4, "ls_count": 3}],
}


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "logs"
    setup_logging(None, "test", "none", console=False)  # detach the files again


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Until ``condition()``; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.05)


def status(loop_config: LoopConfig, calibration: str, step: str) -> dict[str, object]:
    """A daemon's status file ({} while there is none)."""
    try:
        loaded: dict[str, object] = json.loads(
            status_path(loop_config, calibration, step).read_text()
        )
    except (OSError, ValueError):
        return {}
    return loaded


def keep_only(loop_config: LoopConfig, *names: str) -> None:
    """Remove the workspace's other calibration YAMLs (the shipped set may grow)."""
    for path in loop_config.calibrations_dir.glob("*.yaml"):
        if path.stem not in names:
            path.unlink()


def break_yaml(loop_config: LoopConfig, name: str) -> Path:
    """A calibration ``name`` whose YAML has a misspelt key (and is otherwise valid)."""
    path = fix_yaml(loop_config, name)
    data = yaml.safe_load(path.read_text())
    data["step2"]["max_ls_per_jb"] = data["step2"].pop("max_ls_per_job")
    dump_yaml(path, data)
    return path


def fix_yaml(loop_config: LoopConfig, name: str) -> Path:
    """A valid calibration ``name``: EcalPedestals under its own detector and tag."""
    directory = loop_config.calibrations_dir
    data = yaml.safe_load((directory / "EcalPedestals.yaml").read_text())
    data.update(name=name, detector="ecal-0099")
    data["payload"]["destination_tag"] = f"{name}_prompt_v1"
    dump_yaml(directory / f"{name}.yaml", data)
    return directory / f"{name}.yaml"


def jsonl_calibrations(path: Path) -> set[str]:
    """The calibrations named by the records of a JSON-lines log file."""
    return {json.loads(line).get("calibration") for line in path.read_text().splitlines()}


# ----------------------------------------------------------------- log routing


def test_records_go_to_the_files_of_their_calibration(log_dir: Path) -> None:
    router = setup_hosted_logging(log_dir, "step2", console=False)
    assert router is not None
    get_logger("calloop.step2").bind(calibration="CalA", step="step2").info("a-msg", run=1)
    get_logger("calloop.step2").bind(calibration="CalB").warning("b-msg")

    def library_call() -> None:  # a hosted daemon's thread: its context names it
        structlog.contextvars.bind_contextvars(calibration="CalB", step="step2")
        logging.getLogger("urllib3.connectionpool").warning("lib-msg")

    thread = threading.Thread(target=library_call)
    thread.start()
    thread.join()
    get_logger("calloop.step2").info("host-msg")  # no calibration: the host's files
    get_logger("calloop.step2").bind(calibration="../escape").info("odd-msg")

    a_all = (log_dir / "CalA" / "step2_ALL.log").read_text()
    assert "a-msg" in a_all and "calibration=CalA step=step2 run=1" in a_all
    assert "b-msg" not in a_all and "lib-msg" not in a_all and "host-msg" not in a_all
    b_warning = (log_dir / "CalB" / "step2_WARNING.log").read_text()
    assert "b-msg" in b_warning and "lib-msg" in b_warning
    assert "a-msg" not in (log_dir / "CalB" / "step2_ALL.log").read_text()
    assert jsonl_calibrations(log_dir / "CalA" / "step2.jsonl") == {"CalA"}
    assert jsonl_calibrations(log_dir / "CalB" / "step2.jsonl") == {"CalB"}
    host = (log_dir / HOST_LOG_DIR / "step2_ALL.log").read_text()
    assert "host-msg" in host and "odd-msg" in host and "a-msg" not in host
    assert not (log_dir.parent / "escape").exists()

    router.close_calibration("CalA")  # no longer hosted: files closed, reopened on need
    get_logger("calloop.step2").bind(calibration="CalA").error("again")
    assert "again" in (log_dir / "CalA" / "step2_ERROR.log").read_text()


# ------------------------------------------------------- isolation, in-process


def test_failures_stay_with_their_calibration_and_are_retried(
    tmp_path: Path, log_dir: Path
) -> None:
    """Step 3 needs no service: a host over a workspace where one YAML is invalid and
    one calibration's lock is held by a daemon of its own; the third runs throughout."""
    loop_config = workspace(tmp_path)
    keep_only(loop_config, "EcalPedestals", "SiStripBad")
    setup_hosted_logging(loop_config.log_dir, "step3", console=False)
    broken = break_yaml(loop_config, "Broken")
    other = daemon_lock(loop_config, "SiStripBad", "step3")
    other.acquire(0)  # "another step3 daemon runs for SiStripBad"
    host = Host("step3", loop_config, backoff=Backoff(first_s=0.05, max_s=0.2))
    state = lambda name: status(loop_config, name, "step3").get("state")  # noqa: E731
    try:
        host.initialize()
        wait_for(lambda: state("EcalPedestals") == "running", "EcalPedestals running")
        assert state("Broken") == "failed"
        error = str(status(loop_config, "Broken", "step3")["error"])
        assert str(broken) in error and "max_ls_per_jb" in error
        broken_log = (loop_config.log_dir / "Broken" / "step3_ERROR.log").read_text()
        assert "max_ls_per_jb" in broken_log and "retry_in_s=" in broken_log
        assert state("SiStripBad") is None  # the lock's holder owns the status file

        def retried() -> bool:
            host.loop(time.time())
            host.pause(0.05)
            every = loop_config.log_dir / "SiStripBad" / "step3_ALL.log"  # repeats too
            return every.exists() and every.read_text().count("another step3 daemon") >= 2

        wait_for(retried, "SiStripBad retried while its lock is held")
        other.release()
        fix_yaml(loop_config, "Broken")
        host.request_reload()  # retries the failed ones at once

        def running(*names: str) -> Callable[[], bool]:
            def check() -> bool:
                host.loop(time.time())
                host.pause(0.05)
                return all(state(name) == "running" for name in names)

            return check

        wait_for(running("Broken", "SiStripBad"), "every calibration hosted")
        assert (
            "calibration not running"
            not in (loop_config.log_dir / "EcalPedestals" / "step3_ALL.log").read_text()
        )

        broken.unlink()  # removed from the configuration: stopped cleanly on reload
        host.request_reload()
        wait_for(
            lambda: running()() and "Broken" not in host.hosted and state("Broken") == "stopped",
            "Broken stopped after its YAML was removed",
        )
    finally:
        other.release()
        host.shutdown()
    assert {state(name) for name in ("EcalPedestals", "SiStripBad")} == {"stopped"}


def test_a_daemon_that_dies_is_started_again(
    tmp_path: Path, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error outside the cycle (here: its wait) ends the daemon's thread: logged with
    its traceback in the calibration's files, retried, running again."""
    loop_config = workspace(tmp_path)
    keep_only(loop_config, "EcalPedestals")
    setup_hosted_logging(loop_config.log_dir, "step3", console=False)
    failures = iter(["once"])
    pause = Daemon.pause

    def failing_pause(daemon: Daemon, ping_in: float = math.inf) -> None:
        if next(failures, None):
            raise RuntimeError("the wait broke")
        pause(daemon, ping_in)

    monkeypatch.setattr(Daemon, "pause", failing_pause)
    host = Host("step3", loop_config, backoff=Backoff(first_s=0.05, max_s=0.2))
    errors = loop_config.log_dir / "EcalPedestals" / "step3_ERROR.log"

    def running_again() -> bool:
        host.loop(time.time())
        host.pause(0.05)
        failed_once = host.hosted["EcalPedestals"].delay is not None
        return (
            failed_once and status(loop_config, "EcalPedestals", "step3").get("state") == "running"
        )

    try:
        host.initialize()
        wait_for(running_again, "EcalPedestals failed once, then running")
    finally:
        host.shutdown()
    assert "daemon stopped by an unexpected error" in errors.read_text()
    assert "RuntimeError: the wait broke" in (errors.parent / "step3_ALL.log").read_text()


def test_a_hung_cycle_stops_the_watchdog_pings(
    tmp_path: Path, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle running longer than the watchdog's timeout is reported once, and the
    host stops pinging (systemd restarts it) until the cycle completes."""
    loop_config = workspace(tmp_path)
    keep_only(loop_config, "EcalPedestals")
    setup_hosted_logging(loop_config.log_dir, "step3", console=False)
    entered, release = threading.Event(), threading.Event()
    tick = Step3.tick

    def hanging_tick(step: Step3, now: float) -> None:
        entered.set()
        release.wait()
        tick(step, now)

    monkeypatch.setattr(Step3, "tick", hanging_tick)
    elapsed = [0.0]  # the monotonic clock, moved ahead by the test
    host = Host("step3", loop_config, monotonic=lambda: time.monotonic() + elapsed[0])
    try:
        host.initialize()
        assert entered.wait(30), "the first cycle did not begin"
        assert not host.hung(600.0) and not host.hung(None)
        elapsed[0] = 601.0
        assert host.hung(600.0) and host.hung(600.0)
        assert not host.hung(None)  # no watchdog: nobody to tell
        release.set()
        wait_for(lambda: not host.hung(600.0), "the cycle completed")
    finally:
        release.set()
        host.shutdown()
    every = (loop_config.log_dir / "EcalPedestals" / "step3_ALL.log").read_text()
    assert every.count("cycle hung") == 1


# ------------------------------------------------------------ real processes


def test_three_hosts_run_two_calibrations_end_to_end(tmp_path: Path) -> None:
    """``calloop step2|step3|step4 --all`` as real processes over two calibrations and
    a third whose YAML is invalid: the two process the run to Done, each in its own
    log files; the third is reported, then hosted once fixed and SIGHUP sent."""
    scenario_path = tmp_path / "scenario.yaml"
    scenario_path.write_text(yaml.safe_dump(SCENARIO))
    scenario = load_scenario(scenario_path)
    loop_yaml = write_workspace(tmp_path, scenario=scenario)
    group = ProcessGroup(tmp_path / "processes", cwd=tmp_path)
    loop_config = load_loop_config(loop_yaml)
    calibrations = ["EcalPedestals", "SiStripBad"]
    keep_only(loop_config, *calibrations)
    try:
        set_registry_url(loop_yaml, start_registry(group, tmp_path))
        break_yaml(loop_config, "Broken")
        hosts = {
            step: group.start(f"all-{step}", step, "--all", "--config", str(loop_yaml))
            for step in STEPS
        }
        player = group.start(
            "player", "sim", "play", str(scenario_path), "--speed", "4",
            "--state", str(tmp_path / "registry_state.json"),
            "--raw-root", str(loop_config.raw_root),
        )  # fmt: skip
        wait_for(
            lambda: player.poll() is not None and is_complete(loop_config, scenario, calibrations),
            "both calibrations Done in every step",
            timeout=120,
        )
        answer = run_cli("status", "--config", str(loop_yaml), "--json")
        assert answer.returncode == 1  # a failed calibration needs an operator
        rows = {(r["calibration"], r["step"]): r for r in json.loads(answer.stdout)}
        for step, proc in hosts.items():
            assert rows[("Broken", step)]["state"] == "failed"
            assert "max_ls_per_jb" in rows[("Broken", step)]["error"]
            for name in calibrations:
                assert rows[(name, step)]["pid"] == proc.pid and rows[(name, step)]["alive"]
        for name in calibrations:
            directory = loop_config.log_dir / name
            for step in STEPS:
                assert "daemon started" in (directory / f"{step}_INFO.log").read_text()
                assert jsonl_calibrations(directory / f"{step}.jsonl") == {name}

        fix_yaml(loop_config, "Broken")
        for proc in hosts.values():
            proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: all(
                status(loop_config, "Broken", step).get("state") == "running"
                and status(loop_config, "Broken", step).get("pid") == proc.pid
                for step, proc in hosts.items()
            ),
            "Broken hosted after the fix and SIGHUP",
        )
    finally:
        codes = group.stop_all()
    assert all(codes[f"all-{step}"] == 0 for step in STEPS), codes
    for step in STEPS:
        assert status(loop_config, "EcalPedestals", step)["state"] == "stopped"


# --------------------------------------------------------------------- systemd


def test_systemd_install_hosted_writes_one_unit_per_step(tmp_path: Path) -> None:
    workspace(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    config = tmp_path / "config" / "loop.yaml"
    result = run_cli(
        "systemd", "install", "--hosted", "--config", str(config),
        "--unit-dir", str(units), "--prefix", sys.prefix,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in units.iterdir())
    assert names == sorted([*(f"calloop-{step}-all.service" for step in STEPS), TARGET])
    for step in STEPS:
        text = (units / f"calloop-{step}-all.service").read_text()
        assert f"bin/calloop {step} --all --config {config.resolve()}\n" in text
        assert "%i" not in text
    wants = [line for line in (units / TARGET).read_text().splitlines() if "Wants=" in line]
    assert wants == ["Wants=" + " ".join(f"calloop-{step}-all.service" for step in STEPS)]
    require("systemd-analyze", have("systemd-analyze"), "apt-get install systemd")
    verify = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in units.iterdir())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
