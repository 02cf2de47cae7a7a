"""Step 4's durable outbox: every payload upload is queued in the journal first and
retried until the conditions DB takes it, exactly once and in order.

Exactly once: every entry is sent with an idempotency key (calibration, tag, run,
harvest) and its run's harvest sequence; the conditions DB answers a repeated key with
the original result and never applies an older harvest of a since after a newer one,
so a request that timed out but landed late can neither duplicate nor reorder IOVs.

In order: per (tag, since) only the newest harvest is sent; an older one still pending
is marked ``superseded``. Entries of one tag go in since order, and a tag whose head
entry waits for a retry holds its later entries back.

Nothing refused for good by a transient cause: an unreachable service and a rejected
token keep the entry pending with backoff (a changed token file makes it due at once);
only a permanent refusal (a synchronization rule, an invalid request, an unreadable
payload file) settles it as ``refused``. The call itself runs on a background thread
(:mod:`loop.background`), so a hung service never stalls the daemon's loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import numpy as np
import structlog

from loop.background import BackgroundCall, ServiceHealth
from loop.conddb.client import Conditions
from loop.conddb.db import ConditionsUnavailable, InvalidRequest, NotAuthorized, UploadResult
from loop.conddb.rules import RuleRefused
from loop.config import CalibrationConfig
from loop.errors import ConfigError
from loop.fsutil import sha256_file
from loop.journal import Journal, UploadRow
from loop.redact import redact

MAX_BACKOFF_S = 300.0
# a verdict on the payload itself: asking again gives the same answer. Everything else
# (an unreachable service, a refused token, an I/O error reading the payload file, an
# answer not understood) keeps the upload pending
PERMANENT = (RuleRefused, InvalidRequest, FileNotFoundError, ValueError)
AUTH_REMINDER_S = 600.0  # a rejected token is an ERROR again at most this often
PENDING, DONE, SUPERSEDED, REFUSED = "pending", "done", "superseded", "refused"


LUMI_SEQ_SHIFT = 20
"""An outbox entry of one LS group has the sequence ``harvest << 20 | first LS``."""


def upload_seq(harvest: int, first_ls: int | None = None) -> int:
    """The sequence of an outbox entry: its harvest, or for one LS group of a
    ``time_type: lumi`` calibration the harvest and the group's first LS together
    (unique within the run, and rising with the harvest for the same IOV)."""
    return harvest if first_ls is None else harvest << LUMI_SEQ_SHIFT | first_ls


def describe_seq(seq: int) -> str:
    """``harvest3`` or ``harvest3:ls0005`` (keys, upload texts, logs)."""
    harvest, first_ls = seq >> LUMI_SEQ_SHIFT, seq & ((1 << LUMI_SEQ_SHIFT) - 1)
    return f"harvest{seq}" if harvest == 0 else f"harvest{harvest}:ls{first_ls:04d}"


def upload_key(calibration: str, row: UploadRow) -> str:
    """The idempotency key of an outbox entry: stable across restarts and retries. The
    payload's hash is part of it, so a journal started afresh (harvests numbered from 1
    again) never gets an earlier, different payload's result back for its key."""
    digest = sha256_file(row.payload)[:16]
    return f"calloop:{calibration}:{row.tag}:run{row.run}:{describe_seq(row.seq)}:{digest}"


