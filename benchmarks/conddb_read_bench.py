"""Conditions reads ("payload valid for run R" through a global tag) and bulk uploads,
side by side in one run.

Run: ``python benchmarks/conddb_read_bench.py [--iovs 10000 100000] [--reps 5]``.

For SQLite and PostgreSQL (a throw-away server, as in the tests), with a tag of 10^4 and
10^5 IOVs mapped in two global tags (one following the latest IOVs, one read at a
settled snapshot), at 1, 8 and 32 concurrent clients (threads, each with its own
connection), it prints the median over ``--reps`` interleaved rounds of the p50 latency
and of the throughput of:

- raw SQL: the driver alone (sqlite3 / psycopg), one prepared statement joining global
  tag, map, tag and IOV, autocommit: the floor;
- calloop direct: ``ConditionsDatabase.resolve``;
- HTTP: ``calloop conddb serve`` (a separate process) over loopback, full answers;
- HTTP 304: the same with ``If-None-Match`` (the client holds the answer);
- nginx miss: through nginx running nginx/calloop-conddb.conf, a read that follows the
  latest IOVs (never kept: every request reaches the service);
- nginx hit: through nginx, a read at the settled snapshot (kept: answered by nginx).

Then uploads over HTTP: one keyed upload per request (the outbox's way) against bulk
requests of ``--bulk`` IOVs, in IOVs per second.

The code before: ``--before /work/baseline`` also serves the same database with that
checkout's ``calloop conddb serve`` (row "HTTP, code before", and its single uploads),
side by side; ``PYTHONPATH=/work/baseline python benchmarks/conddb_read_bench.py`` runs
everything against it (modes it lacks print ``n/a``).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

# appended, not prepended: PYTHONPATH=/work/baseline must win for the "before" figures
sys.path.append(str(Path(__file__).resolve().parent.parent))
from benchmarks._common import table
from loop.conddb.db import ConditionsDatabase
from tests.infra.nginx import NginxCache, nginx_binary
from tests.infra.postgres import PostgresServer, initdb_binary

TAG, UPLOAD_TAG, RECORD = "Bench_v1", "BenchUpload_v1", "BenchRcd"
LATEST, SETTLED = "GT_latest", "GT_settled"
MAX_TIME = 1e12
CONCURRENCY = (1, 8, 32)
SINCES = itertools.count(10_000_000)  # fresh sinces (and keys) for every upload
RAW_SQL = """
SELECT i.since, i.payload_hash, i.insertion_time
FROM global_tag g
JOIN global_tag_map m ON m.global_tag_name = g.name
JOIN tag t ON t.name = m.tag_name
JOIN iov i ON i.id = (
    SELECT j.id FROM iov j
    WHERE j.tag_name = t.name AND j.since <= :run AND j.insertion_time <= g.snapshot_time
    ORDER BY j.since DESC, j.insertion_time DESC, j.id DESC LIMIT 1)
