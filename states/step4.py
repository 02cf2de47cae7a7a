"""Step 4: step-3 witnesses -> harvests -> calibration store -> conditions DB.

=========================  =========================================================
State                      Meaning
=========================  =========================================================
NotRunning                 a step-3 witness of the run was seen
WaitingForDependencies     waiting until every calibration of ``depends_on`` has finished
                           the run (see :mod:`states.dependencies`), and with
                           ``statistics.across_runs`` every earlier run of this one; then
                           their payloads (and the statistics inherited) are resolved
WaitingForFiles            waiting for more ALCA outputs or step 3's ``step3.done``
CheckingFiles              deciding whether to (re-)harvest, do the final harvest or close
PreparingFiles             grouping the new ALCA outputs of an intermediate harvest
PreparingFinalFiles        grouping the last ALCA outputs (``step3.done`` seen)
PreparingHarvestingJobs    creating the harvest job (previous state + new outputs only)
LaunchingHarvestingJobs    submitting it
WaitingForHarvest          one harvest per run at a time: waiting for it to finish
Uploading                  validating the payload, writing a store version, queuing the
                           upload in the outbox (a failed validation is stored retired; a
                           harvest short of ``statistics.min_events`` is held back)
Cleanup                    step 3 complete, all harvested: ``step4.done`` and
                           ``summary.json`` written (the final upload queued)
WaitingForUpload           the final payload is not in the conditions DB yet (service
                           down, token refused): retried until it is
Done                       complete: the final payload passed validation and is in the
                           conditions DB (or the run produced no payload)
Rejected                   complete, but the final payload failed validation: kept in
                           the store (retired) for inspection, not uploaded
UploadRefused              complete, but the conditions DB refused the final payload
                           for good (e.g. a synchronization rule): in the store only
Skipped                    closed on purpose by an operator (``calloop runs skip``)
Failed                     handling the run raised: quarantined, reason stored (status)
=========================  =========================================================

Harvests of a run are serialized and chained (each merges the previous state with the
new accumulators), so a re-harvest costs what is new and parallel harvests can never
upload out of order. Each harvest publishes with its own frozen configuration
(validation thresholds, tag, time type), whose SHA-256 goes into the store version,
the upload and ``summary.json``. With ``step4.upload_intermediate: false`` every
harvest is stored but only the run's newest accepted payload is uploaded, at Cleanup.

A calibration with ``depends_on`` harvests a run only once each dependency has finished
it (no busy wait: the run is looked at again every ``poll.heartbeat_s``); every harvest
job of the run gets the dependencies' payloads (``--dependency NAME=PATH``), and the
store version and ``summary.json`` name the versions used (``inputs``).

With ``statistics.min_events`` a harvest short of them is held back; with
``statistics.across_runs`` a run that ends short hands its statistics on to the next run
(outcome ``carried``), whose payload is valid from the first run used
(:mod:`states.accumulation`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from enum import Enum, auto
from pathlib import Path
from typing import Any

import numpy as np
from transitions import EventData

from loop import __version__
from loop.conddb.client import Conditions
from loop.conddb.rules import lumi_since
from loop.config import CalibrationConfig, calibration_path, load_calibration
from loop.control.runcontrol import Command, approve_refusal, rerun_refusal
from loop.errors import StoreError
from loop.fsutil import atomic_write_json
from loop.jobconfig import FROZEN_CONFIG, load_frozen
from loop.journal import JobPhase, JobRow
from loop.manifest import Manifest, ManifestError
from loop.outbox import REFUSED, Outbox, upload_seq
from loop.runrecord import RunRecord
from loop.store import CalibStore, Validity
from states.accumulation import (
    Carry,
    hand_on,
    predecessor,
    read_carry,
    write_carry,
)
from states.dependencies import (
    RESOLVED,
    DependencyInput,
    awaited,
    dependency_state,
    read_inputs,
    resolve,
    runs_before,
    stage,
    write_inputs,
)
from states.lumi import ready_groups, validate_groups
from states.machine import Facts, RunModel, Transition
from states.step import CommandRefused, StepContext
from states.upstream import FollowsUpstream
from workers.algorithms import Payload, validate
from workers.harvest import PAYLOAD, STATE, SUMMARY


class Step4State(Enum):
    """States of a run in step 4 (see the module table)."""

    NotRunning = auto()
    WaitingForDependencies = auto()
    WaitingForFiles = auto()
    CheckingFiles = auto()
    PreparingFiles = auto()
    PreparingFinalFiles = auto()
    PreparingHarvestingJobs = auto()
    LaunchingHarvestingJobs = auto()
    WaitingForHarvest = auto()
    Uploading = auto()
    Cleanup = auto()
    WaitingForUpload = auto()
    Done = auto()
    Rejected = auto()
    UploadRefused = auto()
    Skipped = auto()
    Failed = auto()


S = Step4State

TRANSITIONS: list[Transition] = [
    {
        "trigger": "start",
        "source": S.NotRunning,
        "dest": S.WaitingForDependencies,
        "conditions": "selected",
    },
    {
        "trigger": "proceed",
        "source": S.WaitingForDependencies,
        "dest": S.WaitingForFiles,
        "conditions": "dependencies_met",
        "before": "record_dependencies",
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
        "dest": S.PreparingHarvestingJobs,
        "conditions": "has_unjobbed",
    },
    {
        "trigger": "prepare",
        "source": S.CheckingFiles,
        "dest": S.PreparingFiles,
        "conditions": "harvest_ready",
    },
    {
        "trigger": "prepare_final",
        "source": S.CheckingFiles,
        "dest": S.PreparingFinalFiles,
        "conditions": "final_harvest_ready",
    },
    {
        "trigger": "publish",
        "source": S.CheckingFiles,
        "dest": S.Uploading,
        "conditions": "has_unpublished",
    },
    {
        "trigger": "cleanup",
        "source": S.CheckingFiles,
        "dest": S.Cleanup,
        "conditions": "all_harvested",
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
        "dest": S.PreparingHarvestingJobs,
    },
    {"trigger": "launch", "source": S.PreparingHarvestingJobs, "dest": S.LaunchingHarvestingJobs},
    {"trigger": "wait_jobs", "source": S.LaunchingHarvestingJobs, "dest": S.WaitingForHarvest},
    {
        "trigger": "resume",
        "source": S.WaitingForHarvest,
        "dest": S.Uploading,
        "conditions": "jobs_settled",
    },
    {"trigger": "more_inputs", "source": S.Uploading, "dest": S.CheckingFiles},
    {
        "trigger": "await_upload",
        "source": S.Cleanup,
        "dest": S.WaitingForUpload,
        "unless": "final_rejected",
    },
    {
        "trigger": "reject",
        "source": S.Cleanup,
        "dest": S.Rejected,
        "conditions": ["uploads_settled", "final_rejected"],
    },
    {
        "trigger": "finish",
        "source": S.WaitingForUpload,
        "dest": S.Done,
        "conditions": ["uploads_settled", "final_uploaded"],
    },
    {
        "trigger": "refused",
        "source": S.WaitingForUpload,
        "dest": S.UploadRefused,
        "conditions": ["uploads_settled", "final_refused"],
    },
    {"trigger": "fail", "source": "*", "dest": S.Failed},
]


class Step4Run(RunModel):
    """A run in step 4."""

    STATES = Step4State
    TRANSITIONS = TRANSITIONS
    INITIAL = Step4State.NotRunning
    FAILED = Step4State.Failed
    step: Step4

    # pure conditions specific to harvesting
    def dependencies_met(self, _event: EventData) -> bool:
        """Every calibration of ``depends_on`` finished the run as the policy requires."""
        return not self.facts.awaiting

    def harvest_ready(self, _event: EventData) -> bool:
        """Enough new ALCA outputs for an intermediate harvest, cadence permitting."""
        f = self.facts
        return not f.ended and f.jobs_open == 0 and f.harvest_allowed and f.pending >= f.min_batch

    def final_harvest_ready(self, _event: EventData) -> bool:
        """Step 3 is complete and there is something left to harvest."""
        f = self.facts
        return f.ended and f.jobs_open == 0 and f.pending > 0

    def all_harvested(self, _event: EventData) -> bool:
        """Step 3 complete, every output harvested and published."""
        f = self.facts
        return (
            f.ended
            and f.jobs_open == 0
            and f.pending == 0
            and f.unjobbed == 0
            and not f.unpublished
        )

    def has_unpublished(self, _event: EventData) -> bool:
        """A finished harvest was never published (its publication failed and the run
        was retried): publish it before anything else."""
        return self.facts.unpublished and self.facts.jobs_open == 0

    def has_news(self, event: EventData) -> bool:
        return (
            self.has_unpublished(event)
            or self.has_unjobbed(event)
            or self.harvest_ready(event)
            or self.final_harvest_ready(event)
            or self.all_harvested(event)
        )

    def uploads_settled(self, _event: EventData) -> bool:
        """The outbox holds nothing more for this run."""
        return self.facts.uploads_pending == 0

    def final_rejected(self, _event: EventData) -> bool:
        """The run's newest harvest failed validation."""
        return self.facts.rejected

    def final_uploaded(self, _event: EventData) -> bool:
        """The final payload is in the conditions DB (or there is none to upload)."""
        return self.facts.final_upload in (None, "done", "superseded")

    def final_refused(self, _event: EventData) -> bool:
        """The conditions DB refused the final payload for good."""
        return self.facts.final_upload == "refused"

    def record_dependencies(self, _event: EventData) -> None:
        """Resolve the dependency payloads the run's harvests use (raises, sending the
        run to Failed, when the policy finds none usable)."""
        self.step.record_dependencies(self.run)

    on_enter_PreparingFiles = RunModel.make_batches  # one batch of all new outputs
    on_enter_PreparingFinalFiles = RunModel.make_final_batches
    on_enter_PreparingHarvestingJobs = RunModel.create_jobs
    on_enter_LaunchingHarvestingJobs = RunModel.submit_jobs

    def on_enter_Uploading(self, _event: EventData) -> None:
        """Store and queue every finished harvest not yet published."""
        self.step.publish(self.run)

    on_enter_Cleanup = RunModel.close_run

    def on_enter_Done(self, event: EventData) -> None:
        """Record the upload outcome in ``summary.json``, then retire."""
        self.step.write_summary(self.run)
        self.retire(event)

    on_enter_Rejected = on_enter_Done
    on_enter_UploadRefused = on_enter_Done


