"""Control-room page latency vs the length of the history in the journals.

Run: ``python benchmarks/web_bench.py``. For work directories whose journals hold 10^2,
10^3 and 10^4 runs (every step of one calibration, as ``tests/web_loop.fill_journals``
writes them: history, jobs, uploads), each served by its own ``calloop web`` application
over real HTTP on loopback, prints side by side in one run (requests interleaved across
the sizes, medians of ``--repeat`` rounds):

* the overview page (``/``) and its live fragment (what each Server-Sent Event renders);
* the run page of a finished run in the middle of the history;
* the paged run list (``/runs/<calibration>``, newest 100);
* for reference, ``calloop runs show``'s reader on the same journals (in process).

Goal: flat in the history size (every query is per run or LIMITed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.commands.runs_cmd import _journals, _step_detail
from loop.conddb.server import ServiceThread
from loop.config import LoopConfig, load_loop_config
from loop.demo import write_workspace
from loop.web.app import create_app
from tests.web_loop import fill_journals

FIRST = 100000
CALIBRATION = "EcalPedestals"


def serve(root: Path, runs: int) -> tuple[ServiceThread, LoopConfig]:
    """A work directory with ``runs`` runs, served by the control room."""
    loop_config = load_loop_config(write_workspace(root))
    started = time.perf_counter()
    fill_journals(loop_config, CALIBRATION, runs, first=FIRST)
    print(f"  {runs} runs written in {time.perf_counter() - started:.1f} s", flush=True)
    return ServiceThread(create_app(loop_config)).start(), loop_config


def cli_show(loop_config: LoopConfig, run: int) -> None:
    """What ``calloop runs show`` reads, without printing."""
    journals = _journals(loop_config, CALIBRATION)
    try:
        for journal in journals.values():
            _step_detail(journal, run)
    finally:
        for journal in journals.values():
            journal.close()


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="calloop-web-bench-") as tmp:
        served = {n: serve(Path(tmp) / str(n), n) for n in args.sizes}
        session = requests.Session()

        def get(url: str) -> Callable[[], object]:
            return lambda: session.get(url, timeout=60).raise_for_status()

        probes: dict[str, dict[int, Callable[[], object]]] = {}
        for n, (service, loop_config) in served.items():
            run = FIRST + n // 2
            probes.setdefault("overview page", {})[n] = get(service.url + "/")
            probes.setdefault("overview fragment (SSE)", {})[n] = get(
                service.url + "/fragment/overview"
            )
            probes.setdefault("run page", {})[n] = get(f"{service.url}/runs/{CALIBRATION}/{run}")
            probes.setdefault("run list (newest 100)", {})[n] = get(
                f"{service.url}/runs/{CALIBRATION}"
            )
            probes.setdefault("reference: runs show reader", {})[n] = lambda c=loop_config, r=run: (
                cli_show(c, r)
            )
        samples: dict[tuple[str, int], list[float]] = {}
        for probe in probes.values():  # warm-up: imports, template compilation, caches
            for fn in probe.values():
                fn()
        for _ in range(args.repeat):
            for name, probe in probes.items():
                for n, fn in probe.items():  # interleaved: the sizes see the same machine
                    start = time.perf_counter()
                    fn()
                    samples.setdefault((name, n), []).append(time.perf_counter() - start)
        for service, _config in served.values():
            service.stop()
            service.server.config.app.state.room.close()
    smallest = min(args.sizes)
    rows = []
    for name in probes:
        medians = {n: statistics.median(samples[(name, n)]) * 1e3 for n in args.sizes}
        rows.append(
            [name]
            + [medians[n] for n in args.sizes]
            + [medians[max(args.sizes)] / medians[smallest]]
        )
    table(
        f"median latency in ms vs runs in the journals ({args.repeat} rounds, interleaved)",
        ["page", *[f"{n} runs" for n in args.sizes], f"ratio {max(args.sizes)}/{smallest}"],
        rows,
    )


if __name__ == "__main__":
    main()
