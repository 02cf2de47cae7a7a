"""``calloop runs list|show|retry|skip|rerun|approve``: what happened to a run, and operator
commands.

``retry``, ``skip``, ``rerun`` (recalibrate a finished run) and ``approve`` (an expert's
override of a Rejected run's validation) are queued in the acting
step's journal (:mod:`loop.control.runcontrol`) and applied by its daemon at its next
cycle; the command waits for the acknowledgement (``--wait``), and with the daemon
stopped the command waits for its next start. All are safe to repeat.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from loop.commands.common import add_json_flag, emit, when
from loop.commands.daemon_cmd import add_config_option, loop_config_from
from loop.config import LoopConfig
from loop.control.runcontrol import (
    PENDING,
    RERUN_STEP,
    Command,
    CommandQueue,
    approve_refusal,
    rerun_refusal,
)
from loop.errors import CalloopError
from loop.journal import Journal
from states import STEPS

FAILED = "Failed"
CLOSED = ("Done", "Skipped", "Rejected", "UploadRefused")  # final states of any step


def register(subparsers: Any) -> None:
    """Add the ``runs`` command group."""
    runs = subparsers.add_parser("runs", help="list, inspect, retry or skip runs")
    sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="every run of a calibration with its state per step")
    _common(listing)
    listing.set_defaults(handler=cmd_list)

    show = sub.add_parser("show", help="one run: states, history, jobs, bad LS, uploads")
    _common(show)
    show.add_argument("run", type=int)
    show.set_defaults(handler=cmd_show)

    retry = sub.add_parser("retry", help="put a Failed run (or one given-up batch) back")
    _common(retry, json_flag=False)
    retry.add_argument("run", type=int)
    retry.add_argument("--step", choices=STEPS, help="default: the first step where it failed")
    retry.add_argument("--batch", type=int, help="retry only this given-up batch (or harvest)")
    _acting(retry)
    retry.set_defaults(handler=cmd_retry)

    for name, handler, text in (
        ("skip", cmd_skip, "close a run on purpose in every step, with a reason"),
        (
            "rerun",
            cmd_rerun,
            "recalibrate a finished run: step 4 harvests all its inputs again with the "
            "current configuration (new store version, new upload)",
        ),
        (
            "approve",
            cmd_approve,
            "an expert's override of a Rejected run: its payload is stored again as an "
            "accepted version naming the approval, and uploaded",
        ),
    ):
        command = sub.add_parser(name, help=text)
        _common(command, json_flag=False)
        command.add_argument("run", type=int)
        _acting(command)
        command.set_defaults(handler=handler)


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("-c", "--calibration", required=True)
    add_config_option(parser)
    if json_flag:
        add_json_flag(parser)


def _acting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why (kept with who and when)")
    parser.add_argument(
        "--wait", type=float, default=15.0, help="seconds to wait for the daemon's answer"
    )


# ------------------------------------------------------------------------- journals


def _journal_path(loop_config: LoopConfig, calibration: str, step: str) -> Path:
    return loop_config.work_dir / calibration / f"{step}.journal.sqlite"


def _journals(loop_config: LoopConfig, calibration: str) -> dict[str, Journal]:
    """The journals of the calibration's steps that have one."""
    found = {
        step: Journal(path)
        for step in STEPS
        if (path := _journal_path(loop_config, calibration, step)).exists()
    }
    if not found:
        raise CalloopError(
            f"no journal of calibration {calibration!r} under {loop_config.work_dir}: "
            "check the name (-c) and --config"
        )
    return found


def run_states(journals: dict[str, Journal], run: int) -> dict[str, str | None]:
    """The run's state in each step (None: the step has not seen it)."""
    return {step: journal.run_state(run) for step, journal in journals.items()}


# ---------------------------------------------------------------------------- reads


def cmd_list(args: argparse.Namespace) -> int:
    """Every run with its state per step and its failure, if any."""
    journals = _journals(loop_config_from(args), args.calibration)
    runs = sorted({run for j in journals.values() for run, _ in j.all_runs()})
    rows: list[dict[str, Any]] = []
    for run in runs:
        states = run_states(journals, run)
        failure = next(
            (f for j in journals.values() if (f := j.info(run).failure) is not None), None
        )
        rows.append({"run": run, "states": states, "failure": failure})

    def text() -> str:
        lines = [f"{'run':>8}  " + "  ".join(f"{s:<18}" for s in journals) + "  failure"]
        for row in rows:
            cells = "  ".join(f"{row['states'][s] or '-':<18}" for s in journals)
            failure = row["failure"]
            why = f"{failure['exception']}: {failure['message'][:60]}" if failure else ""
            lines.append(f"{row['run']:>8}  {cells}  {why}")
        return "\n".join(lines)

    return emit(args, rows, text)


def cmd_show(args: argparse.Namespace) -> int:
    """A run in every step: state, history, jobs, bad inputs, versions, uploads."""
    loop_config = loop_config_from(args)
    journals = _journals(loop_config, args.calibration)
    detail = {step: _step_detail(journal, args.run) for step, journal in journals.items()}
    if all(d is None for d in detail.values()):
        raise CalloopError(f"run {args.run} is unknown to calibration {args.calibration}")
    data = {"run": args.run, "calibration": args.calibration, "steps": detail}
    return emit(args, data, lambda: _show_text(data))


