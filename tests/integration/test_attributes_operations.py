"""Due entities, the guide's scripts, definition reloads, storing and concurrent stitching."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.attributes import calculate
from tests.integration.test_attributes_helpers import World, ev


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


SUM = {"type": "sum", "value": "payload->>'n'"}


def psql(settings: config.Settings, statement: str) -> None:
    """A plain session with the default search_path, as the guide's scripts run."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(statement)


def state(world: World, entity_id: str) -> tuple[Any, ...]:
    row = world.db.execute(
        "SELECT calculated IS NOT NULL AND calculated >= modified, version, "
        "customer_events_count FROM customer_attributes WHERE customer_entity_id = %s",
        [entity_id],
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_only_due_entities_are_calculated(world: World) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    b = world.entity([ev({"n": 2}, 1)])
    assert world.run() == 2
    assert world.run() == 0  # nothing due
    world.add_events(a, [ev({"n": 5}, 2)])  # as stitching does: events + modified
    assert world.run() == 1
    assert world.attrs(a) == {"s": 6}
    assert world.attrs(b) == {"s": 2}


def test_modified_null_is_never_calculated(world: World) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    world.db.execute("UPDATE customer_attributes SET modified = NULL")
    assert world.run() == 0
    assert world.attrs(a) == {}


def test_store_sets_version_and_outbox(world: World) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1), ev({"n": 2}, 2)])
    world.run()
    calculated, version, count = state(world, a)
    assert calculated and count == 2 and version > 0
    outbox = world.db.execute("SELECT entity_id, op, version FROM cdp_attr.outbox").fetchall()
    assert outbox == [(a, "upsert", version)]
    world.touch(a)
    world.run()
    _, version2, _ = state(world, a)
    assert version2 > version
    assert world.db.execute("SELECT count(*) FROM cdp_attr.outbox").fetchone() == (2,)


def test_guide_recalculate_all_and_one(world: World, settings: config.Settings) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    b = world.entity([ev({"n": 2}, 1)])
    world.run()
    # change the events behind the worker's back: only a forced recalculation sees it
    world.db.execute("UPDATE cdp_ce.customer_events SET payload = '{\"n\": 100}'")
    assert world.run() == 0
    psql(
        settings,
        f"UPDATE customer_attributes SET calculated = NULL WHERE customer_entity_id = '{a}'",
    )
    assert world.run() == 1
    assert (world.attrs(a), world.attrs(b)) == ({"s": 100}, {"s": 2})
    psql(settings, "UPDATE customer_attributes SET calculated = NULL;")
    assert world.run() == 2
    assert world.attrs(b) == {"s": 100}


def test_definition_change_applies_to_every_entity_without_restart(world: World) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1, "c": "x"}, 1)])
    b = world.entity([ev({"n": 2, "c": "y"}, 1)])
    world.run()
    world.attribute("s", {"type": "max", "value": "payload->>'n'"}, "string")
    world.attribute("c", {"type": "list", "value": "payload->>'c'"})
    assert world.run() == 2  # same worker, no restart
    assert world.attrs(a) == {"s": "1", "c": ["x"]}
    assert world.attrs(b) == {"s": "2", "c": ["y"]}
    world.db.execute("UPDATE public.attributes SET definition = NULL WHERE id = 'c'")
    assert world.run() == 2
    assert world.attrs(a) == {"s": "1"}
    assert world.run() == 0


def test_meta_attribute_change_reloads(world: World) -> None:
    world.meta("m", "SELECT 1 AS x FROM base")
    world.attribute(
        "m_count", {"type": "custom", "query": "SELECT count(*) AS value FROM m"}, "int"
    )
    a = world.entity([ev({}, 1), ev({}, 2)])
    world.run()
    assert world.attrs(a) == {"m_count": 2}
    world.meta("m", "SELECT 1 AS x FROM base WHERE event_time > '2024-01-01 00:01:30+00'")
    world.run()
    assert world.attrs(a) == {"m_count": 1}


def test_merged_and_rekeyed_entities(world: World) -> None:
    """What stitching leaves after a merge: one row with the union of identifiers, modified."""
    world.attribute("s", SUM, "int")
    world.attribute("first", {"type": "first", "value": "payload->>'c'"})
    a = world.entity([ev({"n": 1, "c": "late"}, 5)])
    b = world.entity([ev({"n": 2, "c": "early"}, 1)])
    world.run()
    world.db.execute(
        "UPDATE customer_attributes SET identifiers = %s, modified = clock_timestamp() "
        "WHERE customer_entity_id = %s",
        [[f"email:{a}", f"email:{b}"], b],
    )
    world.db.execute("DELETE FROM customer_attributes WHERE customer_entity_id = %s", [a])
    world.run()
    assert world.attrs(b) == {"s": 3, "first": "early"}
    assert state(world, b)[2] == 2
    # re-keyed: a new id takes over the identifiers
    world.db.execute(
        "UPDATE customer_attributes SET customer_entity_id = 'new-id', "
        "modified = clock_timestamp() WHERE customer_entity_id = %s",
        [b],
    )
    world.run()
    assert world.attrs("new-id") == {"s": 3, "first": "early"}


