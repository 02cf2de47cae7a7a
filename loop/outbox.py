"""Step 4's durable outbox: every payload upload is queued in the journal first and
retried until the conditions DB takes it.

Per (tag, since) only the newest harvest is uploaded; an older one still pending when a
newer one is queued or landed is marked ``superseded``, so a smaller, older harvest never
lands after a newer one. Entries of one tag go in since order, and a tag whose head
entry waits for a retry holds its later entries back. Uploads are idempotent in the DB,
so a retry after a crash never duplicates an IOV.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import structlog

from loop.conddb.client import Conditions
from loop.conddb.db import ConditionsUnavailable
from loop.config import CalibrationConfig
from loop.errors import ConditionsError
from loop.journal import Journal, UploadRow

MAX_BACKOFF_S = 300.0


class Outbox:
    """Uploads queued payloads of one calibration."""

    def __init__(
        self,
        journal: Journal,
        connect: Callable[[], Conditions],
        calibration: Callable[[], CalibrationConfig],
        log: structlog.stdlib.BoundLogger,
        backoff_s: float = 2.0,
    ) -> None:
        self.journal = journal
        self._connect = connect
        self._calibration = calibration
        self.log = log
        self.backoff_s = backoff_s
        self._conditions: Conditions | None = None
        self._tag_ready = False
        self.last_upload: dict[str, object] | None = None

    def _db(self) -> Conditions:
        if self._conditions is None:
            self._conditions = self._connect()
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

    def pending(self, run: int | None = None) -> int:
        """Entries not yet settled (of one run, or all)."""
        return len(self.journal.uploads(states=("pending",), run=run))

    def flush(self, now: float) -> None:
        """Upload what is due, in order; never raises for DB trouble."""
        rows = self.journal.uploads(states=("pending",))
        if not rows:
            return
        newest: dict[tuple[str, int], int] = {}
        for row in self.journal.uploads(states=("pending", "done")):
            key = (row.tag, row.since)
            newest[key] = max(newest.get(key, -1), row.seq)
        held: set[str] = set()
        for row in rows:
            if row.tag in held:
                continue
            if newest[(row.tag, row.since)] > row.seq:
                self.journal.update_upload(
                    row.run,
                    row.seq,
                    state="superseded",
                    detail="a newer harvest of the same run exists",
                )
                continue
            if row.next_attempt > now or not self._upload(row, now):
                held.add(row.tag)

    def _upload(self, row: UploadRow, now: float) -> bool:
        try:
            array = np.load(row.payload, allow_pickle=False)
            result = self._db().upload(
                row.tag,
                row.since,
                array,
                input_tag=row.version,
                user_text=(
                    f"calloop {self._calibration().name} run {row.run} harvest {row.seq} "
                    f"config_sha256 {row.config_sha256 or 'unknown'}"
                ),
            )
        except ConditionsUnavailable as exc:
            delay = min(MAX_BACKOFF_S, self.backoff_s * 2**row.attempts)
            self.journal.update_upload(
                row.run,
                row.seq,
                attempts=row.attempts + 1,
                next_attempt=now + delay,
                detail=str(exc),
            )
            self.log.warning(
                "conditions DB unavailable; upload kept in the outbox",
                run=row.run,
                harvest=row.seq,
                retry_in_s=delay,
                error=str(exc),
            )
            self._conditions = None
            return False
        except (ConditionsError, OSError, ValueError) as exc:
            self.journal.update_upload(row.run, row.seq, state="refused", detail=str(exc))
            self.log.error(
                "upload refused; payload stays in the calibration store only",
                run=row.run,
                harvest=row.seq,
                tag=row.tag,
                error=str(exc),
            )
            return True
        self.journal.update_upload(
            row.run,
            row.seq,
            state="done",
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
        return True
