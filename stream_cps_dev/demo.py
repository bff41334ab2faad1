"""``stream-cps demo``: the whole pipeline on an embedded PostgreSQL with the sample data.

Events are inserted in chunks while the service runs, so the demo exercises the real path
(logical replication -> stitching -> calculation), then prints a short summary of the entities.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.service import process
from stream_cps.service.progress import Progress
from stream_cps_dev import embedded
from stream_cps_dev.sample import generator

log = logging.getLogger(__name__)


def run_demo(settings: Settings, workdir: str, persons: int) -> int:
    datadir = Path(workdir).resolve() / "pgdata"
    shutil.rmtree(datadir, ignore_errors=True)
    print(f"starting embedded PostgreSQL in {datadir} ...", flush=True)
    server = embedded.start(datadir, settings=embedded.STITCHING_SETTINGS)
    try:
        settings = settings.replace(dsn=server.dsn)
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            conn.execute(generator.config_sql(settings.schemas))
            stop = threading.Event()
            done: list[Progress] = []
            thread = threading.Thread(
                target=lambda: done.append(process.run(settings, "postgres", stop)),
                name="service",
                daemon=True,
            )
            thread.start()
            rows = list(generator.events(persons=persons))
            _feed(conn, settings, rows)
            _wait_until_done(conn, settings, len(rows))
            stop.set()
            thread.join(timeout=30)
            if not done:
                raise RuntimeError("the service did not stop in time")
            _summary(conn, settings, done[0])
    finally:
        embedded.destroy(server)
    return 0


def _feed(conn: psycopg.Connection[Any], settings: Settings, rows: list[Any]) -> None:
    table = sql.Identifier(settings.schemas.ce, "customer_events")
    chunk = max(1, len(rows) // 10)
    for start in range(0, len(rows), chunk):
        with conn.cursor() as cur:
            generator.copy_events(cur, table, rows[start : start + chunk])
        print(f"inserted {min(start + chunk, len(rows))}/{len(rows)} events", flush=True)
        time.sleep(0.2)


def _wait_until_done(
    conn: psycopg.Connection[Any], settings: Settings, total: int, timeout: float = 120
) -> None:
    """Until every event is stitched and every entity's attributes are calculated."""
    query = sql.SQL(
        "SELECT (SELECT count(*) FROM {ce} WHERE stitched IS NULL), "
        "(SELECT count(*) FROM {ca} WHERE calculated IS NULL OR calculated < modified), "
        "(SELECT count(*) FROM {ca})"
    ).format(
        ce=sql.Identifier(settings.schemas.ce, "customer_events"),
        ca=sql.Identifier(settings.schemas.cdp, "customer_attributes"),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(query).fetchone()
        assert row is not None
        left, due, entities = (int(v) for v in row)
        print(
            f"stitched {total - left}/{total} events; "
            f"attributes calculated for {entities - due}/{entities} entities",
            flush=True,
        )
        if left == 0 and due == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("the demo did not finish in time")


def _summary(conn: psycopg.Connection[Any], settings: Settings, progress: Progress) -> None:
    ca = sql.Identifier(settings.schemas.cdp, "customer_attributes")
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(max(cardinality(identifiers)), 0), "
            "coalesce(avg(cardinality(identifiers)), 0) FROM {}"
        ).format(ca)
    ).fetchone()
    assert row is not None
    print()
    print("summary")
    print(f"  events stitched:   {progress.events}")
    print(
        f"  entities:          {row[0]}  "
        f"(from {progress.created} created, {progress.merges} merges)"
    )
    print(f"  identifiers/entity: avg {float(row[2]):.1f}, max {row[1]}")
    print("  largest entities:")
    top = conn.execute(
        sql.SQL(
            "SELECT customer_entity_id, cardinality(identifiers), identifiers[1:3], attributes "
            "FROM {} ORDER BY cardinality(identifiers) DESC, customer_entity_id LIMIT 5"
        ).format(ca)
    ).fetchall()
    for entity_id, count, sample, attributes in top:
        print(f"    {entity_id}  {count} identifiers, e.g. {', '.join(sample)}")
        if attributes:
            print(f"      attributes: {attributes}")
