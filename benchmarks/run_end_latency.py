"""Latency at scale: from the end of a run to its final payload resolvable in the
conditions DB, with the whole loop running as separate processes.

Run: ``python benchmarks/run_end_latency.py [--scenario config/scenarios/scale.yaml]``.
A fresh loop in a temporary directory (:func:`loop.demo.start_loop`: simulated registry,
the six daemons, the scenario player) plays the scenario with a LS closing every
``--ls-interval`` seconds. Prints, per run and calibration, as seconds after the
registry's end of run:

    last LS file written -> registry end -> step 2 done (``run.end``) -> step 3 done
    (``step3.done``) -> final payload stored -> IOV resolvable

(goal: IOV resolvable <= 30 s), where the time went in each step (the run's last job:
submitted, finished), the RSS of every daemon per run (goal: flat across runs) and every
payload compared with the simulator's truth. Exit 1 if a run never completed within
``--timeout`` after the player finished, or a payload does not match the truth.

Most times come from what the loop writes anyway: raw files' mtimes, the markers'
``written``, the store version's ``produced``, the step journals (job and state times) and
the conditions DB's IOV ``insertion_time``. Two are observed from outside, every
``POLL_S``: the registry's end of run (the state file the player rewrites; its mtime, so
exact unless two writes fall within one poll) and the IOV being resolvable (the harness
resolves (tag, run) like a reconstruction job would, until the final payload's hash
comes back).

To measure an older calloop, put it first on PYTHONPATH: the loop's processes then run
it (they start in the temporary directory, so the checkout here cannot shadow it), the
shipped calibrations are taken from its tree, and this harness reads what they wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.conddb.client import Conditions, ConditionsDB
from loop.conddb.db import Resolved
from loop.config import CalibrationConfig, LoopConfig
from loop.demo import LoopSession, format_table, start_loop
from loop.errors import CalloopError
from loop.journal import JobPhase, Journal
from loop.logs import setup_logging
from loop.rawformat import raw_path
from loop.sim.scenario import RunSpec, Scenario, load_scenario
from loop.store import CalibStore, Constants
from loop.witness import WitnessError, read_marker

REPO = Path(__file__).resolve().parent.parent
SCALE = REPO / "config" / "scenarios" / "scale.yaml"
POLL_S = 0.2  # outside observations: registry state file, conditions DB resolves
RSS_EVERY_S = 1.0
GOAL_S = 30.0
PLAYER_LAG = 10.0  # a player this late is hung, not slow
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# per run, seconds after the registry's end of run; None: never happened
STAGES = ("last_ls", "registry_end", "step2_done", "step3_done", "stored", "iov")
STAGE_HEADERS = ("last LS", "reg. end", "s2 done", "s3 done", "stored", "IOV")
# where the time went: the step-2 daemon seeing the end, each step's last job, step 4 Done
DETAIL = (
    "s2_saw_end",
    "s2_last_submit",
    "s2_last_finish",
    "s3_last_submit",
    "s3_last_finish",
    "s4_last_submit",
    "s4_last_finish",
    "iov_inserted",
    "s4_done",
)
FINAL_UPLOADS = ("done", "superseded")


# ----------------------------------------------------------------- outside observations


@dataclass
class Observations:
    """What the harness saw from outside while the loop ran (unix times)."""

    run_started: dict[int, float] = field(default_factory=dict)
    run_ended: dict[int, float] = field(default_factory=dict)
    # (calibration, run) -> IOV (since/payload hash) -> first time a resolve returned it
    resolved: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    settled: set[tuple[str, int]] = field(default_factory=set)  # final upload known
    rss_kb: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (t, daemon->kB)
    cpu_s: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # cumulative


class Watcher:
    """Polls the registry state file, the conditions DB and the daemons' RSS."""

    def __init__(self, session: LoopSession, conditions: Conditions) -> None:
        self.session = session
        self.conditions = conditions
        self.state_file = session.loop_config.raw_root.parent / "registry_state.json"
        self.seen = Observations()
        self._state_mtime = 0
        self._next_rss = 0.0

    def poll(self, now: float) -> None:
        """One round of observations."""
        self._registry()
        for calibration in self.session.calibrations:
            for run in self.seen.run_ended:
                if (calibration, run) not in self.seen.settled:
                    self._resolve(calibration, run, now)
        if now >= self._next_rss:
            self._next_rss = now + RSS_EVERY_S
            rss, cpu = daemon_usage(self.session)
            self.seen.rss_kb.append((now, rss))
            self.seen.cpu_s.append((now, cpu))

    def _registry(self) -> None:
        try:
            stamp = self.state_file.stat().st_mtime_ns
            if stamp == self._state_mtime:
                return
            runs = json.loads(self.state_file.read_text()).get("runs", {})
        except (OSError, ValueError):  # not written yet
            return
        self._state_mtime = stamp
        for key, info in runs.items():
            self.seen.run_started.setdefault(int(key), stamp / 1e9)
            if info.get("end_time"):
                self.seen.run_ended.setdefault(int(key), stamp / 1e9)

    def _resolve(self, calibration: str, run: int, now: float) -> None:
        cal = self.session.calibrations[calibration]
        summary = _summary(self.session.loop_config, calibration, run)
        settled = summary is not None and (
            summary.get("upload") in FINAL_UPLOADS or summary.get("outcome") != "accepted"
        )
        try:
            found = self.conditions.resolve(tag=cal.payload.destination_tag, run=run)
        except CalloopError:  # no IOV at or before the run yet
            return
        seen = self.seen.resolved.setdefault((calibration, run), {})
        seen.setdefault(iov_key(found.since, found.payload_hash), now)
        if settled:  # this resolve came after the final upload: its hash is the final one
            self.seen.settled.add((calibration, run))