WHERE g.name = :gt AND m.record = :record AND m.label = ''
"""
Call = Callable[[int], Any]  # one read at a run
Client = tuple[Call, Callable[[], None]]  # a client's read call and how to close it


# ------------------------------------------------------------------------- set-up


def load(url: str, iovs: int) -> ConditionsDatabase:
    """A tag of ``iovs`` IOVs (distinct payloads) written an hour ago, mapped in a
    global tag following the latest IOVs and one read at a settled snapshot."""
    db = ConditionsDatabase(url)
    db.create_schema()
    db.create_tag(TAG, time_type="run", object_type="Bench")
    db.create_tag(UPLOAD_TAG, time_type="run", object_type="Bench")
    rows = [(since, np.full(4, float(since))) for since in range(1, iovs + 1)]
    for start in range(0, iovs, 20_000):
        db.import_iovs(TAG, rows[start : start + 20_000])
    with db._write.begin() as conn:  # as if uploaded an hour ago
        conn.exec_driver_sql("UPDATE iov SET insertion_time = insertion_time - 3600")
    db.create_global_tag(LATEST)
    db.create_global_tag(SETTLED, snapshot_time=time.time() - 1800)
    for gt in (LATEST, SETTLED):
        db.map_global_tag(gt, RECORD, "", TAG)
    return db


@contextmanager
def service(url: str, workdir: Path, code: str | None = None) -> Iterator[str]:
    """``calloop conddb serve`` in its own process, as deployed (from the checkout
    ``code`` if given: the code before); yields host:port."""
    port_file = workdir / f"port{'-before' if code else ''}"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": code} if code else None
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loop.cli",
            "conddb",
            "--db",
            url,
            "serve",
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "serve.log").open("ab"),
        env=env,
        cwd=code,  # ``-m`` puts the working directory first on the path
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "serve.log").read_text()[-2000:])
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        http_get(address)(f"/api/v1/globaltags/{LATEST}")  # serving
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


# ------------------------------------------------------------------------ clients


def http_get(
    address: str, etag: bool = False, conn: http.client.HTTPConnection | None = None
) -> Callable[[str], bytes]:
    """A keep-alive GET on one connection; with ``etag`` it sends the ETag of the
    previous answer to the same path (a client that holds it)."""
    if conn is None:
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    held: dict[str, str] = {}

    def get(path: str) -> bytes:
        headers = {"If-None-Match": held[path]} if etag and path in held else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status not in (200, 304):
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        if response.getheader("ETag"):
            held[path] = response.getheader("ETag", "")
        return body

    return get


def resolve_path(gt: str, run: int) -> str:
    return f"/api/v1/resolve?global_tag={gt}&record={RECORD}&run={run}"


def raw_sql(url: str) -> Callable[[], Client]:
    """Per client: one driver connection, one prepared statement, autocommit."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")

        def sqlite_client() -> Client:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            params = {"gt": LATEST, "record": RECORD}
            return lambda run: conn.execute(RAW_SQL, {**params, "run": run}).fetchone(), conn.close

        return sqlite_client
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    statement = re.sub(r":(\w+)", r"%(\1)s", RAW_SQL)

    def pg_client() -> Client:
        conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
        params = {"gt": LATEST, "record": RECORD}
        return lambda run: conn.execute(statement, {**params, "run": run}).fetchone(), conn.close

    return pg_client


def modes(
    url: str, db: ConditionsDatabase, address: str, cache: str | None, before: str | None
) -> dict[str, Callable[[], Client] | None]:
    """Each mode: a factory of one client's read call (None: not available)."""
    has_etag = "etag" in _headers(address, resolve_path(LATEST, 1))

    def http_mode(target: str, gt: str, etag: bool = False) -> Callable[[], Client]:
        def client() -> Client:
            host, port = target.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            get = http_get(target, etag, conn)
            return lambda run: get(resolve_path(gt, run)), conn.close

        return client

    return {
        "raw SQL": raw_sql(url),
        "calloop direct": lambda: (
            lambda run: db.resolve(global_tag=LATEST, record=RECORD, run=run),
            lambda: None,
        ),
        "HTTP, code before": http_mode(before, LATEST) if before else None,
        "HTTP": http_mode(address, LATEST),
        "HTTP 304": http_mode(address, LATEST, etag=True) if has_etag else None,
        "nginx miss": http_mode(cache, LATEST) if cache else None,
        "nginx hit": http_mode(cache, SETTLED) if cache else None,
    }


def _headers(address: str, path: str) -> dict[str, str]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return {k.lower(): v for k, v in response.getheaders()}


# -------------------------------------------------------------------- measurement


def cell(factory: Callable[[], Client], clients: int, per_client: int, runs: list[int]) -> Any:
    """``clients`` threads, each ``per_client`` reads at random runs of ``runs`` (after
    one warm-up read); returns (p50 latency in ms, reads per second)."""
    made = [factory() for _ in range(clients)]
    calls = [call for call, _ in made]
    for call in calls:
        call(runs[0])
    samples: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(index: int) -> None:
        rng = random.Random(index)
        call, mine = calls[index], samples[index]
        barrier.wait()
        for _ in range(per_client):
            run = rng.choice(runs)
            start = time.perf_counter()
            call(run)
            mine.append(time.perf_counter() - start)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for _, close in made:
        close()
    flat = [s for mine in samples for s in mine]
    return statistics.median(flat) * 1e3, len(flat) / elapsed


