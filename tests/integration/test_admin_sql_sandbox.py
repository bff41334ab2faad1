"""Admin-written SQL cannot escape its sandbox (the security issue's escapes, each against the
real PostgreSQL): no statement of its own, no writes, no other customers' rows, no files, no
side effects, no unbounded time; the bad definition or rule is reported by name and the rest
keeps working."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.db import roles, sandbox
from stream_cps.stitching.stitcher import Stitcher
from tests.integration.test_attributes_helpers import World, ev
from tests.support import event, insert, setup_rules


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


def table_exists(db: psycopg.Connection[Any], name: str) -> bool:
    row = db.execute("SELECT to_regclass(%s) IS NOT NULL", [name]).fetchone()
    return bool(row and row[0])


def stitch_all(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for _ in stitcher.sweep(conn):
        pass


def custom(query: str) -> dict[str, Any]:
    return {"type": "custom", "query": query}


# -- one statement only ------------------------------------------------------------------------

INJECTED_CONTEXT = (
    "SELECT E'\\'' AS value) q; COMMIT; CREATE TABLE public.pwned AS SELECT current_user AS who; "
    "SELECT 1 AS value FROM (SELECT 1 --'"
)


def test_an_injected_context_query_creates_nothing(world: World, tmp_path: Path) -> None:
    """Before: the table was created (who = postgres) and COPY ... TO PROGRAM ran."""
    marker = tmp_path / "ran"
    world.db.execute(
        "INSERT INTO public.context (key, query) VALUES ('inject', %s), ('program', %s), "
        "('fine', 'SELECT count(*) AS value FROM customer_events')",
        [
            INJECTED_CONTEXT,
            f"SELECT 1 AS value) q; COPY (SELECT 1) TO PROGRAM 'touch {marker}'; SELECT (1",
        ],
    )
    world.entity([ev({"n": 1}, 1)])
    world.run()
    assert not table_exists(world.db, "public.pwned")
    assert not marker.exists()
    errors = {e[0]: e[2] for e in world.errors()}
    assert set(errors) == {"context:inject", "context:program"}
    values = dict(world.db.execute("SELECT key, value FROM public.context").fetchall())
    assert values["fine"] == "1"


def test_several_statements_are_refused_by_the_protocol_itself(
    db: psycopg.Connection[Any],
) -> None:
    """Even SQL that got past the fragment check cannot run a second statement."""
    with db.transaction(), sandbox.read_only(db, 1000, roles.ATTRIBUTES):
        outcome = sandbox.fetch(db, "SELECT 1; CREATE TABLE public.pwned (x int)", {})
    assert isinstance(outcome, sandbox.SqlFailure)
    assert "multiple commands" in outcome.message
    assert not table_exists(db, "public.pwned")


# -- stitching rules ----------------------------------------------------------------------------


def test_an_injected_rule_is_reported_by_name_and_creates_nothing(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Before: validation ran the rule by the simple protocol: the table was created, an
    innocent rule was marked broken and the service stopped."""
    setup_rules(
        db,
        [
            ("email", "pv", "payload->>'email'"),
            (
                "cookie",
                "pv",
                "E'\\'' || payload->>'cookie') FROM cdp_ce.customer_events; "
                "CREATE TABLE public.pwned AS SELECT 1 AS x; SELECT (1",
            ),
        ],
    )
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a", cookie="c1"), event("b", 2, email="x@a")])
    stitch_all(stitcher, db)
    assert not table_exists(db, "public.pwned")
    assert [b.name for b in stitcher.rulebook.current.broken] == ["stitching rule cookie/pv"]
    identifiers = dict(db.execute("SELECT id, identifiers FROM customer_events").fetchall())
    assert identifiers == {"a": ["email:x@a"], "b": ["email:x@a"]}


