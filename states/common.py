"""What the three step FSMs share: the per-run model base, the machine builder and
driver, and the step services (inputs, batches, jobs, witnesses, markers).

Each run is its own model in one ``transitions`` machine per daemon, so runs progress
independently (no head-of-line blocking). Conditions are pure functions of a
:class:`Facts` snapshot taken just before each trigger; actions (``on_enter``) are
idempotent, because after a SIGKILL the persisted state is re-entered and its action
may run again. Every state change is persisted to the journal and logged in one
structured line; an exception in an action sends the run to ``Failed``.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import structlog
from transitions import EventData, Machine

from loop.batching import due, plan_batches, ready
from loop.config import CalibrationConfig, LoopConfig
from loop.jobs import JobManager, JobPolicy
from loop.journal import JobRow, Journal
from loop.watch import FileWatcher
from loop.witness import (
    WITNESS_SUFFIX,
    Witness,
    WitnessError,
    describe_outputs,
    read_marker,
    read_witness,
    write_marker,
    write_witness,
)
from workers.backends.base import Backend, JobStatus

Transition = dict[str, Any]


@dataclass(frozen=True)
class Facts:
    """Everything a condition may look at, for one run at one moment."""

    pending: int = 0  # inputs not yet in a batch
    oldest_wait_s: float = 0.0  # how long the oldest pending input has waited
    ended: bool = False  # nothing more will arrive from upstream
    jobs_open: int = 0  # jobs not finished (pending, submitted, running, retrying)
    unjobbed: int = 0  # batches whose job was not created yet (a crash in between)
    selected: bool | None = True  # run selection: True, False, or undecided
    min_batch: int = 1
    max_wait_s: float = 300.0
    harvests: int = 0  # step 4: harvests created
    unpublished: bool = False  # step 4: a finished harvest not yet stored/queued
    uploads_pending: int = 0  # step 4: outbox entries of the run not settled
    harvest_allowed: bool = True  # step 4: cadence (min interval) allows a harvest now


def _unbound() -> RuntimeError:
    return RuntimeError("trigger called before the model was added to its machine")


class RunModel:
    """A run in one step's FSM. Triggers are declared here so mypy sees them; the
    machine (``model_override=True``) binds exactly these."""

    STATES: ClassVar[type[Enum]]
    FAILED: ClassVar[Enum]
    state: Enum

    def __init__(self, run: int, step: Step) -> None:
        self.run = run
        self.step = step
        self.facts = Facts()
        self.log = step.log.bind(run=run)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        states = cls.__dict__.get("STATES")
        if states is not None:  # declare is_<State> so the machine may bind them
            for member in states:
                setattr(cls, f"is_{member.name}", _stub)

    # triggers and their may_ checks (bound by the machine)
    def start(self) -> bool:
        raise _unbound()

    def skip(self) -> bool:
        raise _unbound()

    def check(self) -> bool:
        raise _unbound()

    def prepare(self) -> bool:
        raise _unbound()

    def prepare_final(self) -> bool:
        raise _unbound()

    def prepare_jobs(self) -> bool:
        raise _unbound()

    def launch(self) -> bool:
        raise _unbound()

    def resume(self) -> bool:
        raise _unbound()

    def idle(self) -> bool:
        raise _unbound()

    def wait_jobs(self) -> bool:
        raise _unbound()

    def more_inputs(self) -> bool:
        raise _unbound()

    def cleanup(self) -> bool:
        raise _unbound()

    def finish(self) -> bool:
        raise _unbound()

    def fail(self) -> bool:
        raise _unbound()

    def recover(self) -> bool:
        raise _unbound()

    def may_start(self) -> bool:
        raise _unbound()

    def may_skip(self) -> bool:
        raise _unbound()

    def may_check(self) -> bool:
        raise _unbound()

    def may_prepare(self) -> bool:
        raise _unbound()

    def may_prepare_final(self) -> bool:
        raise _unbound()

    def may_prepare_jobs(self) -> bool:
        raise _unbound()

    def may_launch(self) -> bool:
        raise _unbound()

    def may_resume(self) -> bool:
        raise _unbound()

    def may_idle(self) -> bool:
        raise _unbound()

    def may_wait_jobs(self) -> bool:
        raise _unbound()

    def may_more_inputs(self) -> bool:
        raise _unbound()

    def may_cleanup(self) -> bool:
        raise _unbound()

    def may_finish(self) -> bool:
        raise _unbound()

    def may_fail(self) -> bool:
        raise _unbound()

    def may_recover(self) -> bool:
        raise _unbound()

    def trigger(self, name: str) -> bool:
        raise _unbound()

    def may_trigger(self, name: str) -> bool:
        raise _unbound()

    # ---------------------------------------------------------------- pure conditions

    def selected(self, _event: EventData) -> bool:
        """The run matches the calibration's selection."""
        return self.facts.selected is True

    def rejected(self, _event: EventData) -> bool:
        """The run does not match the selection (or is too short)."""
        return self.facts.selected is False

    def full_batch_ready(self, _event: EventData) -> bool:
        """At least one full batch can be formed."""
        return ready(self.facts.pending, self.facts.min_batch)

    def final_batch_ready(self, _event: EventData) -> bool:
        """A short batch is due (run ended, or the oldest input waited long enough)."""
        f = self.facts
        return due(f.pending, f.oldest_wait_s, f.max_wait_s, f.ended)

    def all_batched(self, _event: EventData) -> bool:
        """Upstream is finished and every input is in a batch that has its job."""
        return self.facts.ended and self.facts.pending == 0 and self.facts.unjobbed == 0

    def has_unjobbed(self, _event: EventData) -> bool:
        """A batch lost its job creation to a crash: create it before anything else."""
        return self.facts.unjobbed > 0

    def has_news(self, event: EventData) -> bool:
        """Something can be done: a batch is ready or due, or the run can be closed."""
        return (
            self.has_unjobbed(event)
            or self.full_batch_ready(event)
            or self.final_batch_ready(event)
            or self.all_batched(event)
        )

    def nothing_ready(self, event: EventData) -> bool:
        """The complement of :meth:`has_news`."""
        return not self.has_news(event)

    def has_pending(self, _event: EventData) -> bool:
        """Inputs arrived after the run was considered complete (late files), or a batch
        still lacks its job."""
        return self.facts.pending > 0 or self.facts.unjobbed > 0

    def jobs_settled(self, _event: EventData) -> bool:
        """Every batch has a job and every job finished (succeeded or given up)."""
        return self.facts.jobs_open == 0 and self.facts.unjobbed == 0

    # ------------------------------------------------------------ shared actions

    def make_batches(self, _event: EventData) -> None:
        """Group full batches of pending inputs."""
        self.step.make_batches(self.run, final=False)

    def make_final_batches(self, _event: EventData) -> None:
        """Group every pending input, short batches included."""
        self.step.make_batches(self.run, final=True)

    def create_jobs(self, _event: EventData) -> None:
        """A job for every batch that has none."""
        self.step.create_jobs(self.run)

    def submit_jobs(self, _event: EventData) -> None:
        """Hand due jobs to the backend (within its limit)."""
        self.step.jobs.submit_ready(self.step.clock())

    def close_run(self, _event: EventData) -> None:
        """Write the completion marker."""
        self.step.close_run(self.run)

    def retire(self, _event: EventData) -> None:
        """The run needs no more attention."""
        self.step.retire_run(self.run, self.state)

    # ------------------------------------------------------------ machine callbacks

    def persist_and_log(self, event: EventData) -> None:
        """One structured line and one journal update per state change."""
        active = self.state.name not in self.step.final_states and self.state is not self.FAILED
        self.step.journal.set_state(self.run, self.state.name, active=active)
        self.log.info(
            "state change",
            state=self.state.name,
            from_state=event.transition.source if event.transition else None,
            trigger=event.event.name if event.event else None,
        )

    def on_exception(self, event: EventData) -> None:
        """An action raised: quarantine the run in Failed, keep the daemon alive."""
        self.log.error(
            "action failed; run quarantined in Failed (restart the daemon after "
            "fixing the cause to retry it)",
            error=repr(event.error),
            exc_info=event.error,
        )
        event.machine.set_state(self.FAILED, self)
        self.step.retire_run(self.run, self.FAILED)


