"""What idle daemons cost: CPU seconds per minute and memory per daemon, side by side.

Run: ``python benchmarks/idle_cost.py`` (about 15 min; ``--window 20 --repeat 2
--calibrations 2`` for a quick look). For each calibration count (10 and 50 by
default) it starts, at the same time and on the same machine:

* ``before``: the daemons of the code at ``--baseline`` (``PYTHONPATH=<baseline>``),
  three per calibration (step 2, 3, 4), with their own simulated registry;
* ``after``: the same with this checkout's code (or ``--after``);
* a few plain 1 Hz Python pollers (``time.sleep(1); os.listdir(dir)``), the yardstick.

Every calibration YAML is a renamed copy of the variant's own
``config/calibrations/*.yaml``; loop.yaml sets paths and URLs only, so each version runs
with its own defaults. The registry
lists no run, no file arrives: the daemons are idle. Once every daemon has published
its "running" status and ``--settle`` seconds have passed, ``--repeat`` windows of
``--window`` seconds (>= 60 for the record) are measured; idle CPU is the scheduler's
CPU time of the process over the window (every thread, in nanoseconds), memory is
``VmRSS`` and the proportional set size (``Pss``: shared library pages divided among
the processes sharing them) after the last window. A daemon counts with its descendants
(the warm pool's fork server). Printed: the median over windows of
the mean per process, the largest process, and after/before ratios. The target is
<= 0.05 CPU-s per minute per daemon.

For "one process per step hosting every calibration" (``calloop step2 --all``,
:mod:`loop.hosting`), the variant ``after --all`` runs, beside the others, this
checkout's three real ``calloop stepN --all`` processes over the same number of
calibrations (its own registry and directories): a table gives their idle CPU and
memory per process and per hosted daemon beside the 3 x calibrations processes of
``after``. A last table measures one process that initializes every daemon of the
calibrations in-process (lock, journal, watcher, services): its RSS before and after,
hence the memory each hosted daemon adds. ``--hosted-only`` leaves out ``before`` and
``after`` (a quick look at the hosts alone).

Each process holds an inotify instance: 3 x calibrations x 2 versions must fit under
``fs.inotify.max_user_instances`` (128 by default; the script says so and stops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table

REPO = Path(__file__).resolve().parent.parent

STEPS = ("step2", "step3", "step4")
TARGET_CPU_S_PER_MIN = 0.05
POLLER = "import os, sys, time\nwhile True:\n    time.sleep(1)\n    os.listdir(sys.argv[1])\n"
POLLERS = 3
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")
HOSTED = """
import json, sys
from pathlib import Path
from loop.config import load_loop_config
from loop.daemon import Daemon
from loop.logs import setup_logging

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

config = load_loop_config(Path(sys.argv[1]))
setup_logging(None, "bench", "hosted", console=False)
names = sorted(path.stem for path in config.calibrations_dir.glob("*.yaml"))
base = rss_mb()
daemons = [Daemon(step, config, name) for name in names for step in sys.argv[2:]]
for daemon in daemons:
    daemon.initialize()
print(json.dumps({"base_mb": base, "all_mb": rss_mb(), "daemons": len(daemons)}))
for daemon in daemons:
    daemon.shutdown()
"""


@dataclass
class Group:
    """The processes of one variant (before, after, poller), each with its name."""

    label: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)  # the registry
    # per process, the "calibration/step" status files it must own once running
    serves: dict[str, list[str]] = field(default_factory=dict)
    daemons: int = 0  # hosted or not, the daemons its processes run

    def pids(self) -> dict[str, int]:
        """Name -> pid of every measured process."""
        return {name: proc.pid for name, proc in self.procs.items()}

    def stop(self) -> None:
        """SIGTERM everything, wait, SIGKILL what is left."""
        every = [*self.procs.values(), *self.others]
        for proc in every:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for proc in every:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def environment(pythonpath: Path) -> dict[str, str]:
    """The environment of a child running the code at ``pythonpath``."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(pythonpath)
    return env


