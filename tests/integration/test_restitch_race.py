"""The guide's restitch-one-customer script while that customer keeps receiving events.

The script's ``UPDATE customer_events`` reads the events as of its statement's snapshot; an event
the stitcher added to the entity just before (after that snapshot) keeps ``stitched`` set, then
the purge deletes the entity: before the fix it was left stitched inside no entity (1-2 per run
of 10 restitches during 130 inserts), and a later event with the same e-mail founded a second
entity. Now the purge also resets every still-stitched event of the entity it deletes.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.quarantine import Limits
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

RESTITCH_ONE = (
    "WITH entities AS (UPDATE customer_attributes SET modified = NULL "
    "WHERE customer_entity_id = %s RETURNING identifiers) "
    "UPDATE customer_events SET stitched = NULL, identifiers = NULL "
    "FROM entities WHERE customer_events.identifiers <@ entities.identifiers"
)

OFF = Limits(0)  # the service below runs with stitching.quarantine_limit = 0


def orphans(conn: psycopg.Connection[Any]) -> int:
    """Stitched events with identifiers that no entity holds."""
    row = conn.execute(
        "SELECT count(*) FROM cdp_ce.customer_events e WHERE e.stitched IS NOT NULL "
        "AND e.identifiers <> '{}' AND NOT EXISTS (SELECT 1 FROM customer_attributes ca "
        "WHERE e.identifiers <@ ca.identifiers)"
    ).fetchone()
    return int(row[0]) if row else -1


def test_restitch_one_during_inserts_leaves_no_event_outside_an_entity(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    insert(db, [event("e0000", 0, email="x@a", cookie="c0")])
    rng = random.Random(7)
    # One e-mail meets 780 cookies here, a hub by the default quarantine limit; this test is
    # about the race with a growing entity, so the quarantine is off.
    with service_process(pg_dsn, tmp_path / "run.log", STREAM_CPS_STITCHING_QUARANTINE_LIMIT="0"):
        wait_until(lambda: slot_active(db), what="the slot")
        wait_until(lambda: unstitched(db) == 0, what="the first event")
        for round_ in range(6):
            done = threading.Event()

            def feed(round_: int = round_, done: threading.Event = done) -> None:
                with psycopg.connect(pg_dsn, autocommit=True) as conn:
                    for n in range(130):
                        k = round_ * 1000 + n + 1
                        insert(conn, [event(f"e{k:04d}", k, email="x@a", cookie=f"c{k}")])
                        time.sleep(rng.uniform(0, 0.004))
                done.set()

            feeder = threading.Thread(target=feed)
            feeder.start()
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                while not done.is_set():
                    admin.execute(RESTITCH_ONE, [entity_id_for("e0000")])
                    time.sleep(rng.uniform(0.005, 0.05))
            feeder.join()
            wait_until(lambda: unstitched(db) == 0, timeout=30, what="stitching")
            wait_until(
                lambda: (
                    not db.execute(
                        "SELECT 1 FROM customer_attributes WHERE modified IS NULL"
                    ).fetchone()
                ),
                timeout=30,
                what="the purge",
            )
            assert orphans(db) == 0, f"round {round_}"
    assert observed(db) == expected(db, OFF)
    # one customer: a chain of e-mails connects every event
    assert set(observed(db).values()) == {entity_id_for("e0000")}
