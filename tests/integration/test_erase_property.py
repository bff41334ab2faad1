"""Erase at a random point of the stream, then the rest of the stream (with the erased events
sent again, as a replay would): the result is the partition of every event except the erased
ones, as if the erase had been applied first. Real PostgreSQL, hypothesis-drawn graphs."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from stream_cps import config
from stream_cps.db import schema
from stream_cps.service import process
from stream_cps.stitching.stitcher import Stitcher
from tests import oracle
from tests.support import event, insert, observed, setup_rules

EMAILS = [f"p{n}@x" for n in range(5)]
COOKIES = [f"c{n}" for n in range(6)]
EVENTS = st.lists(
    st.tuples(st.sampled_from([None, *EMAILS]), st.sampled_from([None, *COOKIES])),
    min_size=2,
    max_size=14,
)


def stitch_all(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for _ in stitcher.sweep(conn):
        pass


@hyp_settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    pairs=EVENTS, cut=st.integers(1, 13), target=st.sampled_from(EMAILS), batch=st.integers(1, 5)
)
def test_erase_at_any_point_equals_never_having_the_events(
    pg_server: Any, pairs: list[tuple[str | None, str | None]], cut: int, target: str, batch: int
) -> None:
    name = f"erase_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
    try:
        settings = config.load(
            flags={"dsn": dsn, "stitching.batch_size": batch, "opensearch.outbox": "always"},
            environ={},
        )
        rows = [
            event(f"e{n:02d}", n, **{k: v for k, v in (("email", e), ("cookie", c)) if v})
            for n, (e, c) in enumerate(pairs)
        ]
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            setup_rules(conn)
            stitcher = Stitcher(settings)
            insert(conn, rows[:cut])
            stitch_all(stitcher, conn)
            erased: set[str] = set()
            holder = conn.execute(
                "SELECT entity_id FROM cdp_ps.identifier_entities WHERE identifier = %s",
                [f"email:{target}"],
            ).fetchone()
            if holder is not None:
                erased = {
                    r[0]
                    for r in conn.execute(
                        "SELECT e.id FROM cdp_ce.customer_events e JOIN customer_attributes ca "
                        "ON e.identifiers <@ ca.identifiers AND e.identifiers <> '{}' "
                        "WHERE ca.customer_entity_id = %s",
                        [holder[0]],
                    )
                }
                process.erase(settings, str(holder[0]), None, None, suppress=False, yes=True)
            # the rest of the stream, and the erased events again (a replay)
            again = [r for r in rows[:cut] if r[0] in erased]
            insert(conn, rows[cut:])
            stitch_all(stitcher, conn)
            for r in again:  # re-inserted one by one: each must be dropped
                insert(conn, [r])
                stitch_all(stitcher, conn)
            stored = {r[0] for r in conn.execute("SELECT id FROM cdp_ce.customer_events")}
            assert stored.isdisjoint(erased)
            kept = [
                (eid, when, idents or [])
                for eid, when, idents in conn.execute(
                    "SELECT id, event_time, identifiers FROM cdp_ce.customer_events"
                )
            ]
            assert observed(conn) == oracle.partition(kept)
            assert {r[0] for r in rows} - erased == stored
    finally:
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
