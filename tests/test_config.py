"""Configuration validation: every error names the file, the key path and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.config import (
    check_config_dir,
    load_all_calibrations,
    load_calibration,
    load_loop_config,
)
from loop.errors import ConfigError
from tests.conftest import CONFIG_DIR, run_cli

ECAL = CONFIG_DIR / "calibrations" / "EcalPedestals.yaml"


def _edited(tmp_path: Path, old: str, new: str, name: str = "EcalPedestals") -> Path:
    text = ECAL.read_text()
    assert old in text, old
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_calibration(path)
    return info.value.problems


def test_shipped_configuration_is_valid() -> None:
    assert check_config_dir(CONFIG_DIR) == []
    configs, problems = load_all_calibrations(CONFIG_DIR / "calibrations")
    assert problems == []
    assert set(configs) == {"EcalPedestals", "SiStripBad"}
    assert configs["SiStripBad"].payload.calibration_type == "bad_channels"


def test_wrong_type_names_file_key_and_line(tmp_path: Path) -> None:
    path = _edited(tmp_path, "min_ls_per_job: 2", "min_ls_per_job: two")
    [problem] = _problems(path)
    assert str(path) in problem
    assert "step2.min_ls_per_job" in problem
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "two" in text)
    assert f"(line {line})" in problem


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = _edited(tmp_path, "  max_ls_per_job: 8", "  max_ls_per_job: 8\n  nThraeds: 4")
    [problem] = _problems(path)
    assert "step2.nThraeds" in problem and "unknown key" in problem


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    path = _edited(tmp_path, "min_ls: 2", "min_ls: -1\n  colour: red")
    problems = _problems(path)
    assert len(problems) == 2
    assert any("run_selection.min_ls" in p for p in problems)
    assert any("run_selection.colour" in p for p in problems)


def test_missing_required_key(tmp_path: Path) -> None:
    path = _edited(tmp_path, "  destination_tag: EcalPedestals_prompt_v1\n", "")
    [problem] = _problems(path)
    assert "payload.destination_tag" in problem and "required key is missing" in problem


def test_missing_file(tmp_path: Path) -> None:
    [problem] = _problems(tmp_path / "Nope.yaml")
    assert "Nope.yaml: file not found" in problem


def test_bad_yaml_syntax_gives_line(tmp_path: Path) -> None:
    path = _edited(tmp_path, "  stream: ecal", "  stream: [ecal")
    [problem] = _problems(path)
    assert str(path) in problem and "YAML syntax error" in problem and "line" in problem


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = _edited(tmp_path, "label: ECAL pedestals", "label: ECAL pedestals\nlabel: again")
    assert any("duplicate key" in p and "label" in p for p in _problems(path))


def test_name_must_match_file(tmp_path: Path) -> None:
    path = _edited(tmp_path, "name: EcalPedestals", "name: Other")
    assert "must equal the file name" in _problems(path)[0]


def test_min_greater_than_max_rejected(tmp_path: Path) -> None:
    path = _edited(tmp_path, "min_ls_per_job: 2", "min_ls_per_job: 9")
    assert "min_ls_per_job must not exceed max_ls_per_job" in _problems(path)[0]


def test_depends_on_unknown_and_cycles(tmp_path: Path) -> None:
    cal = tmp_path / "calibrations"
    cal.mkdir()
    ecal = ECAL.read_text()
    (cal / "EcalPedestals.yaml").write_text(ecal.replace("depends_on: []", "depends_on: [B]"))
    (cal / "B.yaml").write_text(
        ecal.replace("name: EcalPedestals", "name: B").replace(
            "depends_on: []", "depends_on: [EcalPedestals, Zz]"
        )
    )
    _configs, problems = load_all_calibrations(cal)
    assert any("unknown calibration 'Zz'" in p for p in problems)
    assert sum("circular depends_on" in p for p in problems) == 1


def test_loop_config_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        "work_dir: w\nraw_root: r\nlog_dir: l\nstore_root: s\n"
        "registry_url: http://127.0.0.1:1/\nconddb_url: sqlite:///db.sqlite\n"
    )
    config = load_loop_config(path)
    assert config.work_dir == tmp_path / "w"
    assert config.conddb_url == f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert config.registry_url == "http://127.0.0.1:1"
    assert config.lookback_hours == 8


def test_loop_config_rejects_non_http_registry(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        "work_dir: w\nraw_root: r\nlog_dir: l\nstore_root: s\n"
        "registry_url: ftp://x\nconddb_url: sqlite:///db.sqlite\n"
    )
    with pytest.raises(ConfigError, match=r"registry_url \(line 5\)"):
        load_loop_config(path)


def test_cli_config_check(tmp_path: Path) -> None:
    ok = run_cli("config", "check", str(CONFIG_DIR))
    assert ok.returncode == 0, ok.stderr
    bad = _edited(tmp_path, "min_ls: 2", "min_ls: x\n  nThraeds: 1")
    result = run_cli("config", "check", str(bad))
    assert result.returncode == 2
    assert "run_selection.min_ls" in result.stderr and "nThraeds" in result.stderr
    assert "2 problem(s) found" in result.stderr
    assert "Traceback" not in result.stderr


def _with_command(tmp_path: Path, command: str) -> Path:
    old = "  trigger_types: [pedestal]"
    return _edited(tmp_path, old, f"  command: {command}\n{old}")


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ('["reco", "{inputs}", "--out", "{outdir}"]', "unknown placeholder {outdir}"),
        ('["reco", "{inputs}", "{output_dir}", "{0}"]', "unknown placeholder {0}"),
        ('["reco", "{inputs}", "{output_dir}", "{run.real}"]', "unknown placeholder {run.real}"),
        ('["reco", "{inputs}", "{output_dir}", "{run:>8}"]', "unknown placeholder {run:>8}"),
        ('["reco", "--in={inputs}", "{output_dir}"]', "{inputs} must be an item of its own"),
        ('["reco", "{output_dir}", "{"]', "write {{ }} for a brace"),
        ('["reco", "{output_dir}"]', "must contain {inputs}"),
        ("[]", "must name a program"),
    ],
)
def test_command_templates_are_checked_at_load(tmp_path: Path, command: str, says: str) -> None:
    path = _with_command(tmp_path, command)
    [problem] = _problems(path)
    assert str(path) in problem and "step2.command" in problem and "(line 2" in problem
    assert says in problem, problem


def test_good_command_template_is_accepted(tmp_path: Path) -> None:
    command = '["my-reco", "--cal", "{calibration}", "{inputs}", "--out={output_dir}", "r{run}"]'
    path = _with_command(tmp_path, command)
    assert load_calibration(path).step2.command is not None
