"""A huge entity (a hub that glued tens of thousands of logins) must not starve the rest, and
every statement the worker runs is under a timeout."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from stream_cps import config
from tests.integration.test_attributes_helpers import T0, World, ev
from tests.support import wait_until


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


def hub(db: psycopg.Connection[Any], n: int) -> str:
    """An entity of ``n`` logins sharing one cookie: n events, n + 1 identifiers."""
    db.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload, "
        "stitched, identifiers) SELECT 'h' || lpad(g::text, 6, '0'), 'web', 'login', '1', "
        "%s::timestamptz + g * interval '1 s', jsonb_build_object('n', 1), now(), "
        "ARRAY['cookie:junk', 'email:u' || g] FROM generate_series(1, %s) g",
        [T0, n],
    )
    db.execute(
        "INSERT INTO public.customer_attributes (customer_entity_id, identifiers, modified, "
        "first_event_time, first_event_id) SELECT 'hub', array_agg(DISTINCT i ORDER BY i), "
        "now(), %s, 'h000001' FROM cdp_ce.customer_events, unnest(identifiers) i "
        "WHERE id LIKE 'h%%'",
        [T0],
    )
    return "hub"


def calculated(db: psycopg.Connection[Any], entity: str) -> Any:
    row = db.execute(
        "SELECT calculated FROM customer_attributes WHERE customer_entity_id = %s", [entity]
    ).fetchone()
    assert row is not None
    return row[0]


def test_a_huge_entity_is_calculated_on_its_own_lane_after_the_rest(world: World) -> None:
    """Before: one batch held the hub and the small ones, which waited for its 50,000^2 load."""
    world.attribute("n", {"type": "sum", "value": "payload->>'n'"}, "int")
    world.attribute("first", {"type": "first", "value": "id"})
    big = hub(world.db, 20_000)
    small = [world.entity([ev({"n": 2}, 1)]) for _ in range(3)]
    assert world.run() == 4
    assert world.attrs(big) == {"n": 20_000, "first": "h000001"}
    assert [world.attrs(s)["n"] for s in small] == [2, 2, 2]
    assert all(calculated(world.db, s) < calculated(world.db, big) for s in small)
    events = world.db.execute(
        "SELECT customer_events_count FROM customer_attributes WHERE customer_entity_id = 'hub'"
    ).fetchone()
    assert events == (20_000,)  # each event once, though it holds two of the identifiers


def test_a_huge_entity_that_cannot_load_in_time_is_recorded_and_the_rest_goes_on(
    world: World, settings: config.Settings
) -> None:
    quick = settings.replace(**{"attributes.worker_timeout_ms": 100})
    world = World(world.db, quick)
    world.attribute("n", {"type": "sum", "value": "payload->>'n'"}, "int")
    big = hub(world.db, 80_000)  # its load takes ~0.4 s here
    small = world.entity([ev({"n": 2}, 1)])
    assert world.run() == 1
    assert world.attrs(small) == {"n": 2}
    assert world.attrs(big) == {}
    errors = world.errors()
    assert [(e[0], e[1]) for e in errors] == [("*", big)]
    assert "attributes.worker_timeout_ms" in errors[0][2]
    # not tried again until it changes
    assert world.run() == 0
    assert len(world.errors()) == 1


def test_a_stop_during_a_large_load_is_not_recorded_as_too_large(
    world: World, settings: config.Settings
) -> None:
    """Before: the cancel on SIGTERM looked like the entity's own timeout: it was recorded as
    'too large', marked calculated, and the aborted transaction failed the thread (exit 1)."""
    world.attribute("n", {"type": "sum", "value": "payload->>'n'"}, "int")
    big = hub(world.db, 80_000)
    worker = world.worker
    failure: list[BaseException] = []
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        worker._conn = conn

        def calculate() -> None:
            try:
                worker.run_pass(conn)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=calculate)
        thread.start()
        wait_until(
            lambda: (
                world.db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE 'INSERT INTO pg_temp.%%'"
                ).fetchone()
                == (1,)
            ),
            timeout=30,
            what="the large load",
        )
        worker.cancel()
        thread.join(timeout=30)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert [type(e).__name__ for e in failure] == ["Stopped"]
    assert world.errors() == []
    assert calculated(world.db, big) is None
