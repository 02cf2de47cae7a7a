"""Step 2: run registry + raw LS files -> reco jobs -> witnesses -> ``run.end``.

=====================  =============================================================
State                  Meaning
=====================  =============================================================
NotRunning             run seen (registry or raw files); selection not decided yet
WaitingForLS           selected; waiting for new LS files or the run's end
CheckingLSForProcess   deciding what the pending LS files allow
PreparingLS            grouping full batches of LS files (min..max LS per job)
PreparingFinalLS       grouping the remaining LS files (run ended, or waited max_wait_s)
PreparingExpressJobs   creating a job (directory + command) for each new batch
LaunchingExpressJobs   submitting due jobs to the backend (within its limit)
WaitingForJobs         run ended and every LS is batched; waiting for jobs to settle
CleanupState           every job finished or was given up: writing ``run.end``
Done                   complete
Skipped                not selected (the rule is logged once, INFO), or closed on purpose
                       by an operator (``calloop runs skip``)
Failed                 handling the run raised: quarantined, reason stored (status)
=====================  =============================================================

The seed wrote ``runEnd`` before its last jobs finished; here ``run.end`` requires the
registry's end, every LS number 1..last seen (or ``max_wait_s`` of grace, with a WARNING
naming the missing ones), and no job still open. An unreachable registry is never read
as an end; a run that never ends is closed after the look-back window once no LS came
for ``max_wait_s``. Waits are measured on the monotonic clock, so a wall-clock jump
never closes a run early.

LS files: only canonical names count (``run<R>/run<R>_ls<NNNN>.h5``; anything else is
named in one WARNING and ignored), so one LS is one file. An LS file rewritten after it
was batched is reported with a WARNING and kept out: its job read (or reads) the
content it had when batched, and the payload is not silently re-derived from a
different input; the run's marker and the journal list it.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import datetime
from enum import Enum, auto
from pathlib import Path
from typing import Any

from transitions import EventData

from loop.background import BackgroundCall, ServiceHealth
from loop.errors import RegistryError
from loop.fsutil import atomic_write_json, is_temporary
from loop.journal import NewInput
from loop.rawformat import parse_raw_name, run_dir
from loop.registry import Listing, RegistryClient, RejectedRecord, RunInfo
from loop.runrecord import RunRecord
from loop.selection import select
from states.machine import Facts, RunModel, Transition
from states.step import Step, StepContext


class Step2State(Enum):
    """States of a run in step 2 (see the module table)."""

    NotRunning = auto()
    WaitingForLS = auto()
    CheckingLSForProcess = auto()
    PreparingLS = auto()
    PreparingFinalLS = auto()
    PreparingExpressJobs = auto()
    LaunchingExpressJobs = auto()
    WaitingForJobs = auto()
    CleanupState = auto()
    Done = auto()
    Skipped = auto()
    Failed = auto()


S = Step2State

TRANSITIONS: list[Transition] = [
    {"trigger": "start", "source": S.NotRunning, "dest": S.WaitingForLS, "conditions": "selected"},
    {"trigger": "skip", "source": S.NotRunning, "dest": S.Skipped, "conditions": "rejected"},
    {
        "trigger": "check",
        "source": S.WaitingForLS,
        "dest": S.CheckingLSForProcess,
        "conditions": "has_news",
    },
    {
        "trigger": "recover",
        "source": S.CheckingLSForProcess,
        "dest": S.PreparingExpressJobs,
        "conditions": "has_unjobbed",
    },
    {
        "trigger": "prepare",
        "source": S.CheckingLSForProcess,
        "dest": S.PreparingLS,
        "conditions": "full_batch_ready",
    },
    {
        "trigger": "prepare_final",
        "source": S.CheckingLSForProcess,
        "dest": S.PreparingFinalLS,
        "conditions": "final_batch_ready",
    },
    {
        "trigger": "wait_jobs",
        "source": S.CheckingLSForProcess,
        "dest": S.WaitingForJobs,
        "conditions": "all_batched",
    },
    {
        "trigger": "idle",
        "source": S.CheckingLSForProcess,
        "dest": S.WaitingForLS,
        "conditions": "nothing_ready",
    },
    {
        "trigger": "prepare_jobs",
        "source": [S.PreparingLS, S.PreparingFinalLS],
        "dest": S.PreparingExpressJobs,
    },
    {"trigger": "launch", "source": S.PreparingExpressJobs, "dest": S.LaunchingExpressJobs},
    {"trigger": "resume", "source": S.LaunchingExpressJobs, "dest": S.CheckingLSForProcess},
    {
        "trigger": "more_inputs",
        "source": S.WaitingForJobs,
        "dest": S.CheckingLSForProcess,
        "conditions": "has_pending",
    },
    {
        "trigger": "cleanup",
        "source": S.WaitingForJobs,
        "dest": S.CleanupState,
        "conditions": "jobs_settled",
    },
    {"trigger": "finish", "source": S.CleanupState, "dest": S.Done},
    {"trigger": "fail", "source": "*", "dest": S.Failed},
]


class Step2Run(RunModel):
    """A run in step 2: actions are bound to states here, conditions in the base."""

    STATES = Step2State
    TRANSITIONS = TRANSITIONS
    INITIAL = Step2State.NotRunning
    FAILED = Step2State.Failed
    step: Step2

    def on_enter_WaitingForLS(self, event: EventData) -> None:
        """Record ``run.start`` (like the seed's runStart.log) once selected."""
        self.step.write_run_start(self.run)

    def on_enter_Skipped(self, event: EventData) -> None:
        """Say once why the run is not processed, then retire it."""
        self.step.report_skip(self.run)
        self.retire(event)

    on_enter_PreparingLS = RunModel.make_batches
    on_enter_PreparingFinalLS = RunModel.make_final_batches
    on_enter_PreparingExpressJobs = RunModel.create_jobs
    on_enter_LaunchingExpressJobs = RunModel.submit_jobs
    on_enter_CleanupState = RunModel.close_run
    on_enter_Done = RunModel.retire


class Step2(Step):
    """Step 2 of one calibration."""

    name = "step2"
    worker = "reco"
    model_class = Step2Run
    final_states = ("Done", "Skipped")
    marker_name = "run.end"

    def __init__(self, ctx: StepContext, registry: RegistryClient) -> None:
        super().__init__(ctx)
        self.registry = registry
        self._next_poll = 0.0
        self._registry_down = False
        self._poll: BackgroundCall[Listing[RunInfo]] = BackgroundCall(
            "registry-poll", on_done=self.watcher.wake.set
        )
        self._bad_records: set[tuple[str, str]] = set()  # (run, field) already reported
        self.registry_health = ServiceHealth()
        self._warned: set[Path] = set()  # non-canonical names already reported

    @property
    def stream_root(self) -> Path:
        """``<raw_root>/<stream>``."""
        return self.ctx.loop_config.raw_root / self.calibration.raw_input.stream

    def watch_roots(self) -> list[Path]:
        return [self.stream_root]

    def accept(self, path: Path) -> bool:
        return path.suffix == ".h5" and not is_temporary(path)

    def ingest(self, path: Path) -> None:
        parsed = parse_raw_name(path)
        if parsed is None:
            self._warn_name(path)
            return
        run, ls = parsed
        try:
            stat = path.stat()
        except OSError:
            return  # gone again (renamed away): nothing to record
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        recorded = self.journal.input_meta(run, path.name)
        if recorded is not None:
            if recorded != seen:
                self._rewritten(run, path, seen)
            return
        if self.track(run) is None:
            closed_as = self.journal.run_state(run)
            log = self.log.debug if closed_as == "Skipped" else self.log.warning
            log("LS file arrived after the run was closed; not processed", run=run, file=str(path))
            return
        self.journal.add_inputs(run, [NewInput(path.name, ls=ls, meta=seen)], self.clock())
        self.start_wait(("quiet", run))

    def _warn_name(self, path: Path) -> None:
        if path in self._warned:
            return
        self._warned.add(path)
        self.log.warning(
            "not a canonical LS file name; ignored (expected run<R>/run<R>_ls<NNNN>.h5, "
            "LS >= 1, no extra leading zeros)",
            file=str(path),
        )

    def _rewritten(self, run: int, path: Path, seen: dict[str, int]) -> None:
        """An LS file changed after it was recorded (see the module docstring)."""
        self.journal.set_input_meta(run, path.name, seen)
        if self.journal.input_batch(run, path.name) is None:
            return  # not batched yet: its job will read the new content
        record = self.journal.info(run)
        if path.name not in record.rewritten:
            self.journal.update_info(run, rewritten=[*record.rewritten, path.name])
        self.log.warning(
            "LS file rewritten after it was processed; the new content is kept out "
            "(the run's payload uses the content its job read)",
            run=run,
            file=str(path),
            size=seen["size"],
        )

    def startup_scan(self) -> None:
        for run in list(self.models):
            self._scan_run(run)

    def _scan_run(self, run: int) -> None:
        directory = run_dir(self.ctx.loop_config.raw_root, self.calibration.raw_input.stream, run)
        before = self.journal.input_count(run)
        for path in self.watcher.scan(directory, "*.h5"):
            self.ingest_isolated(path)
        found = self.journal.input_count(run) - before
        if found:
            self.log.info("LS files found by directory scan", run=run, files=found)

    def input_paths(self, run: int, inputs: list[str]) -> list[str]:
        return [str(self.stream_root / f"run{run}" / name) for name in inputs]

    # ----------------------------------------------------------------- registry

    def poll_external(self, now: float) -> None:
        """Apply a finished registry poll; start the next one when due.

        The poll runs on its own thread (:mod:`loop.background`), so a slow or hung
        registry never delays the files of known runs nor the answer to SIGTERM; the
        next poll is scheduled when the previous one returned, not before it started.
        """
        outcome = self._poll.collect()
        if outcome is not None:
            self._next_poll = now + self.ctx.loop_config.poll.registry_s
            if outcome.error is not None:
                self._registry_failed(outcome.error)
            elif outcome.value is not None:
                self._registry_answered(outcome.value, now)
        if now >= self._next_poll and not self._poll.busy:
            since = datetime.fromtimestamp(self._poll_window_start(now)).astimezone()
            self._poll.start(lambda: self.registry.runs(since))

    def timers(self, now: float) -> list[float]:
        """The next registry poll (none while one is in flight: its end wakes the loop)."""
        return [] if self._poll.busy else [self._next_poll - now]

    def _poll_window_start(self, now: float) -> float:
        """The look-back window's start, widened to every open run's start: a run
        being processed is never dropped from the poll (after a wall-clock jump)."""
        start = now - self.ctx.loop_config.lookback_hours * 3600
        for run in self.models:
            started = self.journal.info(run).start_time
            if started is not None:
                start = min(start, started)
        return start

    def _registry_failed(self, error: Exception) -> None:
        self.registry_health.failed(self.clock(), str(error))
        if not isinstance(error, RegistryError):
            error = RegistryError(f"run registry poll failed: {type(error).__name__}: {error}")
        if not self._registry_down:
            self.log.warning(
                "run registry unavailable; runs keep their last known state", error=str(error)
            )
        self._registry_down = True

    def _registry_answered(self, listing: Listing[RunInfo], now: float) -> None:
        self.registry_health.succeeded(now)
        if self._registry_down:
            self.log.info("run registry reachable again")
        self._registry_down = False
        for rejected in listing.rejected:
            self._warn_record(rejected)
        for info in listing.records:
            self._update_run(info, now)

    def _warn_record(self, rejected: RejectedRecord) -> None:
        """One WARNING per bad (run, field) for the daemon's lifetime: a registry that
        keeps serving the same bad record is not reported every poll."""
        key = (rejected.run, rejected.field)
        if key in self._bad_records:
            return
        self._bad_records.add(key)
        self.log.warning(
            "run registry record ignored: a field is invalid; the other runs are processed",
            registry_run=rejected.run,
            field=rejected.field,
            reason=rejected.reason,
        )

    def _update_run(self, info: RunInfo, now: float) -> None:
        is_new = info.run_number not in self.models
        if self.track(info.run_number) is None:
            return
        previous = self.journal.info(info.run_number)
        last_ls = info.last_lumisection_number or 0
        ended_seen_at = previous.ended_seen_at
        if info.ended and not previous.ended:
            ended_seen_at = now
            self.log.info("registry reports run ended", run=info.run_number, last_ls=last_ls)
        self.journal.update_info(
            info.run_number,
            run_type=info.run_type,
            stable_beam=info.stable_beam,
            start_time=info.start_time.timestamp(),
            ended=info.ended,
            last_ls=last_ls,
            ended_seen_at=ended_seen_at,
        )
        if is_new or self.journal.count_ls(info.run_number, last_ls) < last_ls:
            self._scan_run(info.run_number)  # safety net for events missed before tracking

    # -------------------------------------------------------------------- facts

    def facts(self, run: int, now: float) -> Facts:
        base = super().facts(run, now)
        record = self.journal.info(run)
        seen = self.journal.input_count(run)
        return replace(
            base,
            selected=self.selection(run, record, seen, now)[0],
            ended=self._ended(run, record, now),
        )

    def selection(
        self, run: int, record: RunRecord, seen: int, now: float
    ) -> tuple[bool | None, str]:
        """Whether the run is selected (None: not decided yet) and the rule that decided."""
        if record.run_type is not None:
            return select(self.calibration.run_selection, record, seen)
        # raw files but no registry entry yet: wait, up to the look-back window, by the
        # wall clock (the files' age) and by the monotonic clock (a jump is not a wait)
        lookback_s = self.ctx.loop_config.lookback_hours * 3600
        first = self.journal.first_seen(run) or now
        waited = self.held_for(("unlisted", run))
        if now - first <= lookback_s or waited <= lookback_s:
            self.wake_in(max(first + lookback_s - now, lookback_s - waited))
            return None, "waiting for the registry to list the run"
        return False, (
            "the registry never listed the run within the look-back window "
            f"(lookback_hours = {self.ctx.loop_config.lookback_hours:g})"
        )

    def report_skip(self, run: int) -> None:
        """Log (once, at INFO) and record the rule that excluded the run."""
        record = self.journal.info(run)
        _, reason = self.selection(run, record, self.journal.input_count(run), self.clock())
        self.journal.update_info(run, skip_reason=reason)
        self.log.info("run skipped", run=run, rule=reason, run_type=record.run_type)

    def _ended(self, run: int, record: RunRecord, now: float) -> bool:
        if not record.ended:
            return self._never_ending(run, record, now)
        if self.journal.count_ls(run, record.last_ls) >= record.last_ls:
            return True  # every LS number 1..last seen (names are canonical: one per LS)
        waited = self.held_for(("ended", run))
        if waited < self.calibration.step2.max_wait_s:
            self.wake_in(self.calibration.step2.max_wait_s - waited)
            return False
        if record.missing_ls is None:
            missing = self.missing_ls(run, record.last_ls)
            self.journal.update_info(run, missing_ls=missing)
            self.log.warning(
                "run ended but LS files never arrived; closing without them",
                run=run,
                missing_ls=missing,
                waited_s=round(waited),
            )
        return True

    def _never_ending(self, run: int, record: RunRecord, now: float) -> bool:
        """A run the registry never ends is closed once it started longer ago than the
        look-back window (wall clock, against the registry's start time) AND no LS
        arrived for ``max_wait_s`` (monotonic): a wall-clock jump alone never closes a
        run that still receives LS."""
        lookback_s = self.ctx.loop_config.lookback_hours * 3600
        if record.start_time is None:
            return False
        if now - record.start_time <= lookback_s:
            self.wake_in(record.start_time + lookback_s - now)
            return False
        quiet = self.held_for(("quiet", run))
        if quiet < self.calibration.step2.max_wait_s:
            self.wake_in(self.calibration.step2.max_wait_s - quiet)
            return False
        if not record.lookback_closed:
            self.journal.update_info(run, lookback_closed=True)
            self.log.warning(
                "run never ended; closing it after the look-back window",
                run=run,
                lookback_hours=lookback_s / 3600,
                no_ls_for_s=round(quiet),
            )
        return True

    def missing_ls(self, run: int, last_ls: int) -> list[int]:
        """The LS numbers 1..``last_ls`` never seen."""
        seen = self.journal.seen_ls(run, last_ls)
        return [ls for ls in range(1, last_ls + 1) if ls not in seen]

    def end_reason(self, run: int) -> str:
        record = self.journal.info(run)
        if record.lookback_closed:
            return "run never ended: closed after the look-back window"
        notes = []
        if record.missing_ls:
            notes.append(f"LS never arrived: {record.missing_ls}")
        if record.rewritten:
            notes.append(f"rewritten after processing, kept out: {record.rewritten}")
        return "; ".join(["registry reports the run ended", *notes])

    def write_run_start(self, run: int) -> None:
        """``run<R>/step2/run.start``: what the registry said when the run was selected."""
        atomic_write_json(
            self.step_dir(run) / "run.start", {"run": run, **self.journal.info(run).to_json()}
        )

    def batch_sizes(self) -> tuple[int, int]:
        return self.calibration.step2.min_ls_per_job, self.calibration.step2.max_ls_per_job

    def max_wait_s(self) -> float:
        return self.calibration.step2.max_wait_s

    def external_command(self) -> list[str] | None:
        return self.calibration.step2.command

    def status(self) -> dict[str, Any]:
        return {**super().status(), "registry": asdict(self.registry_health)}
