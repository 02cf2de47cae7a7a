"""Per-level log files, JSON lines, library routing, logrotate-safe reopening, short
console lines, escaping, and repeats held back."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from transitions import Machine

from loop.logs import CONSOLE_WIDTH, LEVEL_FILES, RepeatFilter, get_logger, setup_logging


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
    [line] = _read(log_dir, "WARNING").splitlines()
    # a library's record has no bound context: it gets the process's
    assert "[calibration=EcalPedestals step=step2] urllib3.connectionpool: Retrying" in line
    assert "urllib3.connectionpool" in _read(log_dir, "ALL")


def test_transitions_chatter_stays_out_of_the_logs(log_dir: Path) -> None:
    """transitions logged several lines per state change (85% of _ALL.log in a demo);
    calloop logs one structured line per state change itself. Its warnings still count."""
    setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    model = Machine(states=["Open", "Closed"], initial="Open", name="Step2Run: ")
    model.add_transition("close", "Open", "Closed", after=lambda: None)
    model.close()
    assert model.state == "Closed"
    assert "transitions" not in _read(log_dir, "ALL")
    logging.getLogger("transitions.core").warning("Skip binding of 'close' to model")
    assert "Skip binding" in _read(log_dir, "WARNING")


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


CONSOLE_HEAD = re.compile(
    r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) +EcalPedestals/step2 run=7: "
)


def test_console_lines_are_short_and_the_level_files_whole(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2").bind(run=7, state="Batching")
    path = "/data/" + "deep/" * 40 + "run000007_ls0003.h5"
    log.info("state change", from_state="WaitingForLS", trigger="batch_ready", batches=3)
    log.warning(
        "LS file failed validation " + "and more words " * 10,
        file=path,
        error="checksum mismatch " * 10,
        witnesses=["a"] * 30,
    )
    info, warning = capsys.readouterr().err.splitlines()
    assert CONSOLE_HEAD.match(info) and CONSOLE_HEAD.match(warning)
    assert info.endswith(": state change state=Batching")  # CONSOLE_FIELDS only
    assert len(warning) == CONSOLE_WIDTH and warning.endswith("\u2026")
    assert " error='checksum mismatch" in warning  # the most telling field first
    assert "witnesses" not in warning
    [whole] = _read(log_dir, "WARNING").splitlines()  # for grep: the full line
    assert path in whole and "witnesses=" in whole and whole.count("checksum") == 10


@pytest.mark.parametrize("evil", ["\n", "\r", "\x1b[31m", "\u2028"])
def test_values_and_events_are_escaped(
    log_dir: Path, capsys: pytest.CaptureFixture[str], evil: str
) -> None:
    """A file or registry value cannot forge a line, or recolour a terminal."""
    forged = f"{evil}2026-01-01T00:00:00Z CRITICAL forged"
    log = setup_logging(log_dir, "EcalPedestals", "step2").bind(run=7)
    log.warning(f"odd name{forged}", file=f"run7{forged}.h5", tag=forged)
    escaped = repr(evil)[1:-1]
    for text in (_read(log_dir, "WARNING"), _read(log_dir, "ALL"), capsys.readouterr().err):
        [line] = text.splitlines()  # splitlines splits on \r and \u2028 too
        assert evil not in line
        assert f"odd name{escaped}2026" in line and f"'run7{escaped}2026" in line
    [record] = (log_dir / "EcalPedestals" / "step2.jsonl").read_text().splitlines()
    assert evil not in record and json.loads(record)["file"] == f"run7{forged}.h5"


def test_a_traceback_cannot_forge_a_record(log_dir: Path) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2", console=False)
    try:
        raise ValueError("bad\n2026-01-01T00:00:00Z CRITICAL [] calloop.step2: forged")
    except ValueError:
        log.exception("cycle failed")
    head, *rest = _read(log_dir, "ALL").splitlines()
    assert "cycle failed" in head and rest
    assert all(line.startswith("    ") for line in rest)  # continuation lines, indented


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(
            record.msg["event"] if isinstance(record.msg, dict) else record.getMessage()
        )


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, _Collect, list[float]]]:
    """A logger whose one handler holds repeats back, on a clock the test moves."""
    now = [0.0]
    handler = _Collect()
    handler.addFilter(RepeatFilter(handler, window_s=60.0, clock=lambda: now[0]))
    logger = logging.getLogger("calloop.test_repeats")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, handler, now
    logger.removeHandler(handler)
    logger.propagate = True


def test_repeated_warnings_pass_once_per_window_then_a_summary(
    limited: tuple[logging.Logger, _Collect, list[float]],
) -> None:
    logger, handler, now = limited
    log = get_logger(logger.name).bind(run=7)
    for second in range(0, 60, 5):  # a conditions-DB outage: the same WARNING every 5 s
        now[0] = second
        log.warning("conditions DB unavailable", error="connection refused")
        if second == 30:
            log.warning("conditions DB unavailable", error="timed out")  # not the same
            log.bind(run=8).warning("conditions DB unavailable", error="connection refused")
            log.info("state change")  # below WARNING: never held back
    assert handler.events == ["conditions DB unavailable"] + ["conditions DB unavailable"] * 2 + [
        "state change"
    ]
    now[0] = 61.0
    log.info("heartbeat")  # the window has ended: its summary comes first
    assert handler.events[4:] == [
        "repeated 11 times in 55 s: conditions DB unavailable",
        "heartbeat",
    ]
    log.warning("conditions DB unavailable", error="connection refused")  # a new window
    assert handler.events[-1] == "conditions DB unavailable"


def test_library_repeats_are_summarised_too(
    limited: tuple[logging.Logger, _Collect, list[float]],
) -> None:
    logger, handler, now = limited
    for second in (0.0, 1.0, 2.0):
        now[0] = second
        logger.warning("Retrying (%d attempts left)", 3)
    now[0] = 90.0
    logger.error("gave up")
    assert handler.events == [
        "Retrying (3 attempts left)",
        "repeated 2 times in 2 s: Retrying (3 attempts left)",
        "gave up",
    ]


def test_repeats_from_many_threads_are_counted_once_each(
    limited: tuple[logging.Logger, _Collect, list[float]],
) -> None:
    logger, handler, _now = limited
    log = get_logger(logger.name)

    def warn() -> None:
        for _ in range(50):
            log.warning("registry unreachable")

    threads = [threading.Thread(target=warn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [limiter] = handler.filters
    assert isinstance(limiter, RepeatFilter)
    limiter.flush()
    assert handler.events == [
        "registry unreachable",
        "repeated 399 times in 0 s: registry unreachable",
    ]


def test_repeats_are_held_back_from_console_and_level_files_only(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = setup_logging(log_dir, "EcalPedestals", "step2")
    for _ in range(5):
        log.warning("LS file late", ls=7)
    for error in ("disk full", "permission denied"):  # different causes are not repeats
        try:
            raise OSError(error)
        except OSError:
            log.exception("cycle failed")
    setup_logging(None, "test", "none", console=False)  # closing sends the summaries
    for text in (_read(log_dir, "WARNING"), capsys.readouterr().err):
        warnings = [line for line in text.splitlines() if "LS file late" in line]
        assert len(warnings) == 2 and "repeated 4 times in 0 s: LS file late" in warnings[1]
    assert _read(log_dir, "ALL").count("LS file late") == 5  # the expert's file keeps all
    errors = _read(log_dir, "ERROR")
    assert "OSError('disk full')" not in errors  # no traceback; but both lines are there
    assert errors.count("cycle failed") == 2


def test_a_critical_console_line_is_whole(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a full log disk the CRITICAL line on stderr may be the only one written."""
    log = setup_logging(log_dir, "EcalPedestals", "step2", console_level=logging.CRITICAL)
    path = "/data/" + "deep/" * 40 + "journal.sqlite"
    log.info("not on a quiet console")
    log.critical("cannot write to disk " + "and more words " * 10, path=path, free="0 B free")
    [line] = capsys.readouterr().err.splitlines()
    assert len(line) > CONSOLE_WIDTH and f"path={path}" in line and "free='0 B free'" in line
