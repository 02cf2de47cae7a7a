"""Configuration validation: every error names the file, the key path and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loop.config import (
    CalibrationConfig,
    LoopConfig,
    check_config_dir,
    load_all_calibrations,
    load_calibration,
    load_loop_config,
)
from loop.config_reference import REFERENCE_PATH, REFRESH_COMMAND, keys, reference_markdown
from loop.errors import ConfigError
from loop.reload import LIVE_CALIBRATION_KEYS, LIVE_LOOP_KEYS
from tests.conftest import CONFIG_DIR, run_cli
from tests.helpers import workspace

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
    assert set(configs) == {p.stem for p in (CONFIG_DIR / "calibrations").glob("*.yaml")}
    assert {"EcalPedestals", "SiStripBad", "PmtGain", "PixelOccupancy"} <= set(configs)
    assert configs["SiStripBad"].kind == "bad_channels"


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


# ------------------------------------------------------ lookup: schema, reference, show


def _two_calibrations(tmp_path: Path, old: str, new: str) -> tuple[Path, list[str]]:
    """A calibrations dir with EcalPedestals and B, a copy with its own name, tag and
    ctype, then edited ``old`` -> ``new``; returns it and the problems found."""
    cal = tmp_path / "calibrations"
    cal.mkdir(parents=True)
    ecal = ECAL.read_text()
    (cal / "EcalPedestals.yaml").write_text(ecal)
    b = (
        ecal.replace("name: EcalPedestals", "name: B")
        .replace("destination_tag: EcalPedestals_prompt_v1", "destination_tag: B_v1")
        .replace("ctype: pedestals", "ctype: pedestals_b")
    )
    assert old in b, old
    (cal / "B.yaml").write_text(b.replace(old, new))
    return cal, load_all_calibrations(cal)[1]


def _line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_run_type_typo_suggests_the_known_one(tmp_path: Path) -> None:
    path = _edited(tmp_path, "run_types: [collisions, cosmics]", "run_types: [colisions, cosmics]")
    [problem] = _problems(path)
    line = _line(path, "colisions")
    assert problem == (
        f"{path}: run_selection.run_types.0 (line {line}): "
        "'colisions' is not one of 'collisions' or 'cosmics'; did you mean 'collisions'?"
    )


def test_literal_typo_suggests_and_far_typo_does_not(tmp_path: Path) -> None:
    path = _edited(tmp_path, "time_type: run", "time_type: rnu")
    assert "did you mean 'run'?" in _problems(path)[0]
    path = _edited(tmp_path, "time_type: run", "time_type: fortnight")
    [problem] = _problems(path)
    assert "payload.time_type" in problem and "did you mean" not in problem


def test_depends_on_unknown_has_line_and_suggestion(tmp_path: Path) -> None:
    cal, problems = _two_calibrations(tmp_path, "depends_on: []", "depends_on: [EcalPedestal]")
    [problem] = problems
    line = _line(cal / "B.yaml", "depends_on:")
    assert problem == (
        f"{cal / 'B.yaml'}: depends_on.0 (line {line}): "
        "unknown calibration 'EcalPedestal'; did you mean 'EcalPedestals'?"
    )


def test_depends_on_an_invalid_file_is_not_called_unknown(tmp_path: Path) -> None:
    cal, _ = _two_calibrations(tmp_path, "depends_on: []", "depends_on: [EcalPedestals]")
    (cal / "EcalPedestals.yaml").write_text("name: [")
    problems = load_all_calibrations(cal)[1]
    assert problems and not any("unknown calibration" in p for p in problems)


def test_duplicate_destination_tag_across_calibrations(tmp_path: Path) -> None:
    old, new = "destination_tag: B_v1", "destination_tag: EcalPedestals_prompt_v1"
    cal, problems = _two_calibrations(tmp_path, old, new)
    [problem] = problems
    line = _line(cal / "EcalPedestals.yaml", "destination_tag")
    # files are read in name order: B.yaml holds the tag first, EcalPedestals.yaml repeats it
    assert problem == (
        f"{cal / 'EcalPedestals.yaml'}: payload.destination_tag (line {line}): "
        "destination tag 'EcalPedestals_prompt_v1' is also that of "
        f"{cal / 'B.yaml'}: payload.destination_tag (line {line}); give each calibration its own"
    )


def test_duplicate_detector_and_ctype_across_calibrations(tmp_path: Path) -> None:
    cal, problems = _two_calibrations(tmp_path, "ctype: pedestals_b", "ctype: pedestals")
    [problem] = problems
    line = _line(cal / "EcalPedestals.yaml", "ctype:")
    assert problem.startswith(f"{cal / 'EcalPedestals.yaml'}: payload.ctype (line {line}): ")
    assert "store entry detector 'ecal-0001', ctype 'pedestals' is also that of" in problem
    other = cal / "B.yaml"
    other.write_text(other.read_text().replace("detector: ecal-0001", "detector: ecal-0002"))
    assert load_all_calibrations(cal)[1] == []  # the same ctype of another detector is fine


def test_distinct_calibrations_pass_the_cross_checks(tmp_path: Path) -> None:
    _, problems = _two_calibrations(tmp_path, "label: ECAL pedestals", "label: B")
    assert problems == []


def test_cli_config_check_reports_cross_calibration_problems(tmp_path: Path) -> None:
    (tmp_path / "loop.yaml").write_text(
        "work_dir: w\nraw_root: r\nlog_dir: l\nstore_root: s\n"
        "registry_url: http://127.0.0.1:1/\nconddb_url: sqlite:///db.sqlite\n"
    )
    _two_calibrations(tmp_path, "depends_on: []", "depends_on: [Ecal]")
    b = tmp_path / "calibrations" / "B.yaml"
    b.write_text(b.read_text().replace("B_v1", "EcalPedestals_prompt_v1"))
    result = run_cli("config", "check", str(tmp_path))
    assert result.returncode == 2
    assert "B.yaml: depends_on.0 (line" in result.stderr
    assert "EcalPedestals.yaml: payload.destination_tag (line" in result.stderr
    assert "2 problem(s) found" in result.stderr


@pytest.mark.parametrize(
    ("flag", "model"), [("--calibration", CalibrationConfig), ("--loop", LoopConfig)]
)
def test_cli_config_schema(flag: str, model: type[CalibrationConfig | LoopConfig]) -> None:
    result = run_cli("config", "schema", flag)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == model.__name__
    assert set(schema["properties"]) == set(model.model_fields)
    assert schema["additionalProperties"] is False


def test_cli_config_schema_defaults_to_calibration() -> None:
    result = run_cli("config", "schema")
    defs = json.loads(result.stdout)["$defs"]
    assert defs["RunSelection"]["properties"]["run_types"]["items"]["enum"] == [
        "collisions",
        "cosmics",
    ]


def test_every_key_is_documented() -> None:
    for model, live in ((LoopConfig, LIVE_LOOP_KEYS), (CalibrationConfig, LIVE_CALIBRATION_KEYS)):
        for key in keys(model, live):
            assert key.description, f"{model.__name__}: {key.path} needs a description="


def test_reference_is_up_to_date() -> None:
    assert REFERENCE_PATH.read_text() == reference_markdown(), (
        f"config/REFERENCE.md is out of date: run `{REFRESH_COMMAND}`"
    )


def test_reference_rows() -> None:
    rows = {line.split(" | ")[0]: line for line in reference_markdown().splitlines()}
    assert rows["| `poll.registry_s`"] == (
        "| `poll.registry_s` | number, > 0 | `30.0` | yes | seconds between registry polls |"
    )
    assert "| `poll` | section |  | partly |" in rows["| `poll`"]
    assert " | `null` | no | " in rows["| `conddb_token_file`"]
    assert "| required | no |" in rows["| `payload.destination_tag`"]
    assert (
        '| list of "collisions" \\| "cosmics", non-empty |' in rows["| `run_selection.run_types`"]
    )
    assert "| yes |" in rows["| `step3.occupancy_threshold`"]  # live through its section
    # but not the accumulations' layout: a run's histograms must stay mergeable
    assert "| no |" in rows["| `step3.histogram.bins`"]
    assert "| partly |" in rows["| `step3`"]
    assert "\\<raw_root>" in rows["| `raw_root`"]


def test_cli_config_reference_write(tmp_path: Path) -> None:
    printed = run_cli("config", "reference")
    assert printed.returncode == 0 and printed.stdout == reference_markdown()
    target = tmp_path / "REFERENCE.md"
    written = run_cli("config", "reference", "--write", str(target))
    assert written.returncode == 0 and target.read_text() == reference_markdown()


def test_cli_config_show_calibration() -> None:
    result = run_cli("config", "show", "-c", "SiStripBad", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    config = load_calibration(CONFIG_DIR / "calibrations" / "SiStripBad.yaml")
    assert shown == config.model_dump(mode="json")
    assert shown["step4"]["min_interval_s"] == 0.0  # not in the file: the default
    text = run_cli("config", "show", "-c", "SiStripBad")
    assert yaml.safe_load(text.stdout) == shown
    assert f"config_sha256 {config.config_hash()}" in text.stdout.splitlines()[0]


def test_cli_config_show_loop() -> None:
    result = run_cli("config", "show", "--loop", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["timeouts"]["registry_deadline_s"] == 30.0  # not in the file: the default
    assert shown == load_loop_config(CONFIG_DIR / "loop.yaml").model_dump(mode="json")


def test_cli_config_show_unknown_calibration_is_one_line() -> None:
    result = run_cli("config", "show", "-c", "SiStripBda")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "no calibration 'SiStripBda'" in line and "did you mean 'SiStripBad'?" in line


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "conddb.token"
    token.write_text("cdb_1_secret\n")
    config = workspace(tmp_path / "ws").model_copy(update={"conddb_token_file": token})
    token.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        config.conddb_token()
    token.chmod(0o600)
    assert config.conddb_token() == "cdb_1_secret"
