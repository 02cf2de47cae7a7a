"""The machine runner the three steps share: per-run models, facts, conditions, driver.

Each run is its own model in one ``transitions`` machine per daemon, so runs progress
independently (no head-of-line blocking). Conditions are pure functions of a
:class:`Facts` snapshot taken just before each trigger; actions (``on_enter``) are
idempotent, because after a SIGKILL the persisted state is re-entered and its action
may run again. Every state change is persisted to the journal and logged in one
structured line; an exception while handling one run (an action, a condition's facts)
sends that run to ``Failed`` with the reason stored, and only that run.

A step module declares its states (an Enum), its transition table and a model class
naming both; the trigger methods the machine binds are generated from that table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from transitions import EventData, Machine

from loop.batching import due, ready
from loop.fsutil import storage_error_in

if TYPE_CHECKING:
    from states.step import Step

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
    rejected: bool = False  # step 4: the newest published harvest failed validation
    final_upload: str | None = None  # step 4: outbox state of the accepted harvest's upload
    awaiting: tuple[str, ...] = ()  # step 4: dependencies the run still waits for (described)


def _unbound(*_args: Any, **_kwargs: Any) -> bool:
    raise RuntimeError("trigger called before the model was added to its machine")


class RunModel:
    """A run in one step's FSM.

    Subclasses set ``STATES``, ``TRANSITIONS``, ``INITIAL`` and ``FAILED``; a stub for
    every trigger of the table, its ``may_`` check and each ``is_<State>`` is generated
    here, so the machine (``model_override=True``) binds exactly those names. The driver
    fires triggers by name through :meth:`trigger` and :meth:`may_trigger`.
    """

    STATES: ClassVar[type[Enum]]
    TRANSITIONS: ClassVar[list[Transition]]
    INITIAL: ClassVar[Enum]
    FAILED: ClassVar[Enum]
    state: Enum

    def __init__(self, run: int, step: Step) -> None:
        self.run = run
        self.step = step
        self.facts = Facts()
        self.log = step.log.bind(run=run)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TRANSITIONS" in cls.__dict__:
            for transition in cls.TRANSITIONS:
                setattr(cls, transition["trigger"], _unbound)
                setattr(cls, f"may_{transition['trigger']}", _unbound)
            for member in cls.STATES:
                setattr(cls, f"is_{member.name}", _unbound)

    def trigger(self, name: str) -> bool:
        """Fire trigger ``name`` (bound by the machine)."""
        raise RuntimeError("trigger called before the model was added to its machine")

    def may_trigger(self, name: str) -> bool:
        """Whether trigger ``name`` may fire now (bound by the machine)."""
        raise RuntimeError("trigger called before the model was added to its machine")

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
        """A job (directory, frozen configuration, command) for every batch that has none."""
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
        assert event.error is not None
        if storage_error_in(event.error):
            # the disk, not the run, is at fault: back to the last persisted state, so
            # the action runs again once the daemon can write (its degraded wait)
            persisted = self.step.journal.run_state(self.run)
            if persisted is not None:
                event.machine.set_state(self.STATES[persisted], self)
            raise event.error
        self.quarantine(event.error, event.machine)

    def quarantine(self, error: BaseException, machine: Machine) -> None:
        """Move the run to Failed with its reason stored (step, state, exception,
        message); one ERROR, the traceback in the debug logs only. Other runs and the
        daemon carry on."""
        failure = {
            "step": self.step.name,
            "state": self.state.name,
            "exception": type(error).__name__,
            "message": str(error),
        }
        self.log.error(
            "run failed and is quarantined in Failed; the daemon and the other runs "
            "carry on. Fix the cause, then retry it",
            **{f"failure_{key}": value for key, value in failure.items()},
            retry=f"calloop runs retry -c {self.step.calibration.name} {self.run}",
            exc_info=error,
        )
        self.step.journal.update_info(self.run, failure=failure)
        machine.set_state(self.FAILED, self)
        self.step.retire_run(self.run, self.FAILED)


def build_machine(model_class: type[RunModel]) -> Machine:
    """One machine per daemon; run models are added and removed as runs come and go."""
    return Machine(
        model=None,
        states=model_class.STATES,
        transitions=model_class.TRANSITIONS,
        initial=model_class.INITIAL,
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
            if model.may_trigger(trigger):
                model.trigger(trigger)
                break
        else:
            return steps
    return max_steps
