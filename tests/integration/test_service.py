"""`stream-cps run` as a real process: streaming, signals, crashes, standby takeover, heartbeat."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps_dev.sample import generator
from tests.support import (
    event,
    expected,
    insert,
    observed,
    service_process,
    setup_rules,
    start_service,
    unstitched,
    wait_until,
)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def slot_active(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'stream_cps'"
    ).fetchone()
    return bool(row and row[0])


def test_streaming_inserts_are_stitched_and_sigterm_exits_cleanly(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    with service_process(pg_dsn, tmp_path / "run.log") as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        for n in range(200):
            insert(db, [event(f"e{n}", n % 37, email=f"p{n % 23}@x", cookie=f"c{n % 31}")])
            if n % 50 == 0:
                wait_until(lambda: unstitched(db) == 0, timeout=10, what="stitching")
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="stitching")
        assert observed(db) == expected(db)
        started = time.monotonic()
        assert stop(proc) == 0
        assert time.monotonic() - started < 5
    log = (tmp_path / "run.log").read_text()
    assert "stitched 200 events" in log


def test_kill_9_at_random_points_loses_and_doubles_nothing(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    db.execute(generator.config_sql(Schemas()))
    rows = list(generator.events(seed=3, persons=120, per_person=5))
    rng = random.Random(99)
    chunks = [rows[i : i + 40] for i in range(0, len(rows), 40)]
    log = tmp_path / "run.log"
    for trial in range(3):
        proc = start_service(
            pg_dsn, log, STREAM_CPS_STITCHING_BATCH_SIZE=str(rng.choice([5, 17, 64]))
        )
        try:
            for _ in range(len(chunks) // 3 + 1):
                if chunks:
                    insert(db, chunks.pop())
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        _ = trial
    with service_process(pg_dsn, log) as proc:
        for chunk in chunks:
            insert(db, chunk)
        wait_until(lambda: unstitched(db) == 0, timeout=60, what="stitching after restarts")
        assert observed(db) == expected(db)
        # nothing doubled: replays after a crash add no second delete for the same id
        doubled = db.execute(
            "SELECT entity_id FROM cdp_attr.outbox WHERE op = 'delete' "
            "GROUP BY entity_id HAVING count(*) > 1"
        ).fetchall()
        assert doubled == []
        assert stop(proc) == 0


def test_standby_takes_over_when_active_process_dies(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    first = start_service(pg_dsn, tmp_path / "a.log")
    wait_until(lambda: slot_active(db), what="first process active")
    second = start_service(pg_dsn, tmp_path / "b.log")
    try:
        wait_until(lambda: "standby" in (tmp_path / "b.log").read_text(), what="standby")
        insert(db, [event("before", 1, email="x@a")])
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="active stitching")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed = time.monotonic()
        insert(db, [event("after", 2, email="x@a")])
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="takeover")
        assert time.monotonic() - killed < 10
        assert "active: holding the lease" in (tmp_path / "b.log").read_text()
        assert observed(db) == expected(db)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()


def test_idle_database_does_not_hold_wal_and_lag_is_small(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    proc = start_service(pg_dsn, tmp_path / "run.log")
    try:
        wait_until(lambda: slot_active(db), what="the slot")
        db.execute("CREATE TABLE unrelated (x text)")
        for _ in range(20):
            db.execute(
                "INSERT INTO unrelated SELECT repeat('x', 1000) FROM generate_series(1, 200)"
            )

        def caught_up() -> bool:
            row = db.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                "FROM pg_replication_slots WHERE slot_name = 'stream_cps'"
            ).fetchone()
            return row is not None and row[0] is not None and row[0] < 64 * 1024

        wait_until(caught_up, timeout=10, what="slot to follow WAL of unrelated tables")
    finally:
        stop(proc)


def test_preexisting_rows_large_payloads_and_restitch_updates(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    big = "z" * 20_000  # TOASTed: not resent in UPDATEs
    insert(db, [event("old", 1, email="x@a", blob=big)])  # before any slot exists
    proc = start_service(pg_dsn, tmp_path / "run.log")
    try:
        wait_until(lambda: unstitched(db) == 0, timeout=15, what="pre-existing row")
        insert(db, [event("new", 2, email="x@a", blob=big)])
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="new row")
        # the guide's restitch-all, no wait between statements, config changed first
        db.execute(
            "UPDATE cdp_ps.stitching_attributes_config SET value_expression = "
            "'lower(payload->>''email'')' WHERE attribute_id = 'email'"
        )
        db.execute(
            "UPDATE customer_events SET payload = payload || %s::jsonb WHERE id = 'old'",
            [json.dumps({"email": "X@A"})],
        )
        db.execute("UPDATE customer_attributes SET modified = NULL")
        db.execute("UPDATE customer_events SET stitched = NULL, identifiers = NULL")
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="restitch")
        assert observed(db) == expected(db)
        assert db.execute("SELECT identifiers FROM customer_attributes").fetchall() == [
            (["email:x@a"],)
        ]
    finally:
        stop(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_within_seconds_while_busy(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path, sig: int
) -> None:
    db.execute(generator.config_sql(Schemas()))
    with service_process(
        pg_dsn, tmp_path / "run.log", STREAM_CPS_STITCHING_BATCH_SIZE="50"
    ) as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        insert(db, list(generator.events(seed=8, persons=200, per_person=5)))
        time.sleep(0.3)
        started = time.monotonic()
        assert stop(proc, sig) == 0
        assert time.monotonic() - started < 5
    assert os.path.exists(tmp_path / "run.log")


def test_burst_while_attributes_are_calculated_keeps_service_up(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """Calculation updates the rows stitching writes; stitching must wait, never fail."""
    db.execute(generator.config_sql(Schemas()))
    with service_process(
        pg_dsn, tmp_path / "run.log", STREAM_CPS_STITCHING_BATCH_SIZE="2000"
    ) as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        rows = list(generator.events(seed=21, persons=2500, per_person=8))
        for start in range(0, len(rows), 2000):
            insert(db, rows[start : start + 2000])
        wait_until(lambda: unstitched(db) == 0, timeout=90, what="stitching the burst")

        def calculated() -> bool:
            row = db.execute(
                "SELECT count(*) FROM customer_attributes "
                "WHERE calculated IS NULL OR calculated < modified"
            ).fetchone()
            return row == (0,)

        wait_until(calculated, timeout=90, what="calculation to catch up")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert observed(db) == expected(db)
        assert stop(proc) == 0


def test_database_restart_is_survived(tmp_path: Path) -> None:
    """The service outlives a restart of its database (its own server, not the shared one)."""
    from stream_cps.db import schema
    from stream_cps_dev import embedded

    server = embedded.start(tmp_path / "pg")
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, Schemas())
            setup_rules(conn)
        with service_process(server.dsn, tmp_path / "run.log") as proc:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                wait_until(lambda: slot_active(conn), what="the slot")
                insert(conn, [event("before", 1, email="x@a")])
                wait_until(lambda: unstitched(conn) == 0, timeout=10, what="first event")
            server.stop("fast")
            time.sleep(2)
            server.start()
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                insert(conn, [event("after", 2, email="x@a", cookie="c")])
                wait_until(lambda: unstitched(conn) == 0, timeout=30, what="after the restart")
                assert observed(conn) == expected(conn)
            assert proc.poll() is None
            assert "database unavailable" in (tmp_path / "run.log").read_text()
            assert stop(proc) == 0
    finally:
        embedded.destroy(server)


def test_rows_reset_without_a_purge_signal_are_restitched(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """A bare `stitched = NULL` (no modified = NULL first) is found by the sweep."""
    setup_rules(db)
    proc = start_service(pg_dsn, tmp_path / "run.log")
    try:
        wait_until(lambda: slot_active(db), what="the slot")
        insert(db, [event("a", 1, email="x@a"), event("b", 2, email="y@a")])
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="first stitching")
        db.execute(
            "UPDATE cdp_ps.stitching_attributes_config SET value_expression = "
            "'upper(payload->>''email'')' WHERE attribute_id = 'email'"
        )
        db.execute("UPDATE customer_events SET stitched = NULL, identifiers = NULL WHERE id = 'b'")
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="restitching the reset row")
        row = db.execute("SELECT identifiers FROM customer_events WHERE id = 'b'").fetchone()
        assert row == (["email:Y@A"],)
    finally:
        stop(proc)


def test_calculation_can_be_left_to_another_process(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """attributes.enabled = false: this process stitches, another one calculates."""
    db.execute(generator.config_sql(Schemas()))
    with service_process(
        pg_dsn, tmp_path / "run.log", STREAM_CPS_ATTRIBUTES_ENABLED="false"
    ) as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        insert(db, list(generator.events(seed=4, persons=20, per_person=3)))
        wait_until(lambda: unstitched(db) == 0, timeout=10, what="stitching")
        time.sleep(1.0)  # several calculation poll intervals
        calculated = db.execute(
            "SELECT count(*) FILTER (WHERE calculated IS NOT NULL), count(*) "
            "FROM customer_attributes"
        ).fetchone()
        assert calculated is not None and calculated[0] == 0 < calculated[1]
        assert stop(proc) == 0


def test_a_burst_is_handed_to_the_sweep_and_stitched_earliest_first(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    """One transaction of many batches arrives in shuffled time order; the stream hands it to
    the read-ahead sweep, which takes it by event_time, so no entity is ever re-keyed."""
    db.execute(generator.config_sql(Schemas()))
    rows = list(generator.events(seed=31, persons=90, per_person=8))  # shuffled times
    with service_process(
        pg_dsn, tmp_path / "run.log", STREAM_CPS_STITCHING_BATCH_SIZE="40"
    ) as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        with db.transaction():
            insert(db, rows)
        wait_until(lambda: unstitched(db) == 0, timeout=60, what="stitching the burst")
        assert observed(db) == expected(db)
        reasons = dict(
            db.execute(
                "SELECT reason, count(*) FROM cdp_ps.entity_aliases GROUP BY reason"
            ).fetchall()
        )
        assert reasons.get("rekey", 0) == 0, reasons
        assert stop(proc) == 0


def test_a_database_that_does_not_exist_is_one_line_and_exit_2(
    pg_server: Any, tmp_path: Path
) -> None:
    """A permanent connection failure is not retried for ever: no retry loop, no traceback."""
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=no_such_database"
    with service_process(dsn, tmp_path / "run.log") as proc:
        assert proc.wait(timeout=30) == 2
    output = (tmp_path / "run.log").read_text()
    assert "stream-cps: cannot connect to PostgreSQL" in output and "no_such_database" in output
    assert "Traceback" not in output and "retrying" not in output


def test_a_background_thread_that_fails_makes_the_process_exit_non_zero(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Calculation meets an error no retry fixes (its context table is gone): the whole process
    stops, and systemd or Kubernetes see it in the exit code, never a 0."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        schema.migrate(conn, Schemas())
        setup_rules(conn)
        with service_process(pg_dsn, tmp_path / "run.log") as proc:
            wait_until(lambda: slot_active(conn), what="the slot")
            conn.execute("DROP TABLE public.context CASCADE")
            code = proc.wait(timeout=30)
    output = (tmp_path / "run.log").read_text()
    assert code != 0, output[-3000:]
    assert "attributes thread failed; stopping the service" in output
