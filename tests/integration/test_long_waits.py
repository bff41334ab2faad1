"""The replication service through work that keeps it off its stream for long.

A sweep through a large backlog, or a batch waiting for the rows of the guide's restitch
script (``UPDATE customer_events`` holds every row it passed, for minutes at 10M events), reads
no replication stream meanwhile. Found in the bench's restitch of everything at 1M: the
walsender ended the connection after ``wal_sender_timeout`` without a reply, and a batch that
kept giving way to the script was retried as if the database were away; either way the whole
session started over (new connections, the lease again, the stream decoded again from the
slot's restart point) under a "database unavailable" warning. And the stream reader listed
every id of a transaction, however big (a backfill COPYing millions of events at once).

These run the real service against the real server; ``wal_sender_timeout`` is set low on the
service's connections (a per-connection setting) so that a few seconds show it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.sources.postgres.readers import StreamReader
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from tests.support import (
    T0,
    event,
    expected,
    insert,
    observed,
    service_process,
    setup_rules,
    unstitched,
    wait_until,
)

IMPATIENT = " options='-c wal_sender_timeout=1s'"
# Above the ~7.5 s a batch spends in its quick retries of a lost conflict (retry.CONFLICT),
# during which nothing reads or answers the stream (60 s by default).
PATIENT_ENOUGH = " options='-c wal_sender_timeout=10s'"


def walsender(conn: psycopg.Connection[Any]) -> int | None:
    """The service's walsender, by the application name its stream reader gives it."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_replication WHERE application_name = 'stream-cps replication'"
    ).fetchone()
    return int(row[0]) if row else None


def restarts(log: Path) -> list[str]:
    """Log lines of a session that started over."""
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if "database unavailable" in line or "stream ended" in line]


def test_a_transaction_bigger_than_a_batch_goes_to_the_sweep_unlisted(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """The reader lists a transaction's ids up to a batch's worth and flags the rest as the
    sweep's: memory stays bounded through one COPY of millions of events."""
    setup_rules(db)
    reader = StreamReader(settings.dsn, settings.schemas, "big_txn", "big_txn_publication")
    reader.ensure(db)
    try:
        with db.transaction():
            insert(db, [event(f"e{n:03}", n, email=f"p{n}@a") for n in range(50)])
        batch = reader.poll(db, 10, 10.0)
        assert batch.backlog and batch.ack_lsn is not None
        assert len(batch.event_ids) == 10
        assert reader.open_txn == {} and not reader.overflowed
        reader.ack(db, batch.ack_lsn)
        with db.transaction():
            insert(db, [event(f"f{n}", 100 + n, email=f"q{n}@a") for n in range(3)])
        small = reader.poll(db, 10, 0.5)
        assert sorted(small.event_ids) == ["f0", "f1", "f2"] and not small.backlog
    finally:
        reader.close()


def test_a_long_sweep_keeps_its_replication_connection(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """A sweep of several seconds (each batch's marking slowed by a trigger) on a server that
    ends a walsender after 1 s without a reply: status updates between batches keep it."""
    setup_rules(db)
    db.execute(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_sleep(0.15); RETURN NULL; END$$"
    )
    db.execute(
        "CREATE TRIGGER slow AFTER UPDATE ON cdp_ce.customer_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION slow()"
    )
    log = tmp_path / "service.log"
    with service_process(pg_dsn + IMPATIENT, log, STREAM_CPS_STITCHING_BATCH_SIZE="10") as proc:
        wait_until(lambda: walsender(db) is not None, what="the service's stream")
        first = walsender(db)
        with db.transaction():
            insert(db, [event(f"e{n:03}", n, email=f"p{n % 40}@a") for n in range(300)])
        started = time.monotonic()
        wait_until(lambda: unstitched(db) == 0, timeout=90, what="the backlog stitched")
        swept = time.monotonic() - started
        insert(db, [event("after", 500, email="p1@a")])  # the stream still carries rows
        wait_until(lambda: unstitched(db) == 0, what="a row after the sweep stitched")
        assert proc.poll() is None
        assert walsender(db) == first, restarts(log)
    assert swept > 3.0, f"the sweep took {swept:.1f} s: too short to show the timeout"
    assert restarts(log) == []
    assert observed(db) == expected(db)


def test_a_batch_waits_out_a_script_holding_its_rows_in_its_own_session(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """The guide's restitch of everything, its second statement holding one event row for
    12 s, longer than the quick retries of a lost conflict: the purging batch gives way and
    waits in the session it has (the same walsender, kept alive meanwhile past its 10 s
    timeout), then restitches everything once the script commits."""
    setup_rules(db)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="y@a", cookie="c")])
    log = tmp_path / "service.log"
    with service_process(pg_dsn + PATIENT_ENOUGH, log) as proc:
        wait_until(lambda: unstitched(db) == 0 and walsender(db) is not None, what="stitched")
        first = walsender(db)
        db.execute("UPDATE customer_attributes SET modified = NULL")
        with psycopg.connect(pg_dsn) as script:
            script.execute(
                "UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL "
                "WHERE id = 'a'"
            )
            time.sleep(12)
            script.execute("UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL")
        wait_until(lambda: unstitched(db) == 0, what="restitched after the script")
        pending = db.execute("SELECT count(*) FROM customer_attributes WHERE modified IS NULL")
        assert pending.fetchone() == (0,)
        assert proc.poll() is None
        assert walsender(db) == first, restarts(log)
    text = log.read_text(errors="replace")
    assert "stitching waits for rows another transaction holds" in text
    assert restarts(log) == []
    assert observed(db) == expected(db)
    assert sorted({str(e) for e in observed(db).values()}) == sorted(
        [entity_id_for("a"), entity_id_for("b")]
    )


def test_a_sweep_slowed_by_a_long_transaction_does_not_blame_the_rules(
    db: psycopg.Connection[Any], settings: config.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """While a transaction holds uncommitted unstitched rows (the guide's second statement at
    10M: 260 s in the bench), the sweep's read of the next events in time order walks their
    index entries and outlasts ``stitching.rule_timeout_ms``. Before, the service logged that
    rule evaluation had failed and isolated every rule over the batch; the rules were never at
    fault. Now the batch is read by id and the log names the slow read."""
    setup_rules(db)
    insert(db, [event(f"e{k:02d}", 10 + k, email=f"p{k % 7}@a", cookie=f"c{k}") for k in range(20)])
    stitcher = Stitcher(settings.replace(**{"stitching.rule_timeout_ms": 100}))
    with psycopg.connect(settings.dsn) as holder:  # a transaction left open, earlier rows
        holder.execute(
            "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, "
            "payload) SELECT 'held' || g, 'web', 'page_view', '1', %s - g * interval '1 s', "
            "'{}' FROM generate_series(1, 1500000) g",
            [T0],
        )
        with caplog.at_level(logging.WARNING, logger="stream_cps.stitching.rules"):
            for _ in stitcher.sweep(db):
                pass
        holder.rollback()
    messages = [r.getMessage() for r in caplog.records]
    assert any("took longer than stitching.rule_timeout_ms" in m for m in messages), messages
    assert not any("rule evaluation failed" in m for m in messages), messages
    assert unstitched(db) == 0
    assert db.execute("SELECT count(*) FROM cdp_ps.stitching_errors").fetchone() == (0,)
    assert observed(db) == expected(db)