def cli(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m loop.cli ARGS`` with its output in ``log``, run from ``log``'s
    directory: ``-m`` puts the working directory first on sys.path, ahead of PYTHONPATH,
    so a checkout as working directory would decide which code runs."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "loop.cli", *args],
            cwd=log.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def start_registry(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """The simulated registry (empty: no run) of one variant; returns it and its URL."""
    root.mkdir(parents=True, exist_ok=True)
    state, port_file = root / "registry_state.json", root / "registry.port"
    state.write_text(json.dumps({"runs": {}, "lumisections": {}, "faults": []}))
    proc = cli(env, root / "registry.out", "registry", "serve", "--state", str(state),
               "--port", "0", "--port-file", str(port_file))  # fmt: skip
    deadline = time.monotonic() + 600  # a loaded machine starts Python slowly
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"registry did not start; see {root / 'registry.out'}")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def write_config(root: Path, registry_url: str, calibrations: int, code: Path) -> Path:
    """loop.yaml (paths and URLs only) and ``calibrations`` renamed copies of the
    calibration YAMLs shipped with the code at ``code`` (each version reads its own
    format); returns the loop.yaml path."""
    config = root / "config"
    cal_dir = config / "calibrations"
    cal_dir.mkdir(parents=True)
    sources = sorted((code / "config" / "calibrations").glob("*.yaml"))
    for index in range(calibrations):
        data = yaml.safe_load(sources[index % len(sources)].read_text())
        name = f"{data['name']}{index:03d}"
        data["name"] = name
        data["detector"] = f"{data['detector'].split('-')[0]}-bench{index:03d}"
        data["payload"]["destination_tag"] = f"{name}_prompt_v1"
        (cal_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    loop_yaml = config / "loop.yaml"
    loop_yaml.write_text(
        yaml.safe_dump(
            {
                "work_dir": str(root / "work"),
                "raw_root": str(root / "raw"),
                "log_dir": str(root / "logs"),
                "store_root": str(root / "calib"),
                "registry_url": registry_url,
                "conddb_url": f"sqlite:///{root / 'conddb.sqlite'}",
                "calibrations_dir": str(cal_dir),
            }
        )
    )
    return loop_yaml


def start_daemons(
    label: str, root: Path, code: Path, calibrations: int, hosted: bool = False
) -> Group:
    """Registry + three daemons per calibration of the code at ``code``: a process
    each, or with ``hosted`` one ``calloop <step> --all`` process per step."""
    env = environment(code)
    registry, url = start_registry(root, env)
    loop_yaml = write_config(root, url, calibrations, code)
    names = sorted(path.stem for path in (root / "config" / "calibrations").glob("*.yaml"))
    group = Group(label, others=[registry], daemons=len(STEPS) * len(names))
    for step in STEPS:
        for name in ["--all"] if hosted else names:
            proc = f"{name}/{step}"
            group.procs[proc] = cli(
                env, root / "daemons.out", step, *(["--all"] if hosted else ["-c", name]),
                "--config", str(loop_yaml), "--quiet",
            )  # fmt: skip
            group.serves[proc] = [f"{n}/{step}" for n in (names if hosted else [name])]
    return group


def start_pollers(root: Path) -> Group:
    """The yardstick: plain 1 Hz Python pollers listing a directory."""
    group = Group("1 Hz poller")
    watched = root / "polled"
    watched.mkdir(parents=True)
    for index in range(POLLERS):
        group.procs[f"poller{index}"] = subprocess.Popen(
            [sys.executable, "-c", POLLER, str(watched)], stdin=subprocess.DEVNULL
        )
    return group


def wait_running(group: Group, work_dir: Path, timeout: float) -> None:
    """Until every daemon published a running status under its process's pid."""
    deadline = time.monotonic() + timeout
    waiting = {(name, daemon) for name, daemons in group.serves.items() for daemon in daemons}
    while waiting:
        for name, daemon in sorted(waiting):
            proc = group.procs[name]
            if proc.poll() is not None:
                raise SystemExit(f"{group.label} process {name} exited with {proc.returncode}")
            try:
                status = json.loads((work_dir / f"{daemon}.status.json").read_text())
            except (OSError, ValueError):
                continue
            if status.get("pid") == proc.pid and status.get("state") == "running":
                waiting.discard((name, daemon))
        if time.monotonic() > deadline:
            raise SystemExit(f"{group.label}: {len(waiting)} daemons not running after {timeout} s")
        time.sleep(0.5)


def family(pid: int) -> list[int]:
    """The process and its descendants (a daemon's warm-pool fork server is its cost)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids.extend(family(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants (every thread), in seconds, from the
    scheduler's nanosecond count (``/proc/<pid>/task/<tid>/schedstat``): utime + stime
    count in ticks of 10 ms, too coarse for a process that runs a few ms a minute."""
    total = 0
    for member in family(pid):
        for task in Path(f"/proc/{member}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and its descendants in MB."""
    rss = pss = 0.0
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
        for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) / 1024
    return rss, pss


def measure(groups: list[Group], window: float, repeat: int) -> dict[str, list[list[float]]]:
    """Per group, per window, CPU-s per minute of each process (all sampled together)."""
    results: dict[str, list[list[float]]] = {g.label: [] for g in groups}
    for _ in range(repeat):
        before = {g.label: {n: cpu_seconds(p) for n, p in g.pids().items()} for g in groups}
        start = time.monotonic()
        time.sleep(window)
        elapsed_min = (time.monotonic() - start) / 60
        for g in groups:
            results[g.label].append(
                [(cpu_seconds(p) - before[g.label][n]) / elapsed_min for n, p in g.pids().items()]
            )
    return results


HOSTED_LABEL = "after --all"  # the label of this checkout's hosts (calloop <step> --all)


def run_size(
    calibrations: int, args: argparse.Namespace, tmp: Path
) -> tuple[list[list[object]], dict[str, float]]:
    """Start every variant for ``calibrations``, measure, stop; returns the table rows
    and the median CPU-s/min per process of each variant."""
    variants = [] if args.hosted_only else [("before", args.baseline), ("after", args.after)]
    variants.append((HOSTED_LABEL, args.after))
    groups: list[Group] = []
    roots = {label: tmp / f"{label.replace(' ', '')}-{calibrations}" for label, _ in variants}
    try:
        for label, code in variants:
            groups.append(
                start_daemons(label, roots[label], code, calibrations, hosted=label == HOSTED_LABEL)
            )
        groups.append(start_pollers(tmp / f"poller-{calibrations}"))
        for group in groups[: len(variants)]:
            wait_running(group, roots[group.label] / "work", timeout=900)
        time.sleep(args.settle)
        cpu = measure(groups, args.window, args.repeat)
        memory = {g.label: [memory_mb(p) for p in g.pids().values()] for g in groups}
    finally:
        for group in groups:
            group.stop()
    rows: list[list[object]] = []
    medians: dict[str, float] = {}
    for group in groups:
        per_window = cpu[group.label]
        mean = statistics.median(statistics.fmean(w) for w in per_window)
        largest = statistics.median(max(w) for w in per_window)
        medians[group.label] = mean
        rss = statistics.fmean(m[0] for m in memory[group.label])
        pss = statistics.fmean(m[1] for m in memory[group.label])
        count = len(group.procs)
        rows.append(
            [calibrations, group.label, count, mean, largest, mean * count, rss, pss, pss * count]
        )
    return rows, medians


def hosted_row(calibrations: int, rows: list[list[object]]) -> list[object]:
    """The hosts of one size beside the separate processes of ``after`` (if measured):
    per process, per hosted daemon, in total."""
    by_label: dict[object, list[Any]] = {row[1]: row for row in rows}
    hosts, separate = by_label[HOSTED_LABEL], by_label.get("after")
    daemons = len(STEPS) * calibrations
    _cals, _label, _procs, cpu, _largest, cpu_total, rss, pss, pss_total = hosts
    return [
        calibrations, daemons, cpu, cpu_total / daemons, rss, pss, pss_total / daemons,
        pss_total, separate[3] if separate else "-", separate[8] if separate else "-",
    ]  # fmt: skip


def hosted_memory(calibrations: int, tmp: Path, code: Path) -> dict[str, float]:
    """RSS of one process of the code at ``code`` hosting the 3 x ``calibrations`` daemons
    (initialized, idle): before them (imports done) and with them."""
    root = tmp / f"hosted-{calibrations}"
    loop_yaml = write_config(root, "http://127.0.0.1:9", calibrations, code)  # never polled
    result = subprocess.run(
        [sys.executable, "-c", HOSTED, str(loop_yaml), *STEPS],
        cwd=root,  # not a checkout (see cli)
        env=environment(code),
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    measured: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def check_inotify(calibrations: list[int], variants: int) -> None:
    """Stop early when the daemons of ``variants`` would run out of inotify instances."""
    limit = int(INOTIFY_LIMIT.read_text())
    needed = variants * len(STEPS) * max(calibrations)
    if needed + 16 > limit:
        raise SystemExit(
            f"{needed} daemons need {needed} inotify instances, the limit is {limit} "
            f"(fs.inotify.max_user_instances); raise it first, e.g. "
            "sysctl -w fs.inotify.max_user_instances=1024"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibrations", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per window")
    parser.add_argument("--repeat", type=int, default=5, help="windows (median of)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after start-up")
    parser.add_argument("--baseline", type=Path, default=Path("/work/baseline"))
    parser.add_argument("--after", type=Path, default=REPO, help="code measured as after")
    parser.add_argument(
        "--hosted-only", action="store_true", help="only the --all hosts and the pollers"
    )
    args = parser.parse_args()
    check_inotify(args.calibrations, variants=1 if args.hosted_only else 3)
    rows: list[list[object]] = []
    ratios = []
    hosted: list[list[object]] = []
    measured: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="idle_cost.") as tmp:
        for calibrations in args.calibrations:
            size_rows, medians = run_size(calibrations, args, Path(tmp))
            rows.extend(size_rows)
            ratios.append((calibrations, medians))
            measured.append(hosted_row(calibrations, size_rows))
            memory = hosted_memory(calibrations, Path(tmp), args.after)
            separate = next((r for r in size_rows if r[1] == "after"), None)
            per_daemon = (memory["all_mb"] - memory["base_mb"]) / memory["daemons"]
            three = 3 * memory["base_mb"] + memory["all_mb"] - memory["base_mb"]
            hosted.append(
                [calibrations, memory["daemons"], memory["base_mb"], memory["all_mb"],
                 per_daemon, three,
                 separate[6] * separate[2] if separate else "-"]  # type: ignore[operator]
            )  # fmt: skip
            shutil.rmtree(Path(tmp), ignore_errors=True)
            Path(tmp).mkdir(exist_ok=True)
    table(
        f"idle cost per process: median of {args.repeat} windows of {args.window:g} s "
        "(no run, registry answering)",
        ["cals", "variant", "procs", "CPU-s/min", "max CPU-s/min", "total CPU-s/min",
         "RSS MB", "PSS MB", "total PSS MB"],
        rows,
    )  # fmt: skip
    table(
        "calloop stepN --all (this checkout, 3 processes), measured with the others: idle "
        "CPU-s/min and MB",
        ["cals", "daemons", "CPU/proc", "CPU/daemon", "RSS/proc", "PSS/proc", "PSS/daemon",
         "total PSS", "after CPU/daemon", "after total PSS"],
        measured,
    )  # fmt: skip
    table(
        "one process hosting every daemon (this checkout): RSS MB",
        ["cals", "daemons", "process alone", "with daemons", "per daemon",
         "3 processes (est.)", "3 x cals processes"],
        hosted,
    )  # fmt: skip
    for calibrations, medians in ratios:
        if args.hosted_only:
            continue
        after, before = medians["after"], medians["before"]
        verdict = "meets" if after <= TARGET_CPU_S_PER_MIN else "MISSES"
        print(
            f"  {calibrations} calibrations: after/before CPU x{after / before:.3f}, "
            f"after/poller x{after / medians['1 Hz poller']:.2f}; after {after:.4f} CPU-s/min "
            f"per daemon {verdict} the target <= {TARGET_CPU_S_PER_MIN}"
        )


if __name__ == "__main__":
    main()
