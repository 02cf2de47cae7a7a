"""Per-level log files, JSON lines, library routing and logrotate-safe reopening."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from loop.logs import LEVEL_FILES, setup_logging


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "logs"
    setup_logging(None, "test", "none", console=False)  # detach the files again


def _read(log_dir: Path, suffix: str) -> str:
    return (log_dir / "EcalPedestals" / f"step2_{suffix}.log").read_text()


def test_warning_lands_in_all_and_warning_only(log_dir: Path) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    log.bind(run=386001, state="WaitingForLS").warning("LS file late", ls=7)
    assert "LS file late" in _read(log_dir, "ALL")
    assert "LS file late" in _read(log_dir, "WARNING")
    for other in set(LEVEL_FILES) - {"WARNING"}:
        assert "LS file late" not in _read(log_dir, other)
    line = _read(log_dir, "WARNING").strip()
    assert "calibration=EcalPedestals step=step2 run=386001 state=WaitingForLS" in line
    assert line.count("\n") == 0 and "ls=7" in line


def test_each_level_file_holds_exactly_its_level(log_dir: Path) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    log.debug("d-msg")
    log.info("i-msg")
    log.error("e-msg")
    log.critical("c-msg")
    all_text = _read(log_dir, "ALL")
    assert all(msg in all_text for msg in ("d-msg", "i-msg", "e-msg", "c-msg"))
    assert "i-msg" in _read(log_dir, "INFO") and "e-msg" not in _read(log_dir, "INFO")
    assert "e-msg" in _read(log_dir, "ERROR") and "c-msg" not in _read(log_dir, "ERROR")
    assert "c-msg" in _read(log_dir, "CRITICAL")


def test_json_lines_carry_context(log_dir: Path) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    log.bind(run=5).info("batched", ls=[1, 2])
    records = [
        json.loads(line)
        for line in (log_dir / "EcalPedestals" / "step2.jsonl").read_text().splitlines()
    ]
    record = next(r for r in records if r["event"] == "batched")
    assert record["run"] == 5 and record["ls"] == [1, 2]
    assert record["calibration"] == "EcalPedestals" and record["step"] == "step2"
    assert record["level"] == "info"


def test_library_loggers_reach_the_same_files(log_dir: Path) -> None:
    setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    logging.getLogger("urllib3.connectionpool").warning("Retrying connection to registry")
    logging.getLogger("transitions.core").info("Finished processing state X exit callbacks.")
    assert "Retrying connection to registry" in _read(log_dir, "WARNING")
    all_text = _read(log_dir, "ALL")
    assert "urllib3.connectionpool" in all_text
    # transitions' chatter is demoted to DEBUG: in ALL, not in INFO
    assert "Finished processing state X" in all_text
    assert "Finished processing state X" not in _read(log_dir, "INFO")


def test_tracebacks_only_in_the_all_log_and_jsonl(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where an operator looks (the level files, the console) an error is one line that
    says where its traceback is; the expert's files keep the whole traceback."""
    log = setup_logging(log_dir, "EcalPedestals", "step2")
    try:
        raise RuntimeError("job crashed")
    except RuntimeError:
        log.exception("job failed")
    error = _read(log_dir, "ERROR")
    assert "job failed" in error and "traceback_in=step2_ALL.log" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert "Traceback" not in capsys.readouterr().err
    everything = _read(log_dir, "ALL")
    assert "Traceback" in everything and "RuntimeError: job crashed" in everything
    record = json.loads((log_dir / "EcalPedestals" / "step2.jsonl").read_text().splitlines()[-1])
    assert "RuntimeError" in json.dumps(record["exception"])


def test_reopens_after_logrotate_moves_the_file(log_dir: Path) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    log.info("before rotation")
    current = log_dir / "EcalPedestals" / "step2_ALL.log"
    current.rename(current.with_suffix(".log.1"))  # what logrotate does (no copytruncate)
    log.info("after rotation")
    assert "after rotation" in current.read_text()
    rotated = current.with_suffix(".log.1").read_text()
    assert "before rotation" in rotated and "after rotation" not in rotated
