"""Structured logging for daemons and tools.

A daemon writes, under ``<log_dir>/<calibration>/``:

* ``<step>_ALL.log``: every record from DEBUG up, one human-readable line each;
* ``<step>_INFO.log``, ``_WARNING``, ``_ERROR``, ``_CRITICAL``: exactly that level, so an
  expert can ``tail -f`` the errors alone; these and the console carry no tracebacks (a
  record that had one says ``traceback_in=<step>_ALL.log``);
* ``<step>.jsonl``: the same records as JSON lines, for machines.

Records carry bound context (calibration, step, run, state) from structlog's contextvars
or ``log.bind``. Files are written by :class:`DiskSafeFileHandler`, which reopens a file
when logrotate moves it away, so no line is lost, and which survives a full or failing
disk: a daemon's CRITICAL line about that disk still reaches stderr (journald under
systemd) instead of drowning in one logging traceback per record. The stdlib loggers of
libraries (transitions, urllib3, uvicorn) propagate to the root logger and land in the
same files; transitions' per-callback chatter is demoted to DEBUG (ALL only), because
calloop logs one structured line per state change itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.typing import EventDict, Processor

LEVEL_FILES = ("INFO", "WARNING", "ERROR", "CRITICAL")
CONTEXT_KEYS = ("calibration", "step", "run", "state")
_HANDLER_TAG = "_calloop_handler"


class ExactLevelFilter(logging.Filter):
    """Pass records of one level only."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno == self.level


class DemoteToDebug(logging.Filter):
    """Turn a chatty library's INFO records into DEBUG ones (they then reach ALL only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class DiskSafeFileHandler(logging.handlers.WatchedFileHandler):
    """A :class:`~logging.handlers.WatchedFileHandler` for a disk that may fill up or fail.

    The stdlib answers a failed write with a traceback on stderr for every record and
    every handler, and lets an error of its reopen check escape into the logging call.
    Here a failed write is one note on stderr; the file is reopened at the next record,
    a line the failure cut short is removed (JSON lines stay parsable), and the first
    line that gets through is preceded by one saying how many were lost.
    """

    def __init__(self, filename: Path) -> None:
        self.lost = 0  # records not written since the last failure (the base opens the file)
        self.error = ""
        super().__init__(filename)

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        try:
            super().emit(record)
        except OSError:  # the reopen check runs outside the stdlib's own error handling
            self.handleError(record)
        if lost and self.lost == lost:  # this record got through, the note with it
            self.lost = 0

    def _open(self) -> io.TextIOWrapper:
        if self.lost:
            _cut_partial_line(Path(self.baseFilename))
        return super()._open()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.lost:
            return text
        note = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": "%d log lines could not be written to this file (%s)",
                "args": (self.lost, self.error),
            }
        )
        return super().format(note) + self.terminator + text

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if not self.lost:
            _note_on_stderr(
                f"calloop: cannot write log file {self.baseFilename} "
                f"({type(error).__name__}: {error}); its lines are lost until it can be "
                "written again, the other log files and stderr carry on"
            )
        self.lost += 1
        self.error = f"{type(error).__name__}: {error}"
        stream, self.stream = self.stream, None  # reopened at the next record
        if stream is not None:
            with contextlib.suppress(OSError):  # closes the file even when the flush fails
                stream.close()


def _cut_partial_line(path: Path, tail: int = 1 << 16) -> None:
    """Remove the end of ``path`` after its last newline (a write cut short)."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = fh.seek(max(0, size - tail))
        end = fh.read().rfind(b"\n") + 1
        if end or start == 0:  # no newline in a whole tail: a huge line, keep it
            fh.truncate(start + end)


def _note_on_stderr(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr closed or broken: nowhere left
        print(text, file=sys.stderr, flush=True)


def _without_traceback(where: str) -> Processor:
    """Replace a record's traceback by a pointer to the file that has it."""

    def processor(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        had = event_dict.pop("exc_info", None) or event_dict.pop("exception", None)
        if had:
            event_dict["traceback_in"] = where
        return event_dict

    return processor


def render_line(_logger: Any, _name: str, event_dict: EventDict) -> str:
    """One grep-friendly line: ``time LEVEL [context] logger: event key=value ...``."""
    timestamp = event_dict.pop("timestamp", "")
    level = str(event_dict.pop("level", "info")).upper()
    logger_name = event_dict.pop("logger", "")
    event = event_dict.pop("event", "")
    exc = event_dict.pop("exception", None)
    context = " ".join(f"{key}={event_dict.pop(key)}" for key in CONTEXT_KEYS if key in event_dict)
    extras = " ".join(f"{key}={_short(value)}" for key, value in sorted(event_dict.items()))
    line = f"{timestamp} {level:<8} [{context}] {logger_name}: {event}"
    if extras:
        line += f" | {extras}"
    if exc:
        line += "\n" + str(exc).rstrip()
    return line


def _short(value: Any) -> str:
    text = str(value)
    return repr(text) if " " in text else text


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]


def _formatter(renderer: Processor, extra: list[Processor] | None = None) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *(extra or []),
            renderer,
        ],
    )


def _tagged(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _HANDLER_TAG, True)
    return handler


def _remove_our_handlers(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
            handler.close()


def configure_structlog() -> None:
    """Route structlog through the stdlib so both end up in the same handlers."""
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def setup_logging(
    log_dir: Path | None,
    calibration: str,
    step: str,
    *,
    console: bool = True,
    console_level: int = logging.INFO,
) -> structlog.stdlib.BoundLogger:
    """Configure the process's logging for one daemon or tool; return a bound logger.

    Calling it again (tests, reload) replaces the handlers it installed before.
    """
    configure_structlog()
    root = logging.getLogger()
    _remove_our_handlers(root)
    root.setLevel(logging.DEBUG)
    text = _formatter(render_line, [structlog.processors.format_exc_info])
    # where an operator looks (level files, console): the cause in one line, no traceback
    brief = _formatter(render_line, [_without_traceback(f"{step}_ALL.log")])
    if log_dir is not None:
        directory = log_dir / calibration
        directory.mkdir(parents=True, exist_ok=True)
        all_handler = DiskSafeFileHandler(directory / f"{step}_ALL.log")
        all_handler.setFormatter(text)
        root.addHandler(_tagged(all_handler))
        for name in LEVEL_FILES:
            handler = DiskSafeFileHandler(directory / f"{step}_{name}.log")
            handler.addFilter(ExactLevelFilter(logging.getLevelName(name)))
            handler.setFormatter(brief)
            root.addHandler(_tagged(handler))
        json_handler = DiskSafeFileHandler(directory / f"{step}.jsonl")
        json_handler.setFormatter(
            _formatter(structlog.processors.JSONRenderer(), [structlog.processors.dict_tracebacks])
        )
        root.addHandler(_tagged(json_handler))
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(console_level)
        stream.setFormatter(brief)
        root.addHandler(_tagged(stream))
    # watchdog logs every inotify event at DEBUG: noise, not information, for an expert
    logging.getLogger("watchdog").setLevel(logging.INFO)
    transitions_logger = logging.getLogger("transitions.core")
    if not any(isinstance(f, DemoteToDebug) for f in transitions_logger.filters):
        transitions_logger.addFilter(DemoteToDebug())
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(calibration=calibration, step=step)
    return get_logger(f"calloop.{step}")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger that goes through the handlers set up by :func:`setup_logging`."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
