"""After the sweep stitched a backlog, the replication loop moves its slot past it instead of
reading every change of it back from the stream (``SlotSource.skip_to``)."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.service.replication import ReplicationLoop
from stream_cps.sources.postgres.readers import reader
from stream_cps.sources.postgres.slot import SlotBatch
from tests.support import event, insert, setup_rules, unstitched, wait_until

BATCH = 100
TRANSACTIONS, PER_TRANSACTION = 12, 50


def confirmed(db: psycopg.Connection[Any], slot: str) -> int:
    row = db.execute(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
        "WHERE slot_name = %s",
        [slot],
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def wal_now(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("kind", ["stream", "peek"])
def test_a_swept_backlog_is_not_read_back_from_the_slot(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    setup_rules(db)
    local = settings.replace(**{"stitching.batch_size": BATCH, "stitching.replication": kind})
    first = reader(local)
    first.ensure(db)  # the slot exists before the backlog is written: it carries all of it
    first.close()
    for t in range(TRANSACTIONS):
        insert(
            db,
            [
                event(f"e{t}-{i}", t * 100 + i, cookie=f"c{t}-{i % 10}")
                for i in range(PER_TRANSACTION)
            ],
        )
    backlog_end = wal_now(db)

    stop = threading.Event()
    loop = ReplicationLoop(local, stop)
    handed: list[str] = []
    poll = loop.source.poll

    def counting(conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
        batch = poll(conn, max_changes, wait)
        handed.extend(batch.event_ids)
        return batch

    monkeypatch.setattr(loop.source, "poll", counting)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: unstitched(db) == 0, what="the backlog stitched")
        wait_until(lambda: confirmed(db, local.stitching.slot_name) >= backlog_end, what="slot")
        # The stream still carries what comes after the skip.
        insert(db, [event("after", 5000, cookie="c0-1")])
        wait_until(lambda: unstitched(db) == 0, what="an event after the backlog stitched")
        wait_until(lambda: "after" in handed, what="the event after it handed out by the slot")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    total = TRANSACTIONS * PER_TRANSACTION
    # The first poll (whole transactions, up to a batch) starts the sweep; without the skip
    # every later change of the backlog would be handed out too, a batch per poll.
    backlog_handed = [i for i in handed if i != "after"]
    assert len(backlog_handed) <= 2 * BATCH < total, len(backlog_handed)
    rows = db.execute(
        "SELECT count(DISTINCT c.entity_id) FROM cdp_ce.customer_events e "
        "CROSS JOIN LATERAL unnest(e.identifiers) AS i(x) "
        "JOIN cdp_ps.identifier_entities c ON c.identifier = i.x"
    ).fetchone()
    assert rows == (TRANSACTIONS * 10,)  # one entity per cookie, "after" joined c0-1's
