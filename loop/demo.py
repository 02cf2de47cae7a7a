"""``calloop demo``: the whole loop on one machine, end to end, as separate processes.

A fresh work directory gets a loop.yaml and the shipped calibrations; the simulated
registry, the six daemons (two calibrations x three steps) and the scenario player
run as their own processes; when every run is processed the daemons are stopped with
SIGTERM and the results are compared with the simulator's truth.

Step 4 writes to the conditions DB (SQLite) directly, unless the scenario has faults
aimed at ``conddb``: then the database is served by ``calloop conddb serve`` behind the
fault proxy (``calloop sim conddb-proxy``), and step 4 uploads through the proxy with a
token, so that the faults hit real HTTP uploads.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loop.conddb.client import Conditions, ConditionsDB
from loop.conddb.db import ConditionsDatabase
from loop.config import (
    CalibrationConfig,
    LoopConfig,
    dump_yaml,
    load_all_calibrations,
    load_loop_config,
)
from loop.errors import CalloopError, StoreError
from loop.fsutil import atomic_write_text
from loop.journal import Journal
from loop.sim.scenario import Scenario, load_scenario
from loop.sim.truth import compare
from loop.store import CalibStore

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config"
FINAL_STEP2 = ("Done", "Skipped")
FINAL_LATER = ("Done", "Rejected", "UploadRefused")  # steps 3 and 4 (only step 4 rejects)


def write_workspace(
    root: Path,
    *,
    backend: str = "local",
    registry_port: int = 0,
    calibrations_from: Path = REPO_CONFIG / "calibrations",
    scenario: Scenario | None = None,
) -> Path:
    """A self-contained config directory under ``root``; returns its loop.yaml path.

    With ``scenario``, only the calibrations of the streams it simulates are copied (with
    those depending on them): the others' daemons would wait for files that never come.
    Each one's ``raw_input.channels`` is set to the channel
    count of its stream's simulated detector, and the waits its faults provoke are cut
    to the demo's time: ``timeouts.job_s`` to :data:`HUNG_JOB_S` if it hangs jobs, each
    ``step2.max_wait_s`` to :data:`MISSING_LS_WAIT_S` if LS files come late or never.
    """
    config_dir = root / "config"
    shutil.copytree(calibrations_from, config_dir / "calibrations", dirs_exist_ok=True)
    if scenario is not None:
        _fit_calibrations(config_dir / "calibrations", scenario)
    loop_yaml = config_dir / "loop.yaml"
    dump_yaml(
        loop_yaml,
        {
            "work_dir": str(root / "work"),
            "raw_root": str(root / "raw"),
            "log_dir": str(root / "logs"),
            "store_root": str(root / "calib"),
            "registry_url": f"http://127.0.0.1:{registry_port}",
            "conddb_url": f"sqlite:///{root / 'conddb.sqlite'}",
            "lookback_hours": 8,
            "poll": {"registry_s": 0.5, "observer": "inotify", "tick_s": 0.1, "heartbeat_s": 0.5},
            "timeouts": {
                "registry_s": 2,
                "registry_attempts": 2,
                "registry_backoff_s": 0.2,
                # for uploads over HTTP (conditions-DB fault scenarios): short, so that
                # a hang window outlasts an attempt and the service applies it late
                "conddb_s": 1,
                "conddb_attempts": 3,
                "conddb_deadline_s": 8,
                "job_s": HUNG_JOB_S if scenario and _hangs_jobs(scenario) else 300,
            },
            "jobs": {
                "backend": backend,
                "max_attempts": 3,
                "retry_backoff_s": 0.5,
                "local": {"max_parallel": 2},
            },
        },
    )
    return loop_yaml


HUNG_JOB_S = 20
"""``timeouts.job_s`` of a demo whose scenario hangs jobs: each hung attempt costs this."""
MISSING_LS_WAIT_S = 15
"""``step2.max_wait_s`` of a demo whose scenario delays or drops LS files: how long step
2 waits for them after the run ended (a late file must come within it)."""


def _hangs_jobs(scenario: Scenario) -> bool:
    return any(fault.kind == "hang" for fault in scenario.job_faults())


def _fit_calibrations(directory: Path, scenario: Scenario) -> None:
    import yaml

    waits = any(f.kind in ("late", "never") for f in scenario.raw_faults().values())
    documents = {
        path: yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yaml"))
    }
    for path in _unfed(documents, set(scenario.detectors)):
        path.unlink()
        del documents[path]
    for path, data in documents.items():
        stream = _stream(data)
        if stream in scenario.detectors:
            data["raw_input"]["channels"] = scenario.detectors[stream].channels
        if waits:
            step2 = data.setdefault("step2", {})
            step2["max_wait_s"] = min(step2.get("max_wait_s", MISSING_LS_WAIT_S), MISSING_LS_WAIT_S)
        if stream in scenario.detectors or waits:
            dump_yaml(path, data)


def _stream(data: Any) -> str | None:
    """The raw stream a parsed calibration file names (None: it names none)."""
    raw_input = (data or {}).get("raw_input") or {}
    return raw_input.get("stream") if isinstance(raw_input, dict) else None


def _unfed(documents: dict[Path, Any], streams: set[str]) -> list[Path]:
    """The calibration files (parsed) whose raw stream is not in ``streams``, and those
    depending on one of them, directly or not."""
    name_of = {path: path.stem for path in documents}
    dropped = {path for path, data in documents.items() if _stream(data) not in (None, *streams)}
    while True:
        names = {name_of[path] for path in dropped}
        more = {
            path
            for path, data in documents.items()
            if path not in dropped and names & set((data or {}).get("depends_on") or [])
        }
        if not more:
            return sorted(dropped)
        dropped |= more


@dataclass
class ProcessGroup:
    """Child processes of the demo, each with its output in a log file."""

    log_dir: Path
    # the children's working directory: ``python -m`` puts it first on sys.path, so a
    # source checkout there would shadow the calloop under test (None: inherit)
    cwd: Path | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``python -m loop.cli ARGS`` as a child named ``name``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 (closed in stop_all)
        self._files.append(out)
        proc = subprocess.Popen(
            [sys.executable, "-m", "loop.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
        )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM one child and wait for it (SIGKILL after ``timeout``)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        """Stop every child; returns their exit codes."""
        # newest first: daemons stop before the registry they poll
        codes = {name: self.stop(name, timeout) for name in reversed(list(self.procs))}
        for handle in self._files:
            handle.close()
        return codes


def start_daemons(group: ProcessGroup, loop_yaml: Path, calibrations: list[str]) -> None:
    """The three daemons of every calibration."""
    for name in calibrations:
        for step in ("step2", "step3", "step4"):
            group.start(f"{name}-{step}", step, "-c", name, "--config", str(loop_yaml), "--quiet")


def wait_running(group: ProcessGroup, loop_config: LoopConfig, timeout: float = 30.0) -> None:
    """Wait until every daemon child has published a running status under its own pid."""
    deadline = time.monotonic() + timeout
    for name, proc in group.procs.items():
        calibration, _, step = name.rpartition("-")
        if step not in ("step2", "step3", "step4"):
            continue
        path = loop_config.work_dir / calibration / f"{step}.status.json"
        while time.monotonic() < deadline:
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                status = {}
            if status.get("pid") == proc.pid and status.get("state") == "running":
                break
            time.sleep(0.05)


def start_listener(group: ProcessGroup, name: str, port_file: Path, *args: str) -> str:
    """Start a server child given ``--port 0 --port-file port_file``; returns its URL
    once it listens."""
    group.start(name, *args, "--port", "0", "--port-file", str(port_file))
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline or group.procs[name].poll() is not None:
            raise CalloopError(f"{name} did not start within 30 s (see {group.log_dir})")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port_file.read_text().strip()}"


def start_registry(group: ProcessGroup, root: Path) -> str:
    """The simulated registry on a free port; returns its URL."""
    state = str(root / "registry_state.json")
    return start_listener(
        group, "registry", root / "registry.port", "registry", "serve", "--state", state
    )


def start_conddb_behind_proxy(group: ProcessGroup, root: Path, database_url: str) -> str:
    """Serve the database over HTTP behind the fault proxy; returns the proxy's URL.

    The proxy reads its faults from the registry state file the player writes.
    """
    service = start_listener(
        group, "conddb", root / "conddb.port", "conddb", "--db", database_url, "serve"
    )
    return start_listener(
        group,
        "conddb-proxy",
        root / "conddb-proxy.port",
        "sim",
        "conddb-proxy",
        "--upstream",
        service,
        "--state",
        str(root / "registry_state.json"),
    )


def write_token_file(root: Path, database_url: str) -> Path:
    """Create the schema and an upload token for step 4; returns the token file."""
    database = ConditionsDatabase(database_url)
    try:
        database.create_schema()
        token = database.create_token("calloop-demo", ["*"])
    finally:
        database.close()
    path = root / "conddb.token"
    atomic_write_text(path, f"{token}\n")
    path.chmod(0o600)
    return path


def update_loop_yaml(loop_yaml: Path, **values: str) -> None:
    """Set top-level keys of loop.yaml (URLs of the services actually running)."""
    import yaml

    data = yaml.safe_load(loop_yaml.read_text())
    data.update(values)
    dump_yaml(loop_yaml, data)


def set_registry_url(loop_yaml: Path, url: str) -> None:
    """Point loop.yaml at the registry that is actually running."""
    update_loop_yaml(loop_yaml, registry_url=url)


def _journal_states(loop_config: LoopConfig, calibration: str, step: str) -> dict[int, str]:
    path = loop_config.work_dir / calibration / f"{step}.journal.sqlite"
    if not path.exists():
        return {}
    journal = Journal(path)
    try:
        return dict(journal.all_runs())
    finally:
        journal.close()


def is_complete(loop_config: LoopConfig, scenario: Scenario, calibrations: list[str]) -> bool:
    """Every scenario run finished by step 2 and every processed run by steps 3 and 4."""
    runs = {r.run_number for r in scenario.runs}
    for name in calibrations:
        step2 = _journal_states(loop_config, name, "step2")
        if not runs <= set(step2) or any(step2[r] not in FINAL_STEP2 for r in runs):
            return False
        processed = {r for r in runs if step2[r] == "Done"}
        for step in ("step3", "step4"):
            states = _journal_states(loop_config, name, step)
            if any(states.get(r) not in FINAL_LATER for r in processed):
                return False
    return True


# ------------------------------------------------------------------------- summary


@dataclass
class RunSummary:
    """One row of the demo's table."""

    calibration: str
    run: int
    step2: str
    step4: str
    ls_seen: int
    ls_processed: int
    jobs: str  # succeeded/given up per step
    versions: int
    uploads: int
    truth: str
    ok: bool


