"""Run daemons in-process against the real registry server, real files and real jobs,
with the clock injected: tests drive time instead of sleeping for it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loop.config import LoopConfig, dump_yaml
from loop.daemon import Daemon
from loop.sim.player import Player
from loop.sim.registry_server import RegistryServer
from loop.sim.scenario import DetectorSpec, RunSpec, Scenario, timeline
from tests.helpers import workspace
from workers.backends.local import LocalBackend

SMALL = DetectorSpec(channels=64, events_per_ls=60, dead=1, noisy=1, hot=1)


def scenario(*runs: RunSpec, streams: tuple[str, ...] = ("ecal", "sistrip")) -> Scenario:
    """A scenario of small detectors."""
    return Scenario(name="test", seed=5, detectors={s: SMALL for s in streams}, runs=list(runs))


@dataclass
class Harness:
    """Registry + player + in-process daemons sharing one workspace."""

    root: Path
    registry: RegistryServer
    loop_config: LoopConfig
    player: Player
    offset: float = 0.0  # added to wall-clock time: lets a test jump ahead (look-back)
    monotonic_offset: float = 0.0  # added to the monotonic clock: elapsed time passes
    daemons: list[Daemon] = field(default_factory=list)

    def clock(self) -> float:
        """The daemons' clock."""
        return time.time() + self.offset

    def monotonic(self) -> float:
        """The daemons' monotonic clock (durations, waits)."""
        return time.monotonic() + self.monotonic_offset

    def edit_calibration(self, name: str, changes: dict[str, object]) -> None:
        """Change keys or sections of a calibration YAML (before starting its daemons)."""
        path = self.loop_config.calibrations_dir / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        dump_yaml(path, data)

    def start(self, step: str, calibration: str) -> Daemon:
        """An initialized daemon."""
        daemon = Daemon(
            step, self.loop_config, calibration, clock=self.clock, monotonic=self.monotonic
        )
        daemon.initialize()
        self.daemons.append(daemon)
        return daemon

    def cycle(self) -> None:
        """One loop() of every daemon."""
        for daemon in self.daemons:
            daemon.loop(self.clock())

    def run_until(
        self,
        done: Callable[[], bool],
        timeout: float = 60.0,
        each: Callable[[], None] | None = None,
    ) -> None:
        """Cycle until ``done()``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            self.cycle()
            if each is not None:
                each()
            time.sleep(0.02)

    def play(self, until: float | None = None) -> None:
        """Apply the scenario's events (those before ``until`` scenario seconds)."""
        for event in timeline(self.player.scenario):
            key = (event.kind, event.run, event.ls)
            if (until is None or event.at <= until) and key not in self._played:
                self.player.apply(event)
                self._played.add(key)

    _played: set[tuple[str, int, int]] = field(default_factory=set)

    def stop(self) -> None:
        """Shut every daemon down and stop the registry."""
        for daemon in self.daemons:
            backend = daemon.step.jobs.backend if daemon.step else None
            if isinstance(backend, LocalBackend):
                backend.wait_children(timeout=60)  # no job outlives the test
            daemon.shutdown()
        self.daemons.clear()
        self.registry.stop()


def harness(tmp_path: Path, plan: Scenario) -> Harness:
    """A harness with the registry running and the player prepared (no event played)."""
    registry = RegistryServer(tmp_path / "registry_state.json").start_background()
    loop_config = workspace(tmp_path, registry_port=registry.port, scenario=plan)
    player = Player(plan, tmp_path / "registry_state.json", loop_config.raw_root, speed=1.0)
    player.prepare()
    return Harness(tmp_path, registry, loop_config, player)


def slow_command(worker: str, delay: float, fail_batch: int = 0) -> list[str]:
    """An external step command that sleeps (and may crash one batch) around a worker."""
    return [
        sys.executable,
        str(Path(__file__).with_name("slow_worker.py")),  # by path: jobs run in their job dir
        str(delay),
        str(fail_batch),
        "{batch}",
        worker,
        "--calibration",
        "{calibration}",
        "--output-dir",
        "{output_dir}",
        "{inputs}",
    ]
