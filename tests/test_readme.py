"""The README's commands work as written: every ``calloop`` line parses with the real
argument parser (flags exist, in the right order), and the read-only ones run against a
workspace and succeed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loop.cli import build_parser
from tests.conftest import run_cli
from tests.helpers import workspace

README = Path(__file__).resolve().parents[1] / "README.md"
# read-only commands that can run here against a fresh workspace (no daemon, no service)
RUNNABLE = {("config", "check"), ("config", "show"), ("status",), ("graph",)}


def readme_commands() -> list[list[str]]:
    """Every ``calloop ...`` command of the README's shell blocks, as argv (comments,
    trailing ``&`` and continuation lines handled)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip().rstrip("&").strip()
            for part in line.split("&&"):
                argv = shlex.split(part.strip())
                if argv[:1] == ["sudo"]:  # sudo -u USER calloop ...
                    argv = argv[3:] if argv[1:2] == ["-u"] else argv[1:]
                if len(argv) > 1 and argv[0].endswith("calloop"):
                    commands.append(argv[1:])
    return commands


def test_the_readme_has_calloop_commands() -> None:
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("argv", readme_commands(), ids=shlex.join)
def test_every_readme_command_parses(argv: list[str]) -> None:
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README command `calloop {shlex.join(argv)}` does not parse ({exc.code})")


def test_read_only_readme_commands_run(tmp_path: Path) -> None:
    workspace(tmp_path)
    config = str(tmp_path / "config" / "loop.yaml")
    ran = 0
    for argv in readme_commands():
        key = tuple(a for a in argv[:2] if not a.startswith("-"))
        if key not in RUNNABLE and key[:1] not in RUNNABLE:
            continue
        args = [a if not a.endswith("loop.yaml") else config for a in argv]
        if key == ("config", "check"):
            args = ["config", "check", str(tmp_path / "config")]
        elif "--config" not in args and argv[0] != "graph":
            args += ["--config", config]
        if argv[0] == "graph":
            args = [a if not a.endswith((".svg", ".png")) else str(tmp_path / "g.md") for a in args]
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, f"calloop {shlex.join(args)}: {result.stderr}"
        assert "Traceback" not in result.stderr
        ran += 1
    assert ran >= 3
