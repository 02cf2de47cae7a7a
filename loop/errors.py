"""Domain exceptions. Every message names the file, key, run or service involved and
what the operator can do; the CLI prints ``str(exc)`` on one line and exits 2."""

from __future__ import annotations


class CalloopError(Exception):
    """Base of every error calloop reports to an operator."""


class ConfigError(CalloopError):
    """A configuration file is missing, unparsable or invalid.

    ``problems`` lists every individual finding so ``calloop config check`` can show all
    of them at once instead of stopping at the first.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class RegistryError(CalloopError):
    """The run registry could not be reached or returned something unusable.

    Never to be read as an answer about a run: callers keep their previous view.
    """


class ScenarioError(CalloopError):
    """A simulation scenario file is invalid."""


class StoreError(CalloopError):
    """A calibration-store operation failed (lookup miss, lock timeout, validation)."""


class ConditionsError(CalloopError):
    """A conditions-database operation was refused or failed."""


class JobError(CalloopError):
    """A job could not be submitted, polled or cancelled by its backend."""


class DaemonError(CalloopError):
    """A daemon could not start (e.g. another instance holds its lock)."""


class JournalError(CalloopError):
    """A daemon's journal cannot be opened: not SQLite, damaged, or not accessible."""
