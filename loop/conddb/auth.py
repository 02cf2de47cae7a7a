"""Who may write what in the conditions DB (pure; the one place it is decided).

=====================  ==================  ====================  =====================
write                  no token            ``uploader`` token    ``admin`` token
=====================  ==================  ====================  =====================
create a tag           no                  tags its patterns     tags its patterns
                                           match                 match
upload IOVs            no                  tags its patterns     tags its patterns
                                           match (all or none)   match (all or none)
create a global tag    no                  no                    yes
map a record in a      no                  no                    yes, to any existing
global tag                                                       tag; a mapped record
                                                                 is never remapped
=====================  ==================  ====================  =====================

An ``operator`` token writes nothing here: it lets its holder act in the web control
room (``calloop web``: retry or skip runs, retire or pin store versions, reload the
configuration), which checks it against this database's token table.

Reads are open (or need any valid token with ``read_token_required``), so every token
may read every tag: mapping a tag exposes nothing its holder could not read already.
Re-creating an identical tag or global tag is a no-op (the outbox creates its tag on
every connect); a different definition under an existing name is a conflict that names
what exists. Tokens are made with direct database access (``calloop conddb token
create``), which is itself the trust boundary: whoever holds the database URL with its
password is an administrator of everything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from loop.conddb.models import ADMIN, OPERATOR
from loop.errors import ConditionsError


class Forbidden(ConditionsError):
    """A valid token without the right for this write (HTTP 403)."""


@dataclass(frozen=True)
class Identity:
    """An authenticated token: who holds it, its role and its tag patterns."""

    user: str
    role: str
    patterns: tuple[str, ...]
    token_id: int


def tag_allowed(patterns: tuple[str, ...] | list[str], tag: str) -> bool:
    """True when ``tag`` matches one of a token's patterns."""
    return any(fnmatch.fnmatchcase(tag, pattern) for pattern in patterns)


def check_tags(identity: Identity, tags: list[str]) -> None:
    """Refuse unless the token's patterns cover every tag of the write (never for an
    ``operator`` token, whatever its patterns)."""
    if identity.role == OPERATOR:
        raise Forbidden(
            f"token of {identity.user} (role operator) may not write to the conditions DB"
        )
    denied = [t for t in tags if not tag_allowed(identity.patterns, t)]
    if denied:
        raise Forbidden(f"token of {identity.user} may not write tag(s) {', '.join(denied)}")


def check_global_tag_edit(identity: Identity, name: str) -> None:
    """Refuse unless the token may create or edit global tag ``name`` (admins only)."""
    if identity.role != ADMIN:
        raise Forbidden(
            f"token of {identity.user} (role {identity.role}) may not edit global tag "
            f"{name}: global tags are edited with an admin token"
        )
