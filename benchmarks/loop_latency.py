"""Loop latency and cost, measured side by side in one run.

Run: ``python benchmarks/loop_latency.py``. Prints:

1. time from a raw file's rename into place to its job's submission (p50/p99), with the
   inotify observer and with the polling observer (goal: under 100 ms with inotify);
2. the cost of one daemon cycle after 10 and after 10,000 LS already processed in the
   run, idle and with one new file (goal: flat);
3. worker throughput: reco and alca MB/s beside plain h5py reading the same raw files.

``--baseline /work/baseline`` prints only (1), for the code there and for this checkout,
interleaved: ``--repeat`` rounds, each running both in fresh processes one after the
other, then the medians of their p50 and p99 side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import percentiles_ms, table
from loop.config import dump_yaml, load_calibration, load_loop_config
from loop.daemon import Daemon
from loop.demo import write_workspace
from loop.journal import NewInput
from loop.logs import setup_logging
from loop.rawformat import raw_path, write_raw_ls
from loop.registry import iso
from loop.sim.detector import generate_ls, make_truth
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import DetectorSpec
from loop.sim.state import RegistryState
from workers import alca, reco

RUN = 777001
FAST_JOB = [
    sys.executable,
    "-S",
    "-c",
    "import os,sys; os.makedirs(sys.argv[1], exist_ok=True); "
    "open(os.path.join(sys.argv[1], 'manifest.json'), 'w').write('{{\"outputs\": []}}')",
    "{output_dir}",
    "{inputs}",
]


def _workspace(root: Path, observer: str) -> tuple[Path, RegistryServer]:
    registry = RegistryServer(root / "state.json").start_background()
    state = RegistryState()
    state.runs[str(RUN)] = {
        "run_number": RUN,
        "start_time": iso_now(),
        "end_time": None,
        "run_type": "collisions",
        "stable_beam": True,
        "last_lumisection_number": 0,
    }
    state.save(root / "state.json")
    loop_yaml = write_workspace(root, registry_port=registry.port)
    data = yaml.safe_load(loop_yaml.read_text())
    data["poll"].update(observer=observer, polling_interval_s=0.05, tick_s=0.2)
    data["jobs"]["local"]["max_parallel"] = 16
    dump_yaml(loop_yaml, data)
    cal_path = root / "config" / "calibrations" / "EcalPedestals.yaml"
    cal = yaml.safe_load(cal_path.read_text())
    cal["step2"].update(min_ls_per_job=1, max_ls_per_job=1, command=FAST_JOB)
    cal["run_selection"]["min_ls"] = 1
    dump_yaml(cal_path, cal)
    return loop_yaml, registry


def iso_now() -> str:
    from datetime import UTC, datetime

    return iso(datetime.now(UTC))


def submit_latency(observer: str, files: int) -> list[float]:
    """Seconds from rename-into-place to backend.submit, per file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loop_yaml, registry = _workspace(root, observer)
        loop_config = load_loop_config(loop_yaml)
        daemon = Daemon("step2", loop_config, "EcalPedestals")
        submitted: dict[str, float] = {}
        ready, stop = threading.Event(), threading.Event()

        def run() -> None:  # the journal's SQLite connection lives in this thread
            daemon.initialize()
            assert daemon.step is not None
            backend = daemon.step.jobs.backend
            original = backend.submit

            def timed_submit(spec):  # type: ignore[no-untyped-def]
                submitted[spec.argv[-1]] = time.time()
                return original(spec)

            backend.submit = timed_submit  # type: ignore[method-assign]
            ready.set()
            while not stop.is_set():
                daemon.loop(time.time())
                daemon.pause()  # as run_forever: until an event or a timer
            backend.wait_children(30)  # type: ignore[attr-defined]
            daemon.shutdown()

        thread = threading.Thread(target=run)
        thread.start()
        ready.wait(30)
        spec = DetectorSpec(channels=64, events_per_ls=10)
        truth = make_truth(spec, 1)
        arrived: dict[int, float] = {}
        time.sleep(1.0)  # the first registry poll selects the run
        for ls in range(1, files + 1):
            content = generate_ls(
                spec, truth, detector="ecal", run=RUN, ls=ls, seed=1, start_time=0, end_time=1
            )
            write_raw_ls(raw_path(loop_config.raw_root, "ecal", RUN, ls), content)
            arrived[ls] = time.time()
            time.sleep(0.15)
        deadline = time.monotonic() + 20
        while len(submitted) < files and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join()
        registry.stop()
    by_batch = sorted(submitted.values())
    return [t - a for t, a in zip(by_batch, (arrived[k] for k in sorted(arrived)), strict=False)]


