"""Definitions whose result is too big, or that end their own database session: errors of that
attribute in ``attribute_errors``, while other attributes and entities keep being calculated."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from stream_cps import config
from tests.integration.test_attributes_helpers import World, ev


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


GOOD = {"type": "sum", "value": "payload->>'n'"}
# 150,000 rows of ~900 bytes: 135 MB of jsonb per entity, two of them over jsonb's 256 MB
HUGE = {
    "type": "custom",
    "query": "SELECT repeat('x', 900) || g AS value FROM base, generate_series(1, 150000) g "
    "WHERE base.payload->>'huge' = 'yes'",
}


def test_values_over_the_limit_are_errors_of_that_attribute(world: World) -> None:
    world.attribute("good", GOOD, "int")
    world.attribute("huge", HUGE)
    a = world.entity([ev({"n": 1, "huge": "yes"}, 1)])
    b = world.entity([ev({"n": 2, "huge": "yes"}, 1)])
    c = world.entity([ev({"n": 3, "huge": "no"}, 1)])
    assert world.run() == 3
    assert world.attrs(a) == {"good": 1}
    assert world.attrs(b) == {"good": 2}
    assert world.attrs(c) == {"good": 3}
    errors = sorted(world.errors())
    assert [(e[0], e[1]) for e in errors] == sorted([("huge", a), ("huge", b)])
    assert all("attributes.max_value_bytes" in e[2] for e in errors)


def test_a_value_under_the_limit_is_stored(world: World, settings: config.Settings) -> None:
    small = settings.replace(**{"attributes.max_value_bytes": 10_000})
    world = World(world.db, small)
    world.attribute("good", GOOD, "int")
    world.attribute("few", {"type": "list", "value": "payload->>'c'"})
    world.attribute("many", {"type": "list", "value": "payload->>'c' || repeat('y', 200)"})
    events = [ev({"n": 1, "c": f"c{i:03d}"}, i) for i in range(60)]
    a = world.entity(events)
    assert world.run() == 1
    attrs = world.attrs(a)
    assert set(attrs) == {"good", "few"}
    assert len(attrs["few"]) == 60
    assert [(e[0], e[1]) for e in world.errors()] == [("many", a)]


def test_a_definition_cannot_end_its_own_session(world: World) -> None:
    """Before: pg_terminate_backend(pg_backend_pid()) made the worker reconnect forever; the
    sandbox role is not a member of the service's role, so it is refused."""
    world.attribute("good", GOOD, "int")
    world.attribute(
        "kill",
        {"type": "custom", "query": "SELECT pg_terminate_backend(pg_backend_pid())::text AS value"},
    )
    a = world.entity([ev({"n": 1}, 1)])
    assert world.run() == 1
    assert world.attrs(a) == {"good": 1}
    errors = world.errors()
    assert [(e[0], e[1]) for e in errors] == [("kill", None)]
    assert "permission denied to terminate process" in errors[0][2]


def test_a_definition_whose_session_keeps_ending_is_skipped_and_reported(
    world: World, settings: config.Settings
) -> None:
    """The session running a definition is terminated each time (a crash it causes, an
    operator): the worker retries the batch with the attributes alone, then skips the one
    that ends the session on its own, instead of reconnecting forever."""
    world.attribute("good", GOOD, "int")
    world.attribute("slow", {"type": "custom", "query": "SELECT pg_sleep(0.7)::text AS value"})
    a = world.entity([ev({"n": 1}, 1)])
    done = threading.Event()

    def terminate_the_slow_one() -> None:
        with psycopg.connect(settings.dsn, autocommit=True) as admin:
            while not done.is_set():
                # (the query text is cut at 1 kB: the statement that runs 0.3 s is the one)
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                    "datname = current_database() AND state = 'active' AND query LIKE 'WITH %%' "
                    "AND clock_timestamp() - query_start > interval '0.3 s' "
                    "AND pid <> pg_backend_pid()"
                )
                time.sleep(0.05)

    killer = threading.Thread(target=terminate_the_slow_one, daemon=True)
    killer.start()
    passes = 0
    try:
        while passes < 5:
            passes += 1
            with psycopg.connect(settings.dsn, autocommit=True) as conn:
                try:
                    if world.worker.run_pass(conn):
                        break
                except psycopg.OperationalError:
                    continue
    finally:
        done.set()
        killer.join()
    assert passes == 3  # together, alone, then skipped
    assert world.attrs(a) == {"good": 1}
    errors = world.errors()
    assert [(e[0], e[1]) for e in errors] == [("slow", None)]
    assert "ended the database session" in errors[0][2]