def summarize(
    loop_config: LoopConfig,
    scenario: Scenario,
    calibrations: dict[str, CalibrationConfig],
    database_url: str,
) -> list[RunSummary]:
    """Per run and calibration: what each step did and how the payload compares
    (``database_url``: the conditions DB itself, not a service that has stopped)."""
    rows = []
    store = CalibStore(loop_config.store_root)
    conditions = ConditionsDB.connect(database_url, create=True)
    for name, cal in calibrations.items():
        journals = {
            s: Journal(loop_config.work_dir / name / f"{s}.journal.sqlite")
            for s in ("step2", "step3", "step4")
        }
        for spec in scenario.runs:
            rows.append(
                _summarize_run(
                    name,
                    cal,
                    spec.run_number,
                    journals=journals,
                    store=store,
                    conditions=conditions,
                    loop_config=loop_config,
                )
            )
        for journal in journals.values():
            journal.close()
    conditions.close()
    store.close()
    return rows


def _summarize_run(
    name: str,
    cal: CalibrationConfig,
    run: int,
    *,
    journals: dict[str, Journal],
    store: CalibStore,
    conditions: Conditions,
    loop_config: LoopConfig,
) -> RunSummary:
    state = journals["step2"].run_state(run) or "unseen"
    counts = {s: j.job_counts(run) for s, j in journals.items()}
    jobs = " ".join(f"{c.get('succeeded', 0)}/{c.get('given_up', 0)}" for c in counts.values())
    processed = sum(
        len(journals["step2"].inputs_of(run, j.batch))
        for j in journals["step2"].jobs(run=run)
        if j.state == "succeeded"
    )
    base = RunSummary(
        name,
        run,
        state,
        journals["step4"].run_state(run) or "-",
        journals["step2"].input_count(run),
        processed,
        jobs,
        0,
        0,
        "-",
        state == "Skipped",
    )
    if state != "Done":
        return base
    detector = store.detector(cal.detector, create=True)
    rejected = journals["step4"].run_state(run) == "Rejected"
    try:
        final = _final_payload(detector, cal, run, loop_config, rejected=rejected)
        versions = detector.versions(cal.payload.ctype, final.range)
    except StoreError as exc:
        base.truth = f"no payload: {exc}"
        return base
    uploads = len(journals["step4"].uploads(states=("done",), run=run))
    truth = compare(cal, final.array, final.metadata.get("quality", {}), loop_config.raw_root)
    base.versions, base.uploads, base.truth = len(versions), uploads, truth.text
    # a payload the truth says must be refused is right to be Rejected, not uploaded
    placed = rejected if truth.refuse else _resolvable(conditions, cal, run)
    base.ok = truth.ok and placed and processed == base.ls_seen
    return base


