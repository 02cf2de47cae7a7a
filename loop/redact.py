"""Hide secrets before text reaches a log, a journal, an outbox entry or a terminal.

Two kinds of secret travel with the conditions DB: the password of a database URL
(``postgresql+psycopg://user:PASSWORD@host/db``) and the secret half of a bearer token
(``cdb_<id>_<secret>``). Whatever prints, logs or stores a URL or an error message that
may quote one passes it through :func:`redact_url` or :func:`redact` first; the id of a
token stays visible so that an operator can still tell which token was refused.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"

# userinfo with a password: scheme://user:password@host. Greedy up to the last @ before
# the path, as urlsplit reads it, so that an unescaped @ in the password is hidden too.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^\s/]*(?P<at>@)")
_TOKEN = re.compile(r"\b(?P<head>cdb_[0-9]+_)[A-Za-z0-9_\-]+")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; otherwise unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: fall back to the text patterns
        return redact(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}"))


def redact(text: str) -> str:
    """``text`` with URL passwords and token secrets (``cdb_<id>_<secret>``) hidden."""
    text = _URL_PASSWORD.sub(rf"\g<head>{HIDDEN}\g<at>", text)
    return _TOKEN.sub(rf"\g<head>{HIDDEN}", text)
