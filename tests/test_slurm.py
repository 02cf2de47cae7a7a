"""The Slurm backend against a live single-node cluster."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.config import SlurmConfig, load_loop_config
from loop.demo import format_table, run_demo
from loop.errors import JobError
from loop.journal import JobPhase, Journal
from loop.sim.scenario import RunSpec, load_scenario
from tests.daemon_harness import harness, scenario, slow_command
from tests.test_jobs_deadline import add_hang_once, drive, make_manager, short_policy, stop_attempt
from workers.backends.base import BackendUnavailable, JobSpec, JobState, JobStatus
from workers.backends.slurm import SlurmBackend, parse_elapsed, parse_exit_code, slurm_state

pytestmark = pytest.mark.slurm


def _spec(tmp_path: Path, name: str, code: str, **resources: object) -> JobSpec:
    return JobSpec(
        key=f"calloop.test.{name}",
        argv=[sys.executable, "-c", code],
        job_dir=tmp_path / name,
        attempt=1,
        timeout_s=600,
        resources=dict(resources),
    )


def _wait_all(
    backend: SlurmBackend, jobs: dict[str, JobSpec], limit: float
) -> dict[str, JobStatus]:
    deadline = time.monotonic() + limit
    done: dict[str, JobStatus] = {}
    while time.monotonic() < deadline and len(done) < len(jobs):
        for job_id, status in backend.poll(
            {k: v for k, v in jobs.items() if k not in done}
        ).items():
            if status.state.finished:
                done[job_id] = status
        time.sleep(0.5)
    return done


def test_state_and_exit_code_parsing() -> None:
    assert slurm_state("CANCELLED by 0") is JobState.CANCELLED
    assert slurm_state("OUT_OF_MEMORY") is JobState.FAILED
    assert slurm_state("NODE_FAIL") is JobState.FAILED
    assert slurm_state("TIMEOUT") is JobState.TIMEOUT
    assert slurm_state("PENDING") is JobState.PENDING
    assert parse_exit_code("3:0") == 3 and parse_exit_code("0:9") == 137
    assert parse_exit_code("") is None
    assert parse_elapsed("0:07") == 7 and parse_elapsed("1:02:03") == 3723
    assert parse_elapsed("2-00:00:01") == 172801
    assert parse_elapsed("INVALID") is None and parse_elapsed("") is None


def test_job_outcomes_on_the_live_cluster(slurm_cluster: Path, tmp_path: Path) -> None:
    """Success, exit 3, time limit exceeded and scancel from outside, in one batch."""
    backend = SlurmBackend(SlurmConfig(vanish_grace_s=30), "Test")
    specs = {
        "ok": _spec(tmp_path, "ok", "print('done')"),
        "fail": _spec(tmp_path, "fail", "raise SystemExit(3)"),
        "slow": _spec(tmp_path, "slow", "import time; time.sleep(600)", time_limit="00:01:00"),
        "cancel": _spec(tmp_path, "cancel", "import time; time.sleep(600)"),
    }
    ids = {name: backend.submit(spec) for name, spec in specs.items()}
    assert len(set(ids.values())) == 4
    time.sleep(2)
    subprocess.run(["scancel", ids["cancel"]], check=True, timeout=30)  # from outside
    statuses = _wait_all(backend, {ids[n]: specs[n] for n in specs}, limit=240)
    by_name = {name: statuses.get(job_id) for name, job_id in ids.items()}
    assert by_name["ok"] == JobStatus(JobState.SUCCEEDED, 0)
    assert specs["ok"].log_path("stdout").read_text() == "done\n"
    assert by_name["fail"] is not None and by_name["fail"].state is JobState.FAILED
    assert by_name["fail"].exit_code == 3
    assert by_name["cancel"] is not None and by_name["cancel"].state is JobState.CANCELLED
    assert by_name["slow"] is not None and by_name["slow"].state is JobState.TIMEOUT


def test_invalid_directive_is_a_clear_error(slurm_cluster: Path, tmp_path: Path) -> None:
    backend = SlurmBackend(SlurmConfig(partition="nosuchpartition"), "EcalPedestals")
    with pytest.raises(JobError, match=r"Invalid partition.*jobs\.slurm\.partition"):
        backend.submit(_spec(tmp_path, "bad", "pass"))
    bogus = SlurmBackend(SlurmConfig(extra_directives=["--bogus-directive"]), "EcalPedestals")
    with pytest.raises(JobError, match=r"bogus-directive.*jobs\.slurm\.extra_directives"):
        bogus.submit(_spec(tmp_path, "bogus", "pass"))


def test_unreachable_controller_is_waited_for(
    slurm_cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "unreachable.conf"
    text = slurm_cluster.read_text()
    conf.write_text(
        "\n".join(
            "SlurmctldPort=9" if line.startswith("SlurmctldPort=") else line
            for line in text.splitlines()
        )
        + "\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    backend = SlurmBackend(SlurmConfig(command_timeout_s=60), "Test")
    with pytest.raises(BackendUnavailable):
        backend.submit(_spec(tmp_path, "x", "pass"))
    with pytest.raises(BackendUnavailable):
        backend.poll({"1": _spec(tmp_path, "x", "pass")})


def test_overdue_job_is_cancelled_and_retried(
    slurm_cluster: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrapper and payload stopped inside a Slurm job: the daemon scancels the job once
    squeue's run time passes timeout + grace, and the retry (a new job) succeeds."""
    journal = Journal(tmp_path / "step2.journal.sqlite")
    try:
        manager = make_manager(
            journal,
            SlurmBackend(SlurmConfig(vanish_grace_s=30), "Test"),
            policy=short_policy(timeout_s=3, grace_s=2),
        )
        add_hang_once(journal, tmp_path)
        manager.submit_ready(time.time())
        first = journal.jobs()[0]
        stop_attempt(manager.spec(first, 1), limit=60)
        with caplog.at_level(logging.WARNING):
            drive(
                manager,
                lambda: journal.jobs()[0].state == JobPhase.SUCCEEDED,
                limit=120,
                interval=0.5,
            )
        retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
        assert len(retried) == 1 and "killed by the daemon" in retried[0]
        assert "timeouts.job_s = 3 s + 2 s grace" in retried[0]
        last = journal.jobs()[0]
        assert last.attempts == 2 and last.backend_id != first.backend_id
    finally:
        journal.close()
    cancelled = _wait_all(
        SlurmBackend(SlurmConfig(vanish_grace_s=30), "Test"),
        {str(first.backend_id): manager.spec(first, 1)},
        limit=60,
    )
    assert cancelled[str(first.backend_id)].state is JobState.CANCELLED