def _step_detail(journal: Journal, run: int) -> dict[str, Any] | None:
    state = journal.run_state(run)
    if state is None:
        return None
    record = journal.info(run)
    queue = CommandQueue(journal.path)
    try:
        commands = [_command_dict(c) for c in queue.of_run(run)]
    finally:
        queue.close()
    return {
        "state": state,
        "history": [{"state": s, "time": t} for s, t in journal.history(run)],
        "failure": record.failure,
        "jobs": [
            {
                "batch": job.batch,
                "state": job.state.value,
                "attempts": job.attempts,
                "exit_code": job.exit_code,
                "detail": job.detail,
                "stderr": str(job.job_dir / f"stderr.{job.attempts}.log"),
            }
            for job in journal.jobs(run=run)
        ],
        "bad_inputs": journal.bad_inputs(run),
        "missing_ls": record.missing_ls,
        "versions": {"last": record.last_version, "accepted": record.accepted_version},
        "validation_problems": record.last_problems,
        "uploads": [
            {"harvest": u.seq, "state": u.state, "attempts": u.attempts, "detail": u.detail}
            for u in journal.uploads(states=("pending", "done", "superseded", "refused"), run=run)
        ],
        "commands": commands,
    }


def _show_text(data: dict[str, Any]) -> str:
    lines = [f"run {data['run']} of {data['calibration']}"]
    for step, d in data["steps"].items():
        if d is None:
            lines.append(f"  {step}: not seen")
            continue
        lines.append(f"  {step}: {d['state']}")
        history = " -> ".join(f"{h['state']} ({when(h['time'])[11:]})" for h in d["history"])
        lines.append(f"    history: {history}")
        if d["failure"]:
            f = d["failure"]
            lines.append(f"    FAILED in {f['state']}: {f['exception']}: {f['message']}")
        for job in d["jobs"]:
            lines.append(
                f"    batch {job['batch']:>4}: {job['state']:<10} attempts {job['attempts']} "
                f"exit {job['exit_code']} {job['detail']} ({job['stderr']})"
            )
        for name, reason in d["bad_inputs"].items():
            lines.append(f"    bad input {name}: {reason}")
        if d["versions"]["last"]:
            lines.append(f"    versions: {d['versions']}")
        for upload in d["uploads"]:
            lines.append(
                f"    upload harvest {upload['harvest']}: {upload['state']} "
                f"(attempts {upload['attempts']}) {upload['detail']}"
            )
        for c in d["commands"]:
            lines.append(
                f"    command #{c['id']} {c['action']} by {c['user']} {when(c['created'])}: "
                f"{c['state']} {c['result']} ({c['reason']})"
            )
    return "\n".join(lines)


def _command_dict(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "action": command.action,
        "batch": command.batch,
        "reason": command.reason,
        "user": command.user,
        "created": command.created,
        "state": command.state,
        "result": command.result,
    }


# ------------------------------------------------------------------------ commands


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue a retry in the step where the run failed (or ``--step``)."""
    loop_config = loop_config_from(args)
    journals = _journals(loop_config, args.calibration)
    states = run_states(journals, args.run)
    step = args.step or next((s for s, state in states.items() if state == FAILED), None)
    if step is None:
        shown = ", ".join(f"{s}: {v or 'not seen'}" for s, v in states.items())
        raise CalloopError(f"run {args.run} is not Failed in any step ({shown}); nothing to retry")
    return _queue(loop_config, args, [step], "retry")


def cmd_skip(args: argparse.Namespace) -> int:
    """Queue a skip in every step that has not finished the run."""
    loop_config = loop_config_from(args)
    journals = _journals(loop_config, args.calibration)
    steps = [s for s, state in run_states(journals, args.run).items() if state not in CLOSED]
    if not steps:
        raise CalloopError(f"run {args.run} is closed in every step; nothing to skip")
    return _queue(loop_config, args, steps, "skip")


def cmd_rerun(args: argparse.Namespace) -> int:
    """Queue a recalibration of a finished run in step 4."""
    loop_config = loop_config_from(args)
    journals = _journals(loop_config, args.calibration)
    why = rerun_refusal(run_states(journals, args.run).get(RERUN_STEP))
    if why is not None:
        raise CalloopError(f"run {args.run}: {why}")
    return _queue(loop_config, args, [RERUN_STEP], "rerun")


def cmd_approve(args: argparse.Namespace) -> int:
    """Queue an expert's approval of a Rejected run's payload in step 4."""
    loop_config = loop_config_from(args)
    journals = _journals(loop_config, args.calibration)
    why = approve_refusal(run_states(journals, args.run).get(RERUN_STEP))
    if why is not None:
        raise CalloopError(f"run {args.run}: {why}")
    return _queue(loop_config, args, [RERUN_STEP], "approve")


def _queue(loop_config: LoopConfig, args: argparse.Namespace, steps: list[str], action: str) -> int:
    """Queue the command in each step, then wait for every acknowledgement."""
    queued: list[tuple[str, CommandQueue, Command]] = []
    for step in steps:
        queue = CommandQueue(_journal_path(loop_config, args.calibration, step))
        batch = getattr(args, "batch", None)
        queued.append(
            (step, queue, queue.submit(args.run, action, reason=args.reason, batch=batch))
        )
    deadline = time.monotonic() + args.wait
    refused = False
    try:
        for step, queue, command in queued:
            settled = _await(queue, command.id, deadline)
            if settled is None or settled.state == PENDING:
                print(
                    f"{action} of run {args.run} queued in {step} (#{command.id}); its daemon "
                    "applies it at its next cycle (it is not answering now: is it running?)"
                )
            else:
                refused |= settled.state != "done"
                print(f"{step}: {settled.state}: {settled.result}")
    finally:
        for _, queue, _ in queued:
            queue.close()
    return 1 if refused else 0


def _await(queue: CommandQueue, command_id: int, deadline: float) -> Command | None:
    while True:
        command = queue.get(command_id)
        if command is None or command.state != PENDING or time.monotonic() > deadline:
            return command
        time.sleep(0.1)