def _stub(*_args: Any, **_kwargs: Any) -> bool:
    raise _unbound()


def build_machine(
    model_class: type[RunModel], transitions: list[Transition], initial: Enum
) -> Machine:
    """One machine per daemon; run models are added and removed as runs come and go."""
    return Machine(
        model=None,
        states=model_class.STATES,
        transitions=transitions,
        initial=initial,
        queued=True,
        model_override=True,
        auto_transitions=False,
        send_event=True,
        after_state_change="persist_and_log",
        on_exception="on_exception",
        name=model_class.__name__,
    )


def trigger_order(transitions: list[Transition]) -> dict[str, list[str]]:
    """Per source state name, its triggers in table order (the driver's priority).

    Wildcard transitions (``fail``) are never fired by the driver.
    """
    order: dict[str, list[str]] = {}
    for transition in transitions:
        sources = transition["source"]
        if sources == "*":
            continue
        for source in sources if isinstance(sources, list) else [sources]:
            triggers = order.setdefault(source.name, [])
            if transition["trigger"] not in triggers:
                triggers.append(transition["trigger"])
    return order


def advance(
    model: RunModel, order: dict[str, list[str]], refresh: Callable[[], Facts], max_steps: int = 32
) -> int:
    """Fire the first allowed trigger of the current state until none is; returns count."""
    for steps in range(max_steps):
        model.facts = refresh()
        for trigger in order.get(model.state.name, []):
            if getattr(model, f"may_{trigger}")():
                getattr(model, trigger)()
                break
        else:
            return steps
    return max_steps


