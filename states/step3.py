"""Step 3: step-2 witnesses -> ALCA jobs (mergeable accumulators) -> ``step3.done``.

=====================  =============================================================
State                  Meaning
=====================  =============================================================
NotRunning             a step-2 witness of the run was seen
WaitingForFiles        waiting for more step-2 witnesses or step 2's ``run.end``
CheckingFiles          deciding what the pending reco outputs allow
PreparingFiles         grouping full batches of reco outputs
PreparingFinalFiles    grouping the rest (``run.end`` seen, or waited max_wait_s)
PreparingAlCaJobs      creating a job for each new batch
LaunchingAlCaJobs      submitting due jobs
WaitingForJobs         step 2 complete and everything batched; jobs still open
Cleanup                writing ``step3.done`` (lists every witness, every failed batch)
Done                   complete
Skipped                closed on purpose by an operator (``calloop runs skip``)
Failed                 handling the run raised: quarantined, reason stored (status)
=====================  =============================================================
"""

from __future__ import annotations

from enum import Enum, auto

from states.machine import RunModel, Transition
from states.upstream import FollowsUpstream


class Step3State(Enum):
    """States of a run in step 3 (see the module table)."""

    NotRunning = auto()
    WaitingForFiles = auto()
    CheckingFiles = auto()
    PreparingFiles = auto()
    PreparingFinalFiles = auto()
    PreparingAlCaJobs = auto()
    LaunchingAlCaJobs = auto()
    WaitingForJobs = auto()
    Cleanup = auto()
    Done = auto()
    Skipped = auto()
    Failed = auto()


S = Step3State

TRANSITIONS: list[Transition] = [
    {
        "trigger": "start",
        "source": S.NotRunning,
        "dest": S.WaitingForFiles,
        "conditions": "selected",
    },
    {
        "trigger": "check",
        "source": S.WaitingForFiles,
        "dest": S.CheckingFiles,
        "conditions": "has_news",
    },
    {
        "trigger": "recover",
        "source": S.CheckingFiles,
        "dest": S.PreparingAlCaJobs,
        "conditions": "has_unjobbed",
    },
    {
        "trigger": "prepare",
        "source": S.CheckingFiles,
        "dest": S.PreparingFiles,
        "conditions": "full_batch_ready",
    },
    {
        "trigger": "prepare_final",
        "source": S.CheckingFiles,
        "dest": S.PreparingFinalFiles,
        "conditions": "final_batch_ready",
    },
    {
        "trigger": "wait_jobs",
        "source": S.CheckingFiles,
        "dest": S.WaitingForJobs,
        "conditions": "all_batched",
    },
    {
        "trigger": "idle",
        "source": S.CheckingFiles,
        "dest": S.WaitingForFiles,
        "conditions": "nothing_ready",
    },
    {
        "trigger": "prepare_jobs",
        "source": [S.PreparingFiles, S.PreparingFinalFiles],
        "dest": S.PreparingAlCaJobs,
    },
    {"trigger": "launch", "source": S.PreparingAlCaJobs, "dest": S.LaunchingAlCaJobs},
    {"trigger": "resume", "source": S.LaunchingAlCaJobs, "dest": S.CheckingFiles},
    {
        "trigger": "cleanup",
        "source": S.WaitingForJobs,
        "dest": S.Cleanup,
        "conditions": "jobs_settled",
    },
    {"trigger": "finish", "source": S.Cleanup, "dest": S.Done},
    {"trigger": "fail", "source": "*", "dest": S.Failed},
]


class Step3Run(RunModel):
    """A run in step 3."""

    STATES = Step3State
    TRANSITIONS = TRANSITIONS
    INITIAL = Step3State.NotRunning
    FAILED = Step3State.Failed

    on_enter_PreparingFiles = RunModel.make_batches
    on_enter_PreparingFinalFiles = RunModel.make_final_batches
    on_enter_PreparingAlCaJobs = RunModel.create_jobs
    on_enter_LaunchingAlCaJobs = RunModel.submit_jobs
    on_enter_Cleanup = RunModel.close_run
    on_enter_Done = RunModel.retire


class Step3(FollowsUpstream):
    """Step 3 of one calibration."""

    name = "step3"
    worker = "alca"
    model_class = Step3Run
    final_states = ("Done", "Skipped")
    marker_name = "step3.done"
    upstream = "step2"
    upstream_marker = "run.end"

    def batch_sizes(self) -> tuple[int, int]:
        return self.calibration.step3.min_files_per_job, self.calibration.step3.max_files_per_job

    def max_wait_s(self) -> float:
        return self.calibration.step3.max_wait_s

    def external_command(self) -> list[str] | None:
        return self.calibration.step3.command
