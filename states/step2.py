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
Skipped                not selected (run type, stable beams, or fewer than min_ls LS)
Failed                 an action raised; quarantined until an operator restarts
=====================  =============================================================

The seed wrote ``runEnd`` before its last jobs finished; here ``run.end`` requires the
registry's end, every LS up to the registry's last LS (or ``max_wait_s`` of grace, with
a WARNING naming the missing ones), and no job still open. An unreachable registry is
never read as an end; a run that never ends is closed after the look-back window.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from enum import Enum, auto
from pathlib import Path
from typing import Any

from transitions import EventData

from loop.errors import RegistryError
from loop.fsutil import atomic_write_json
from loop.rawformat import parse_raw_name, raw_path, run_dir
from loop.registry import RegistryClient, RunInfo
from states.common import Facts, RunModel, Step, StepContext, Transition


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
    FAILED = Step2State.Failed
    step: Step2

    def on_enter_WaitingForLS(self, event: EventData) -> None:
        """Record ``run.start`` (like the seed's runStart.log) once selected."""
        self.step.write_run_start(self.run)

    on_enter_PreparingLS = RunModel.make_batches
    on_enter_PreparingFinalLS = RunModel.make_final_batches
    on_enter_PreparingExpressJobs = RunModel.create_jobs
    on_enter_LaunchingExpressJobs = RunModel.submit_jobs
    on_enter_CleanupState = RunModel.close_run
    on_enter_Done = RunModel.retire
    on_enter_Skipped = RunModel.retire