def test_concurrent_modification_keeps_entity_due(
    world: World, settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stitcher changes the entity while its attributes are computed: nothing is lost."""
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    original = calculate.BatchCalculator._compute
    calls = 0

    def stitch_meanwhile(self: Any, conn: Any, attrs: Any, ids: list[str]) -> Any:
        nonlocal calls
        result = original(self, conn, attrs, ids)
        calls += 1
        if calls == 1:
            with psycopg.connect(settings.dsn, autocommit=True) as stitcher:
                stitcher.execute(
                    "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, "
                    "event_time, payload, stitched, identifiers) VALUES ('late', 'web', 'x', "
                    "'1', now(), '{\"n\": 10}', now(), %s)",
                    [[f"email:{a}"]],
                )
                stitcher.execute(
                    "UPDATE customer_attributes SET modified = clock_timestamp() "
                    "WHERE customer_entity_id = %s",
                    [a],
                )
        return result

    monkeypatch.setattr(calculate.BatchCalculator, "_compute", stitch_meanwhile)
    assert world.run() == 0  # computed, but the entity changed meanwhile: not stored
    assert world.attrs(a) == {}
    assert world.run() == 1  # still due, so the next pass gets it right
    assert calls == 2
    assert world.attrs(a) == {"s": 11}
    assert world.db.execute("SELECT count(*) FROM cdp_attr.outbox").fetchone() == (1,)


def test_stitcher_holding_the_row_lock(world: World, settings: config.Settings) -> None:
    """A stitch transaction holds the row: calculation skips it without waiting (it locks with
    SKIP LOCKED, so it cannot deadlock with the stitcher), the row stays due, and it is
    calculated once the stitch has committed."""
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    stitcher = psycopg.connect(settings.dsn)
    stitcher.execute(
        "UPDATE customer_attributes SET modified = clock_timestamp() WHERE customer_entity_id = %s",
        [a],
    )
    timer = threading.Timer(3.0, stitcher.commit)
    timer.start()
    try:
        worker_conn = psycopg.connect(settings.dsn, autocommit=True)
        world.worker._max_batches = 1
        started = time.monotonic()
        assert world.worker.run_pass(worker_conn) == 0
        assert time.monotonic() - started < 2.5  # did not wait for the stitcher's commit
        timer.join()
        assert world.worker.run_pass(worker_conn) == 1
        assert world.attrs(a) == {"s": 1}
        worker_conn.close()
    finally:
        timer.join()
        stitcher.close()


def test_cache_refresh(world: World, settings: config.Settings, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    world.attribute("color", {"type": "last", "value": "payload->>'c'"})
    world.attribute("tags", {"type": "list", "value": "jsonb_array_elements_text(payload->'t')"})
    world.attribute("never", {"type": "sum", "value": "payload->>'nope'"}, "int")
    world.entity([ev({"c": "red", "t": ["a", "b"]}, 1)])
    world.entity([ev({"c": "red", "t": ["b"]}, 1)])
    world.entity([ev({"c": "blue"}, 1)])
    world.run()  # empty caches with entities: filled at once
    per_attribute = dict(
        world.db.execute(
            "SELECT attribute_id, count FROM cdp_attr."
            "cached_attributes_counts_customers_per_attribute"
        ).fetchall()
    )
    assert per_attribute == {"color": 3, "tags": 2, "never": 0}
    values = world.db.execute(
        "SELECT attribute_id, value, count FROM cdp_attr.cached_attribute_values_counts "
        "ORDER BY 1, 2"
    ).fetchall()
    assert values == [("color", "blue", 1), ("color", "red", 2), ("tags", "a", 1), ("tags", "b", 2)]
    assert any(r.message.startswith("CACHE:") for r in caplog.records)
    world.entity([ev({"c": "blue"}, 1)])
    world.run()
    count = world.db.execute(
        "SELECT count FROM cdp_attr.cached_attribute_values_counts WHERE value = 'blue'"
    ).fetchone()
    assert count == (1,)  # not due yet (interval 300 s)
    caplog.clear()
    psql(
        settings,
        "UPDATE cdp_attr.cached_attributes_counts_customers_per_attribute SET modified = NULL;",
    )
    world.run()
    count = world.db.execute(
        "SELECT count FROM cdp_attr.cached_attribute_values_counts WHERE value = 'blue'"
    ).fetchone()
    assert count == (2,)
    assert [r for r in caplog.records if r.message.startswith("CACHE:")]
    psql(settings, "UPDATE cdp_attr.cached_attribute_values_counts SET modified = NULL;")
    assert world.worker._caches.due(world.db) == "modified set to NULL"
    world.run()
    assert world.worker._caches.due(world.db) is None


def test_cache_interval(world: World, settings: config.Settings) -> None:
    fast = settings.replace(**{"attributes.cache_interval": 0})
    world = World(world.db, fast)
    world.attribute("c", {"type": "value", "value": "payload->>'c'"})
    world.entity([ev({"c": "x"}, 1)])
    world.run()
    world.entity([ev({"c": "x"}, 1)])
    world.run()
    assert world.db.execute(
        "SELECT count FROM cdp_attr.cached_attribute_values_counts"
    ).fetchone() == (2,)


def test_run_forever_stops_and_calculates(world: World, settings: config.Settings) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 4}, 1)])
    stop = threading.Event()
    thread = threading.Thread(target=world.worker.run_forever, args=(stop,))
    thread.start()
    try:
        for _ in range(100):
            if world.attrs(a):
                break
            stop.wait(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert world.attrs(a) == {"s": 4}


def test_modified_later_than_the_calculation_start_is_not_due_again(world: World) -> None:
    """The stitcher stamps modified with clock_timestamp(), which may be later than the start of
    the transaction that calculates that very change."""
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    world.db.execute(
        "UPDATE customer_attributes SET modified = clock_timestamp() + interval '1 minute'"
    )
    assert world.run() == 1
    assert world.run() == 0
    assert state(world, a)[0]


def test_stitching_is_not_blocked_while_a_batch_is_computed(
    world: World, settings: config.Settings
) -> None:
    """Rows are locked only by the final UPDATE of a batch, never while it is computed."""
    world.attribute(
        "slow", {"type": "custom", "query": "SELECT 1 AS value FROM pg_sleep(1.5)"}, "int"
    )
    a = world.entity([ev({"n": 1}, 1)])
    worker_conn = psycopg.connect(settings.dsn, autocommit=True)
    thread = threading.Thread(target=world.worker.run_pass, args=(worker_conn,))
    thread.start()
    try:
        with psycopg.connect(settings.dsn, autocommit=True) as stitcher:
            stitcher.execute("SET statement_timeout = '500ms'")
            for _ in range(50):  # wait until the batch is running
                busy = stitcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
                if busy and busy[0]:
                    break
                threading.Event().wait(0.05)
            stitcher.execute(
                "UPDATE customer_attributes SET modified = clock_timestamp() "
                "WHERE customer_entity_id = %s",
                [a],
            )  # fails with a timeout if the calculation held the row
    finally:
        thread.join()
        worker_conn.close()
    assert world.attrs(a) == {}  # changed meanwhile: not stored, still due
    assert world.run() == 1


def test_run_forever_survives_a_lost_connection(world: World, settings: config.Settings) -> None:
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 1}, 1)])
    stop = threading.Event()
    thread = threading.Thread(target=world.worker.run_forever, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: world.attrs(a) == {"s": 1})
        killed = world.db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'stream-cps attributes'"
        ).fetchone()
        assert killed == (1,)
        b = world.entity([ev({"n": 2}, 1)])
        wait_for(lambda: world.attrs(b) == {"s": 2})
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def wait_for(condition: Any, seconds: float = 15.0) -> None:
    pause = threading.Event()
    for _ in range(int(seconds / 0.1)):
        if condition():
            return
        pause.wait(0.1)
    raise AssertionError("condition not met in time")


def test_cancelled_batch_is_retried_not_fatal(
    world: World, settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_cancel_backend on one of the worker's own statements: the pass goes on."""
    world.attribute("s", SUM, "int")
    a = world.entity([ev({"n": 3}, 1)])
    original = calculate.BatchCalculator._load_events
    calls = 0

    def cancelled_once(self: Any, conn: Any, ids: list[str], large: bool = False) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            conn.execute("SET LOCAL statement_timeout = '10ms'")
            conn.execute("SELECT pg_sleep(1)")
        original(self, conn, ids, large)

    monkeypatch.setattr(calculate.BatchCalculator, "_load_events", cancelled_once)
    assert world.run() == 0
    assert world.run() == 1
    assert world.attrs(a) == {"s": 3}
