"""Property-based fuzz of the conditions-DB service from its own OpenAPI spec.

Every operation of the real app gets schemathesis-generated requests (in-process, over
ASGI), each sent three times: without a token, with an uploader token scoped to
``Ecal*`` and with an admin token. Whatever comes in, the answer is never a 5xx and
never slow. The database is seeded so that the generated names sometimes hit real tags
and a real global tag.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from loop.conddb.db import ConditionsDatabase
from loop.conddb.server import create_app

SLOW_S = 5.0  # generous: every call is local SQLite; a slow answer means unbounded work
TOKENS: dict[str, str | None] = {"anonymous": None}


def _seeded_app() -> FastAPI:
    directory = Path(tempfile.mkdtemp(prefix="calloop-fuzz-"))
    db = ConditionsDatabase(f"sqlite:///{directory / 'c.sqlite'}")
    db.create_schema()
    db.create_tag("EcalPedestals_v1", time_type="run", object_type="EcalPedestals")
    db.create_tag("SiStripBad_v1", time_type="lumi", object_type="SiStripBad")
    db.upload("EcalPedestals_v1", 1, np.arange(4.0))
    db.create_global_tag("GT_v1")
    db.map_global_tag("GT_v1", "SiStripBadChannelRcd", "", "SiStripBad_v1")
    TOKENS["uploader"] = db.create_token("ecal", ["Ecal*"])
    TOKENS["admin"] = db.create_token("admin", ["*"], role="admin")
    return create_app(db, max_body_bytes=64 * 1024)


schema = schemathesis.openapi.from_asgi("/openapi.json", _seeded_app())


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_api_never_answers_5xx_nor_slowly(case: schemathesis.Case) -> None:
    """No token, an uploader token, an admin token: no server error, no slow answer."""
    for who, token in TOKENS.items():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        started = time.monotonic()
        response = case.call(headers=headers)
        elapsed = time.monotonic() - started
        what = (who, case.method, case.path, case.path_parameters, case.query)
        assert response.status_code < 500, (*what, response.text[:300])
        assert elapsed < SLOW_S, (*what, f"{elapsed:.1f} s")