def iov_key(since: int, payload_hash: str) -> str:
    """An IOV as the harness records it: an earlier run's IOV with the same payload is
    not the run's own."""
    return f"{since}/{payload_hash}"


def daemon_usage(session: LoopSession) -> tuple[dict[str, int], dict[str, float]]:
    """VmRSS (kB) and CPU seconds so far (user + system, the daemon itself, not its
    jobs) of every running daemon, by its name in the process group."""
    sizes, cpu = {}, {}
    for name, proc in session.group.procs.items():
        if name.rpartition("-")[2] not in ("step2", "step3", "step4"):
            continue
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
        except OSError:  # exited
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                sizes[name] = int(line.split()[1])
        fields = stat.rpartition(")")[2].split()  # after the command name
        cpu[name] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return sizes, cpu


def _summary(loop_config: LoopConfig, calibration: str, run: int) -> dict[str, Any] | None:
    path = loop_config.work_dir / calibration / f"run{run}" / "step4" / "summary.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def observe(session: LoopSession, timeout_s: float, limit: float) -> tuple[Observations, bool]:
    """Watch the loop until every run is complete, at most ``timeout_s`` after the player
    finished (it lags behind its schedule when the machine is busy) and never past the
    monotonic ``limit``; returns the observations and whether it completed."""
    conditions = ConditionsDB.connect(session.database_url, create=True)
    watcher = Watcher(session, conditions)
    deadline, next_check = limit, 0.0
    try:
        while time.monotonic() < deadline:
            now = time.time()
            watcher.poll(now)
            if session.player.poll() is not None and deadline == limit:
                deadline = min(limit, time.monotonic() + timeout_s)
            if now >= next_check:  # opening six journals: once a second is enough
                next_check = now + 1.0
                if session.complete():
                    watcher.poll(time.time())  # every final upload is in: settle them all
                    return watcher.seen, True
            time.sleep(POLL_S)
    finally:
        conditions.close()
    return watcher.seen, False


# --------------------------------------------------------------- what the loop wrote


@dataclass
class RunLatency:
    """One run of one calibration: stage times in seconds after the registry's end."""

    calibration: str
    run: int
    end: float | None  # unix time of the registry's end of run
    ls_pace_s: float | None  # seconds between LS files as played (the player may lag)
    stages: dict[str, float | None]
    detail: dict[str, float | None]
    problems: list[str]  # why a stage is missing, or the IOV is not the stored payload

    @property
    def iov_s(self) -> float | None:
        """Seconds from the end of run to the final IOV being resolvable."""
        return self.stages["iov"]


def extract(
    loop_config: LoopConfig,
    calibrations: dict[str, CalibrationConfig],
    scenario: Scenario,
    seen: Observations,
    conditions: Conditions,
) -> list[RunLatency]:
    """Every run's stage times from the files, journals, store and conditions DB the
    loop wrote, plus the harness's observations."""
    store = CalibStore(loop_config.store_root)
    try:
        return [
            _extract_run(
                loop_config,
                name,
                cal,
                spec,
                scenario=scenario,
                seen=seen,
                conditions=conditions,
                store=store,
            )
            for name, cal in calibrations.items()
            for spec in scenario.runs
            if spec.run_type in cal.run_selection.run_types
        ]
    finally:
        store.close()