def _final_payload(
    detector: Any, cal: CalibrationConfig, run: int, loop_config: LoopConfig, *, rejected: bool
) -> Any:
    """The payload in force for the run (maybe from an earlier run on), or the final
    one of a Rejected run (retired: read by its version)."""
    if not rejected:
        return detector.get(cal.payload.ctype, run=run)
    summary = loop_config.work_dir / cal.name / f"run{run}" / "step4" / "summary.json"
    version = json.loads(summary.read_text())["final_version"]
    return detector.get(cal.payload.ctype, version=version)


def _resolvable(conditions: Conditions, cal: CalibrationConfig, run: int) -> bool:
    """An IOV of the calibration's tag covers the run (its first LS)."""
    ls = 1 if cal.payload.time_type == "lumi" else None
    try:
        conditions.resolve(tag=cal.payload.destination_tag, run=run, ls=ls)
    except CalloopError:
        return False
    return True


def format_table(rows: list[RunSummary]) -> str:
    """The summary as aligned text."""
    width = max([len("calibration"), *(len(r.calibration) for r in rows)])
    header = (
        f"{'calibration':<{width}} {'run':>7} {'step2':<8} {'step4':<9} {'LS seen/proc':>12} "
        f"{'jobs ok/failed s2 s3 s4':<24} {'versions':>8} {'uploads':>7}  truth"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.calibration:<{width}} {r.run:>7} {r.step2:<8} {r.step4:<9} "
            f"{f'{r.ls_seen}/{r.ls_processed}':>12} {r.jobs:<24} {r.versions:>8} "
            f"{r.uploads:>7}  {r.truth} {'OK' if r.ok else 'MISMATCH'}"
        )
    return "\n".join(lines)