def test_a_rule_cannot_reset_the_version_sequence(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Before: setval() in a value_expression reset the OpenSearch version sequence."""
    db.execute("SELECT setval('cdp_ps.entity_version_seq', 500)")
    setup_rules(
        db,
        [
            ("email", "pv", "payload->>'email'"),
            (
                "cookie",
                "pv",
                "(SELECT payload->>'cookie' FROM "
                "(SELECT setval('cdp_ps.entity_version_seq', 1)) s)",
            ),
        ],
    )
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a", cookie="c1")])
    stitch_all(stitcher, db)
    last = db.execute("SELECT last_value FROM cdp_ps.entity_version_seq").fetchone()
    assert last is not None and last[0] >= 500
    # the rules role cannot even name the sequence: refused when the rules load
    broken = stitcher.rulebook.current.broken
    assert [(b.name, b.reason) for b in broken] == [
        ("stitching rule cookie/pv", "permission denied for schema cdp_ps")
    ]
    assert db.execute("SELECT identifiers FROM customer_events").fetchone() == (["email:x@a"],)


def test_a_slow_rule_cannot_hold_stitching(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Before: ``... FROM pg_sleep(25)`` held all stitching for 25 s per batch."""
    quick = settings.replace(**{"stitching.rule_timeout_ms": 300})
    setup_rules(
        db,
        [
            ("email", "pv", "payload->>'email'"),
            ("cookie", "pv", "(SELECT payload->>'cookie' FROM pg_sleep(25))"),
        ],
    )
    stitcher = Stitcher(quick)
    insert(db, [event("a", 1, email="x@a", cookie="c1"), event("b", 2, email="y@a")])
    started = time.monotonic()
    stitch_all(stitcher, db)
    insert(db, [event("c", 3, email="x@a", cookie="c2")])
    stitch_all(stitcher, db)
    assert time.monotonic() - started < 10
    identifiers = dict(db.execute("SELECT id, identifiers FROM customer_events").fetchall())
    assert identifiers == {"a": ["email:x@a"], "b": ["email:y@a"], "c": ["email:x@a"]}
    errors = db.execute("SELECT attribute_id, event_id, message FROM cdp_ps.stitching_errors")
    rows = errors.fetchall()
    assert [(a, e) for a, e, _ in rows] == [("cookie", None)]  # once: then it is disabled
    assert "stitching.rule_timeout_ms" in rows[0][2]


# -- attributes: least privilege ----------------------------------------------------------------


def test_definitions_read_only_their_own_entity_and_nothing_secret(world: World) -> None:
    """Before: /etc/passwd became an attribute value, pg_authid was readable, a meta
    attribute gave every entity everyone's e-mails, an advisory lock outlived the batch."""
    world.attribute("good", {"type": "sum", "value": "payload->>'n'"}, "int")
    world.attribute("passwd", custom("SELECT pg_read_file('/etc/passwd') AS value"))
    world.attribute("authid", custom("SELECT rolpassword AS value FROM pg_authid"))
    world.meta("everyone", "SELECT payload->>'email' AS value FROM cdp_ce.customer_events")
    world.attribute("emails", custom("SELECT value FROM everyone"))
    world.attribute("lock", custom("SELECT pg_advisory_lock(42)::text AS value"))
    world.attribute("role", custom("SELECT set_config('role', 'postgres', true) AS value"))
    a = world.entity([ev({"n": 1, "email": "a@x"}, 1)])
    b = world.entity([ev({"n": 2, "email": "b@x"}, 1)])
    assert world.run() == 2
    assert world.attrs(a) == {"good": 1}
    assert world.attrs(b) == {"good": 2}
    errors = {e[0]: e[2] for e in world.errors()}
    assert errors["passwd"] == "permission denied for function pg_read_file"
    assert errors["authid"] == "permission denied for table pg_authid"
    assert errors["emails"] == "permission denied for schema cdp_ce"
    assert errors["lock"] == (
        "invalid definition: query: pg_advisory_lock() is not allowed in admin-written SQL"
    )
    assert errors["role"] == (
        "invalid definition: query: set_config() is not allowed in admin-written SQL"
    )
    held = world.db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    assert held.fetchone() == (0,)


def test_the_sandbox_sees_the_batch_events_and_context_only(world: World) -> None:
    """What a definition may read still works: its own events (base), context values."""
    world.db.execute("INSERT INTO public.context (key, value) VALUES ('k', '7')")
    world.attribute("own", custom("SELECT count(*) AS value FROM base"), "int")
    world.attribute("ctx", custom("SELECT value::int AS value FROM context WHERE key = 'k'"), "int")
    a = world.entity([ev({"n": 1}, 1), ev({"n": 2}, 2)])
    assert world.run() == 1
    assert world.attrs(a) == {"own": 2, "ctx": 7}
    assert world.errors() == []
