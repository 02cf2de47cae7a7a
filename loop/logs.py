"""Structured logging for daemons and tools.

A daemon writes, under ``<log_dir>/<calibration>/``:

* ``<step>_ALL.log``: every record from DEBUG up, one human-readable line each (a
  traceback follows its record on indented lines);
* ``<step>_INFO.log``, ``_WARNING``, ``_ERROR``, ``_CRITICAL``: exactly that level, one
  full line per record and every field, so an expert can ``tail -f`` or grep the errors
  alone; these and the console carry no tracebacks (a record that had one says
  ``traceback_in=<step>_ALL.log``);
* ``<step>.jsonl``: the same records as JSON lines, for machines.

The console (stderr: a terminal, or journald under systemd) gets short lines for a
person on shift: ``HH:MM:SS LEVEL calibration/step run=R: event`` and only the fields in
:data:`CONSOLE_FIELDS`, each value and the whole line cut to a width; the files have the
rest. The time is UTC, as in the files, so a console line is found there by its time. A
CRITICAL line is shown whole (rare, and maybe the only line written when the log disk
failed).

**Repeats.** An outage repeats the same WARNING every few seconds. On the console and in
the level files an identical record (same logger, level, event and fields; only the time
differs) is shown once per :data:`REPEAT_WINDOW_S`, then summarised as "repeated N times
in M s" (see :class:`RepeatFilter`). ``_ALL.log`` and the jsonl keep every record.

**Escaping.** Text lines escape every value they render (event, fields, context, the
lines of a traceback): a newline, carriage return, ANSI escape or other control character
in a file name or a registry value shows as ``\\n``, ``\\x1b``, ... and cannot start a
forged line or recolour a terminal. JSON lines are escaped by the JSON encoding itself.

Records carry bound context (calibration, step, run, state) from structlog's contextvars
or ``log.bind``; records without it (library loggers, background threads) get the
process's calibration and step. A process hosting the daemons of many calibrations
(``calloop step2 --all``, :func:`setup_hosted_logging`) routes each record by its
calibration to that calibration's files, the same files as above. Files are written
by :class:`DiskSafeFileHandler`, which reopens a file when logrotate moves it away, so
no line is lost, and which survives a full or failing disk: a daemon's CRITICAL line
about that disk still reaches stderr (journald under systemd) instead of drowning in
one logging traceback per record. The
stdlib loggers of libraries (urllib3, uvicorn) propagate to the root logger and land in
the same files. transitions logs nothing below WARNING: its per-callback lines were 85%
of ``_ALL.log`` and say nothing that calloop's own structured line per state change
(``states/machine.py``) does not.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from structlog.typing import EventDict, Processor

LEVEL_FILES = ("INFO", "WARNING", "ERROR", "CRITICAL")
CONTEXT_KEYS = ("calibration", "step", "run", "state")
# the console shows these fields only, most telling first (a long line loses its last
# ones): why, which file, what state the run is in, which batch of it, where the
# traceback went; run is in the line's head, and the files show every field
CONSOLE_FIELDS = ("error", "kind", "file", "path", "state", "batch", "traceback_in")
CONSOLE_WIDTH = 160  # characters of a console line, ellipsis included
CONSOLE_EVENT_WIDTH = 72  # so that a long message leaves room for its fields
CONSOLE_VALUE_WIDTH = 40  # per field: a long path or error is cut, the next field still shows
_CONSOLE_HEAD_KEYS = ("timestamp", "level", "logger", "event", "calibration", "step", "run")
REPEAT_WINDOW_S = 60.0
ELLIPSIS = "\u2026"
_HANDLER_TAG = "_calloop_handler"
_SUMMARY_TAG = "_calloop_repeat_summary"
_NEEDS_QUOTES = re.compile(r"[\s'\"]")
_TIMESTAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)
HandlerT = TypeVar("HandlerT", bound=logging.Handler)


class ExactLevelFilter(logging.Filter):
    """Pass records of one level only."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno == self.level


