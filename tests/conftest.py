"""Shared fixtures: real loopback servers, real files, and the CI rule for components.

Under ``CI=true`` a test that needs a real component (PostgreSQL, Slurm, graphviz) fails
when the component is missing instead of skipping, so a broken CI machine cannot pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loop.sim.registry_server import RegistryServer
from tests.infra.postgres import PostgresServer, initdb_binary

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "config"


def require(component: str, available: bool, hint: str) -> None:
    """Skip (developer machine) or fail (CI) when ``component`` is not available."""
    if available:
        return
    message = f"{component} is not available: {hint}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires {message}")
    pytest.skip(message)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A real registry HTTP server on a free loopback port, backed by a state file."""
    server = RegistryServer(tmp_path / "registry_state.json").start_background()
    yield server
    server.stop()


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``calloop`` in a subprocess exactly as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "loop.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def have(binary: str) -> bool:
    """True when ``binary`` is on PATH."""
    return shutil.which(binary) is not None


# ------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (see tests/infra/postgres.py)."""
    require(
        "PostgreSQL",
        initdb_binary() is not None,
        "apt-get install postgresql (tests/run.sh does it as root)",
    )
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(autouse=True, scope="session")
def _structlog_to_stdlib() -> None:
    """In-process daemons log through the stdlib, where caplog sees them."""
    from loop.logs import configure_structlog

    configure_structlog()


# ------------------------------------------------------------------------------ Slurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A live single-node Slurm cluster (tests/infra/slurm_cluster.sh); yields slurm.conf."""
    script = REPO / "tests" / "infra" / "slurm_cluster.sh"
    can_start = os.geteuid() == 0 or (have("slurmctld") and have("munge"))
    require("Slurm", can_start, "run as root (tests/run.sh installs slurm-wlm and munge)")
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(script), "start", str(directory)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    require(
        "Slurm", started.returncode == 0, f"cluster did not start: {started.stderr.strip()[-500:]}"
    )
    conf = directory / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # every client (and daemon child) finds the cluster
    try:
        yield conf
    finally:
        subprocess.run(
            ["bash", str(script), "stop", str(directory)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
