"""Structured logging for daemons and tools.

A daemon writes, under ``<log_dir>/<calibration>/``:

* ``<step>_ALL.log``: every record from DEBUG up, one human-readable line each;
* ``<step>_INFO.log``, ``_WARNING``, ``_ERROR``, ``_CRITICAL``: exactly that level, so an
  expert can ``tail -f`` the errors alone;
* ``<step>.jsonl``: the same records as JSON lines, for machines.

Records carry bound context (calibration, step, run, state) from structlog's contextvars
or ``log.bind``. Files are opened with :class:`logging.handlers.WatchedFileHandler`, which
reopens a file when logrotate moves it away, so no line is lost. The stdlib loggers of
libraries (transitions, urllib3, uvicorn) propagate to the root logger and land in the
same files; transitions' per-callback chatter is demoted to DEBUG (ALL only), because
calloop logs one structured line per state change itself.
"""

from __future__ import annotations

import logging
import logging.handlers
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
    if log_dir is not None:
        directory = log_dir / calibration
        directory.mkdir(parents=True, exist_ok=True)
        all_handler = logging.handlers.WatchedFileHandler(directory / f"{step}_ALL.log")
        all_handler.setFormatter(text)
        root.addHandler(_tagged(all_handler))
        for name in LEVEL_FILES:
            handler = logging.handlers.WatchedFileHandler(directory / f"{step}_{name}.log")
            handler.addFilter(ExactLevelFilter(logging.getLevelName(name)))
            handler.setFormatter(text)
            root.addHandler(_tagged(handler))
        json_handler = logging.handlers.WatchedFileHandler(directory / f"{step}.jsonl")
        json_handler.setFormatter(
            _formatter(structlog.processors.JSONRenderer(), [structlog.processors.dict_tracebacks])
        )
        root.addHandler(_tagged(json_handler))
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(console_level)
        stream.setFormatter(text)
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