def _extract_run(
    loop_config: LoopConfig,
    name: str,
    cal: CalibrationConfig,
    spec: RunSpec,
    *,
    scenario: Scenario,
    seen: Observations,
    conditions: Conditions,
    store: CalibStore,
) -> RunLatency:
    absolute: dict[str, float | None] = dict.fromkeys(STAGES)
    detail: dict[str, float | None] = dict.fromkeys(DETAIL)
    problems: list[str] = []
    run = spec.run_number
    detectors = scenario.detectors_of(spec)
    absolute["last_ls"] = _ls_written(loop_config.raw_root, detectors, run, spec.ls_count)
    first = _ls_written(loop_config.raw_root, detectors, run, 1)
    pace = None
    if first is not None and absolute["last_ls"] is not None and spec.ls_count > 1:
        pace = (absolute["last_ls"] - first) / (spec.ls_count - 1)
    absolute["registry_end"] = seen.run_ended.get(run)
    run_dir = loop_config.work_dir / name / f"run{run}"
    for stage, marker in (("step2_done", "step2/run.end"), ("step3_done", "step3/step3.done")):
        try:
            absolute[stage] = read_marker(run_dir / marker).written
        except WitnessError as exc:
            problems.append(str(exc))
    detail.update(journal_times(loop_config.work_dir / name, run))
    summary = _summary(loop_config, name, run) or {}
    version = summary.get("uploaded_version")
    if version is None:
        problems.append(f"no accepted payload (summary: {summary or 'missing'})")
    else:
        stored = _stored(store, cal, version)
        absolute["stored"] = stored.produced if stored is not None else None
        final = _final_iov(conditions, cal, run, stored, problems)
        if final is not None:
            detail["iov_inserted"] = final.insertion_time
            key = iov_key(final.since, final.payload_hash)
            absolute["iov"] = seen.resolved.get((name, run), {}).get(key)
            if absolute["iov"] is None:
                problems.append(f"final payload {final.payload_hash[:12]} never seen resolvable")
    end = absolute["registry_end"]
    return RunLatency(
        name, run, end, pace, _relative(absolute, end), _relative(detail, end), problems
    )


def journal_times(cal_dir: Path, run: int) -> dict[str, float | None]:
    """From the step journals: when step 2 saw the registry's end, each step's last job
    (the one that finished last: submitted, finished) and step 4's Done."""
    times: dict[str, float | None] = {}
    for step, prefix in (("step2", "s2"), ("step3", "s3"), ("step4", "s4")):
        journal = Journal(cal_dir / f"{step}.journal.sqlite")
        try:
            jobs = [j for j in journal.jobs(run=run) if j.state == JobPhase.SUCCEEDED]
            last = max(jobs, key=lambda j: j.finished or 0.0, default=None)
            times[f"{prefix}_last_submit"] = last.submitted if last else None
            times[f"{prefix}_last_finish"] = last.finished if last else None
            if step == "step2":
                times["s2_saw_end"] = journal.info(run).ended_seen_at
            if step == "step4":
                done = [t for state, t in journal.history(run) if state == "Done"]
                times["s4_done"] = done[0] if done else None
        finally:
            journal.close()
    return times


def _ls_written(raw_root: Path, detectors: Iterable[str], run: int, ls: int) -> float | None:
    """When a LS's files were written (the newest of its detectors' files)."""
    stamps = []
    for detector in detectors:
        try:
            stamps.append(raw_path(raw_root, detector, run, ls).stat())
        except OSError:
            return None
    return max(s.st_mtime for s in stamps)


def _relative(values: dict[str, float | None], end: float | None) -> dict[str, float | None]:
    return {k: None if v is None or end is None else v - end for k, v in values.items()}


def _stored(store: CalibStore, cal: CalibrationConfig, version: str) -> Constants | None:
    """The run's final (uploaded) store version, or None."""
    try:
        return store.detector(cal.detector, create=True).get(cal.payload.ctype, version=version)
    except CalloopError:
        return None


def _final_iov(
    conditions: Conditions,
    cal: CalibrationConfig,
    run: int,
    stored: Constants | None,
    problems: list[str],
) -> Resolved | None:
    """The IOV the run resolves to now: its own, carrying the stored final payload."""
    try:
        final = conditions.resolve(tag=cal.payload.destination_tag, run=run)
    except CalloopError as exc:
        problems.append(f"not resolvable: {exc}")
        return None
    if final.since != run:
        problems.append(f"resolves to the IOV of run {final.since}")
        return None
    if stored is None:
        problems.append("final version missing from the store")
    elif not np.array_equal(conditions.payload(final.payload_hash).array(), stored.array):
        problems.append(f"the IOV's payload is not the stored final version {stored.version}")
    return final


