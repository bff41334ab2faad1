"""One suite, two slot readers: the replication stream and SQL peek + advance, on real
PostgreSQL. The replication loop relies on exactly these behaviours from either.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from stream_cps import config
from stream_cps.sources.postgres.readers import PeekReader, StreamReader, reader
from stream_cps.sources.postgres.slot import SlotSource
from tests.support import event, insert

READERS = {"stream": StreamReader, "peek": PeekReader}


@pytest.fixture(params=sorted(READERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def local(settings: config.Settings, kind: str) -> config.Settings:
    return settings.replace(**{"stitching.replication": kind})


@pytest.fixture
def slot(local: config.Settings, db: psycopg.Connection[Any], kind: str) -> Iterator[SlotSource]:
    source = reader(local)
    assert isinstance(source, READERS[kind])
    source.ensure(db)
    yield source
    source.close()


def collect(
    source: SlotSource,
    conn: psycopg.Connection[Any],
    want: int,
    timeout: float = 15.0,
    ack: bool = True,
) -> tuple[list[str], int | None]:
    """Poll until ``want`` ids arrived (or the time is up), acknowledging each batch as the
    replication loop does (unless ``ack`` is off): the ids in order, the last position."""
    ids: list[str] = []
    position: int | None = None
    deadline = time.monotonic() + timeout
    while len(ids) < want and time.monotonic() < deadline:
        batch = source.poll(conn, 1000, 0.1)
        ids += batch.event_ids
        if batch.ack_lsn is not None:
            position = batch.ack_lsn
            if ack:
                source.ack(conn, position)
    return ids, position


def test_ensure_creates_an_insert_only_publication_and_a_pgoutput_slot(
    slot: SlotSource, db: psycopg.Connection[Any]
) -> None:
    slot.ensure(db)  # a second time changes nothing
    publication = db.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication "
        "WHERE pubname = %s",
        [slot.publication],
    ).fetchone()
    assert publication == (True, False, False, False)
    assert published_columns(db, slot) == ["id", "stitched"]
    assert db.execute(
        "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", [slot.slot]
    ).fetchone() == ("pgoutput",)


def published_columns(db: psycopg.Connection[Any], slot: SlotSource) -> list[str]:
    row = db.execute(
        "SELECT attnames FROM pg_publication_tables WHERE pubname = %s AND tablename = %s",
        [slot.publication, "customer_events"],
    ).fetchone()
    assert row is not None
    return sorted(row[0])


def assert_streams(source: SlotSource, db: psycopg.Connection[Any]) -> None:
    """An event inserted now reaches ``source``."""
    insert(db, [event("a", 1)])
    ids, _ = collect(source, db, 1)
    assert ids == ["a"]


def test_the_stream_carries_only_the_columns_the_reader_decodes(
    slot: SlotSource, db: psycopg.Connection[Any]
) -> None:
    """The payload is never sent: the walsender would turn every one into text for nothing."""
    assert_streams(slot, db)
    (relation,) = slot.decoder.relations.values()
    assert relation.columns == ("id", "stitched")


def test_an_existing_publication_of_every_column_gets_the_column_list(
    local: config.Settings, db: psycopg.Connection[Any]
) -> None:
    """A database set up by an earlier version (or by hand) is narrowed by ``ensure``."""
    db.execute(
        "CREATE PUBLICATION stream_cps_events FOR TABLE cdp_ce.customer_events "
        "WITH (publish = 'insert, update')"
    )
    source = reader(local)
    try:
        source.ensure(db)
        assert published_columns(db, source) == ["id", "stitched"]
        assert_streams(source, db)
        (relation,) = source.decoder.relations.values()
        assert relation.columns == ("id", "stitched")
    finally:
        source.close()


def test_committed_inserts_arrive_in_commit_order_and_stitched_rows_do_not(
    slot: SlotSource, db: psycopg.Connection[Any]
) -> None:
    insert(db, [event("a", 1), event("b", 2)])
    db.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, "
        "payload, stitched, identifiers) VALUES ('done', 'web', 'page_view', '1', now(), "
        "'{}', now(), '{}')"
    )
    insert(db, [event("c", 3)])
    ids, ack = collect(slot, db, 3)
    assert ids == ["a", "b", "c"]
    assert ack is not None and ack > 0


def test_an_open_transaction_is_handed_out_only_once_it_commits(
    slot: SlotSource, db: psycopg.Connection[Any], local: config.Settings
) -> None:
    with psycopg.connect(local.dsn) as writer:
        insert(writer, [event("late", 1)])
        writer.execute("SELECT pg_current_xact_id()")  # keep the transaction open
        insert(db, [event("early", 2)])
        ids, _ = collect(slot, db, 1)
        assert ids == ["early"]
        writer.commit()
    ids, _ = collect(slot, db, 1)
    assert ids == ["late"]


def test_what_was_not_acknowledged_is_handed_out_again_after_a_restart(
    local: config.Settings, db: psycopg.Connection[Any], slot: SlotSource
) -> None:
    insert(db, [event("a", 1)])
    ids, ack = collect(slot, db, 1)
    assert ids == ["a"] and ack is not None
    insert(db, [event("b", 2)])
    ids, _ = collect(slot, db, 1, ack=False)
    assert ids == ["b"]  # ... but never acknowledged: a crash before the ack
    slot.close()
    again = reader(local)
    try:
        ids, _ = collect(again, db, 1)
        assert ids == ["b"]  # "a" was acknowledged and stays behind
    finally:
        again.close()


def test_an_idle_poll_returns_nothing_and_lets_the_slot_move_on(
    slot: SlotSource, db: psycopg.Connection[Any]
) -> None:
    insert(db, [event("a", 1)])
    ids, ack = collect(slot, db, 1)
    assert ids == ["a"] and ack is not None
    db.execute("CREATE TABLE unrelated (x int)")  # WAL that carries nothing of ours
    db.execute("INSERT INTO unrelated VALUES (1)")
    started = time.monotonic()
    deadline = started + 15
    heartbeat: int | None = None
    while time.monotonic() < deadline:
        batch = slot.poll(db, 1000, 0.2)
        assert batch.event_ids == []
        if batch.ack_lsn is not None and batch.ack_lsn > ack:
            heartbeat = batch.ack_lsn
            break
    assert heartbeat is not None, "no heartbeat position past the last event"
    slot.ack(db, heartbeat)
    assert slot.lag_bytes(db) < 1 << 20


def test_acknowledging_an_older_position_does_not_move_the_slot_back(
    local: config.Settings, slot: SlotSource, db: psycopg.Connection[Any]
) -> None:
    insert(db, [event("a", 1)])
    _, first = collect(slot, db, 1, ack=False)
    insert(db, [event("b", 2)])
    _, second = collect(slot, db, 1, ack=False)
    assert first is not None and second is not None and second > first
    slot.ack(db, second)
    slot.ack(db, first)  # a late, older acknowledgement
    slot.close()
    again = reader(local)
    try:
        insert(db, [event("c", 3)])
        ids, _ = collect(again, db, 1)
        assert ids == ["c"]  # neither "a" nor "b" comes back
    finally:
        again.close()


def test_a_publication_of_the_whole_schema_is_left_as_it_is(
    local: config.Settings, db: psycopg.Connection[Any]
) -> None:
    """A hand-made publication that takes the table through its schema cannot carry a column
    list: the reader works with it as it is (stepping over the payload) instead of failing."""
    db.execute(
        "CREATE PUBLICATION stream_cps_events FOR TABLES IN SCHEMA cdp_ce WITH (publish = 'insert')"
    )
    source = reader(local)
    try:
        source.ensure(db)
        assert len(published_columns(db, source)) > 2
        assert_streams(source, db)
    finally:
        source.close()


def test_a_publication_someone_else_owns_is_used_as_it_is_with_a_warning(
    local: config.Settings, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Narrowing needs the publication's owner; a service role that is not must still start
    (it did before the column list), and say how the owner can narrow it."""
    role = "cps_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    db.execute(f"GRANT USAGE ON SCHEMA cdp_ce TO {role}")
    db.execute(f"GRANT SELECT ON cdp_ce.customer_events TO {role}")
    db.execute(
        "CREATE PUBLICATION stream_cps_events FOR TABLE cdp_ce.customer_events "
        "WITH (publish = 'insert')"
    )
    dsn = make_conninfo(local.dsn, user=role)
    source = reader(local.replace(dsn=dsn))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            source.ensure(conn)
        assert len(published_columns(db, source)) > 2
        assert "only its owner can change it" in caplog.text
        assert_streams(source, db)
    finally:
        source.close()  # the database's teardown drops the slot
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")