def cycle_cost(already: int, cycles: int) -> tuple[float, float]:
    """Mean ms of an idle cycle and of a cycle with one new file, after N processed LS."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loop_yaml, registry = _workspace(root, "inotify")
        loop_config = load_loop_config(loop_yaml)
        daemon = Daemon("step2", loop_config, "EcalPedestals")
        daemon.initialize()
        step = daemon.step
        assert step is not None
        journal = step.journal
        now = time.time()
        step.track(RUN)
        names = [f"run{RUN}_ls{ls:04d}.h5" for ls in range(1, already + 1)]
        journal.add_inputs(RUN, [NewInput(n, ls=i + 1) for i, n in enumerate(names)], now)
        batches = journal.create_batches(RUN, [[n] for n in names], final=False, now=now)
        for batch in batches:
            journal.add_job(RUN, batch, root / "jobs" / str(batch), ["true"], "")
        journal._db.execute("UPDATE jobs SET state='succeeded'")
        step._next_poll = float("inf")  # measure the cycle, not the registry round trip
        daemon.loop(now)
        start = time.perf_counter()
        for _ in range(cycles):
            daemon.loop(time.time())
        idle = (time.perf_counter() - start) / cycles * 1e3
        new_file_ms = []
        for k in range(20):
            ls = already + k + 1
            journal.add_inputs(RUN, [NewInput(f"run{RUN}_ls{ls:04d}.h5", ls=ls)], time.time())
            start = time.perf_counter()
            step.make_batches(RUN, final=False)
            step.create_jobs(RUN)
            new_file_ms.append((time.perf_counter() - start) * 1e3)
        journal._db.execute("UPDATE jobs SET state='succeeded'")
        daemon.shutdown()
        registry.stop()
    return idle, sum(new_file_ms) / len(new_file_ms)


def worker_throughput(files: int) -> list[list[object]]:
    """reco and alca MB/s beside plain h5py reads of the same files."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loop_config = load_loop_config(write_workspace(root))
        cal = load_calibration(loop_config.calibrations_dir / "SiStripBad.yaml")
        spec = DetectorSpec(channels=2048, events_per_ls=200)
        raw_input = cal.raw_input.model_copy(update={"channels": spec.channels})
        cal = cal.model_copy(update={"raw_input": raw_input})
        truth = make_truth(spec, 2)
        paths = []
        for ls in range(1, files + 1):
            content = generate_ls(
                spec, truth, detector="sistrip", run=RUN, ls=ls, seed=2, start_time=0, end_time=1
            )
            path = raw_path(loop_config.raw_root, "sistrip", RUN, ls)
            write_raw_ls(path, content)
            paths.append(path)
        megabytes = files * spec.channels * spec.events_per_ls * 2 / 1e6
        start = time.perf_counter()
        for path in paths:
            with h5py.File(path, "r") as h5:
                h5["frames"][()]
                h5["trigger"][()]
        plain = time.perf_counter() - start
        start = time.perf_counter()
        reco.run(cal, paths, root / "reco", argparse.Namespace())
        reco_s = time.perf_counter() - start
        start = time.perf_counter()
        alca.run(cal, [root / "reco" / reco.OUTPUT], root / "alca", argparse.Namespace())
        alca_s = time.perf_counter() - start
    return [
        ["plain h5py read of the raw files", megabytes / plain, 1.0],
        ["reco worker (read, select, write)", megabytes / reco_s, plain / reco_s],
        ["alca worker (read reco, accumulate)", megabytes / alca_s, plain / alca_s],
    ]


REPO = Path(__file__).resolve().parent.parent
LATENCY_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks._common import percentiles_ms
from benchmarks.loop_latency import submit_latency
from loop.logs import setup_logging
setup_logging(None, "bench", "bench", console=False)
print(json.dumps(percentiles_ms(submit_latency(sys.argv[2], int(sys.argv[3])))))
"""


def latency_in(code: Path, observer: str, files: int) -> tuple[float, float]:
    """(p50, p99) ms of :func:`submit_latency` run by the code at ``code``."""
    result = subprocess.run(
        [sys.executable, "-c", LATENCY_CHILD, str(code), observer, str(files)],
        env={**os.environ, "PYTHONPATH": str(code)},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    p50, p99 = json.loads(result.stdout.strip().splitlines()[-1])
    return p50, p99


def compare_latency(baseline: Path, files: int, repeat: int) -> None:
    """Before (``baseline``) and after (this checkout), interleaved; medians."""
    rows = []
    for observer in ("inotify", "polling"):
        samples: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
        for _ in range(repeat):
            for label, code in (("before", baseline), ("after", REPO)):
                samples[label].append(latency_in(code, observer, files))
        for label, runs in samples.items():
            p50 = statistics.median(r[0] for r in runs)
            p99 = statistics.median(r[1] for r in runs)
            rows.append([observer, label, files, repeat, p50, p99])
    table(
        "raw file renamed into place -> job submitted (ms), medians of interleaved runs",
        ["observer", "code", "files", "runs", "p50", "p99"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--baseline", type=Path, help="compare latency with the code there")
    parser.add_argument("--repeat", type=int, default=5, help="rounds with --baseline")
    args = parser.parse_args()
    if args.baseline is not None:
        compare_latency(args.baseline, args.files, args.repeat)
        return
    setup_logging(None, "bench", "bench", console=False)
    rows = []
    for observer in ("inotify", "polling"):
        p50, p99 = percentiles_ms(submit_latency(observer, args.files))
        rows.append([observer, args.files, p50, p99])
    table(
        "raw file renamed into place -> job submitted (ms)",
        ["observer", "files", "p50", "p99"],
        rows,
    )
    costs = [[n, *cycle_cost(n, args.cycles)] for n in (10, 10_000)]
    table(
        "daemon cycle cost vs LS already processed in the run (ms)",
        ["processed LS", "idle cycle", "cycle with 1 new LS"],
        costs,
    )
    print(
        f"  10,000 vs 10: idle x{costs[1][1] / costs[0][1]:.2f}, "  # type: ignore[operator]
        f"new LS x{costs[1][2] / costs[0][2]:.2f}"
    )  # type: ignore[operator]
    table(
        "worker throughput (MB/s of uncompressed frames)",
        ["what", "MB/s", "vs plain"],
        worker_throughput(20),
    )


if __name__ == "__main__":
    main()
