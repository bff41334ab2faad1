"""Admin-written SQL that writes, times out or fails: reported by attribute id with the
database's message; everything else is still computed and stored."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.attributes import calculate
from tests.integration.test_attributes_helpers import World, ev


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


GOOD = {"type": "sum", "value": "payload->>'n'"}


def custom(query: str) -> dict[str, Any]:
    return {"type": "custom", "query": query}


def test_write_attempts_are_refused(world: World) -> None:
    world.db.execute(
        "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql "
        "AS $$ INSERT INTO public.sources (id, name) VALUES ('evil', 'x') RETURNING 1 $$"
    )
    world.attribute("good", GOOD, "int")
    world.attribute("evil_custom", custom("SELECT public.evil() AS value"), "int")
    world.attribute("evil_value", {"type": "max", "value": "public.evil()"}, "int")
    world.attribute("seq", {"type": "max", "value": "nextval('cdp_ps.entity_version_seq')"}, "int")
    world.attribute(
        "escape", custom("SELECT set_config('transaction_read_only', 'off', true) AS value")
    )
    world.attribute(
        "dml_cte",
        custom(
            "WITH x AS (DELETE FROM public.sources RETURNING 1) SELECT count(*) AS value FROM x"
        ),
    )
    a = world.entity([ev({"n": 1}, 1)])
    b = world.entity([ev({"n": 2}, 1)])
    assert world.run() == 2
    assert world.attrs(a) == {"good": 1}
    assert world.attrs(b) == {"good": 2}
    assert world.db.execute("SELECT count(*) FROM public.sources").fetchone() == (0,)
    errors = {e[0]: (e[1], e[2]) for e in world.errors()}
    assert set(errors) == {"evil_custom", "evil_value", "seq", "escape", "dml_cte"}
    assert errors["evil_custom"] == (None, "cannot execute INSERT in a read-only transaction")
    assert errors["seq"] == (None, "permission denied for schema cdp_ps")  # the sandbox role
    assert errors["escape"] == (
        None,
        "invalid definition: query: set_config() is not allowed in admin-written SQL",
    )
    # reported once per definition, not again every batch
    world.db.execute("UPDATE customer_attributes SET calculated = NULL")
    world.run()
    assert len(world.errors()) == 5


def test_timeout(world: World, settings: config.Settings) -> None:
    fast = settings.replace(**{"attributes.statement_timeout_ms": 300})
    world = World(world.db, fast)
    world.attribute("good", GOOD, "int")
    world.attribute(
        "slow",
        custom(
            "SELECT count(*) AS value FROM base "
            "WHERE payload->>'slow' IS NULL OR pg_sleep(3)::text = ''"
        ),
        "int",
    )
    a = world.entity([ev({"n": 1}, 1)])
    slow = world.entity([ev({"n": 2, "slow": 1}, 1)])
    assert world.run() == 2
    assert world.attrs(a) == {"good": 1, "slow": 1}
    assert world.attrs(slow) == {"good": 2}
    assert world.errors() == [("slow", slow, "canceling statement due to statement timeout")]


def test_timeout_for_everyone_is_not_retried_per_entity_forever(
    world: World, settings: config.Settings
) -> None:
    fast = settings.replace(**{"attributes.statement_timeout_ms": 200})
    world = World(world.db, fast)
    world.attribute("good", GOOD, "int")
    world.attribute("sleepy", custom("SELECT 1 AS value FROM pg_sleep(2)"), "int")
    ids = [world.entity([ev({"n": i}, 1)]) for i in range(6)]
    assert world.run() == 6
    errors = world.errors()
    assert len(errors) == 6
    assert sum("not retried" in e[2] for e in errors) == 6 - calculate.MAX_TIMEOUTS_IN_A_ROW
    assert [world.attrs(i) for i in ids] == [{"good": n} for n in range(6)]


def test_error_for_one_entity_keeps_its_previous_value(world: World) -> None:
    world.attribute("good", GOOD, "int")
    world.attribute("ratio", custom("SELECT 10 / (count(*) - 2) AS value FROM base"), "int")
    one = world.entity([ev({"n": 1}, 1)])
    three = world.entity([ev({"n": 1}, 1), ev({"n": 1}, 2), ev({"n": 1}, 3)])
    world.run()
    assert world.attrs(one) == {"good": 1, "ratio": -10}
    assert world.attrs(three) == {"good": 3, "ratio": 10}
    world.add_events(one, [ev({"n": 5}, 2)])  # now count - 2 = 0 for it
    world.run()
    assert world.attrs(one) == {"good": 6, "ratio": -10}  # ratio kept, the rest updated
    assert world.errors() == [("ratio", one, "division by zero")]


def test_data_error_in_predefined_type_isolated_by_entity(world: World) -> None:
    world.attribute("n", {"type": "max", "value": "payload->>'n'"}, "int")
    world.attribute("c", {"type": "value", "value": "payload->>'c'"})
    good = world.entity([ev({"n": "4", "c": "x"}, 1)])
    bad = world.entity([ev({"n": "four", "c": "y"}, 1)])
    world.run()
    assert world.attrs(good) == {"n": 4, "c": "x"}
    assert world.attrs(bad) == {"c": "y"}
    assert world.errors() == [("n", bad, 'invalid input syntax for type numeric: "four"')]


def test_syntax_error_reported_once_with_null_entity(world: World) -> None:
    world.attribute("good", GOOD, "int")
    world.attribute("broken", custom("SELECT value FROM nowhere"), "int")
    world.attribute("typo", {"type": "max", "value": "payload->>'n' +"}, "int")
    a = world.entity([ev({"n": 1}, 1)])
    world.run()
    assert world.attrs(a) == {"good": 1}
    errors = {e[0]: (e[1], e[2]) for e in world.errors()}
    assert errors["broken"] == (None, 'relation "nowhere" does not exist')
    assert errors["typo"][0] is None and "syntax error" in errors["typo"][1]


def test_invalid_definitions_rejected_at_load_naming_the_attribute(world: World) -> None:
    world.attribute("good", GOOD, "int")
    world.attribute("no_type", {"value": "1"})
    world.attribute("no_value", {"type": "max"})
    world.attribute("bad_type", {"type": "median", "value": "1"})
    world.attribute("bad_json", "{oops")
    world.attribute("bad_dtype", GOOD, "money")
    world.attribute("comment", {"type": "custom", "query": "SELECT 1 AS value -- hi"})
    world.attribute("category", None)  # a stitching category: not calculated, no error
    a = world.entity([ev({"n": 7}, 1)])
    world.run()
    assert world.attrs(a) == {"good": 7}
    errors = {e[0]: e[2] for e in world.errors()}
    assert set(errors) == {"no_type", "no_value", "bad_type", "bad_json", "bad_dtype", "comment"}
    assert errors["bad_type"].startswith("invalid definition: unknown type 'median'")
    assert "not valid JSON" in errors["bad_json"]
    # a later pass does not report them again
    world.touch(a)
    world.run()
    assert len(world.errors()) == 6
