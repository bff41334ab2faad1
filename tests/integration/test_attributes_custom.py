"""Custom queries over ``base``, meta attributes and context values.

Entity A has three events (n = 5, 3, null; c = red, blue, red), entity B one (n = 10, c = green).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from stream_cps import config
from tests.integration.test_attributes_helpers import World, ev


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


def two_entities(world: World) -> tuple[str, str]:
    a = world.entity(
        [
            ev({"n": 5, "c": "red"}, 1, type="purchase"),
            ev({"n": 3, "c": "blue"}, 2, source="app"),
            ev({"n": None, "c": "red"}, 3, type="purchase"),
        ]
    )
    b = world.entity([ev({"n": 10, "c": "green"}, 1, type="purchase")])
    return a, b


def custom(query: str, **extra: Any) -> dict[str, Any]:
    return {"type": "custom", "query": query, **extra}


def test_scalar_array_absent(world: World) -> None:
    world.attribute("count", custom("SELECT count(*) AS value FROM base"), "int")
    world.attribute(
        "colors",
        custom("SELECT DISTINCT payload->>'c' AS value FROM base ORDER BY 1 DESC;"),
    )
    world.attribute("none", custom("SELECT payload->>'c' AS value FROM base WHERE false"))
    world.attribute("null_only", custom("SELECT max(payload->>'nope') AS value FROM base"))
    world.attribute(
        "nulls_dropped",
        custom("SELECT payload->>'n' AS value FROM base ORDER BY event_time"),
        "int",
    )
    a, b = two_entities(world)
    assert world.run() == 2
    assert world.attrs(a) == {"count": 3, "colors": ["red", "blue"], "nulls_dropped": [5, 3]}
    assert world.attrs(b) == {"count": 1, "colors": "green", "nulls_dropped": 10}


def test_custom_with_event_filters_and_with_clause(world: World) -> None:
    world.attribute(
        "purchases",
        custom(
            "WITH p AS (SELECT (payload->>'n')::int AS n FROM base) SELECT sum(n) AS value FROM p",
            types=["purchase"],
        ),
        "int",
    )
    world.attribute(
        "app_count", custom("SELECT count(*) AS value FROM base", sources=["app"]), "int"
    )
    world.attribute(
        "avg_typed",
        custom("SELECT avg((payload->>'n')::numeric) AS value FROM base"),
        "float",
    )
    a, b = two_entities(world)
    world.run()
    assert world.attrs(a) == {"purchases": 5, "app_count": 1, "avg_typed": 4}
    assert world.attrs(b) == {"purchases": 10, "app_count": 0, "avg_typed": 10}


def test_meta_attributes(world: World) -> None:
    # the guide's example shape: a meta attribute used by several custom queries
    world.meta(
        "products_bought",
        "SELECT payload->>'c' AS product, (payload->>'n')::int AS price FROM base "
        "WHERE type = 'purchase'",
    )
    world.meta("expensive", "SELECT * FROM products_bought WHERE price > 4")  # meta on meta
    world.attribute("sum_price", custom("select sum(price) AS value from products_bought;"), "int")
    world.attribute("n_expensive", custom("SELECT count(*) AS value FROM expensive"), "int")
    world.attribute(
        "products", custom("SELECT DISTINCT product AS value FROM products_bought ORDER BY 1")
    )
    a, b = two_entities(world)
    world.run()
    assert world.attrs(a) == {"sum_price": 5, "n_expensive": 1, "products": "red"}
    assert world.attrs(b) == {"sum_price": 10, "n_expensive": 1, "products": "green"}
    assert world.errors() == []


def test_meta_attribute_cycle_and_invalid_meta_are_definition_errors(world: World) -> None:
    world.meta("m1", "SELECT * FROM m2")
    world.meta("m2", "SELECT * FROM m1")
    world.meta("Bad Name", "SELECT 1")
    world.attribute("loop", custom("SELECT count(*) AS value FROM m1"), "int")
    world.attribute("ok", custom("SELECT count(*) AS value FROM base"), "int")
    a, _ = two_entities(world)
    world.run()
    assert world.attrs(a) == {"ok": 3}
    errors = {e[0]: e[2] for e in world.errors()}
    assert "refer to each other" in errors["loop"]
    assert "Bad Name" in errors


def test_context_refresh_and_use(world: World) -> None:
    world.db.execute(
        "INSERT INTO public.context (key, query) VALUES ('entities', "
        "'SELECT count(*) AS value FROM public.customer_attributes'), "
        "('max_n', 'SELECT max((payload->>''n'')::int) AS value FROM customer_events')"
    )
    world.attribute(
        "share",
        custom(
            "SELECT count(*)::numeric / (SELECT value::numeric FROM public.context "
            "WHERE key = 'entities') AS value FROM base"
        ),
        "float",
    )
    world.attribute(
        "max_all", custom("SELECT value::int AS value FROM context WHERE key = 'max_n'"), "int"
    )
    a, b = two_entities(world)
    world.run()
    values = dict(world.db.execute("SELECT key, value FROM public.context").fetchall())
    assert values == {"entities": "2", "max_n": "10"}
    assert world.attrs(a) == {"share": 1.5, "max_all": 10}
    assert world.attrs(b) == {"share": 0.5, "max_all": 10}


def test_context_not_refreshed_while_fresh_then_guide_script(
    world: World, settings: config.Settings
) -> None:
    world.db.execute(
        "INSERT INTO public.context (key, query) VALUES "
        "('entities', 'SELECT count(*) AS value FROM customer_attributes')"
    )
    two_entities(world)
    world.run()
    world.entity([ev({}, 1)])
    world.run()
    value = world.db.execute("SELECT value FROM public.context").fetchone()
    assert value == ("2",)  # fresh (< 24 h): kept
    with psycopg.connect(settings.dsn, autocommit=True) as psql:  # default search_path
        psql.execute("UPDATE cdp_attr.context SET modified = NULL;")
    world.run()
    value = world.db.execute("SELECT value FROM public.context").fetchone()
    assert value == ("3",)


def test_context_older_than_max_age_is_refreshed(world: World) -> None:
    world.db.execute(
        "INSERT INTO public.context (key, value, query, modified) VALUES "
        "('k', 'old', 'SELECT ''new'' AS value', localtimestamp - interval '25 hours'), "
        "('fresh', 'kept', 'SELECT ''new'' AS value', "
        "(now() AT TIME ZONE 'UTC') - interval '23 hours'), "
        "('static', 'manual', NULL, NULL)"
    )
    world.run()
    values = dict(world.db.execute("SELECT key, value FROM public.context").fetchall())
    assert values == {"k": "new", "fresh": "kept", "static": "manual"}


def test_failing_context_query_keeps_value_and_is_reported(world: World) -> None:
    world.db.execute(
        "INSERT INTO public.context (key, value, query) VALUES "
        "('bad', 'old', 'SELECT 1/0 AS value'), ('two', 'old', 'SELECT 1 AS value UNION SELECT 2'),"
        "('writer', 'old', 'SELECT nextval(''cdp_ps.entity_version_seq'') AS value')"
    )
    world.run()
    values = dict(world.db.execute("SELECT key, value FROM public.context").fetchall())
    assert values == {"bad": "old", "two": "old", "writer": "old"}
    errors = {e[0]: e[2] for e in world.errors()}
    assert errors["context:bad"] == "division by zero"
    assert "more than one row" in errors["context:two"]
    # the context role cannot even see the sequence's schema (and read-only would refuse it)
    assert errors["context:writer"] == "permission denied for schema cdp_ps"
    assert world.db.execute("SELECT last_value FROM cdp_ps.entity_version_seq").fetchone() == (1,)


def test_percent_and_braces_in_sql_fragments(world: World) -> None:
    world.attribute(
        "pages",
        {
            "type": "list",
            "value": "payload #>> '{page,path}'",
            "filter": "payload #>> '{page,path}' LIKE '/p%'",
        },
    )
    world.attribute(
        "like_count",
        custom("SELECT count(*) AS value FROM base WHERE payload->>'c' LIKE 'r%'"),
        "int",
    )
    a = world.entity(
        [
            ev({"page": {"path": "/pricing"}, "c": "red"}, 1),
            ev({"page": {"path": "/about"}, "c": "rose"}, 2),
            ev({"page": {"path": "/p%25"}, "c": "blue"}, 3),
        ]
    )
    world.run()
    assert world.attrs(a) == {"pages": ["/p%25", "/pricing"], "like_count": 2}