def test_restarted_daemon_readopts_its_jobs(
    slurm_cluster: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kill (drop) a daemon while its Slurm jobs run; the next one re-adopts them."""
    made = harness(tmp_path, scenario(RunSpec(run_number=9101, start=0, ls_seconds=1, ls_count=4)))
    try:
        made.edit_calibration(
            "EcalPedestals",
            {
                "backend": "slurm",
                "step2": {
                    "command": slow_command("reco", 4.0),
                    "min_ls_per_job": 2,
                    "max_ls_per_job": 2,
                },
            },
        )
        first = made.start("step2", "EcalPedestals")
        made.play()
        step = first.step
        assert step is not None
        in_flight = (JobPhase.SUBMITTED, JobPhase.RUNNING)
        made.run_until(lambda: len(step.journal.jobs(states=in_flight)) == 2)
        submitted = {j.batch: j.backend_id for j in step.journal.jobs()}
        step.watcher.stop()  # the process "dies": no clean shutdown, no final status
        step.close()
        first._lock.release()
        made.daemons.remove(first)
        second = made.start("step2", "EcalPedestals")
        assert second.step is not None
        made.run_until(lambda: second.step.journal.run_state(9101) == "Done", timeout=120)  # type: ignore[union-attr]
        assert {j.batch: j.backend_id for j in second.step.journal.jobs()} == submitted
        for batch in submitted:
            name = f"EcalPedestals.step2.run9101.b{batch:04d}"
            listed = subprocess.run(
                ["sacct", "-c", "-n", "-P", "-o", "JobID,JobName"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            ids = [
                line.split("|")[0]
                for line in listed.stdout.splitlines()
                if line.endswith(f"|{name}")
            ]  # sacct -c ignores --name
            assert len(ids) == 1, f"{name} was submitted {len(ids)} times"
    finally:
        made.stop()


@pytest.mark.slow
def test_quickstart_end_to_end_on_slurm(slurm_cluster: Path, tmp_path: Path) -> None:
    """The six daemons with backend: slurm give the same payloads as the reference."""
    from tests.test_e2e import QUICKSTART, check_against_reference

    rows, ok, _seconds = run_demo(tmp_path, QUICKSTART, speed=50, timeout_s=240, backend="slurm")
    assert ok, format_table(rows)
    check_against_reference(
        load_loop_config(tmp_path / "config" / "loop.yaml"), load_scenario(QUICKSTART)
    )
    jobs = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-o", "JobName"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert sum(name.startswith("EcalPedestals.step2.run386001") for name in jobs) >= 1