@dataclass
class _Repeats:
    """A run of identical records: when the first passed, and the repeats held back."""

    first: float
    held: int = 0
    last: float = 0.0
    record: logging.LogRecord | None = None  # the last one held back

    def summary(self) -> logging.LogRecord:
        """The last record held back, its event prefixed by how many were."""
        assert self.record is not None
        note = f"repeated {self.held} times in {self.last - self.first:.0f} s"
        record = self.record
        if isinstance(record.msg, dict):  # structlog's event dict
            event_dict = _TIMESTAMPER(None, "", dict(record.msg))  # the summary's own time
            event_dict["event"] = f"{note}: {event_dict.get('event', '')}"
            message: dict[str, Any] = {"msg": event_dict}
        else:
            message = {"msg": "%s: %s", "args": (note, record.getMessage())}
        return logging.makeLogRecord(
            {**record.__dict__, **message, "exc_info": None, "exc_text": None, _SUMMARY_TAG: True}
        )


class RepeatFilter(logging.Filter):
    """Let one of a run of identical records through per window; count the others.

    Identical means same logger, level, event and fields (the time aside), and the same
    exception if any. The first record passes; identical ones within ``window_s`` of it
    are held back and counted. Once the window has ended, the next record reaching the
    handler (of any level: a daemon logs every state change), or closing the handler,
    brings a summary: the last record held back, its event prefixed by "repeated N times
    in M s". Each run of repeats has a window of its own, so two warnings that alternate
    (two runs waiting for the same service) are both limited. Records below ``min_level``
    are never held back.

    One instance per handler, put before its other filters (it sees every record, and
    sends its summaries through ``handler``); thread-safe.
    """

    def __init__(
        self,
        handler: logging.Handler,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        min_level: int = logging.WARNING,
    ) -> None:
        super().__init__()
        self.handler = handler
        self.window_s = window_s
        self.clock = clock
        self.min_level = min_level
        self._lock = threading.Lock()
        self._runs: dict[Hashable, _Repeats] = {}  # oldest first: windows end in this order

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY_TAG, False):
            return True
        now = self.clock()
        with self._lock:
            ended = self._take_ended(now)
            passes = self._admit(record, now)
        self._send(ended)
        return passes

    def flush(self) -> None:
        """Send the summaries of all runs of repeats now (the handler is closing)."""
        with self._lock:
            ended = self._take_ended(math.inf)
        self._send(ended)

    def _take_ended(self, now: float) -> list[logging.LogRecord]:
        ended = []
        while self._runs:
            key, run = next(iter(self._runs.items()))
            if now - run.first < self.window_s:
                break
            del self._runs[key]
            if run.held:
                ended.append(run.summary())
        return ended

    def _admit(self, record: logging.LogRecord, now: float) -> bool:
        if record.levelno < self.min_level:
            return True
        key = _identity(record)
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = _Repeats(first=now)
            return True
        run.held, run.last, run.record = run.held + 1, now, record
        return False

    def _send(self, summaries: list[logging.LogRecord]) -> None:
        # outside the lock: the handler runs this filter again (summaries pass at once)
        for summary in summaries:
            self.handler.handle(summary)


def _identity(record: logging.LogRecord) -> Hashable:
    """What makes two records the same message: everything but their time."""
    if isinstance(record.msg, dict):  # structlog's event dict
        fields: tuple[object, ...] = tuple(
            sorted((k, repr(v)) for k, v in record.msg.items() if k != "timestamp")
        )
    else:
        fields = (record.getMessage(),)
    return record.name, record.levelno, fields, _exception_text(record)


def _exception_text(record: logging.LogRecord) -> str:
    """The record's exception, if any: two errors differ when their causes do."""
    exc: Any = record.exc_info
    if not exc and isinstance(record.msg, dict):
        exc = record.msg.get("exc_info")
    if exc is True:  # log.exception(): the exception being handled, as the formatter does
        exc = sys.exc_info()
    if isinstance(exc, tuple):
        exc = exc[1]
    return repr(exc) if exc else ""