class Step2(Step):
    """Step 2 of one calibration."""

    name = "step2"
    worker = "reco"
    model_class = Step2Run
    transitions = TRANSITIONS
    initial = Step2State.NotRunning
    final_states = ("Done", "Skipped")
    marker_name = "run.end"

    def __init__(self, ctx: StepContext, registry: RegistryClient) -> None:
        super().__init__(ctx)
        self.registry = registry
        self._next_poll = 0.0
        self._registry_down = False

    @property
    def stream_root(self) -> Path:
        """``<raw_root>/<stream>``."""
        return self.ctx.loop_config.raw_root / self.calibration.raw_input.stream

    def watch_roots(self) -> list[Path]:
        return [self.stream_root]

    def accept(self, path: Path) -> bool:
        return parse_raw_name(path) is not None

    def ingest(self, path: Path) -> None:
        parsed = parse_raw_name(path)
        if parsed is None:
            return
        run, _ls = parsed
        if self.track(run) is None:
            self.log.warning(
                "LS file arrived after the run was closed; not processed", run=run, file=str(path)
            )
            return
        self.journal.add_inputs(run, [path.name], self.clock())

    def startup_scan(self) -> None:
        for run in list(self.models):
            self._scan_run(run)

    def _scan_run(self, run: int) -> None:
        directory = run_dir(self.ctx.loop_config.raw_root, self.calibration.raw_input.stream, run)
        names = [p.name for p in self.watcher.scan(directory, f"run{run}_ls*.h5")]
        if self.journal.add_inputs(run, names, self.clock()):
            self.log.info("LS files found by directory scan", run=run, files=len(names))

    def input_paths(self, run: int, inputs: list[str]) -> list[str]:
        return [str(self.stream_root / f"run{run}" / name) for name in inputs]

    # ----------------------------------------------------------------- registry

    def poll_external(self, now: float) -> None:
        if now < self._next_poll:
            return
        self._next_poll = now + self.ctx.loop_config.poll.registry_s
        since = datetime.fromtimestamp(now - self.ctx.loop_config.lookback_hours * 3600)
        try:
            runs = self.registry.runs(since.astimezone())
        except RegistryError as exc:
            if not self._registry_down:
                self.log.warning(
                    "run registry unavailable; runs keep their last known state", error=str(exc)
                )
            self._registry_down = True
            return
        if self._registry_down:
            self.log.info("run registry reachable again")
        self._registry_down = False
        for info in runs:
            self._update_run(info, now)

    def _update_run(self, info: RunInfo, now: float) -> None:
        is_new = info.run_number not in self.models
        if self.track(info.run_number) is None:
            return
        previous = self.journal.info(info.run_number)
        values: dict[str, Any] = {
            "run_type": info.run_type,
            "stable_beam": info.stable_beam,
            "start_time": info.start_time.timestamp(),
            "ended": info.ended,
            "last_ls": info.last_lumisection_number or 0,
        }
        if info.ended and not previous.get("ended"):
            values["ended_seen_at"] = now
            self.log.info(
                "registry reports run ended",
                run=info.run_number,
                last_ls=info.last_lumisection_number,
            )
        self.journal.update_info(info.run_number, **values)
        seen = self.journal.input_count(info.run_number)
        if is_new or seen < values["last_ls"]:
            self._scan_run(info.run_number)  # safety net for events missed before tracking

    # -------------------------------------------------------------------- facts

    def facts(self, run: int, now: float) -> Facts:
        base = super().facts(run, now)
        info = self.journal.info(run)
        seen = self.journal.input_count(run)
        return replace(
            base,
            selected=self._selected(run, info, seen, now),
            ended=self._ended(run, info, seen, now),
        )

    def _selected(self, run: int, info: dict[str, Any], seen: int, now: float) -> bool | None:
        if "run_type" not in info:  # raw files but no registry entry yet: wait, up to a point
            first = self.journal.first_seen(run) or now
            if now - first <= self.ctx.loop_config.lookback_hours * 3600:
                return None
            self.log.warning(
                "raw files of a run the registry never listed; skipping it after "
                "the look-back window",
                run=run,
                files=seen,
            )
            return False
        selection = self.calibration.run_selection
        if info["run_type"] not in selection.run_types:
            return False
        if selection.stable_beam is not None and info["stable_beam"] != selection.stable_beam:
            return False
        if max(seen, info["last_ls"]) >= selection.min_ls:
            return True
        return False if info["ended"] else None

    def _ended(self, run: int, info: dict[str, Any], seen: int, now: float) -> bool:
        lookback_s = self.ctx.loop_config.lookback_hours * 3600
        if not info.get("ended"):
            if "start_time" in info and now - info["start_time"] > lookback_s:
                if not info.get("lookback_closed"):
                    self.journal.update_info(run, lookback_closed=True)
                    self.log.warning(
                        "run never ended; closing it after the look-back window",
                        run=run,
                        lookback_hours=lookback_s / 3600,
                    )
                return True
            return False
        if seen >= info["last_ls"]:
            return True
        waited = now - info.get("ended_seen_at", now)
        if waited < self.calibration.step2.max_wait_s:
            return False
        if not info.get("missing_reported"):
            missing = self._missing_ls(run, info["last_ls"])
            self.journal.update_info(run, missing_reported=True, missing_ls=missing)
            self.log.warning(
                "run ended but LS files never arrived; closing without them",
                run=run,
                missing_ls=missing,
                waited_s=round(waited),
            )
        return True

    def _missing_ls(self, run: int, last_ls: int) -> list[int]:
        stream = self.calibration.raw_input.stream
        root = self.ctx.loop_config.raw_root
        return [
            ls
            for ls in range(1, last_ls + 1)
            if not self.journal.has_input(run, raw_path(root, stream, run, ls).name)
        ]

    def end_reason(self, run: int) -> str:
        info = self.journal.info(run)
        if info.get("lookback_closed"):
            return "run never ended: closed after the look-back window"
        missing = info.get("missing_ls")
        return "registry reports the run ended" + (
            f"; LS never arrived: {missing}" if missing else ""
        )

    def write_run_start(self, run: int) -> None:
        """``run<R>/step2/run.start``: what the registry said when the run was selected."""
        atomic_write_json(self.step_dir(run) / "run.start", {"run": run, **self.journal.info(run)})

    def batch_sizes(self) -> tuple[int, int]:
        return self.calibration.step2.min_ls_per_job, self.calibration.step2.max_ls_per_job

    def max_wait_s(self) -> float:
        return self.calibration.step2.max_wait_s

    def external_command(self) -> list[str] | None:
        return self.calibration.step2.command