# ------------------------------------------------------------------------ presentation


def run_of(stamp: float, starts: list[tuple[int, float]]) -> int | None:
    """The newest run started at ``stamp`` (``starts``: (run, start) by start)."""
    current = [run for run, begin in starts if begin <= stamp]
    return current[-1] if current else None


def rss_by_run(
    samples: list[tuple[float, dict[str, int]]], started: dict[int, float]
) -> dict[str, dict[int, int]]:
    """Per daemon and run, the largest RSS (kB) sampled while the run was the newest
    (from its start to the next run's start)."""
    starts = sorted(started.items(), key=lambda item: item[1])
    peaks: dict[str, dict[int, int]] = {}
    for stamp, sizes in samples:
        run = run_of(stamp, starts)
        if run is None:
            continue
        for name, kb in sizes.items():
            per_run = peaks.setdefault(name, {})
            per_run[run] = max(per_run.get(run, 0), kb)
    return peaks


def cpu_by_run(
    samples: list[tuple[float, dict[str, float]]], started: dict[int, float]
) -> dict[str, dict[int, float]]:
    """Per daemon and run, the CPU seconds it used while the run was the newest (from
    the last sample before the run's start to its last sample in the run)."""
    starts = sorted(started.items(), key=lambda item: item[1])
    used: dict[str, dict[int, float]] = {}
    previous: dict[str, float] = {}
    for stamp, totals in samples:
        run = run_of(stamp, starts)
        for name, total in totals.items():
            if run is not None:
                per_run = used.setdefault(name, {})
                per_run[run] = per_run.get(run, 0.0) + total - previous.get(name, total)
            previous[name] = total
    return used


def latency_rows(latencies: list[RunLatency]) -> list[list[object]]:
    """One row per run and calibration: the stage times and the verdict."""
    return [
        [
            r.calibration,
            r.run,
            "-" if r.ls_pace_s is None else f"{r.ls_pace_s:.2f}",
            *(_seconds(r.stages[s]) for s in STAGES),
            _seconds(r.detail["s4_done"]),
            "ok" if r.iov_s is not None and r.iov_s <= GOAL_S else "MISSED",
        ]
        for r in latencies
    ]


def detail_rows(latencies: list[RunLatency]) -> list[list[object]]:
    """One row per run and calibration: where the time went."""
    return [[r.calibration, r.run, *(_seconds(r.detail[d]) for d in DETAIL)] for r in latencies]


def usage_rows(
    peaks: dict[str, dict[int, int]], cpu: dict[str, dict[int, float]], runs: list[int]
) -> list[list[object]]:
    """One row per daemon: peak RSS (MB) and CPU seconds per run, and the RSS growth
    from the first run to the last."""
    rows: list[list[object]] = []
    for name in sorted(peaks):
        values = [peaks[name].get(run) for run in runs]
        present = [v for v in values if v is not None]
        growth = (present[-1] - present[0]) / 1024 if len(present) > 1 else None
        cells = [
            f"{_mb(v)} / {_seconds(cpu.get(name, {}).get(run))}"
            for v, run in zip(values, runs, strict=True)
        ]
        rows.append([name, *cells, _seconds(growth)])
    return rows


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def print_report(
    latencies: list[RunLatency], seen: Observations, runs: list[int], truth: str
) -> None:
    """Every table of the benchmark."""
    table(
        f"seconds after the registry's end of run (goal: IOV resolvable <= {GOAL_S:g} s)",
        ["calibration", "run", "s/LS", *STAGE_HEADERS, "s4 Done", "goal"],
        latency_rows(latencies),
    )
    print(
        "  s/LS: LS pace as played; IOV: the final payload's hash first resolved (before\n"
        "  'stored' when an earlier harvest uploaded the same payload); s4 Done: step 4's\n"
        "  final state (the final upload acknowledged)"
    )
    table(
        "where the time went (s after end of run; the run's last job of each step)",
        ["calibration", "run", *DETAIL],
        detail_rows(latencies),
    )
    table(
        "daemons: peak RSS MB / CPU-s while each run was the newest; RSS growth first -> last",
        ["daemon", *(str(r) for r in runs), "growth MB"],
        usage_rows(
            rss_by_run(seen.rss_kb, seen.run_started),
            cpu_by_run(seen.cpu_s, seen.run_started),
            runs,
        ),
    )
    for r in latencies:
        for problem in r.problems:
            print(f"  {r.calibration} run {r.run}: {problem}")
    print(f"\n== payloads vs the simulator's truth\n{truth}")


