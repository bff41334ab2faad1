"""Rows PostgreSQL accepts but Python cannot read as-is never stop stitching.

``customer_events.event_time`` accepts 'infinity', '-infinity', years after 9999 and years BC;
psycopg cannot load any of them into a ``datetime``. Each such row is stitched with its
identifiers, recorded in ``stitching_errors`` with the value it had, and everyone else goes on
being stitched, on the real service and in the sweep's read-ahead across batch boundaries.
Odd payloads (JSON null, an array, deep nesting, megabytes) are stitched with what the rules
find in them.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from stream_cps import config
from stream_cps.db import schema, timestamps
from stream_cps.db.connect import connect
from stream_cps.stitching.stitcher import Stitcher
from tests.integration.test_service import slot_active
from tests.support import (
    event,
    expected,
    insert,
    observed,
    service_process,
    setup_rules,
    unstitched,
    wait_until,
)

OUT_OF_RANGE = ["infinity", "-infinity", "20000-01-01 00:00:00+00", "4713-01-01 00:00:00+00 BC"]


def insert_raw(conn: psycopg.Connection[Any], rows: list[tuple[str, str, str]]) -> None:
    """(id, event_time as text, payload as JSON text): the text goes to PostgreSQL as-is."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, "
            "payload) VALUES (%s, 'web', 'page_view', '1', %s::timestamptz, %s::jsonb)",
            rows,
        )


def reading(dsn: str) -> psycopg.Connection[Any]:
    """A connection of the test's own that can load every timestamp (for the oracle); the
    stitcher's connections get no such help."""
    conn = connect(dsn, autocommit=True)
    timestamps.register(conn)
    return conn


def errors(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {
        str(r[0]): str(r[1])
        for r in conn.execute(
            "SELECT event_id, message FROM cdp_ps.stitching_errors WHERE attribute_id IS NULL"
        )
    }


def test_out_of_range_times_and_odd_payloads_do_not_stop_the_service(
    pg_dsn: str, tmp_path: Path
) -> None:
    with reading(pg_dsn) as conn:
        schema.migrate(conn, config.Schemas())
        setup_rules(conn)
        with service_process(pg_dsn, tmp_path / "run.log") as proc:
            wait_until(lambda: slot_active(conn), what="the slot")
            insert(conn, [event("good-1", 1, email="ann@x", cookie="c1")])
            poison = [
                (f"t{n}", when, json.dumps({"email": "ann@x", "cookie": f"p{n}"}))
                for n, when in enumerate(OUT_OF_RANGE)
            ]
            deep = '{"email": "deep@x", "n": ' + "[" * 2000 + "1" + "]" * 2000 + "}"
            big = json.dumps({"email": "big@x", "blob": "x" * 5_000_000})
            odd = [
                ("null-payload", "2026-01-01 00:00:00+00", "null"),
                ("array-payload", "2026-01-01 00:00:00+00", '[{"email": "ann@x"}]'),
                ("deep", "2026-01-01 00:00:00+00", deep),
                ("big", "2026-01-01 00:00:00+00", big),
            ]
            insert_raw(conn, poison + odd)
            insert(conn, [event("good-2", 5, email="bob@x", cookie="c1")])
            wait_until(lambda: unstitched(conn) == 0, timeout=60, what="every row stitched")
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert observed(conn) == expected(conn)
        found = errors(conn)
        assert set(found) == {f"t{n}" for n in range(len(OUT_OF_RANGE))}
        for n, when in enumerate(OUT_OF_RANGE):
            assert when.split(" ")[0] in found[f"t{n}"], found[f"t{n}"]
        identifiers = dict(conn.execute("SELECT id, identifiers FROM customer_events"))
        # The out-of-range rows joined ann's entity through their e-mail, like any other row.
        entity = conn.execute(
            "SELECT identifiers FROM customer_attributes WHERE 'email:ann@x' = ANY(identifiers)"
        ).fetchone()
        assert entity is not None
        assert {f"cookie:p{n}" for n in range(len(OUT_OF_RANGE))} <= set(entity[0])
        assert identifiers["null-payload"] == [] and identifiers["array-payload"] == []
        assert identifiers["deep"] == ["email:deep@x"] and identifiers["big"] == ["email:big@x"]


def test_the_read_ahead_sweep_walks_out_of_range_times_exactly_once(
    pg_dsn: str, settings: config.Settings
) -> None:
    """Many out-of-range rows across batches of 3: the cursor is exact (PostgreSQL's own text
    of the time), so a batch is never read twice nor a row skipped, with and without the
    second connection, and the result equals the oracle's."""
    local = settings.replace(**{"stitching.batch_size": 3})
    with connect(pg_dsn, autocommit=True) as conn, connect(pg_dsn, autocommit=True) as ahead:
        schema.migrate(conn, local.schemas)
        setup_rules(conn)
        times = OUT_OF_RANGE * 4 + ["2026-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00"]
        rows = [
            (f"e{n:02d}", when, json.dumps({"email": f"u{n % 5}@x", "cookie": f"k{n % 7}"}))
            for n, when in enumerate(times)
        ]
        insert_raw(conn, rows)
        results = list(Stitcher(local).sweep(conn, ahead, threading.Event()))
        assert sum(r.events for r in results) == len(rows)
        assert unstitched(conn) == 0
        with reading(pg_dsn) as check:
            assert observed(check) == expected(check)
        assert len(errors(conn)) == len(OUT_OF_RANGE) * 4


TIMES = st.one_of(
    st.sampled_from([*OUT_OF_RANGE, "0001-01-01 00:00:00+14", "9999-12-31 23:59:59-14"]),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
)
PAYLOADS = st.one_of(
    st.just("null"),
    st.just("[]"),
    st.just('"a string"'),
    st.builds(
        lambda e, c: json.dumps({"email": e, "cookie": c}),
        st.sampled_from(["a@x", "b@x", None, "", " None "]),
        st.sampled_from(["k1", "k2", None]),
    ),
)


@hyp_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(TIMES, PAYLOADS), min_size=1, max_size=12))
def test_any_accepted_row_is_stitched_and_matches_the_oracle(
    pg_server: Any, rows: list[tuple[str, str]]
) -> None:
    name = f"poison_{abs(hash(tuple(rows))) % (1 << 30)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
    try:
        local = config.load(flags={"dsn": dsn, "stitching.batch_size": 4}, environ={})
        with connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, local.schemas)
            setup_rules(conn)
            insert_raw(
                conn, [(f"r{n:02d}", when, payload) for n, (when, payload) in enumerate(rows)]
            )
            for _ in Stitcher(local).sweep(conn):
                pass
            assert unstitched(conn) == 0
            with reading(dsn) as check:
                assert observed(check) == expected(check)
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
