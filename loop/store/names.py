"""Names that become paths or HDF5 group names, checked wherever they enter the store.

A detector type and id become a directory and a file name under the store root, and a
calibration type becomes an HDF5 group name and a fixed-width field of the index log, so
each of them, whether it comes from the API, the command line, an alias table or an
imported file, must match a strict pattern: ASCII letters, digits, ``_ . -``, starting
with a letter or digit (so never ``.``, ``..`` or ``_index``), at most 64 characters
(the width of the index log's ctype field). A detector type has no ``-`` because the
first ``-`` of a detector name separates type from id. On top of the pattern, a path
built from names must resolve (symlinks followed) inside the store root.
"""

from __future__ import annotations

import re
from pathlib import Path

from loop.errors import StoreError

MAX_NAME = 64
NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
DETTYPE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.]{{0,{MAX_NAME - 1}}}")


def is_valid(value: object, pattern: re.Pattern[str] = NAME) -> bool:
    """True when ``value`` is a string matching ``pattern`` with no ``..`` in it."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None and ".." not in value


def check_name(kind: str, value: object, pattern: re.Pattern[str] = NAME) -> str:
    """``value`` when valid (see the module docstring), else :class:`StoreError`."""
    if not is_valid(value, pattern):
        raise StoreError(
            f"invalid {kind} {value!r}: use 1-{MAX_NAME} ASCII letters, digits, '_', '.' or "
            "'-' (no '-' in a detector type), starting with a letter or digit, without '..'"
        )
    return str(value)


def check_detector(dettype: object, detid: object) -> tuple[str, str]:
    """A valid (detector type, detector id) pair, else :class:`StoreError`."""
    return check_name("detector type", dettype, DETTYPE), check_name("detector id", detid)


def check_inside(root: Path, path: Path) -> Path:
    """``path`` when it resolves (symlinks followed) inside ``root``, else :class:`StoreError`."""
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise StoreError(f"{path} resolves to {real}, outside the store root {real_root}")
    return path
