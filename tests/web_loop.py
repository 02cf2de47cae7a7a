"""Fixtures of the control-room tests and benchmark: a live loop (registry, six daemons,
a tiny scenario, ``calloop web``, each its own process, as ``calloop demo`` runs them),
journals filled with a long synthetic history, and headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loop.conddb.db import ConditionsDatabase
from loop.config import LoopConfig, load_loop_config
from loop.demo import (
    ProcessGroup,
    set_registry_url,
    start_daemons,
    start_registry,
    wait_running,
    write_workspace,
)
from loop.journal import JobPhase, Journal
from loop.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("CALLOOP_ARTIFACTS", REPO / "tests" / "artifacts")) / "web"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CALIBRATIONS = ("EcalPedestals", "SiStripBad")

# one short collision run: both calibrations process it, in a few seconds
TINY_SCENARIO = {
    "name": "web",
    "description": "one short collision run for the control-room tests",
    "seed": 7,
    "detectors": {
        "ecal": {"channels": 64, "events_per_ls": 80, "dead": 1, "noisy": 1, "hot": 0},
        "sistrip": {"channels": 64, "events_per_ls": 80, "dead": 1, "noisy": 1, "hot": 1},
    },
    "runs": [
        {
            "run_number": 386001,
            "start": 1,
            "run_type": "collisions",
            "ls_seconds": 10,
            "ls_count": 4,
        }
    ],
}
RUN = 386001


@dataclass
class LiveLoop:
    """The processes of a live loop and what a test needs to talk to them."""

    root: Path
    loop_yaml: Path
    loop_config: LoopConfig
    group: ProcessGroup
    web_url: str
    operator_token: str
    uploader_token: str
    scenario: Path

    def play(self, speed: float = 10.0) -> None:
        """Start the scenario player (a process; it ends with the scenario)."""
        self.group.start(
            "player",
            "sim",
            "play",
            str(self.scenario),
            "--speed",
            str(speed),
            "--state",
            str(self.root / "registry_state.json"),
            "--raw-root",
            str(self.loop_config.raw_root),
        )

    def stop(self) -> dict[str, int | None]:
        """Stop every process (web, daemons, player, registry)."""
        return self.group.stop_all()


def start_live_loop(root: Path) -> LiveLoop:
    """Registry, daemons and ``calloop web`` running; the scenario not yet played."""
    scenario = root / "web_scenario.yaml"
    scenario.write_text(yaml.safe_dump(TINY_SCENARIO))
    loop_yaml = write_workspace(root, scenario=load_scenario(scenario))
    group = ProcessGroup(root / "processes")
    try:
        set_registry_url(loop_yaml, start_registry(group, root))
        loop_config = load_loop_config(loop_yaml)
        operator, uploader = make_tokens(loop_config.conddb_url)
        start_daemons(group, loop_yaml, list(CALIBRATIONS))
        wait_running(group, loop_config)
        web = _start_web(group, root, loop_yaml)
    except BaseException:
        group.stop_all()
        raise
    return LiveLoop(root, loop_yaml, loop_config, group, web, operator, uploader, scenario)


def _start_web(group: ProcessGroup, root: Path, loop_yaml: Path, timeout: float = 120.0) -> str:
    """``calloop web`` on a free port; its URL once it listens (a loaded CI machine may
    take tens of seconds to import FastAPI and friends)."""
    port_file = root / "web.port"
    process = group.start(
        "web", "web", "--config", str(loop_yaml), "--port", "0", "--port-file", str(port_file)
    )
    wait_for(
        lambda: port_file.exists() or process.poll() is not None, timeout, "calloop web listening"
    )
    if process.poll() is not None:
        raise AssertionError(f"calloop web exited {process.returncode}: see {group.log_dir}")
    return f"http://127.0.0.1:{port_file.read_text().strip()}"


def make_tokens(database_url: str) -> tuple[str, str]:
    """An operator token (may act in the control room) and an uploader token (may not)."""
    database = ConditionsDatabase(database_url)
    try:
        database.create_schema()
        operator = database.create_token("shift-operator", ["none"], role="operator")
        uploader = database.create_token("loop-uploader", ["Ecal*"])
    finally:
        database.close()
    return operator, uploader


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


# ------------------------------------------------------------------ long histories

STEP4_PATH = (
    "NotRunning",
    "WaitingForFiles",
    "CheckingFiles",
    "PreparingFinalFiles",
    "PreparingHarvestingJobs",
    "LaunchingHarvestingJobs",
    "WaitingForHarvest",
    "Uploading",
    "Cleanup",
    "Done",
)


def fill_journals(
    loop_config: LoopConfig, calibration: str, runs: int, first: int = 100000
) -> None:
    """Journals of every step holding ``runs`` runs as the daemons leave them: each with
    its state history, two succeeded jobs and (step 4) a stored version and a done
    upload; the newest five still in flight. The schema is :class:`Journal`'s; the rows
    go in with one bulk transaction per journal (10^4 runs in seconds)."""
    directory = loop_config.work_dir / calibration
    numbers = range(first, first + runs)
    start = time.time() - 60.0 * runs  # a run a minute
    for step in ("step2", "step3", "step4"):
        path = directory / f"{step}.journal.sqlite"
        Journal(path).close()  # creates the schema
        rows = [
            _run_rows(step, run, start + 60.0 * i, run >= first + runs - 5)
            for i, run in enumerate(numbers)
        ]
        db = sqlite3.connect(path)
        try:
            with db:
                db.executemany(
                    "INSERT INTO runs (run, state, info, first_seen, updated, active) "
                    "VALUES (?,?,?,?,?,?)",
                    [x for r in rows for x in r["run"]],
                )
                db.executemany(
                    "INSERT INTO history (run, state, time) VALUES (?,?,?)",
                    [h for r in rows for h in r["history"]],
                )
                db.executemany(
                    "INSERT INTO jobs (run, batch, state, attempts, job_dir, argv, exit_code, "
                    "submitted, finished) VALUES (?,?,?,?,?,?,?,?,?)",
                    [j for r in rows for j in r["jobs"]],
                )
                db.executemany(
                    "INSERT INTO uploads (run, seq, tag, since, payload, version, state, "
                    "created) VALUES (?,?,?,?,?,?,?,?)",
                    [u for r in rows for u in r["uploads"]],
                )
        finally:
            db.close()


def _run_rows(step: str, run: int, at: float, in_flight: bool) -> dict[str, list[Any]]:
    path = STEP4_PATH[:5] if in_flight else STEP4_PATH
    final = step == "step4" and not in_flight
    version = f"v{run % 1_000_000:06d}"
    info = (
        {"last_version": version, "accepted_version": version, "accepted_harvest": 2}
        if final
        else {}
    )
    job_dir = f"/nonexistent/run{run}/{step}"
    return {
        "run": [(run, path[-1], json.dumps(info), at, at + len(path), int(in_flight))],
        "history": [(run, state, at + k) for k, state in enumerate(path)],
        "jobs": [
            (run, b, JobPhase.SUCCEEDED.value, 1, f"{job_dir}/batch{b:04d}", "[]", 0, at, at + 1)
            for b in (1, 2)
        ],
        "uploads": [(run, 2, "T", run, "/nonexistent", version, "done", at)] if final else [],
    }


# ------------------------------------------------------------------------- browser


def chromium_binary() -> str | None:
    """Debian's chromium (or another Chrome), if installed."""
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def chromedriver_binary() -> str | None:
    """Debian's chromium-driver, if installed."""
    return shutil.which("chromedriver")


def chrome() -> Any:
    """Headless Chromium under Selenium, with its own fresh profile (root needs
    --no-sandbox; nothing is fetched: no updates, no sync, no first-run page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary() or "chromium"
    profile = tempfile.mkdtemp(prefix="calloop-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=chromedriver_binary() or "chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.calloop_profile = profile  # removed by quit_chrome
    return driver


def quit_chrome(driver: Any) -> None:
    """Quit the browser and remove its profile."""
    profile = getattr(driver, "calloop_profile", None)
    driver.quit()
    if profile:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> Path:
    """Save the page as ``<artifacts>/web/<name>.png``; returns the path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