@dataclass
class LoopSession:
    """A whole loop started by :func:`start_loop`: registry, daemons and player running."""

    scenario: Scenario
    loop_config: LoopConfig
    calibrations: dict[str, CalibrationConfig]
    database_url: str  # the conditions DB itself (step 4 may upload through a proxy)
    group: ProcessGroup
    player: subprocess.Popen[bytes]

    def complete(self) -> bool:
        """The player finished and every run reached its final state in every step."""
        return self.player.poll() is not None and is_complete(
            self.loop_config, self.scenario, list(self.calibrations)
        )

    def wait(self, deadline: float, poll_s: float = 0.25) -> bool:
        """Wait until :meth:`complete` or the monotonic ``deadline``; True if complete."""
        while time.monotonic() < deadline:
            if self.complete():
                return True
            time.sleep(poll_s)
        return is_complete(self.loop_config, self.scenario, list(self.calibrations))

    def stop(self) -> bool:
        """Stop every process (SIGTERM); True if every daemon and server exited 0."""
        codes = self.group.stop_all()
        return all(code == 0 for name, code in codes.items() if name != "player")

    def summarize(self) -> list[RunSummary]:
        """Per run and calibration, the results compared with the truth (after stop)."""
        return summarize(self.loop_config, self.scenario, self.calibrations, self.database_url)


def start_loop(
    root: Path,
    scenario_path: Path,
    *,
    speed: float,
    backend: str = "local",
    calibrations_from: Path = REPO_CONFIG / "calibrations",
) -> LoopSession:
    """A fresh loop under ``root`` playing ``scenario_path`` at ``speed``: the registry,
    the conditions DB service behind the fault proxy if the scenario has conditions-DB
    faults, the three daemons of every calibration in ``calibrations_from`` and the
    player, each its own process with ``root`` as working directory. Processes started
    before a failure are stopped."""
    root, scenario_path = root.resolve(), scenario_path.resolve()
    scenario = load_scenario(scenario_path)
    loop_yaml = write_workspace(
        root, backend=backend, calibrations_from=calibrations_from, scenario=scenario
    )
    database_url = load_loop_config(loop_yaml).conddb_url
    group = ProcessGroup(root / "processes", cwd=root)
    try:
        set_registry_url(loop_yaml, start_registry(group, root))
        if scenario.faults_of("conddb"):
            token_file = write_token_file(root, database_url)
            proxy = start_conddb_behind_proxy(group, root, database_url)
            update_loop_yaml(loop_yaml, conddb_url=proxy, conddb_token_file=str(token_file))
        loop_config = load_loop_config(loop_yaml)
        calibrations, problems = load_all_calibrations(loop_config.calibrations_dir)
        if problems:
            raise CalloopError("; ".join(problems))
        start_daemons(group, loop_yaml, list(calibrations))
        player = group.start(
            "player",
            "sim",
            "play",
            str(scenario_path),
            "--speed",
            str(speed),
            "--state",
            str(root / "registry_state.json"),
            "--raw-root",
            str(loop_config.raw_root),
            "--work-dir",
            str(loop_config.work_dir),
        )
    except BaseException:
        group.stop_all()
        raise
    return LoopSession(scenario, loop_config, calibrations, database_url, group, player)


def run_demo(
    root: Path,
    scenario_path: Path,
    *,
    speed: float = 50.0,
    timeout_s: float = 110.0,
    backend: str = "local",
) -> tuple[list[RunSummary], bool, float]:
    """Run everything; returns (rows, all ok, seconds). Processes are always stopped."""
    started = time.monotonic()
    session = start_loop(root, scenario_path, speed=speed, backend=backend)
    try:
        complete = session.wait(started + timeout_s)
    finally:
        clean = session.stop()
    rows = session.summarize()
    return rows, complete and clean and all(r.ok for r in rows), time.monotonic() - started
