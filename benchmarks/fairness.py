"""Fair job scheduling: how long a short run's job waits when it starts during a long run.

Run: ``python benchmarks/fairness.py``. A long run's jobs are created as its data arrives
(``--backlog`` of them always waiting for a free slot, as when LS files arrive faster than
jobs finish); once ``--after`` of them were submitted, a later run creates its one job.
Measured side by side with the real JobManager, journal and LocalBackend and fast jobs:
the short run's job from creation to success, and how many of the long run's jobs ended
before it, with pending jobs submitted by (run, batch) (before) and oldest-created first
(after).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.jobs import JobManager, JobPolicy
from loop.journal import JobPhase, JobRow, Journal
from loop.logs import configure_structlog, get_logger
from workers.backends.base import JobStatus
from workers.backends.local import LocalBackend

FAST = [sys.executable, "-S", "-c", "pass"]
LONG_RUN, SHORT_RUN = 386001, 386002
POLICY = JobPolicy(
    max_attempts=1, retry_backoff_s=0, timeout_s=60, key_prefix="Bench.step2", resources={}
)


class RunOrderJournal(Journal):
    """The order before: by run, then batch, so an earlier run's jobs, even those created
    later, all go before a later run's."""

    def due_jobs(self, now: float, limit: int) -> list[JobRow]:
        """Every due job (SQLite's LIMIT -1: no limit), re-sorted by (run, batch)."""
        due = super().due_jobs(now, limit=-1)
        return sorted(due, key=lambda job: (job.run, job.batch))[:limit]


class Scenario:
    """One long run that keeps producing jobs, one short run started during it."""

    def __init__(self, journal: Journal, root: Path, args: argparse.Namespace) -> None:
        self.journal, self.root, self.args = journal, root, args
        self.long_created = 0
        self.long_done = 0
        self.short_created: float | None = None
        self.short_latency: float | None = None
        self.long_done_before_short = 0

    def arrive(self, submitted: int) -> None:
        """New jobs: the long run's while its backlog is short, the short run's once."""
        waiting = self.journal.jobs(run=LONG_RUN, states=(JobPhase.PENDING,))
        for _ in range(self.args.backlog - len(waiting)):
            if self.long_created == self.args.jobs:
                break
            self.long_created += 1
            self.add(LONG_RUN, self.long_created)
        if self.short_created is None and submitted >= self.args.after:
            self.add(SHORT_RUN, 1)
            self.short_created = time.perf_counter()

    def add(self, run: int, batch: int) -> None:
        """Create one fast job."""
        self.journal.add_job(run, batch, self.root / f"run{run}" / f"b{batch:04d}", FAST, "")

    def on_success(self, job: JobRow, _status: JobStatus) -> None:
        """Count the long run's jobs; time the short run's."""
        if job.run == LONG_RUN:
            self.long_done += 1
        elif self.short_created is not None:
            self.short_latency = time.perf_counter() - self.short_created
            self.long_done_before_short = self.long_done


def measure(name: str, journal_class: type[Journal], args: argparse.Namespace) -> list[object]:
    """[ordering, short job's latency, long-run jobs done before it]."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = journal_class(Path(tmp) / "step2.journal.sqlite")
        backend = LocalBackend(args.parallel)
        scenario = Scenario(journal, Path(tmp), args)
        manager = JobManager(
            journal, backend, POLICY, scenario.on_success, get_logger("bench.fairness")
        )
        submitted = 0
        while scenario.short_latency is None:
            scenario.arrive(submitted)
            manager.poll(time.time())
            submitted += manager.submit_ready(time.time())
            time.sleep(args.poll_s)
        backend.wait_children(timeout=60)
        journal.close()
    return [name, scenario.short_latency, scenario.long_done_before_short]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200, help="jobs of the long run")
    parser.add_argument("--parallel", type=int, default=2, help="jobs.local.max_parallel")
    parser.add_argument("--after", type=int, default=6, help="long-run jobs submitted first")
    parser.add_argument("--backlog", type=int, default=2, help="long-run jobs kept waiting")
    parser.add_argument("--poll-s", type=float, default=0.02, help="daemon cycle period")
    args = parser.parse_args()
    configure_structlog()  # through the stdlib, which shows warnings only: no per-job lines
    before = measure("by (run, batch)", RunOrderJournal, args)
    after = measure("oldest created", Journal, args)
    table(
        f"short run's job created during a {args.jobs}-job run "
        f"(max_parallel {args.parallel}, {args.backlog} of its jobs always waiting)",
        ["order", "short job latency s", f"long-run jobs done before (of {args.jobs})"],
        [before, after],
    )
    ratio = float(str(before[1])) / float(str(after[1]))
    print(f"\nlatency before / after: {ratio:.1f}x")


if __name__ == "__main__":
    main()
