"""The daemon runtime shared by steps 2, 3 and 4.

``initialize()`` takes the per-(calibration, step) lock, restores every run from the
journal, re-adopts jobs and starts watching; ``loop(now)`` runs one cycle with the clock
injected (tests drive time instead of sleeping); ``shutdown()`` persists and releases.
Signal handlers only set flags: SIGTERM/SIGINT stop after the current cycle, SIGHUP
reloads the calibration YAML and loop.yaml. A reload is all or nothing: an invalid file,
or a changed key that cannot take effect without a restart (:mod:`loop.reload`), is one
ERROR naming the file or the keys, and the running configuration stays.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from loop.conddb.client import ConditionsDB
from loop.config import (
    CalibrationConfig,
    LoopConfig,
    calibration_path,
    load_calibration,
    load_loop_config,
)
from loop.errors import ConfigError, DaemonError
from loop.fsutil import atomic_write_json
from loop.locks import FileLock, LockTimeout
from loop.logs import get_logger
from loop.registry import RegistryClient
from loop.reload import LIVE_CALIBRATION_KEYS, LIVE_LOOP_KEYS, changed_keys, restart_keys
from loop.store import CalibStore
from states import STEPS
from states.step import Step, StepContext
from workers.backends import make_backend


def status_path(loop_config: LoopConfig, calibration: str, step: str) -> Path:
    """Where a daemon publishes its heartbeat and status."""
    return loop_config.work_dir / calibration / f"{step}.status.json"


def build_step(
    step: str, loop_config: LoopConfig, calibration: CalibrationConfig, clock: Callable[[], float]
) -> Step:
    """The step logic with the services it needs (registry, store, conditions DB)."""
    from states.step2 import Step2
    from states.step3 import Step3
    from states.step4 import Step4

    log = get_logger(f"calloop.{step}").bind(calibration=calibration.name, step=step)
    ctx = StepContext(loop_config, calibration, make_backend(loop_config, calibration), log, clock)
    timeouts = loop_config.timeouts
    if step == "step2":
        registry = RegistryClient(
            loop_config.registry_url,
            timeout_s=timeouts.registry_s,
            attempts=timeouts.registry_attempts,
            backoff_s=timeouts.registry_backoff_s,
        )
        return Step2(ctx, registry)
    if step == "step3":
        return Step3(ctx)
    if step != "step4":
        raise DaemonError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    store = CalibStore(loop_config.store_root, lock_timeout_s=timeouts.store_lock_s)

    def connect() -> Any:
        return ConditionsDB.connect(
            loop_config.conddb_url,
            loop_config.conddb_token(),
            timeout_s=timeouts.conddb_s,
            attempts=timeouts.conddb_attempts,
        )

    return Step4(ctx, store, connect)


class Daemon:
    """One step of one calibration, as a long-running process."""

    def __init__(
        self,
        step: str,
        loop_config: LoopConfig,
        calibration: str,
        *,
        clock: Callable[[], float] = time.time,
        loop_config_path: Path | None = None,
    ) -> None:
        self.step_name = step
        self.loop_config = loop_config
        self.loop_config_path = loop_config_path  # re-read on SIGHUP when known
        self.cal_path = calibration_path(loop_config, calibration)
        self.calibration = load_calibration(self.cal_path)
        self.clock = clock
        self.log = get_logger(f"calloop.{step}").bind(calibration=calibration, step=step)
        self._lock = FileLock(
            loop_config.work_dir / calibration / f"{step}.lock", what=f"{step} of {calibration}"
        )
        self.step: Step | None = None
        self.stop_requested = False
        self.reload_requested = False
        self._next_heartbeat = 0.0
        self.started = clock()

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Lock, restore, adopt, watch, catch up."""
        try:
            self._lock.acquire(0)
        except LockTimeout as exc:
            raise DaemonError(
                f"another {self.step_name} daemon runs for {self.calibration.name}: {exc}"
            ) from None
        self.step = build_step(self.step_name, self.loop_config, self.calibration, self.clock)
        self.step.restore()
        self.step.watcher.start()
        self.step.startup_scan()
        self.log.info(
            "daemon started",
            pid=os.getpid(),
            backend=self.step.jobs.backend.name,
            runs_restored=len(self.step.models),
        )
        self._heartbeat(self.clock(), "running")

    def loop(self, now: float) -> None:
        """One cycle; an unexpected error is logged and the daemon carries on."""
        assert self.step is not None, "initialize() first"
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        try:
            self.step.tick(now)
        except Exception:  # one bad cycle must not kill the daemon
            self.log.exception("cycle failed; continuing with the next one")
        if now >= self._next_heartbeat:
            self._heartbeat(now, "running")

    def shutdown(self) -> None:
        """Stop watching, publish the final status, release the lock."""
        if self.step is not None:
            self.step.watcher.stop()
            self._heartbeat(self.clock(), "stopped")
            self.step.close()
        self._lock.release()
        self.log.info("daemon stopped")

    def reload(self) -> None:
        """Re-read the calibration YAML (and loop.yaml when its path is known); apply
        it only if it is valid and every changed key is live."""
        try:
            calibration = load_calibration(self.cal_path)
            loop_config = (
                load_loop_config(self.loop_config_path)
                if self.loop_config_path is not None
                else self.loop_config
            )
        except ConfigError as exc:
            self.log.error(
                "reload rejected: a configuration file is invalid; the previous "
                "configuration keeps running",
                problems=exc.problems,
            )
            return
        loop_changed = changed_keys(self.loop_config, loop_config)
        calibration_changed = changed_keys(self.calibration, calibration)
        changed = [*(f"loop.{k}" for k in loop_changed), *calibration_changed]
        blocked = [
            *(f"loop.{k}" for k in restart_keys(loop_changed, LIVE_LOOP_KEYS)),
            *restart_keys(calibration_changed, LIVE_CALIBRATION_KEYS),
        ]
        if blocked:
            self.log.error(
                "reload refused: these keys cannot change while the daemon runs; "
                "restart the daemon to apply them (the previous configuration keeps running)",
                keys=blocked,
            )
            return
        self.calibration, self.loop_config = calibration, loop_config
        if self.step is not None:
            self.step.reconfigure(loop_config, calibration)
        self.log.info(
            "configuration reloaded", changed=changed, config_sha256=calibration.config_hash()
        )

    def _heartbeat(self, now: float, state: str) -> None:
        self._next_heartbeat = now + self.loop_config.poll.heartbeat_s
        status = self.step.status() if self.step is not None else {}
        atomic_write_json(
            status_path(self.loop_config, self.calibration.name, self.step_name),
            {
                "calibration": self.calibration.name,
                "step": self.step_name,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self.started,
                "heartbeat": now,
                "state": state,
                **status,
            },
        )

    # -------------------------------------------------------------------- running

    def request_stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: stop after the current cycle."""
        self.stop_requested = True
        if self.step is not None:
            self.step.watcher.wake.set()

    def request_reload(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: reload the calibration at the next cycle."""
        self.reload_requested = True

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.initialize()
        assert self.step is not None
        tick = self.loop_config.poll.tick_s
        try:
            while not self.stop_requested:
                self.loop(self.clock())
                self.step.watcher.wake.wait(tick)  # new files wake the loop at once
        finally:
            self.shutdown()
        return 0