# -------------------------------------------------------------------------------- main


@dataclass
class Measurement:
    """Everything one benchmark run measured."""

    latencies: list[RunLatency]
    seen: Observations
    truth: str
    complete: bool  # every run finished in every step and its final IOV was resolved
    ok: bool  # complete, processes exited cleanly, every payload matches the truth


def to_json(result: Measurement) -> dict[str, Any]:
    """The measurement as JSON (observations keyed by ``calibration/run``)."""
    seen = result.seen
    return {
        "complete": result.complete,
        "ok": result.ok,
        "latencies": [asdict(r) for r in result.latencies],
        "run_started": seen.run_started,
        "run_ended": seen.run_ended,
        "resolved": {f"{c}/{r}": hashes for (c, r), hashes in seen.resolved.items()},
        "rss_kb": seen.rss_kb,
        "cpu_s": seen.cpu_s,
        "truth": result.truth,
    }


def code_under_test(cwd: Path) -> Path:
    """The calloop tree the loop's processes import (PYTHONPATH decides)."""
    out = subprocess.run(
        [sys.executable, "-c", "import loop; print(loop.__file__)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return Path(out.stdout.strip()).parent.parent


def measure(root: Path, scenario_path: Path, *, speed: float, timeout_s: float) -> Measurement:
    """Play ``scenario_path`` at ``speed`` through a fresh loop under ``root``; wait for
    every run's final IOV at most ``timeout_s`` after the player finished."""
    root.mkdir(parents=True, exist_ok=True)
    calibrations = code_under_test(root) / "config" / "calibrations"
    session = start_loop(
        root,
        scenario_path,
        speed=speed,
        calibrations_from=calibrations if calibrations.is_dir() else REPO / "config/calibrations",
    )
    play_s = max(r.end for r in session.scenario.runs) / speed
    try:
        # the player may lag up to PLAYER_LAG x its schedule before the run is given up
        limit = time.monotonic() + PLAYER_LAG * play_s + timeout_s
        seen, complete = observe(session, timeout_s, limit)
    finally:
        clean = session.stop()
    rows = session.summarize()
    conditions = ConditionsDB.connect(session.database_url, create=True)
    try:
        latencies = extract(
            session.loop_config, session.calibrations, session.scenario, seen, conditions
        )
    finally:
        conditions.close()
    complete = complete and all(r.iov_s is not None for r in latencies)
    ok = complete and clean and all(r.ok for r in rows) and not any(r.problems for r in latencies)
    return Measurement(latencies, seen, format_table(rows), complete, ok)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", type=Path, default=SCALE)
    parser.add_argument(
        "--ls-interval", type=float, default=0.25, help="wall seconds between LS closes"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed after the player finished"
    )
    parser.add_argument("--work-dir", type=Path, help="keep everything here (default: temp dir)")
    parser.add_argument("--json", type=Path, help="also write the measurement here")
    args = parser.parse_args()
    setup_logging(None, "bench", "bench", console=False)
    scenario = load_scenario(args.scenario)
    speed = scenario.runs[0].ls_seconds / args.ls_interval
    with tempfile.TemporaryDirectory(prefix="calloop-latency-") as tmp:
        root = args.work_dir or Path(tmp)
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.1f}: scenario "
            f"{scenario.name} (LS every {args.ls_interval:g} s, x{speed:.2f}), calloop under "
            f"test {code_under_test(Path(tmp))}, work dir {root}",
            flush=True,
        )
        result = measure(root, args.scenario, speed=speed, timeout_s=args.timeout)
    print_report(result.latencies, result.seen, [r.run_number for r in scenario.runs], result.truth)
    iovs = [r.iov_s for r in result.latencies if r.iov_s is not None]
    if iovs:
        print(f"\nworst end of run -> IOV resolvable: {max(iovs):.1f} s (goal {GOAL_S:g} s)")
    if args.json:
        args.json.write_text(json.dumps(to_json(result), indent=2))
    if not result.complete:
        print(f"FAILED: a run did not complete within {args.timeout:g} s after the player")
    elif not result.ok:
        print("FAILED: see the problems and the truth comparison above")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