class Outbox:
    """Uploads queued payloads of one calibration."""

    def __init__(
        self,
        journal: Journal,
        connect: Callable[[], Conditions],
        calibration: Callable[[], CalibrationConfig],
        log: structlog.stdlib.BoundLogger,
        *,
        backoff_s: float = 2.0,
        credentials: Callable[[], Hashable] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.journal = journal
        self._connect = connect
        self._calibration = calibration
        self._credentials = credentials  # changes when the token file changes
        self._monotonic = monotonic
        self.log = log
        self.backoff_s = backoff_s
        self._conditions: Conditions | None = None
        self._tag_ready = False
        self._call: BackgroundCall[UploadResult] = BackgroundCall(
            f"upload-{calibration().name}", on_done=on_done
        )
        self._in_flight: UploadRow | None = None
        self._seen_credentials: Hashable = credentials()
        self._auth_reported_at: float | None = None
        self.last_upload: dict[str, object] | None = None
        self.service = ServiceHealth()

    def pending(self, run: int | None = None) -> int:
        """Entries not yet settled (of one run, or all)."""
        return len(self.journal.uploads(states=(PENDING,), run=run))

    def final_state(self, run: int, seq: int) -> str | None:
        """The outbox state of one harvest's entry (None: never queued)."""
        for row in self.journal.uploads(states=(PENDING, DONE, SUPERSEDED, REFUSED), run=run):
            if row.seq == seq:
                return row.state
        return None

    def flush(self, now: float) -> None:
        """Settle the finished call, then start the next due upload; never blocks and
        never raises for conditions-DB trouble."""
        outcome = self._call.collect()
        if outcome is not None and self._in_flight is not None:
            row, self._in_flight = self._in_flight, None
            if outcome.error is not None:
                self._failed(row, outcome.error, now)
            elif outcome.value is not None:
                self._uploaded(row, outcome.value, now)
        if self._call.busy:
            return
        self._notice_new_credentials(now)
        due = self._next_due(now)
        if due is not None:
            name = self._calibration().name
            self._in_flight = due
            self._call.start(lambda: self._send(due, name))

    def next_attempt_in(self, now: float) -> float | None:
        """Seconds until a pending upload should be tried (None: no upload waits, or
        one is in flight, whose end ``on_done`` announces); at least a second, so an
        upload held back behind its tag's head is not asked for in a busy loop."""
        if self._call.busy:
            return None
        rows = self.journal.uploads(states=(PENDING,))
        if not rows:
            return None
        return max(1.0, min(row.next_attempt for row in rows) - now)

    # ------------------------------------------------------------------- choosing

    def _next_due(self, now: float) -> UploadRow | None:
        rows = self.journal.uploads(states=(PENDING,))
        if not rows:
            return None
        newest: dict[tuple[str, int], int] = {}
        for row in self.journal.uploads(states=(PENDING, DONE)):
            key = (row.tag, row.since)
            newest[key] = max(newest.get(key, -1), row.seq)
        held: set[str] = set()
        for row in rows:
            if row.tag in held:
                continue
            if newest[(row.tag, row.since)] > row.seq:
                self.journal.update_upload(
                    row.run, row.seq, state=SUPERSEDED, detail="a newer harvest of the run exists"
                )
                continue
            # a retry time further ahead than any backoff means the wall clock went back
            if now < row.next_attempt <= now + MAX_BACKOFF_S:
                held.add(row.tag)
                continue
            return row
        return None

    def _notice_new_credentials(self, now: float) -> None:
        """A changed token file: reconnect, and retry what waits for authorization now."""
        current = self._credentials()
        if current == self._seen_credentials:
            return
        self._seen_credentials = current
        self._drop_connection()
        for row in self.journal.uploads(states=(PENDING,)):
            if row.next_attempt > now:
                self.journal.update_upload(row.run, row.seq, next_attempt=now)
        self.log.info("conditions DB token changed; retrying pending uploads now")

    # -------------------------------------------------------- the call (background)

    def _send(self, row: UploadRow, calibration: str) -> UploadResult:
        """Runs on the background thread: the service only, no journal."""
        array = np.load(row.payload, allow_pickle=False)
        return self._db().upload(
            row.tag,
            row.since,
            array,
            input_tag=row.version,
            user_text=(
                f"calloop {calibration} run {row.run} {describe_seq(row.seq)} "
                f"config_sha256 {row.config_sha256 or 'unknown'}"
            ),
            key=upload_key(calibration, row),
            sequence=row.seq,
        )

    def _db(self) -> Conditions:
        if self._conditions is None:
            self._conditions = self._connect()
            self._tag_ready = False
        if not self._tag_ready:
            payload = self._calibration().payload
            self._conditions.create_tag(
                payload.destination_tag,
                time_type=payload.time_type,
                object_type=payload.object_type,
                synchronization=payload.synchronization,
                description=f"calloop {self._calibration().name}",
            )
            self._tag_ready = True
        return self._conditions

    def _drop_connection(self) -> None:
        """Close the connection (no call is in flight): the next call reconnects and
        re-reads the token."""
        if self._conditions is not None:
            self._conditions.close()
        self._conditions = None
        self._tag_ready = False

    # ----------------------------------------------------------------- settling

    def waiting(self, now: float) -> list[dict[str, object]]:
        """Entries not uploaded yet, with their age and last error (for the status)."""
        return [
            {
                "run": row.run,
                "harvest": row.seq,
                "age_s": round(now - row.created),
                "attempts": row.attempts,
                "last_error": row.detail,
            }
            for row in self.journal.uploads(states=(PENDING,))
        ]

    def _uploaded(self, row: UploadRow, result: UploadResult, now: float) -> None:
        self.service.succeeded(now)
        if self._auth_reported_at is not None:
            self.log.info("conditions DB accepts the token again")
            self._auth_reported_at = None
        if result.status == SUPERSEDED:
            self.journal.update_upload(
                row.run,
                row.seq,
                state=SUPERSEDED,
                detail="the conditions DB holds a newer harvest of this run",
            )
            self.log.info("upload superseded by a newer harvest", run=row.run, harvest=row.seq)
            return
        self.journal.update_upload(
            row.run,
            row.seq,
            state=DONE,
            payload_hash=result.payload_hash,
            detail=f"{result.status} {result.note}".strip(),
        )
        self.last_upload = {
            "run": row.run,
            "harvest": row.seq,
            "tag": row.tag,
            "since": result.since,
            "hash": result.payload_hash,
            "status": result.status,
            "time": now,
        }
        self.log.info(
            "payload uploaded",
            run=row.run,
            harvest=row.seq,
            tag=row.tag,
            since=result.since,
            status=result.status,
            hash=result.payload_hash[:12],
        )

    def _failed(self, row: UploadRow, error: Exception, now: float) -> None:
        text = redact(str(error))  # what is journaled and logged never holds a secret
        if isinstance(error, ConditionsUnavailable | NotAuthorized):
            self.service.failed(now, text)
        if isinstance(error, NotAuthorized | ConfigError):  # refused, or unreadable, token
            self._retry_later(row, text, now)
            self._report_auth(row, text)
        elif isinstance(error, ConditionsUnavailable):
            self._retry_later(row, text, now)
            self.log.warning(
                "conditions DB unavailable; upload kept in the outbox",
                run=row.run,
                harvest=row.seq,
                error=text,
            )
        elif isinstance(error, PERMANENT):
            self.journal.update_upload(row.run, row.seq, state=REFUSED, detail=text)
            self.log.error(
                "upload refused for good; the payload stays in the calibration store only "
                "(an expert must upload it by hand if it is still wanted)",
                run=row.run,
                harvest=row.seq,
                tag=row.tag,
                error=text,
            )
        else:  # a transient fault of ours or an unclassified answer: never settle on it
            self._retry_later(row, text, now)
            self.log.error(
                "upload failed unexpectedly; kept in the outbox",
                run=row.run,
                harvest=row.seq,
                error=redact(f"{type(error).__name__}: {error}"),
                exc_info=error,
            )

    def _retry_later(self, row: UploadRow, text: str, now: float) -> None:
        delay = min(MAX_BACKOFF_S, self.backoff_s * 2**row.attempts)
        self.journal.update_upload(
            row.run,
            row.seq,
            attempts=row.attempts + 1,
            next_attempt=now + delay,
            detail=text,
        )
        self._drop_connection()

    def _report_auth(self, row: UploadRow, text: str) -> None:
        """ERROR on the first refusal of an outage, then at most every AUTH_REMINDER_S."""
        clock = self._monotonic()
        if self._auth_reported_at is not None and clock - self._auth_reported_at < AUTH_REMINDER_S:
            self.log.debug("upload still not authorized", run=row.run, harvest=row.seq)
            return
        self._auth_reported_at = clock
        self.log.error(
            "conditions DB refused the upload token; uploads stay pending and are retried "
            "(fix or renew the token file: it is re-read when it changes, no restart needed)",
            run=row.run,
            harvest=row.seq,
            tag=row.tag,
            error=text,
            pending=self.pending(),
        )
