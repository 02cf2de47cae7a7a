"""Conditions-DB resolve latency and upload throughput: SQLite, PostgreSQL and HTTP.

Run: ``python benchmarks/conddb_bench.py [--iovs 100000]``. One tag is bulk-loaded with
N IOVs (distinct payloads), then, side by side in one run: ``resolve(run)`` latency
p50/p99 at random runs, and sequential ``upload()`` throughput (each a full transaction
with the synchronization rule and the idempotence check). HTTP runs the FastAPI service
over loopback on top of the SQLite database.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import percentiles_ms, table, timed
from loop.conddb.client import Conditions, ConditionsDB
from loop.conddb.db import ConditionsDatabase
from loop.conddb.server import ServiceThread, create_app
from tests.infra.postgres import PostgresServer, initdb_binary

TAG = "Bench_v1"


def load(url: str, iovs: int) -> ConditionsDatabase:
    db = ConditionsDatabase(url)
    db.create_schema()
    db.create_tag(TAG, time_type="run", object_type="Bench")
    rows = [(since, np.full(4, float(since))) for since in range(1, iovs + 1)]
    for start in range(0, iovs, 20_000):
        db.import_iovs(TAG, rows[start : start + 20_000])
    return db


def measure(name: str, client: Conditions, iovs: int, lookups: int, uploads: int) -> list[object]:
    runs = [random.randrange(1, iovs * 2) for _ in range(lookups)]
    it = iter(runs)
    p50, p99 = percentiles_ms(timed(lambda: client.resolve(tag=TAG, run=next(it)), lookups))
    counter = iter(range(iovs * 10, iovs * 20))
    start = time.perf_counter()
    for _ in range(uploads):
        client.upload(TAG, next(counter), np.arange(64.0) + random.random())
    rate = uploads / (time.perf_counter() - start)
    return [name, iovs, p50, p99, rate]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iovs", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--uploads", type=int, default=200)
    args = parser.parse_args()
    random.seed(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = load(f"sqlite:///{Path(tmp) / 'bench.sqlite'}", args.iovs)
        rows.append(measure("SQLite direct", sqlite, args.iovs, args.lookups, args.uploads))
        service = ServiceThread(create_app(sqlite)).start()
        http = ConditionsDB.connect(service.url, sqlite.create_token("bench", ["*"]))
        rows.append(
            measure("HTTP (FastAPI over SQLite)", http, args.iovs, args.lookups, args.uploads)
        )
        service.stop()
        if initdb_binary() is None:
            print("PostgreSQL not installed: skipping its row (apt-get install postgresql)")
        else:
            with PostgresServer() as pg:
                postgres = load(pg.create_database(), args.iovs)
                rows.append(
                    measure("PostgreSQL direct", postgres, args.iovs, args.lookups, args.uploads)
                )
                postgres.close()
    table(
        "conditions DB: resolve latency (ms) and upload throughput (uploads/s)",
        ["backend", "IOVs in tag", "resolve p50", "resolve p99", "uploads/s"],
        rows,
    )


if __name__ == "__main__":
    main()