def measure_reads(
    name: str,
    url: str,
    db: ConditionsDatabase,
    address: str,
    *,
    cache: str | None,
    before: str | None,
    args: Any,
) -> list[list[object]]:
    runs = random.Random(1).sample(range(1, args.iovs_now + 1), 256)
    available = modes(url, db, address, cache, before)
    if cache:  # warm the cache with every settled read
        get = http_get(cache)
        for run in runs:
            get(resolve_path(SETTLED, run))
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.reps):  # interleaved rounds: drifts hit every mode alike
        for mode, factory in available.items():
            for clients in CONCURRENCY:
                if factory is not None:
                    per_client = max(4, args.reads // clients)
                    results.setdefault((mode, clients), []).append(
                        cell(factory, clients, per_client, runs)
                    )
    rows: list[list[object]] = []
    for mode in available:
        row: list[object] = [name, args.iovs_now, mode]
        for clients in CONCURRENCY:
            got = results.get((mode, clients))
            row.append(statistics.median(p for p, _ in got) if got else "n/a")
        for clients in CONCURRENCY:
            got = results.get((mode, clients))
            row.append(round(statistics.median(r for _, r in got)) if got else "n/a")
        rows.append(row)
    return rows


def measure_uploads(
    name: str, address: str, token: str, args: Any, *, bulk_too: bool = True
) -> list[object]:
    """IOVs/s: keyed single uploads vs bulk requests, over HTTP, interleaved rounds."""
    from loop.conddb.client import ConditionsDB

    client: Any = ConditionsDB.connect(f"http://{address}", token)
    single, bulk = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        for since in itertools.islice(SINCES, args.singles):
            client.upload(UPLOAD_TAG, since, np.arange(16.0) + since, key=f"s{since}")
        single.append(args.singles / (time.perf_counter() - start))
        if bulk_too and hasattr(client, "upload_bulk"):
            rows = [(s, np.arange(16.0) + s) for s in itertools.islice(SINCES, args.bulk)]
            start = time.perf_counter()
            client.upload_bulk(UPLOAD_TAG, rows, key=f"b{rows[0][0]}")
            bulk.append(args.bulk / (time.perf_counter() - start))
    client.close()
    rate = statistics.median(bulk) if bulk else "n/a"
    ratio = rate / statistics.median(single) if bulk else "n/a"
    return [name, round(statistics.median(single)), rate, ratio]


def backend_rows(name: str, url_for: Callable[[int], str], workdir: Path, args: Any) -> Any:
    reads, uploads = [], []
    for iovs in args.iovs:
        args.iovs_now = iovs
        url = url_for(iovs)
        db = load(url, iovs)
        token = db.create_token("bench", ["*"])
        with (
            service(url, workdir) as address,
            service(url, workdir, args.before) if args.before else nullcontext() as before,
        ):
            if nginx_binary() is None:
                print("nginx not installed (apt-get install nginx-light): no cache rows")
            with NginxCache(address) if nginx_binary() else nullcontext() as cache:
                reads += measure_reads(
                    name,
                    url,
                    db,
                    address,
                    cache=cache.url.removeprefix("http://") if cache else None,
                    before=before,
                    args=args,
                )
            if iovs == args.iovs[0]:
                if before:
                    uploads.append(
                        measure_uploads(f"{name}, code before", before, token, args, bulk_too=False)
                    )
                uploads.append(measure_uploads(name, address, token, args))
        db.close()
    return reads, uploads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iovs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--reads", type=int, default=128, help="reads per cell and round")
    parser.add_argument("--singles", type=int, default=40, help="single uploads per round")
    parser.add_argument("--bulk", type=int, default=1000, help="IOVs per bulk request")
    parser.add_argument(
        "--before", help="a checkout of the code before (e.g. /work/baseline): its service too"
    )
    args = parser.parse_args()
    import loop

    print(f"calloop from {Path(loop.__file__).parent}")
    reads, uploads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        got = backend_rows(
            "SQLite", lambda n: f"sqlite:///{workdir / f'c{n}.sqlite'}", workdir, args
        )
        reads += got[0]
        uploads += got[1]
        if initdb_binary() is None:
            print("PostgreSQL not installed: no PostgreSQL rows (apt-get install postgresql)")
        else:
            with PostgresServer() as pg:
                got = backend_rows(
                    "PostgreSQL", lambda n: pg.create_database(f"b{n}"), workdir, args
                )
                reads += got[0]
                uploads += got[1]
    header = ["backend", "IOVs", "mode"]
    header += [f"p50 ms @{c}" for c in CONCURRENCY] + [f"reads/s @{c}" for c in CONCURRENCY]
    table(
        f"resolve through a global tag: median of {args.reps} rounds (p50 latency, throughput)",
        header,
        reads,
    )
    table(
        f"uploads over HTTP (IOVs/s): keyed single uploads vs bulk requests of {args.bulk}",
        ["backend", "single IOV/s", "bulk IOV/s", "bulk / single"],
        uploads,
    )


if __name__ == "__main__":
    main()