class _SummariesOnClose(logging.Handler):
    """Closing the handler (reload, shutdown) sends what its :class:`RepeatFilter` holds."""

    def close(self) -> None:
        for limiter in self.filters:
            if isinstance(limiter, RepeatFilter):
                limiter.flush()
        super().close()


class ConsoleHandler(_SummariesOnClose, logging.StreamHandler):
    """The console's stream handler (its repeats are summarised when it closes)."""


class DiskSafeFileHandler(_SummariesOnClose, logging.handlers.WatchedFileHandler):
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


# tracebacks as data without frame locals: a local may hold a token or a database URL
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _without_traceback(where: str) -> Processor:
    """Replace a record's traceback by a pointer to the file that has it."""

    def processor(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        had = event_dict.pop("exc_info", None) or event_dict.pop("exception", None)
        if had:
            event_dict["traceback_in"] = where
        return event_dict

    return processor


def render_line(_logger: Any, _name: str, event_dict: EventDict) -> str:
    """One grep-friendly line: ``time LEVEL [context] logger: event | key=value ...``,
    every field, every value escaped; an exception follows on indented lines."""
    timestamp = event_dict.pop("timestamp", "")
    level = str(event_dict.pop("level", "info")).upper()
    logger_name = _escape(str(event_dict.pop("logger", "")))
    event = _escape(str(event_dict.pop("event", "")))
    exc = event_dict.pop("exception", None)
    context = " ".join(
        f"{key}={_value(event_dict.pop(key))}" for key in CONTEXT_KEYS if key in event_dict
    )
    extras = " ".join(
        f"{_escape(key)}={_value(value)}" for key, value in sorted(event_dict.items())
    )
    line = f"{timestamp} {level:<8} [{context}] {logger_name}: {event}"
    if extras:
        line += f" | {extras}"
    if exc:  # indented: a line that starts with a time is always a record of its own
        line += "".join(f"\n    {_escape(part)}" for part in str(exc).rstrip().splitlines())
    return line


def render_console(_logger: Any, _name: str, event_dict: EventDict) -> str:
    """A line for a person on shift: ``HH:MM:SS LEVEL calibration/step run=R: event`` and
    the :data:`CONSOLE_FIELDS` the record has, cut to :data:`CONSOLE_WIDTH`. Library
    records name their logger before the event.

    A CRITICAL line is whole, every field uncut: it is rare, and on a full or failing log
    disk its line on stderr (journald) may be the only one written.
    """
    clock = str(event_dict.get("timestamp", ""))[11:19]  # HH:MM:SS of the ISO time
    level = str(event_dict.get("level", "info")).upper()
    whole = level == "CRITICAL"
    event_width, value_width, width = (
        (math.inf, math.inf, math.inf)
        if whole
        else (CONSOLE_EVENT_WIDTH, CONSOLE_VALUE_WIDTH, CONSOLE_WIDTH)
    )
    where = "/".join(
        _escape(str(event_dict[key])) for key in ("calibration", "step") if key in event_dict
    )
    if "run" in event_dict:
        where += f" run={_value(event_dict['run'])}"
    event = _cut(_escape(str(event_dict.get("event", ""))), event_width)
    logger_name = str(event_dict.get("logger", ""))
    if not logger_name.startswith("calloop"):
        event = f"{_escape(logger_name)}: {event}"
    keys = [key for key in CONSOLE_FIELDS if key in event_dict]
    if whole:
        keys += sorted(set(event_dict) - set(CONSOLE_FIELDS) - set(_CONSOLE_HEAD_KEYS))
    fields = "".join(
        f" {_escape(key)}={_cut(_value(event_dict[key]), value_width)}" for key in keys
    )
    return _cut(f"{clock} {level:<8} {where}: {event}{fields}", width)


def _escape(text: str) -> str:
    """``text`` with each unprintable character (newline, carriage return, ANSI escape,
    other control and Unicode line or bidi characters) as its Python escape, so that a
    value can neither end a line nor forge the next one, nor recolour a terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _value(value: Any) -> str:
    """A field's value as one token: as is when it can be, else quoted and escaped as
    by ``repr`` (empty, or with a space, a quote or an unprintable character)."""
    text = str(value)
    if text and text.isprintable() and not _NEEDS_QUOTES.search(text):
        return text
    return repr(text)


def _cut(text: str, width: float) -> str:
    return text if len(text) <= width else text[: int(width) - len(ELLIPSIS)] + ELLIPSIS


def _process_context(calibration: str | None, step: str) -> Processor:
    """Give records without context (library loggers, background threads, which do not
    inherit the main thread's contextvars) the calibration and step of the process (a
    host of many calibrations has no calibration of its own: None)."""

    def processor(_logger: Any, _name: str, event_dict: EventDict) -> EventDict:
        if calibration is not None:
            event_dict.setdefault("calibration", calibration)
        event_dict.setdefault("step", step)
        return event_dict

    return processor


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _TIMESTAMPER,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]


def _formatter(renderer: Processor, *before: Processor) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *before, renderer],
    )


def _tagged(handler: HandlerT) -> HandlerT:
    setattr(handler, _HANDLER_TAG, True)
    return handler


def _limited(handler: HandlerT) -> HandlerT:
    handler.addFilter(RepeatFilter(handler))
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
    root = _fresh_root()
    context = _process_context(calibration, step)
    if log_dir is not None:
        for handler in _file_handlers(log_dir / calibration, step, context):
            root.addHandler(_tagged(handler))
    if console:
        root.addHandler(_tagged(_console_handler(step, context, console_level)))
    structlog.contextvars.bind_contextvars(calibration=calibration, step=step)
    return get_logger(f"calloop.{step}")


def setup_hosted_logging(
    log_dir: Path | None,
    step: str,
    *,
    console: bool = True,
    console_level: int = logging.INFO,
) -> CalibrationRouter | None:
    """Configure the process's logging for a host of many daemons of one step
    (``calloop step2 --all``, :mod:`loop.hosting`): each record goes to the files of its
    calibration, exactly those a daemon of its own writes (:class:`CalibrationRouter`),
    and the console gets every record. Returns the router (None without ``log_dir``)."""
    root = _fresh_root()
    router = None
    if log_dir is not None:

        def files(calibration: str | None) -> list[logging.Handler]:
            directory = log_dir / (calibration or HOST_LOG_DIR)
            return _file_handlers(directory, step, _process_context(calibration, step))

        router = CalibrationRouter(files)
        root.addHandler(_tagged(router))
    if console:
        root.addHandler(
            _tagged(_console_handler(step, _process_context(None, step), console_level))
        )
    structlog.contextvars.bind_contextvars(step=step)
    return router


HOST_LOG_DIR = "_host"
"""The log directory, beside the calibrations' own, of a host's records that belong to no
calibration (its own lines, library records from shared threads): no calibration name
starts with an underscore."""
SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
"""A calibration name (see :class:`loop.config.CalibrationConfig`), hence a safe
directory name; a record claiming another goes to the host's files."""


class CalibrationRouter(logging.Handler):
    """Send each record to the handlers of its calibration, opened at its first record.

    The calibration is the record's bound ``calibration`` (structlog's event dict holds
    the logger's bound fields and the emitting thread's contextvars); a stdlib record of
    a library has none of its own, and takes the emitting thread's contextvars, which a
    hosted daemon's thread binds. Records of no calibration (or of a name that is no
    calibration name) go to the files of :data:`HOST_LOG_DIR`. ``make(name)`` builds the
    handler set of a calibration (``None``: the host's)."""

    def __init__(self, make: Callable[[str | None], list[logging.Handler]]) -> None:
        super().__init__()
        self.make = make
        self._sets: dict[str | None, list[logging.Handler]] = {}
        self._sets_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        for handler in self._handlers(_calibration_of(record)):
            if record.levelno >= handler.level:  # the logger checks levels, not handle()
                handler.handle(record)

    def _handlers(self, calibration: str | None) -> list[logging.Handler]:
        with self._sets_lock:
            handlers = self._sets.get(calibration)
            if handlers is None:
                handlers = self._sets[calibration] = self.make(calibration)
            return handlers

    def close_calibration(self, calibration: str) -> None:
        """Close the files of ``calibration`` (it is no longer hosted); a later record
        of it opens them again."""
        with self._sets_lock:
            handlers = self._sets.pop(calibration, [])
        for handler in handlers:
            handler.close()

    def close(self) -> None:
        with self._sets_lock:
            sets, self._sets = list(self._sets.values()), {}
        for handlers in sets:
            for handler in handlers:
                handler.close()
        super().close()


def _calibration_of(record: logging.LogRecord) -> str | None:
    if isinstance(record.msg, dict):  # structlog's event dict
        value = record.msg.get("calibration")
    else:
        value = structlog.contextvars.get_contextvars().get("calibration")
    return value if isinstance(value, str) and SAFE_NAME.match(value) else None


def _fresh_root() -> logging.Logger:
    """The root logger without the handlers installed before, libraries quietened,
    no context bound."""
    configure_structlog()
    root = logging.getLogger()
    _remove_our_handlers(root)
    root.setLevel(logging.DEBUG)
    # watchdog logs every inotify event at DEBUG: noise, not information, for an expert
    logging.getLogger("watchdog").setLevel(logging.INFO)
    # urllib3 logs every pooled connection it resets (a quarter of _ALL.log in the demo)
    logging.getLogger("urllib3").setLevel(logging.INFO)
    # transitions logs several lines per callback and state change (85% of _ALL.log);
    # calloop logs one structured line per state change itself (persist_and_log)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    return root


def _file_handlers(directory: Path, step: str, context: Processor) -> list[logging.Handler]:
    """The log files of one daemon in ``directory`` (see the module docstring)."""
    # where an operator looks (level files): the cause in one line, no traceback
    brief = _without_traceback(f"{step}_ALL.log")
    directory.mkdir(parents=True, exist_ok=True)
    all_handler = DiskSafeFileHandler(directory / f"{step}_ALL.log")
    all_handler.setFormatter(_formatter(render_line, context, structlog.processors.format_exc_info))
    handlers: list[logging.Handler] = [all_handler]
    for name in LEVEL_FILES:
        handler = _limited(DiskSafeFileHandler(directory / f"{step}_{name}.log"))
        # DEBUG is dropped before the filters run: it costs the two files that keep
        # it (_ALL, jsonl), not six handlers. INFO still reaches every level file, so
        # that a state change brings the summaries of ended repeats (RepeatFilter)
        handler.setLevel(logging.INFO)
        handler.addFilter(ExactLevelFilter(logging.getLevelName(name)))
        handler.setFormatter(_formatter(render_line, context, brief))
        handlers.append(handler)
    json_handler = DiskSafeFileHandler(directory / f"{step}.jsonl")
    json_handler.setFormatter(
        _formatter(structlog.processors.JSONRenderer(), context, _DICT_TRACEBACKS)
    )
    handlers.append(json_handler)
    return handlers


def _console_handler(step: str, context: Processor, level: int) -> logging.Handler:
    stream = _limited(ConsoleHandler(sys.stderr))
    stream.setLevel(level)
    stream.setFormatter(_formatter(render_console, context, _without_traceback(f"{step}_ALL.log")))
    return stream


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger that goes through the handlers set up by :func:`setup_logging`."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