class Step4(FollowsUpstream):
    """Step 4 of one calibration."""

    name = "step4"
    worker = "harvest"
    model_class = Step4Run
    final_states = ("Done", "Rejected", "UploadRefused", "Skipped")
    ATTENTION_STATES = ("Failed", "Rejected", "UploadRefused")
    marker_name = "step4.done"
    upstream = "step3"
    upstream_marker = "step3.done"

    def __init__(
        self, ctx: StepContext, store: CalibStore, connect: Callable[[], Conditions]
    ) -> None:
        super().__init__(ctx)
        self.store = store
        self.outbox = Outbox(
            self.journal,
            connect,
            lambda: self.calibration,
            self.log,
            backoff_s=ctx.loop_config.jobs.retry_backoff_s,
            credentials=self._token_stamp,
            monotonic=ctx.monotonic,
            on_done=self.watcher.wake.set,
        )
        self.waiting_for: dict[int, tuple[str, ...]] = {}  # run -> what it waits for

    def _token_stamp(self) -> tuple[int, int] | None:
        """Changes when the token file is edited or replaced (the outbox then retries)."""
        path = self.ctx.loop_config.conddb_token_file
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            return None
        return None if stat is None else (stat.st_mtime_ns, stat.st_size)

    def batch_sizes(self) -> tuple[int, int]:
        return self.calibration.step4.harvest_every_files, 10**9  # one batch = one harvest

    def max_wait_s(self) -> float:
        return float("inf")  # intermediate harvests follow the cadence, not a timeout

    def external_command(self) -> list[str] | None:
        return self.calibration.step4.command

    def facts(self, run: int, now: float) -> Facts:
        base = super().facts(run, now)
        record = self.journal.info(run)
        succeeded = {j.batch for j in self.journal.jobs(run=run, states=(JobPhase.SUCCEEDED,))}
        since_harvest = now - record.last_harvest_at
        interval_ok = since_harvest >= self.calibration.step4.min_interval_s
        if not interval_ok and base.pending:
            self.wake_in(self.calibration.step4.min_interval_s - since_harvest)
        return replace(
            base,
            awaiting=self._awaiting(run),
            harvests=self.journal.batch_count(run),
            unpublished=bool(succeeded - set(record.published)),
            uploads_pending=self.outbox.pending(run),
            harvest_allowed=interval_ok,
            rejected=bool(record.last_problems),
            final_upload=self._final_upload(run, record),
        )

    def _final_upload(self, run: int, record: RunRecord) -> str | None:
        """The outbox state of the run's final payload (None: none queued); of a lumi
        run, ``refused`` when the conditions DB refused any of its LS groups."""
        if record.accepted_harvest is None:
            return None
        if self.calibration.payload.time_type == "lumi":
            return REFUSED if self.journal.uploads(states=(REFUSED,), run=run) else None
        return self.outbox.final_state(run, record.accepted_harvest)

    # ---------------------------------------------------------------- dependencies

    def _awaiting(self, run: int) -> tuple[str, ...]:
        """The dependencies a run in WaitingForDependencies still waits for (read from
        their journals only in that state); it is looked at again after
        ``poll.heartbeat_s``, as nothing announces a change in another daemon."""
        model = self.models.get(run)
        if model is None or model.state is not S.WaitingForDependencies:
            self.waiting_for.pop(run, None)
            return ()
        cal = self.calibration
        work_dir = self.ctx.loop_config.work_dir
        states = [dependency_state(work_dir, name, run) for name in cal.depends_on]
        waiting = awaited(states, cal.step4.on_dependency_missing)
        if cal.statistics.across_runs:  # statistics are handed on in run order
            earlier = [
                r
                for r in runs_before(work_dir, cal.name, run)
                if not dependency_state(work_dir, cal.name, r).finished
            ]
            if earlier:
                listed = ", ".join(map(str, earlier))
                waiting = (*waiting, f"{cal.name}: earlier run(s) {listed} to finish")
        if waiting:
            self.waiting_for[run] = waiting
            self.wake_in(self.ctx.loop_config.poll.heartbeat_s)
        else:
            self.waiting_for.pop(run, None)
        return waiting

    def record_dependencies(self, run: int) -> None:
        """Resolve the payload of each dependency for the run and record them in
        ``run<R>/step4/dependencies.json`` (what every later harvest job of the run
        stages): raises :class:`~states.dependencies.DependencyError` when the policy
        finds none usable."""
        path = self.step_dir(run) / RESOLVED
        cal = self.calibration
        self._inherit_statistics(run)
        if not cal.depends_on:
            path.unlink(missing_ok=True)  # a calibration that no longer depends on any
            return
        loop_config = self.ctx.loop_config
        states = [dependency_state(loop_config.work_dir, name, run) for name in cal.depends_on]
        configs = {
            name: load_calibration(calibration_path(loop_config, name)) for name in cal.depends_on
        }
        inputs = resolve(run, states, configs, self.store, cal.step4.on_dependency_missing)
        write_inputs(path, inputs)
        previous = [i.calibration for i in inputs if i.source == "previous"]
        (self.log.warning if previous else self.log.info)(
            "dependencies resolved"
            + ("; an earlier payload stands in for: " + ", ".join(previous) if previous else ""),
            run=run,
            dependencies=[s.describe() for s in states],
            inputs=[i.to_json() for i in inputs],
        )

    # ----------------------------------------------------- statistics across runs

    def _inherit_statistics(self, run: int) -> None:
        """Record the statistics the run inherits from the run before it
        (``statistics.across_runs``; see :mod:`states.accumulation`)."""
        carry = None
        before = predecessor(self.journal.all_runs(), run)
        if self.calibration.statistics.across_runs and before is not None:
            record = self.journal.info(before[0])
            if before[1] == "Done" and record.carry is not None:
                carry = Carry.from_json(record.carry)
        write_carry(self.step_dir(run), carry)
        if carry is not None:
            self.log.info(
                "statistics inherited from earlier runs", run=run, carried=carry.describe()
            )

    def _range_runs(self, run: int) -> list[int]:
        """The runs a payload of ``run`` is derived from: those it inherited, then itself."""
        carry = read_carry(self.step_dir(run))
        return [*(carry.runs if carry else []), run]

    def _held_back(self, run: int, job: JobRow, cal: CalibrationConfig, payload: Payload) -> bool:
        """Hold back a harvest short of ``statistics.min_events``: nothing stored or
        uploaded (the run's later harvests, or the next run, add to it)."""
        needed = cal.statistics.min_events
        events = int(payload.summary.get("events", 0))
        if needed is None or events >= needed:
            self.journal.update_info(run, held_events=None)
            return False
        self.journal.update_info(run, held_events=events)
        self.log.info(
            "payload held back: too few events yet (statistics.min_events)",
            run=run,
            harvest=job.batch,
            events=events,
            needed=needed,
            runs=self._range_runs(run),
        )
        return True

    def _hand_on(self, run: int, record: RunRecord) -> None:
        """At the end of a run short of its statistics (``across_runs``), hand them on
        to the next run: a copy of the last harvest's state, the runs and events."""
        if not self.calibration.statistics.across_runs or record.held_events is None:
            return
        if record.accepted_harvest is not None or not record.published:
            return
        last = self.journal.job(run, record.published[-1])
        if last is None:
            return
        carry = hand_on(
            self.step_dir(run),
            last.job_dir / "out" / STATE,
            self._range_runs(run),
            record.held_events,
        )
        self.journal.update_info(run, carry=asdict(carry))
        self.log.info(
            "run ended short of its statistics: handed on to the next run",
            run=run,
            carried=carry.describe(),
            needed=self.calibration.statistics.min_events,
        )

    def _dependency_args(self, run: int, job_dir: Path) -> list[str]:
        """Stage the run's resolved dependency payloads into the job directory and
        return the worker's ``--dependency NAME=PATH`` options (an own command finds
        the files under ``{job_dir}/dependencies/``)."""
        inputs = read_inputs(self.step_dir(run) / RESOLVED)
        if not inputs:
            return []
        staged = stage(job_dir, inputs, self.store)
        return [arg for name, path in staged.items() for arg in ("--dependency", f"{name}={path}")]

    # --------------------------------------------------------------- harvest jobs

    def _previous_harvest(self, run: int, batch: int) -> JobRow | None:
        """The newest succeeded harvest before ``batch`` in its chain (a rerun starts a
        new chain: it merges nothing of the harvests before it)."""
        chain = self.journal.info(run).chain_start
        start = chain if batch >= chain else 0
        previous = [
            j
            for j in self.journal.jobs(run=run, states=(JobPhase.SUCCEEDED,))
            if start <= j.batch < batch
        ]
        return previous[-1] if previous else None

    def job_inputs(self, run: int, batch: int) -> list[str]:
        """Every input since the newest succeeded harvest (a given-up harvest's inputs
        are folded into the next one)."""
        previous = self._previous_harvest(run, batch)
        since = previous.batch if previous else 0
        return [n for b in range(since + 1, batch + 1) for n in self.journal.inputs_of(run, b)]

    def job_argv(
        self, run: int, batch: int, inputs: list[str], job_dir: Path, config_path: Path
    ) -> list[str]:
        """Chain on the newest succeeded harvest's state, with the dependency payloads
        (staged into the job directory here, as the frozen configuration is)."""
        argv = super().job_argv(run, batch, inputs, job_dir, config_path)
        dependencies = self._dependency_args(run, job_dir)
        if self.external_command() is not None:
            return argv
        previous = self._previous_harvest(run, batch)
        carry = read_carry(self.step_dir(run))
        if previous:
            argv += ["--previous-state", str(previous.job_dir / "out" / STATE)]
        elif carry is not None:  # the chain starts from the statistics inherited
            argv += ["--previous-state", carry.state]
        return argv + dependencies

    def rerun(self, run: int) -> str:
        """Recalibrate a finished run: a new harvest of every ALCA output of the run
        (no earlier harvest merged in) with the configuration as it is now, then
        validated, stored and uploaded as any harvest, and the run finishes again. The
        earlier versions and uploads stay; the new version supersedes them as the run's
        payload (or is Rejected, stored retired, when it fails validation)."""
        why = rerun_refusal(self.journal.run_state(run))
        if why is not None:
            raise CommandRefused(f"run {run}: {why}")
        batch = self.journal.add_empty_batch(run, now=self.clock())
        self.journal.update_info(
            run,
            chain_start=batch,
            accepted_harvest=None,
            accepted_version=None,
            last_problems=[],
            last_harvest_at=0.0,
        )
        initial = self.restart_run(run)
        return f"run {run} back in {initial}: harvest {batch} of every input of the run"

    def create_jobs(self, run: int) -> list[int]:
        """Create the harvest job and start the cadence clock."""
        created = super().create_jobs(run)
        if created:
            self.journal.update_info(run, last_harvest_at=self.clock())
        return created

    def record_success(self, job: JobRow, manifest: Manifest) -> None:
        """A harvest must declare a payload and a summary (published in Uploading)."""
        declared = {o.name for o in manifest.outputs}
        for name in (PAYLOAD, SUMMARY):
            if name not in declared:
                raise ManifestError(f"harvest of run {job.run} #{job.batch} declared no {name}")
        super().record_success(job, manifest)

    # ----------------------------------------------------------------- publishing

    def publish(self, run: int) -> None:
        """Validate, store (exactly once per harvest) and queue each finished harvest."""
        published = list(self.journal.info(run).published)
        for job in self.journal.jobs(run=run, states=(JobPhase.SUCCEEDED,)):
            if job.batch not in published:
                self._publish_one(run, job)
                published.append(job.batch)
                self.journal.update_info(run, published=published)

    def _publish_one(self, run: int, job: JobRow) -> None:
        cal, out, payload = _harvest_output(job)
        if self._held_back(run, job, cal, payload):
            return
        detector = self.store.detector(cal.detector, create=True)
        version = self._stored_version(detector, cal, run, _harvest_key(cal, job))
        if version is None:
            previous = self._previous(detector, cal, run)
            problems, extra = self._validate(cal, payload, previous, out)
            version = self._store_version(
                detector,
                job,
                cal,
                payload,
                problems=problems,
                comment=f"harvest {job.batch}",
                extra=extra,
            )
        else:
            problems = list(
                detector.get(cal.payload.ctype, version=version).metadata.get(
                    "validation_problems", []
                )
            )
        self.journal.update_info(
            run,
            last_version=version,
            last_problems=problems,
            last_config_sha256=job.config_sha256,
        )
        if problems:
            self.log.error(
                "payload failed validation: stored as a retired version, not uploaded",
                run=run,
                harvest=job.batch,
                version=version,
                problems=problems,
            )
            return
        self.journal.update_info(run, accepted_harvest=job.batch, accepted_version=version)
        if cal.step4.upload_intermediate:
            self._queue_upload(run, job, cal, version)
        self.log.info(
            "payload stored" + (" and queued for upload" if cal.step4.upload_intermediate else ""),
            run=run,
            harvest=job.batch,
            version=version,
            events=payload.summary.get("events"),
            bad_channels=payload.summary.get("bad_channels"),
        )

    def _store_version(
        self,
        detector: Any,
        job: JobRow,
        cal: CalibrationConfig,
        payload: Payload,
        *,
        problems: list[str],
        comment: str,
        extra: dict[str, Any],
    ) -> str:
        """Add a harvest's payload to the store (retired when ``problems``), its
        provenance and ``extra`` in the metadata, under the key a repeated publication
        finds it by (:func:`_harvest_key`; an approval's own)."""
        runs = self._range_runs(job.run)
        return str(
            detector.add(
                cal.payload.ctype,
                payload.array,
                begin=runs[0],
                retired=bool(problems),
                allow_nonfinite=cal.validation.allow_nonfinite,
                comment=comment,
                metadata={
                    "harvest_key": _harvest_key(cal, job, approved="approved" in extra),
                    "source_runs": runs,
                    "config_sha256": job.config_sha256,
                    "software": f"calloop {__version__}",
                    "author": f"calloop step4 ({cal.expert.email})",
                    "quality": payload.summary,
                    "validation_problems": problems,
                    "inputs": _inputs_json(read_inputs(job.job_dir / RESOLVED)),
                    **extra,
                },
            )
        )

    def approve(self, command: Command) -> str:
        """An expert's approval of a Rejected run: its final payload, stored retired
        because it failed validation, is stored again as an accepted version (versions
        are immutable: the retired one stays, for the record) whose metadata names the
        approval (who, why, the problems overridden, the version approved), and queued
        for upload; the run waits for the upload and ends Done."""
        run = command.run
        why = approve_refusal(self.journal.run_state(run))
        if why is not None:
            raise CommandRefused(f"run {run}: {why}")
        record = self.journal.info(run)
        job = self.journal.job(run, record.published[-1]) if record.published else None
        if job is None or record.last_version is None:
            raise CommandRefused(f"run {run}: no rejected payload to approve")
        cal, _out, payload = _harvest_output(job)
        detector = self.store.detector(cal.detector, create=True)
        version = self._stored_version(detector, cal, run, _harvest_key(cal, job, approved=True))
        if version is None:
            version = self._store_version(
                detector,
                job,
                cal,
                payload,
                problems=[],
                comment=f"approved by {command.user}: {command.reason}",
                extra={
                    "approved": {
                        "version": record.last_version,
                        "overridden_problems": record.last_problems,
                        "by": f"{command.user}@{command.host}",
                        "reason": command.reason,
                    }
                },
            )
        self.journal.update_info(
            run,
            last_version=version,
            last_problems=[],
            accepted_harvest=job.batch,
            accepted_version=version,
        )
        self._queue_upload(run, job, cal, version, approved=True)
        state = self.restart_run(run, S.WaitingForUpload.name)
        return (
            f"run {run}: {record.last_version} approved as {version}, queued for upload ({state})"
        )

    def _validate(
        self, cal: CalibrationConfig, payload: Payload, previous: np.ndarray | None, out: Path
    ) -> tuple[list[str], dict[str, Any]]:
        """(problems, metadata to store with the version): the kind's checks, of each
        LS group of a lumi calibration apart (:mod:`states.lumi`)."""
        if cal.payload.time_type != "lumi":
            return validate(payload, previous, cal.validation, cal.kind), {}
        problems, rejected = validate_groups(cal, out, payload.summary)
        if rejected:
            self.log.warning(
                "LS groups failed validation: not uploaded",
                rejected={f"LS {first}": why for first, why in rejected.items()},
            )
        return problems, {"rejected_lumi_groups": rejected}

    def _queue_upload(
        self,
        run: int,
        job: JobRow,
        cal: CalibrationConfig,
        version: str,
        *,
        approved: bool = False,
    ) -> None:
        """Queue a harvest's payload for upload (idempotent), or each ready LS group of
        a lumi calibration (every group when an expert ``approved`` the version)."""
        if cal.payload.time_type == "lumi":
            self._queue_lumi_uploads(run, job, cal, version, approved=approved)
            return
        self.journal.add_upload(
            run,
            job.batch,
            tag=cal.payload.destination_tag,
            since=self._since(run, cal),
            payload=job.job_dir / "out" / PAYLOAD,
            version=version,
            config_sha256=job.config_sha256,
            now=self.clock(),
        )

    def _queue_lumi_uploads(
        self, run: int, job: JobRow, cal: CalibrationConfig, version: str, *, approved: bool
    ) -> None:
        """One outbox entry per LS group ready and not uploaded with this payload, its
        IOV from the group's first LS (:mod:`states.lumi`)."""
        out = job.job_dir / "out"
        summary = json.loads((out / SUMMARY).read_text())
        rejected = {} if approved else validate_groups(cal, out, summary)[1]
        record = self.journal.info(run)
        uploaded = dict(record.lumi_uploaded)
        ready = ready_groups(
            summary, rejected, out, ended=record.upstream_complete, uploaded=uploaded
        )
        for group, digest in ready:
            self.journal.add_upload(
                run,
                upload_seq(job.batch, group.first_ls),
                tag=cal.payload.destination_tag,
                since=lumi_since(run, group.first_ls),
                payload=out / str(group.file),
                version=version,
                config_sha256=job.config_sha256,
                now=self.clock(),
            )
            uploaded[str(group.first_ls)] = digest
        if ready:
            self.journal.update_info(run, lumi_uploaded=uploaded)
            self.log.info(
                "LS groups queued for upload",
                run=run,
                harvest=job.batch,
                first_ls=[group.first_ls for group, _ in ready],
            )

    def _stored_version(
        self, detector: Any, cal: CalibrationConfig, run: int, key: str
    ) -> str | None:
        if not detector.exists():
            return None
        range_name = Validity(begin_run=self._range_runs(run)[0]).name()
        try:
            versions = detector.versions(cal.payload.ctype, range_name)
        except StoreError:
            return None
        return next((v.version for v in versions if v.metadata.get("harvest_key") == key), None)

    def _previous(self, detector: Any, cal: CalibrationConfig, run: int) -> np.ndarray | None:
        try:
            constants = detector.get(cal.payload.ctype, run=run)
        except StoreError:
            return None
        return np.asarray(constants.array)

    def _since(self, run: int, cal: CalibrationConfig) -> int:
        time_type = cal.payload.time_type
        if time_type == "lumi":
            return lumi_since(run, 1)
        if time_type == "time":
            start = json.loads((self.step_dir(run, "step2") / "run.start").read_text())
            return int(start["start_time"])
        return self._range_runs(run)[0]

    def close_run(self, run: int) -> None:
        """Queue the final upload (``upload_intermediate: false``), then write
        ``step4.done`` and ``summary.json``: outcome, final version, validation,
        configuration hash and every input rejected along the chain."""
        record = self.journal.info(run)
        self._hand_on(run, record)
        accepted = record.accepted_harvest
        job = self.journal.job(run, accepted) if accepted is not None else None
        if job is not None and record.accepted_version is not None:
            cal = load_frozen(job.job_dir / FROZEN_CONFIG, job.config_sha256 or None)
            # a lumi run's last LS groups become ready only now that the run has ended
            if not cal.step4.upload_intermediate or cal.payload.time_type == "lumi":
                self._queue_upload(run, job, cal, record.accepted_version)
        super().close_run(run)
        self.write_summary(run)

    def write_summary(self, run: int) -> None:
        """``summary.json``: outcome, final version and its upload, validation,
        configuration hash and every input rejected along the chain."""
        record = self.journal.info(run)
        if record.carry is not None:
            outcome = "carried"  # short of statistics.min_events: handed on
        elif record.last_version is None and record.held_events is not None:
            outcome = "insufficient statistics"
        elif record.last_version is None:
            outcome = "no payload"
        elif record.last_problems:
            outcome = "rejected"
        else:
            outcome = "accepted"
        accepted = record.accepted_harvest
        published = record.published[-1] if record.published else None
        final_job = None if published is None else self.journal.job(run, published)
        atomic_write_json(
            self.step_dir(run) / "summary.json",
            {
                "run": run,
                "outcome": outcome,
                "final_version": record.last_version,
                "uploaded_version": record.accepted_version,
                "upload": None if accepted is None else self.outbox.final_state(run, accepted),
                "validation_problems": record.last_problems,
                "config_sha256": record.last_config_sha256,
                "inputs": _inputs_json(
                    [] if final_job is None else read_inputs(final_job.job_dir / RESOLVED)
                ),
                "harvests": self.journal.batch_count(run),
                "source_runs": self._range_runs(run),
                "held_events": record.held_events,
                "carried": record.carry,
                "bad_inputs": self.bad_inputs(run),
            },
        )

    def after_tick(self, now: float) -> None:
        self.outbox.flush(now)

    def timers(self, now: float) -> list[float]:
        """The outbox's next retry (none while an upload is in flight: its end wakes
        the loop)."""
        due = self.outbox.next_attempt_in(now)
        return [] if due is None else [due]

    def status(self) -> dict[str, Any]:
        """The step's status; a run waiting for its dependencies says for which."""
        base = super().status()
        waiting = {
            str(run): "; ".join(what)
            for run, what in sorted(self.waiting_for.items())
            if base["runs_in_flight"].get(str(run)) == S.WaitingForDependencies.name
        }
        for run, what in waiting.items():
            base["runs_in_flight"][run] += f" ({what})"
        return {
            **base,
            "runs_waiting_for_dependencies": waiting,
            "uploads_pending": self.outbox.pending(),
            "uploads_waiting": self.outbox.waiting(self.clock()),
            "last_upload": self.outbox.last_upload,
            "conditions_db": asdict(self.outbox.service),
        }


def _harvest_output(job: JobRow) -> tuple[CalibrationConfig, Path, Payload]:
    """A finished harvest's frozen configuration, output directory and payload."""
    cal = load_frozen(job.job_dir / FROZEN_CONFIG, job.config_sha256 or None)
    out = job.job_dir / "out"
    summary = json.loads((out / SUMMARY).read_text())
    return cal, out, Payload(np.load(out / PAYLOAD, allow_pickle=False), summary)


def _harvest_key(cal: CalibrationConfig, job: JobRow, *, approved: bool = False) -> str:
    """The store metadata key of a harvest's version (and of its approval's)."""
    return f"{cal.name}:run{job.run}:harvest{job.batch}" + (":approved" if approved else "")


def _inputs_json(inputs: list[DependencyInput]) -> list[dict[str, str]]:
    """Provenance: the dependency payloads a harvest used."""
    return [i.to_json() for i in inputs]