# ------------------------------------------------------------------------------ steps


@dataclass
class StepContext:
    """What a step needs from the daemon runtime."""

    loop_config: LoopConfig
    calibration: CalibrationConfig
    calibration_path: Path
    backend: Backend
    log: structlog.stdlib.BoundLogger
    clock: Callable[[], float] = time.time


class Step:
    """A step daemon's logic: inputs -> batches -> jobs -> witnesses -> marker.

    Subclasses declare the model class, the transition table and the step specifics
    (what to watch, how a run ends, the worker command, what success writes).
    """

    name: ClassVar[str]
    worker: ClassVar[str]
    model_class: ClassVar[type[RunModel]]
    transitions: ClassVar[list[Transition]]
    initial: ClassVar[Enum]
    final_states: ClassVar[tuple[str, ...]]

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.log = ctx.log
        self.clock = ctx.clock
        self.cal_dir = ctx.loop_config.work_dir / ctx.calibration.name
        self.journal = Journal(self.cal_dir / f"{self.name}.journal.sqlite")
        self.machine = build_machine(self.model_class, self.transitions, self.initial)
        self.order = trigger_order(self.transitions)
        self.models: dict[int, RunModel] = {}
        timeouts = ctx.loop_config.timeouts
        jobs = ctx.loop_config.jobs
        self.jobs = JobManager(
            self.journal,
            ctx.backend,
            JobPolicy(
                max_attempts=jobs.max_attempts,
                retry_backoff_s=jobs.retry_backoff_s,
                timeout_s=timeouts.job_s,
                key_prefix=f"{ctx.calibration.name}.{self.name}",
                env=dict(jobs.slurm.env),
                resources=self.resources(),
            ),
            self.on_job_success,
            self.log,
        )
        poll = ctx.loop_config.poll
        self.watcher = FileWatcher(
            self.watch_roots(),
            self.accept,
            polling=poll.observer == "polling",
            polling_interval_s=poll.polling_interval_s,
        )

    @property
    def calibration(self) -> CalibrationConfig:
        """The current calibration config (replaced on SIGHUP reload)."""
        return self.ctx.calibration

    # ------------------------------------------------------------------- paths

    def run_dir(self, run: int) -> Path:
        """``<work_dir>/<Calibration>/run<R>``."""
        return self.cal_dir / f"run{run}"

    def step_dir(self, run: int, step: str | None = None) -> Path:
        """``run<R>/<step>`` (this step by default)."""
        return self.run_dir(run) / (step or self.name)

    def witness_path(self, run: int, batch: int) -> Path:
        """Where this step's witness of a batch goes."""
        return self.step_dir(run) / f"batch{batch:04d}{WITNESS_SUFFIX}"

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
        if self.journal.ensure_run(run, self.initial.name, self.clock()):
            self.log.info("new run", run=run)
            return self._add_model(run, self.initial.name)
        return None

    def retire_run(self, run: int, state: Enum) -> None:
        """Mark the run inactive; its model leaves the machine on the next cycle."""
        self.journal.set_state(run, state.name, active=False)

    def tick(self, now: float) -> None:
        """One daemon cycle: new inputs, external polls, jobs, then every run's FSM."""
        if not self.watcher.alive:
            self.log.error("file watcher died; restarting it and rescanning active runs")
            self.watcher.restart()
            self.startup_scan()
        for path in self.watcher.drain():
            self.ingest(path)
        self.poll_external(now)
        self.jobs.poll(now)
        for run, model in list(self.models.items()):
            advance(model, self.order, lambda run=run: self.facts(run, now))  # type: ignore[misc]
            if model.state.name in self.final_states or model.state is model.FAILED:
                self.machine.remove_model(model)
                del self.models[run]
        self.jobs.submit_ready(now)
        self.after_tick(now)

    # -------------------------------------------------------------------- facts

    def facts(self, run: int, now: float) -> Facts:
        """The batching facts of a run (subclasses add ``ended`` and ``selected``)."""
        pending = self.journal.pending_inputs(run)
        return Facts(
            pending=len(pending),
            oldest_wait_s=now - min(seen for _, seen in pending) if pending else 0.0,
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

    def create_jobs(self, run: int) -> None:
        """A pending job for every batch without one."""
        for batch in self.journal.batches_without_job(run):
            job_dir = self.step_dir(run) / f"batch{batch:04d}"
            inputs = self.journal.inputs_of(run, batch)
            self.journal.add_job(run, batch, job_dir, self.job_argv(run, batch, inputs, job_dir))

    def job_argv(self, run: int, batch: int, inputs: list[str], job_dir: Path) -> list[str]:
        """The worker command: built-in ``workers.<worker>`` or the calibration's own."""
        output_dir = job_dir / "out"
        values = {
            "run": str(run),
            "batch": str(batch),
            "output_dir": str(output_dir),
            "job_dir": str(job_dir),
            "calibration": str(self.ctx.calibration_path),
        }
        template = self.external_command()
        if template is None:
            return [
                sys.executable,
                "-m",
                f"workers.{self.worker}",
                "--calibration",
                values["calibration"],
                "--output-dir",
                values["output_dir"],
                *self.input_paths(run, inputs),
            ]
        argv: list[str] = []
        for item in template:
            if item == "{inputs}":
                argv.extend(self.input_paths(run, inputs))
            else:
                argv.append(item.format(**values))
        return argv

    def on_job_success(self, job: JobRow, status: JobStatus) -> None:
        """Witness the outputs of a finished job (raises if there are none)."""
        outputs = sorted(p for p in (job.job_dir / "out").glob("*") if p.is_file())
        if not outputs:
            raise WitnessError(
                f"job of run {job.run} batch {job.batch} wrote no outputs into "
                f"{job.job_dir / 'out'}"
            )
        witness = Witness(
            calibration=self.calibration.name,
            run=job.run,
            step=self.name,
            batch=job.batch,
            inputs=self.input_paths(job.run, self.journal.inputs_of(job.run, job.batch)),
            outputs=describe_outputs(outputs),
            job_id=job.backend_id or "",
            host=_started_host(job),
            start=job.submitted,
            end=self.clock(),
            exit_code=status.exit_code or 0,
            attempts=job.attempts,
        )
        write_witness(self.witness_path(job.run, job.batch), witness)

    def witnesses_of(self, run: int) -> tuple[list[str], list[int]]:
        """This step's witnesses of a run and the batches given up on."""
        jobs = self.journal.jobs(run=run)
        done = [str(self.witness_path(run, j.batch)) for j in jobs if j.state == "succeeded"]
        failed = [j.batch for j in jobs if j.state == "given_up"]
        return done, failed

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

    marker_name: ClassVar[str]

    def marker_path(self, run: int) -> Path:
        """This step's completion marker of a run."""
        return self.step_dir(run) / self.marker_name

    def close_run(self, run: int) -> None:
        """Write the completion marker: every witness of the run, every batch given up."""
        witnesses, failed = self.witnesses_of(run)
        reason = self.end_reason(run)
        write_marker(
            self.marker_path(run),
            calibration=self.calibration.name,
            run=run,
            step=self.name,
            witnesses=witnesses,
            failed_batches=failed,
            reason=reason,
        )
        log = self.log.warning if failed else self.log.info
        log(
            "run complete; marker written",
            run=run,
            marker=str(self.marker_path(run)),
            witnesses=len(witnesses),
            failed_batches=failed,
            reason=reason,
        )

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

    def status(self) -> dict[str, Any]:
        """What ``calloop status`` shows of this step."""
        counts = self.journal.job_counts()
        return {
            "runs_in_flight": {str(run): m.state.name for run, m in sorted(self.models.items())},
            "jobs_running": sum(counts.get(s, 0) for s in ("submitted", "running", "submitting")),
            "jobs_pending": counts.get("pending", 0) + counts.get("retry", 0),
            "jobs_failed": counts.get("given_up", 0),
            "jobs_succeeded": counts.get("succeeded", 0),
        }

    def close(self) -> None:
        """Release the journal."""
        self.journal.close()


def _started_host(job: JobRow) -> str:
    try:
        record = json.loads((job.job_dir / f"started.{job.attempts}.json").read_text())
        return str(record.get("host", ""))
    except (OSError, ValueError):
        return socket.gethostname()


class FollowsUpstream(Step):
    """Steps 3 and 4: inputs are the upstream step's witnesses; a run ends when the
    upstream marker exists and every witness it lists has been seen."""

    upstream: ClassVar[str]
    upstream_marker: ClassVar[str]

    def watch_roots(self) -> list[Path]:
        return [self.cal_dir]

    def accept(self, path: Path) -> bool:
        return path.parent.name == self.upstream and (
            path.name.endswith(WITNESS_SUFFIX) or path.name == self.upstream_marker
        )

    def _run_of(self, path: Path) -> int | None:
        name = path.parent.parent.name
        return int(name[3:]) if name.startswith("run") and name[3:].isdigit() else None

    def ingest(self, path: Path) -> None:
        run = self._run_of(path)
        if run is None:
            return
        if path.name == self.upstream_marker:
            try:
                marker = read_marker(path)
            except WitnessError as exc:
                self.log.error(
                    "unusable upstream marker; waiting for a valid one", run=run, error=str(exc)
                )
                return
            if self.track(run) is not None:
                self.journal.update_info(
                    run, upstream_witnesses=marker.witnesses, upstream_failed=marker.failed_batches
                )
            return
        try:
            read_witness(path)
        except WitnessError as exc:
            self.log.error("unusable upstream witness skipped", run=run, error=str(exc))
            return
        if self.track(run) is not None:
            self.journal.add_inputs(run, [str(path)], self.clock())
        else:
            self.log.warning(
                "witness arrived for a run already closed; ignored", run=run, witness=str(path)
            )

    def startup_scan(self) -> None:
        if not self.cal_dir.is_dir():
            return
        closed = {run for run, _ in self.journal.all_runs()} - set(self.models)
        for run_dir in sorted(self.cal_dir.glob("run*")):
            run = self._run_of(run_dir / "x" / "y")
            if run is None or run in closed:
                continue
            upstream = run_dir / self.upstream
            found = self.watcher.scan(upstream, f"*{WITNESS_SUFFIX}")
            marker = upstream / self.upstream_marker
            for path in sorted(found) + ([marker] if marker.exists() else []):
                self.ingest(path)

    def upstream_ended(self, run: int) -> bool:
        """The upstream marker is in and every witness it lists was ingested."""
        info = self.journal.info(run)
        if info.get("upstream_complete"):
            return True
        listed = info.get("upstream_witnesses")
        if listed is None or not all(self.journal.has_input(run, name) for name in listed):
            return False
        self.journal.update_info(run, upstream_complete=True)  # checked once, remembered
        return True

    def input_paths(self, run: int, inputs: list[str]) -> list[str]:
        paths: list[str] = []
        for name in inputs:
            paths.extend(o.path for o in read_witness(Path(name), verify=False).outputs)
        return paths

    def facts(self, run: int, now: float) -> Facts:
        return replace(super().facts(run, now), ended=self.upstream_ended(run))

    def end_reason(self, run: int) -> str:
        failed = self.journal.info(run).get("upstream_failed") or []
        return f"{self.upstream} complete" + (
            f" (upstream gave up batches {failed})" if failed else ""
        )
