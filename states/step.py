"""The step base: inputs -> batches -> jobs (with a frozen configuration) -> witnesses
-> completion marker, and the hooks each step fills in.

A job's outputs are what its manifest declares (:mod:`loop.manifest`); inputs a worker
rejected are recorded as bad, named in one ERROR each, and the run completes without
them. Witnesses are rebuilt from the journal and the job's manifest when a file is
missing, so a deleted witness never fails a run.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import structlog

from loop.batching import plan_batches
from loop.config import CalibrationConfig, LoopConfig
from loop.control.runcontrol import DONE, REFUSED, Command, CommandQueue, doorbell_path
from loop.errors import CalloopError
from loop.fsutil import storage_error_in
from loop.jobconfig import freeze
from loop.jobs import JobManager, JobPolicy
from loop.journal import OPEN_JOB_STATES, JobPhase, JobRow, Journal
from loop.manifest import Manifest, read_manifest
from loop.watch import FileWatcher
from loop.witness import (
    WITNESS_SUFFIX,
    Output,
    Witness,
    WitnessError,
    read_witness,
    write_marker,
    write_witness,
)
from states.machine import Facts, RunModel, advance, build_machine, trigger_order
from workers.backends.base import Backend, JobStatus

PLACEHOLDER_INPUTS = "{inputs}"
SKIPPED = "Skipped"  # every step's state for a run an operator closed on purpose


class CommandRefused(CalloopError):
    """An operator command that does not apply to the run as it is."""


@dataclass
class StepContext:
    """What a step needs from the daemon runtime."""

    loop_config: LoopConfig
    calibration: CalibrationConfig
    backend: Backend
    log: structlog.stdlib.BoundLogger
    clock: Callable[[], float] = time.time  # wall clock: compared with registry times
    monotonic: Callable[[], float] = time.monotonic  # elapsed time: immune to clock jumps


class Step:
    """A step daemon's logic. Subclasses declare the model class (states and transition
    table) and the step specifics: what to watch, how a run ends, the worker command."""

    name: ClassVar[str]
    worker: ClassVar[str]
    model_class: ClassVar[type[RunModel]]
    final_states: ClassVar[tuple[str, ...]]
    marker_name: ClassVar[str]

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.clock = ctx.clock
        self.cal_dir = ctx.loop_config.work_dir / ctx.calibration.name
        self.journal = Journal(self.cal_dir / f"{self.name}.journal.sqlite")
        self.commands = CommandQueue(self.journal.path)
        self.machine = build_machine(self.model_class)
        self.order = trigger_order(self.model_class.TRANSITIONS)
        self.models: dict[int, RunModel] = {}
        self._marks: dict[Hashable, float] = {}
        self._wake_at = math.inf  # monotonic: the nearest timed decision (wake_in)
        self._commands_seen: int | None = None  # the journal's data_version last checked
        self.jobs = JobManager(
            self.journal, ctx.backend, self._job_policy(), self.on_job_success, self.log
        )
        poll = ctx.loop_config.poll
        self.watcher = FileWatcher(
            self.watch_roots(),
            self.accept,
            polling=poll.observer == "polling",
            polling_interval_s=poll.polling_interval_s,
            doorbells=[doorbell_path(self.journal.path)],
        )

    @property
    def calibration(self) -> CalibrationConfig:
        """The current calibration config (replaced on SIGHUP reload)."""
        return self.ctx.calibration

    def _job_policy(self) -> JobPolicy:
        jobs = self.ctx.loop_config.jobs
        return JobPolicy(
            max_attempts=jobs.max_attempts,
            retry_backoff_s=jobs.retry_backoff_s,
            timeout_s=self.ctx.loop_config.timeouts.job_s,
            grace_s=self.ctx.loop_config.timeouts.job_grace_s,
            key_prefix=f"{self.ctx.calibration.name}.{self.name}",
            resources=self.resources(),
        )

    def reconfigure(self, loop_config: LoopConfig, calibration: CalibrationConfig) -> None:
        """Apply a reloaded configuration whose changed keys are all live (see
        :mod:`loop.reload`): new batches, jobs and decisions use it at once; jobs that
        exist keep their frozen copy."""
        self.ctx.loop_config = loop_config
        self.ctx.calibration = calibration
        self.jobs.policy = self._job_policy()

    def held_for(self, key: Hashable) -> float:
        """Monotonic seconds since this process first asked about ``key`` (0 the first
        time). Waits measured this way never shorten when the wall clock jumps; after a
        restart they start again, which only ever makes a wait longer."""
        now = self.ctx.monotonic()
        return now - self._marks.setdefault(key, now)

    def start_wait(self, key: Hashable) -> None:
        """(Re)start the wait of ``key`` now (something happened)."""
        self._marks[key] = self.ctx.monotonic()

    # ------------------------------------------------------------------- timers

    def wake_in(self, seconds: float) -> None:
        """Ask for a cycle ``seconds`` from now: a decision that depends on time alone
        (a wait for inputs, a grace period, a cadence) comes due then, and no event
        announces it. Called while the cycle evaluates its conditions."""
        self._wake_at = min(self._wake_at, self.ctx.monotonic() + max(seconds, 0.0))

    def next_cycle_in(self, now: float) -> float:
        """Seconds until this step needs a cycle that no event announces (``inf``:
        none; the daemon then sleeps until an event or its heartbeat): polling the jobs
        in flight every ``poll.tick_s`` (nothing tells the daemon that a job ended), a
        job's retry coming due, a timed decision (:meth:`wake_in`), the step's own
        timers (:meth:`timers`: the registry poll, the outbox's retries)."""
        tick = self.ctx.loop_config.poll.tick_s
        delays = [self._wake_at - self.ctx.monotonic(), *self.timers(now)]
        in_flight, next_attempt = self.journal.job_timers()
        if in_flight:
            delays.append(tick)
        if next_attempt is not None:
            # at least a tick: a job due now that found no room waits for one in flight
            delays.append(max(next_attempt - now, tick))
        return max(0.0, min(delays))

    def timers(self, now: float) -> list[float]:
        """Seconds until each of the step's own timers is due (default: none)."""
        return []

    # ------------------------------------------------------------------- paths

    def run_dir(self, run: int) -> Path:
        """``<work_dir>/<Calibration>/run<R>``."""
        return self.cal_dir / f"run{run}"

    def step_dir(self, run: int, step: str | None = None) -> Path:
        """``run<R>/<step>`` (this step by default)."""
        return self.run_dir(run) / (step or self.name)

    def job_dir(self, run: int, batch: int) -> Path:
        """``run<R>/<step>/batchNNNN``: a job's directory."""
        return self.step_dir(run) / f"batch{batch:04d}"

    def witness_path(self, run: int, batch: int) -> Path:
        """Where this step's witness of a batch goes."""
        return self.step_dir(run) / f"batch{batch:04d}{WITNESS_SUFFIX}"

    def marker_path(self, run: int) -> Path:
        """This step's completion marker of a run."""
        return self.step_dir(run) / self.marker_name

    # --------------------------------------------------------------- lifecycle

    def restore(self) -> None:
        """Recreate the models of every active run in its persisted state."""
        for run, state in self.journal.active_runs():
            self._add_model(run, state)
        self.jobs.adopt()

    def _add_model(self, run: int, state: str) -> RunModel:
        model = self.model_class(run, self)
        self.machine.add_model(model, initial=self.model_class.STATES[state])
        self.models[run] = model
        return model

    def track(self, run: int) -> RunModel | None:
        """The model of ``run``, creating the run on first sight (None when retired)."""
        if run in self.models:
            return self.models[run]
        if self.journal.ensure_run(run, self.model_class.INITIAL.name, self.clock()):
            self.log.info("new run", run=run)
            return self._add_model(run, self.model_class.INITIAL.name)
        return None

    def retire_run(self, run: int, state: Enum) -> None:
        """Mark the run inactive; its model leaves the machine on the next cycle."""
        self.journal.set_state(run, state.name, active=False)

    def tick(self, now: float) -> None:
        """One daemon cycle: new inputs, external polls, jobs, then every run's FSM."""
        self._wake_at = math.inf  # the conditions evaluated below ask again
        if not self.watcher.alive:
            self.log.error("file watcher died; restarting it and rescanning active runs")
            self.watcher.restart()
            self.startup_scan()
        self.apply_commands()
        for path in self.watcher.drain():
            self.ingest_isolated(path)
        self.poll_external(now)
        self.jobs.poll(now)
        for run, model in list(self.models.items()):
            try:
                advance(model, self.order, lambda run=run: self.facts(run, now))  # type: ignore[misc]
            except Exception as exc:  # per-run isolation: one bad run never stops the others
                if storage_error_in(exc):
                    raise  # the machine, not the run: the daemon's degraded wait handles it
                model.quarantine(exc, self.machine)
            if model.state.name in self.final_states or model.state is model.FAILED:
                self.machine.remove_model(model)
                del self.models[run]
        self.jobs.submit_ready(now)
        self.after_tick(now)

    # ---------------------------------------------------------- operator commands

    def apply_commands(self) -> None:
        """Apply and acknowledge the operator commands queued for this step. The queue is
        read only when the journal changed since the last complete pass (SQLite's
        ``data_version``: one cheap pragma per cycle, no query while idle)."""
        version = self.commands.data_version()  # before reading: a later commit is news
        if version == self._commands_seen:
            return
        self._apply_pending()
        self._commands_seen = version  # not before: a pass the disk broke off is redone

    def _apply_pending(self) -> None:
        for command in self.commands.pending():
            try:
                result = self._apply(command)
            except Exception as exc:  # refused, or failed: either way answered, never again
                if storage_error_in(exc):
                    raise  # the disk: the command stays pending for the degraded wait
                self.commands.settle(command.id, REFUSED, str(exc))
                refused = isinstance(exc, CommandRefused)
                (self.log.warning if refused else self.log.error)(
                    "operator command refused" if refused else "operator command failed",
                    run=command.run,
                    action=command.action,
                    why=str(exc),
                    user=command.user,
                    exc_info=None if refused else exc,
                )
                continue
            self.commands.settle(command.id, DONE, result)
            self.log.info(
                "operator command applied",
                run=command.run,
                action=command.action,
                result=result,
                reason=command.reason,
                user=command.user,
            )

    def _apply(self, command: Command) -> str:
        if command.action == "skip":
            return self._skip(command.run, command.reason)
        if command.action == "rerun":
            return self.rerun(command.run)
        if command.action == "approve":
            return self.approve(command)
        if command.batch is not None:
            return self._retry_batch(command.run, command.batch)
        return self._retry_run(command.run)

    def _retry_run(self, run: int) -> str:
        """A Failed run starts again from the initial state: every action is
        idempotent and the journal holds its inputs, batches and succeeded jobs, so
        only what did not succeed is done again. Given-up batches are retried too."""
        state = self.journal.run_state(run)
        if state != self.model_class.FAILED.name:
            raise CommandRefused(f"run {run} is {state or 'unknown'} in {self.name}, not Failed")
        self.journal.update_info(run, failure=None)
        requeued = self._requeue_given_up(run)
        initial = self.restart_run(run)
        return f"run {run} back in {initial}; {requeued} given-up batch(es) queued again"

    def rerun(self, run: int) -> str:
        """Recalibrate a finished run: only step 4 harvests (see :class:`Step4`)."""
        raise CommandRefused(f"a rerun is applied by step 4, not by {self.name}")

    def approve(self, command: Command) -> str:
        """Approve a Rejected run's payload: only step 4 publishes (see :class:`Step4`)."""
        raise CommandRefused(f"an approval is applied by step 4, not by {self.name}")

    def restart_run(self, run: int, state: str | None = None) -> str:
        """Put a run back in ``state`` (default: the initial state), active (the journal
        keeps what is done)."""
        state = state or self.model_class.INITIAL.name
        self.journal.set_state(run, state, active=True)
        self._add_model(run, state)
        return state

    def _retry_batch(self, run: int, batch: int) -> str:
        job = self.journal.job(run, batch)
        if job is None or job.state != JobPhase.GIVEN_UP:
            phase = "no job" if job is None else job.state.value
            raise CommandRefused(f"batch {batch} of run {run} is {phase}, not given up")
        if run not in self.models:
            raise CommandRefused(
                f"run {run} is closed in {self.name}; retry the run instead of one batch"
            )
        self.journal.update_job(
            run, batch, state=JobPhase.PENDING, attempts=0, next_attempt=0, detail="retried"
        )
        return f"batch {batch} of run {run} queued again"

    def _requeue_given_up(self, run: int) -> int:
        given_up = self.journal.jobs(run=run, states=(JobPhase.GIVEN_UP,))
        for job in given_up:
            self.journal.update_job(
                run, job.batch, state=JobPhase.PENDING, attempts=0, next_attempt=0
            )
        return len(given_up)

    def _skip(self, run: int, reason: str) -> str:
        """Close a run on purpose: it leaves processing in this step, with the reason."""
        state = self.journal.run_state(run)
        if state is not None and state in self.final_states:
            raise CommandRefused(f"run {run} is already {state} in {self.name}")
        self.journal.ensure_run(run, SKIPPED, self.clock())
        self.journal.update_info(run, skip_reason=f"operator: {reason}")
        self.journal.set_state(run, SKIPPED, active=False)
        model = self.models.pop(run, None)
        if model is not None:
            self.machine.remove_model(model)
        return f"run {run} skipped in {self.name} (was {state or 'not seen yet'})"

    def ingest_isolated(self, path: Path) -> None:
        """:meth:`ingest`, where an unexpected error costs only this file: one ERROR
        naming it; the file is looked at again on the next scan (restart)."""
        try:
            self.ingest(path)
        except Exception as exc:
            if storage_error_in(exc):
                raise  # disk trouble concerns every file: the daemon's degraded wait handles it
            self.log.error(
                "could not record an arrived file; it is ignored until the next scan",
                file=str(path),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )

    # -------------------------------------------------------------------- facts

    def facts(self, run: int, now: float) -> Facts:
        """The batching facts of a run (subclasses add ``ended`` and ``selected``)."""
        pending = self.journal.pending_inputs(run)
        oldest_wait_s = now - min(seen for _, seen in pending) if pending else 0.0
        if pending and oldest_wait_s < self.max_wait_s():
            self.wake_in(self.max_wait_s() - oldest_wait_s)  # a short batch comes due then
        return Facts(
            pending=len(pending),
            oldest_wait_s=oldest_wait_s,
            jobs_open=self.journal.open_jobs(run),
            unjobbed=len(self.journal.batches_without_job(run)),
            min_batch=self.batch_sizes()[0],
            max_wait_s=self.max_wait_s(),
        )

    # ----------------------------------------------------------------- actions

    def make_batches(self, run: int, *, final: bool) -> list[int]:
        """Group pending inputs into batches (idempotent)."""
        low, high = self.batch_sizes()
        names = [name for name, _ in self.journal.pending_inputs(run)]
        groups = plan_batches(names, low, high, final=final)
        created = self.journal.create_batches(run, groups, final=final, now=self.clock())
        if created:
            self.log.info(
                "batches formed",
                run=run,
                batches=created,
                final=final,
                inputs=sum(len(g) for g in groups),
            )
        return created

    def create_jobs(self, run: int) -> list[int]:
        """A pending job for every batch without one: its directory, its frozen copy of
        the calibration configuration, and its command. Returns the batches."""
        batches = self.journal.batches_without_job(run)
        for batch in batches:
            job_dir = self.job_dir(run, batch)
            config_path, config_sha256 = freeze(self.calibration, job_dir)
            names = self.job_inputs(run, batch)
            argv = self.job_argv(run, batch, self.input_paths(run, names), job_dir, config_path)
            self.journal.add_job(run, batch, job_dir, argv, config_sha256)
        return batches

    def job_inputs(self, run: int, batch: int) -> list[str]:
        """The input names a batch's job reads (step 4 adds earlier unharvested ones)."""
        return self.journal.inputs_of(run, batch)

    def job_argv(
        self, run: int, batch: int, inputs: list[str], job_dir: Path, config_path: Path
    ) -> list[str]:
        """The worker command (pure): built-in ``workers.<worker>`` or the calibration's
        own template (validated at load: see ``loop.config.check_command``)."""
        output_dir = job_dir / "out"
        template = self.external_command()
        if template is None:
            return [
                sys.executable,
                "-m",
                f"workers.{self.worker}",
                "--calibration",
                str(config_path),
                "--output-dir",
                str(output_dir),
                *inputs,
            ]
        values = {
            "run": str(run),
            "batch": str(batch),
            "output_dir": str(output_dir),
            "job_dir": str(job_dir),
            "calibration": str(config_path),
        }
        argv: list[str] = []
        for item in template:
            if item == PLACEHOLDER_INPUTS:
                argv.extend(inputs)
            else:
                argv.append(item.format(**values))
        return argv

    def on_job_success(self, job: JobRow, _status: JobStatus) -> None:
        """Check the job's manifest, record the inputs it rejected, then publish."""
        manifest = read_manifest(job.job_dir / "out")
        self._record_bad_inputs(job, manifest)
        self.record_success(job, manifest)

    def _record_bad_inputs(self, job: JobRow, manifest: Manifest) -> None:
        by_path = {
            path: name
            for name in self.journal.inputs_of(job.run, job.batch)
            for path in self.input_paths(job.run, [name])
        }
        for bad in manifest.bad_inputs:
            name = by_path.get(bad.input, bad.input)
            self.journal.mark_bad(job.run, name, bad.reason)
            self.log.error(
                "input rejected; the run continues without it",
                run=job.run,
                batch=job.batch,
                file=bad.input,
                reason=bad.reason,
            )

    def record_success(self, job: JobRow, manifest: Manifest) -> None:
        """Write the witness of a finished job (steps 2 and 3)."""
        write_witness(self.witness_path(job.run, job.batch), self.build_witness(job, manifest))

    def build_witness(self, job: JobRow, manifest: Manifest, end: float | None = None) -> Witness:
        """The witness of a succeeded job, from the journal and its manifest."""
        out = job.job_dir / "out"
        return Witness(
            calibration=self.calibration.name,
            run=job.run,
            step=self.name,
            batch=job.batch,
            inputs=self.input_paths(job.run, self.journal.inputs_of(job.run, job.batch)),
            outputs=[
                Output(path=str(out / o.name), size=o.size, sha256=o.sha256)
                for o in manifest.outputs
            ],
            bad_inputs=manifest.bad_inputs,
            config_sha256=job.config_sha256,
            job_id=job.backend_id or "",
            host=_started_host(job),
            start=job.submitted,
            end=end if end is not None else (job.finished or self.clock()),
            exit_code=0,
            attempts=job.attempts,
        )

    def witnesses_of(self, run: int) -> dict[str, Witness]:
        """Every witness of the run's succeeded jobs, by path.

        A witness file that is missing or unreadable is rebuilt from the journal and the
        job's manifest (and rewritten), so downstream never waits for it in vain.
        """
        witnesses: dict[str, Witness] = {}
        for job in self.journal.jobs(run=run, states=(JobPhase.SUCCEEDED,)):
            path = self.witness_path(run, job.batch)
            try:
                witness = read_witness(path)
            except WitnessError as exc:
                witness = self.build_witness(job, read_manifest(job.job_dir / "out"))
                write_witness(path, witness)
                self.log.warning(
                    "witness file was missing or damaged; regenerated from the journal",
                    run=run,
                    batch=job.batch,
                    witness=str(path),
                    error=str(exc),
                )
            witnesses[str(path)] = witness
        return witnesses

    def close_run(self, run: int) -> None:
        """Write the completion marker: every witness of the run in full, every batch
        given up on, every input rejected here or upstream."""
        witnesses = self.witnesses_of(run)
        failed = [j.batch for j in self.journal.jobs(run=run, states=(JobPhase.GIVEN_UP,))]
        bad = self.bad_inputs(run)
        reason = self.end_reason(run)
        write_marker(
            self.marker_path(run),
            calibration=self.calibration.name,
            run=run,
            step=self.name,
            witnesses=witnesses,
            failed_batches=failed,
            bad_inputs=bad,
            reason=reason,
        )
        log = self.log.warning if failed or bad else self.log.info
        log(
            "run complete; marker written",
            run=run,
            marker=str(self.marker_path(run)),
            witnesses=len(witnesses),
            failed_batches=failed,
            bad_inputs=sorted(bad),
            reason=reason,
        )

    def bad_inputs(self, run: int) -> dict[str, str]:
        """Inputs rejected in this step and upstream (input -> reason)."""
        return {**self.journal.info(run).upstream_bad, **self.journal.bad_inputs(run)}

    # -------------------------------------------------------- step specifics

    def watch_roots(self) -> list[Path]:
        """Directories to watch recursively."""
        raise NotImplementedError

    def accept(self, path: Path) -> bool:
        """True for paths this step reacts to."""
        raise NotImplementedError

    def ingest(self, path: Path) -> None:
        """Record one arrived file."""
        raise NotImplementedError

    def startup_scan(self) -> None:
        """Catch up on files that arrived while the daemon was down."""
        raise NotImplementedError

    def input_paths(self, run: int, inputs: list[str]) -> list[str]:
        """Input names as the worker's file arguments."""
        raise NotImplementedError

    def end_reason(self, run: int) -> str:
        """Why the run is considered complete (recorded in the marker)."""
        raise NotImplementedError

    def batch_sizes(self) -> tuple[int, int]:
        """(min, max) inputs per batch."""
        raise NotImplementedError

    def max_wait_s(self) -> float:
        """How long an input may wait for a full batch."""
        raise NotImplementedError

    def external_command(self) -> list[str] | None:
        """The calibration's own command for this step, if any."""
        raise NotImplementedError

    def resources(self) -> dict[str, Any]:
        """Batch-system resources of this step's jobs."""
        slurm = self.ctx.loop_config.jobs.slurm
        return {
            "partition": slurm.partition,
            "time_limit": slurm.time_limit,
            "mem": slurm.mem,
            "cpus": slurm.cpus,
            "extra_directives": list(slurm.extra_directives),
        }

    def poll_external(self, now: float) -> None:
        """Ask external services (the registry) for news; default: nothing."""

    def after_tick(self, now: float) -> None:
        """Step-specific work after the FSMs ran (step 4: the outbox)."""

    ATTENTION_STATES: ClassVar[tuple[str, ...]] = ("Failed",)

    def status(self) -> dict[str, Any]:
        """What ``calloop status`` shows of this step."""
        counts = self.journal.job_counts()
        in_flight = sum(counts.get(s, 0) for s in OPEN_JOB_STATES[2:])
        return {
            "runs_in_flight": {str(run): m.state.name for run, m in sorted(self.models.items())},
            "runs_needing_attention": {
                str(run): self._attention_text(run, state)
                for run, state in self.journal.runs_in_states(self.ATTENTION_STATES).items()
            },
            "jobs_running": in_flight,
            "jobs_pending": counts.get(JobPhase.PENDING, 0) + counts.get(JobPhase.RETRY, 0),
            "jobs_failed": counts.get(JobPhase.GIVEN_UP, 0),
            "jobs_succeeded": counts.get(JobPhase.SUCCEEDED, 0),
        }

    def _attention_text(self, run: int, state: str) -> str:
        """A run's attention state with the stored reason of a failure."""
        failure = self.journal.info(run).failure
        if not failure:
            return state
        return f"{state} ({failure['exception']} in {failure['state']}: {failure['message'][:160]})"

    def close(self) -> None:
        """Release the journal."""
        self.commands.close()
        self.journal.close()


def _started_host(job: JobRow) -> str:
    try:
        record = json.loads((job.job_dir / f"started.{job.attempts}.json").read_text())
        return str(record.get("host", ""))
    except (OSError, ValueError):
        return socket.gethostname()
