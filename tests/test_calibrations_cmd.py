"""``calloop calibrations list|show|check|run``: what an expert sees before a calibration goes
into the automatic system, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from loop.commands.calibrations_cmd import simulate
from loop.conddb.client import ConditionsDB
from loop.config import LoopConfig, dump_yaml
from loop.store import CalibStore
from tests.conftest import CONFIG_DIR, run_cli
from tests.helpers import calibration, workspace

A, B = "EcalPedestals", "EcalPedestalsB"


@pytest.fixture
def config(tmp_path: Path) -> LoopConfig:
    """The built-in calibrations plus B, a copy of A that depends on A."""
    loop_config = workspace(tmp_path)
    write_calibration(loop_config, B, depends_on=[A])
    return loop_config


def write_calibration(loop_config: LoopConfig, name: str, **changes: object) -> Path:
    """A copy of A under another name, ctype and tag, with ``changes`` applied."""
    directory = loop_config.calibrations_dir
    data = yaml.safe_load((directory / f"{A}.yaml").read_text())
    data.update(name=name, **changes)
    data["payload"].update(ctype=name.lower(), destination_tag=f"{name}_prompt_v1")
    path = directory / f"{name}.yaml"
    dump_yaml(path, data)
    return path


def cli(loop_config: LoopConfig, *args: str) -> subprocess.CompletedProcess[str]:
    loop_yaml = loop_config.calibrations_dir.parent / "loop.yaml"
    return run_cli("calibrations", *args, "--config", str(loop_yaml))


def test_list_names_kind_expert_inputs_dependencies_and_statistics(config: LoopConfig) -> None:
    listed = cli(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["calibrations"]}
    shipped = {path.stem for path in (CONFIG_DIR / "calibrations").glob("*.yaml")}
    assert set(rows) == shipped | {B} and {A, "SiStripBad"} <= shipped
    assert rows[B]["depends_on"] == [A] and rows[A]["depends_on"] == []
    assert rows["SiStripBad"]["kind"] == "bad_channels" and rows[A]["kind"] == "pedestals"
    assert rows["SiStripBad"]["inputs"] == {
        "raw_stream": "sistrip",
        "trigger_types": ["pedestal", "physics"],
    }
    assert rows[A]["min_events"] == 50
    assert rows[A]["expert"]["email"] == "ecal-calib-oncall@example.org"
    text = cli(config, "list").stdout.splitlines()
    [line] = [row for row in text if row.startswith(B)]
    assert line.split()[1:3] == ["pedestals", "ecal:"] and A in line


def test_show_gives_the_dependency_chain_dependents_and_effective_config(
    config: LoopConfig,
) -> None:
    write_calibration(config, "EcalPedestalsC", depends_on=[B])
    shown = json.loads(cli(config, "show", "EcalPedestalsC", "--json").stdout)
    assert shown["dependency_chain"] == [A, B]
    assert shown["effective_config"]["validation"]["min_events"] == 50
    assert shown["on_dependency_missing"] == "use_previous"
    assert shown["payload_schema"]["dtype"]
    dependents = json.loads(cli(config, "show", A, "--json").stdout)["dependents"]
    assert dependents == [B]
    text = cli(config, "show", "EcalPedestalsC").stdout
    assert f"chain:         {A} -> {B} -> EcalPedestalsC" in text
    unknown = cli(config, "show", "EcalPedestal")
    assert unknown.returncode == 2
    assert "no calibration 'EcalPedestal'" in unknown.stderr and "did you mean" in unknown.stderr


def test_check_passes_a_dependent_calibration_after_dry_runs(config: LoopConfig) -> None:
    checked = cli(config, "check", B)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert [line.split()[:3] for line in lines[:3]] == [
        ["PASS", B, "config"],
        ["PASS", B, "kind"],
        ["PASS", B, "dependencies"],
    ]
    assert f"chain {A} -> {B}" in lines[2]
    assert lines[3].startswith(f"PASS {B}") and "dry run" in lines[3]
    assert "passes validation" in lines[3] and lines[-1] == "every check passed"


def test_check_names_a_cycle_and_exits_non_zero(config: LoopConfig) -> None:
    write_calibration(config, "Cyc1", depends_on=["Cyc2"])
    write_calibration(config, "Cyc2", depends_on=["Cyc1"])
    checked = cli(config, "check", "Cyc2", "--json")
    assert checked.returncode == 1
    results = {r["check"]: r for r in json.loads(checked.stdout)}
    assert results["config"]["status"] == "PASS"
    assert results["dependencies"]["status"] == "FAIL"
    assert "circular depends_on: Cyc2 -> Cyc1 -> Cyc2" in results["dependencies"]["reason"]
    assert results["dry run"]["reason"] == "not attempted: a check above failed"


def test_check_names_an_unknown_dependency_and_an_invalid_file(config: LoopConfig) -> None:
    write_calibration(config, "Orphan", depends_on=["EcalPedestal"])
    write_calibration(config, "Broken", validation={"min_events": -1})
    checked = cli(config, "check")
    assert checked.returncode == 1
    out = checked.stdout
    assert (
        "FAIL Orphan               dependencies  depends on unknown calibration "
        "'EcalPedestal'; did you mean 'EcalPedestals'?" in out
    )
    [broken] = [line for line in out.splitlines() if line.startswith("FAIL Broken")]
    assert "config" in broken and "validation.min_events" in broken
    assert f"PASS {A:<20} dry run" in out  # the others are still checked
    assert "check(s) failed" in out.splitlines()[-1]


def test_check_of_an_unknown_calibration_is_an_error(config: LoopConfig) -> None:
    checked = cli(config, "check", "Nope")
    assert checked.returncode == 2 and "no calibration 'Nope'" in checked.stderr


def test_run_derives_stores_and_uploads_once_and_a_dependent_reads_the_store(
    config: LoopConfig, tmp_path: Path
) -> None:
    raw = simulate(calibration(config, A), config.raw_root)
    out = tmp_path / "out"
    first = cli(config, "run", A, "--runs", "1", "--out", str(out / "a"), "--store", "--upload")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "passes validation" in first.stdout and "inserted" in first.stdout
    provenance = json.loads((out / "a" / "run1" / "provenance.json").read_text())
    assert provenance["runs"] == [1] and provenance["inputs"] == [str(p) for p in raw]
    payload = np.load(out / "a" / "run1" / "payload.npy")
    stored = CalibStore(config.store_root).detector("ecal-0001").get("pedestals", run=1)
    assert stored.version == provenance["version"]
    np.testing.assert_array_equal(stored.array, payload)
    conditions = ConditionsDB.connect(config.conddb_url)
    resolved = conditions.resolve(tag="EcalPedestals_prompt_v1", run=1)
    np.testing.assert_array_equal(conditions.payload(resolved.payload_hash).array(), payload)
    again = cli(config, "run", A, "--runs", "1", "--out", str(out / "a"), "--upload", "--json")
    assert again.returncode == 0, again.stderr  # answered from its idempotency key
    assert json.loads(again.stdout)[0]["upload"]["hash"] == resolved.payload_hash
    assert len(conditions.iovs("EcalPedestals_prompt_v1", history=True)) == 1
    # the same events given as files: the same payload
    files = cli(config, "run", A, "--files", *map(str, raw), "--out", str(out / "files"))
    assert files.returncode == 0, files.stderr
    np.testing.assert_array_equal(np.load(out / "files" / "payload.npy"), payload)
    # B depends on A: without --dependency it takes A's stored payload for the run
    dependent = cli(config, "run", B, "--runs", "1", "--out", str(out / "b"), "--json")
    assert dependent.returncode == 0, dependent.stderr
    [record] = json.loads(dependent.stdout)
    assert list(record["dependencies"]) == [A]


def test_run_names_a_run_without_files_and_a_foreign_dependency(config: LoopConfig) -> None:
    missing = cli(config, "run", A, "--runs", "7-8", "--out", str(config.work_dir / "o"))
    assert missing.returncode == 2
    assert f"run 7: no raw LS files in {config.raw_root / 'ecal' / 'run7'}" in missing.stderr
    bad = cli(config, "run", A, "--runs", "x", "--out", "o")
    assert bad.returncode == 2 and "'x' is not R, R1,R2,... or R1-R2" in bad.stderr
    simulate(calibration(config, A), config.raw_root)
    foreign = cli(
        config, "run", A, "--runs", "1", "--out", "o", "--dependency", f"{B}=/nowhere.npy"
    )
    assert foreign.returncode == 2
    assert f"--dependency {B}: {A} does not depend on it" in foreign.stderr
