"""Every predefined type and field, with hand-computed expected values.

The shared entity (``EVENTS``):

    id  minute source type      version  n     c       tags        w
    e1  1      web    page_view 1-0-0    5     red     [a, b]      1
    e2  2      app    page_view 1-0-0    3     blue    [b]         3
    e3  3      web    page_view 2-0-0    null  red     []          1
    e4  3      web    purchase  1-0-0    "7"   green   (missing)   2
    e5  4      web    page_view 1-0-0    -     null    (missing)   -

e3 and e4 share a time, so order between them falls to the event id.
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


EVENTS = [
    ev({"n": 5, "c": "red", "tags": ["a", "b"], "w": 1}, 1, id="e1"),
    ev({"n": 3, "c": "blue", "tags": ["b"], "w": 3}, 2, id="e2", source="app"),
    ev({"n": None, "c": "red", "tags": [], "w": 1}, 3, id="e3", version="2-0-0"),
    ev({"n": "7", "c": "green", "w": 2}, 3, id="e4", type="purchase"),
    ev({"c": None}, 4, id="e5"),
]

N = "payload->>'n'"
C = "payload->>'c'"
TAGS = "jsonb_array_elements_text(payload->'tags')"
W = "(payload->>'w')::int"

CASES: list[tuple[str, dict[str, Any], str, Any]] = [
    # numbers: values 5, 3, 7 (e3's null and e5's missing n are ignored)
    ("sum", {"type": "sum", "value": N}, "int", 15),
    ("avg", {"type": "avg", "value": N}, "float", 5),
    ("avg_int_rounds", {"type": "avg", "value": "payload->>'w'"}, "int", 2),  # 7/4 = 1.75
    ("min", {"type": "min", "value": N}, "int", 3),
    ("max", {"type": "max", "value": N}, "int", 7),  # numeric, not text order
    ("max_text", {"type": "max", "value": N}, "string", "7"),
    ("num_of_unique", {"type": "num_of_unique", "value": N}, "int", 3),
    ("first", {"type": "first", "value": N}, "int", 5),
    ("last", {"type": "last", "value": N}, "int", 7),
    ("sum_as_string", {"type": "sum", "value": N}, "string", "15"),
    ("count_as_float", {"type": "num_of_unique", "value": C}, "float", 3),
    # strings: red, blue, red, green (e5's null ignored)
    ("first_c", {"type": "first", "value": C}, "string", "red"),
    ("last_c_tie_by_id", {"type": "last", "value": C}, "string", "green"),  # e4 after e3
    (
        "first_c_tie_by_id",
        {"type": "first", "value": C, "filter": "event_time >= '2024-01-01 00:03+00'"},
        "string",
        "red",  # e3 before e4
    ),
    ("min_c", {"type": "min", "value": C}, "string", "blue"),
    ("max_c", {"type": "max", "value": C}, "string", "red"),
    ("most_frequent", {"type": "most_frequent", "value": C}, "string", "red"),
    ("least_frequent_tie", {"type": "least_frequent", "value": C}, "string", "blue"),
    ("list", {"type": "list", "value": C}, "string", ["blue", "green", "red"]),
    ("num_of_unique_c", {"type": "num_of_unique", "value": C}, "int", 3),
    # weights: red 1+1=2, blue 3, green 2
    (
        "most_frequent_weighted",
        {"type": "most_frequent", "value": C, "weight": W},
        "string",
        "blue",
    ),
    (
        "least_frequent_weighted_tie",
        {"type": "least_frequent", "value": C, "weight": W},
        "string",
        "green",  # green 2 ties red 2; green sorts first
    ),
    ("sum_weighted", {"type": "sum", "value": N, "weight": W}, "int", 28),  # 5*1+3*3+7*2
    ("avg_weighted", {"type": "avg", "value": N, "weight": W}, "float", 28 / 6),
    # outer_weight: red x2 -> red 4, blue 3, green 2
    (
        "least_frequent_outer_weight",
        {
            "type": "least_frequent",
            "value": C,
            "weight": W,
            "outer_weight": "CASE WHEN value = 'red' THEN 2 ELSE 1 END",
        },
        "string",
        "green",
    ),
    (
        "most_frequent_outer_weight",
        {"type": "most_frequent", "value": C, "outer_weight": "length(value)"},
        "string",
        "red",  # red 3+3 = 6 beats green 5 and blue 4
    ),
    # set-returning values: tags a, b, b
    ("list_srf", {"type": "list", "value": TAGS}, "string", ["a", "b"]),
    ("most_frequent_srf", {"type": "most_frequent", "value": TAGS}, "string", "b"),
    ("least_frequent_srf", {"type": "least_frequent", "value": TAGS}, "string", "a"),
    ("num_of_unique_srf", {"type": "num_of_unique", "value": TAGS}, "int", 2),
    ("first_srf_sorts_within_event", {"type": "first", "value": TAGS}, "string", "a"),
    ("last_srf", {"type": "last", "value": TAGS}, "string", "b"),  # e2 is the last with tags
    # outer_value / outer_filter
    (
        "outer_value",
        {"type": "list", "value": C, "outer_value": "upper(value)"},
        "string",
        ["BLUE", "GREEN", "RED"],
    ),
    (
        "outer_value_srf",
        {
            "type": "list",
            "value": "payload->'tags'",
            "outer_value": "jsonb_array_elements_text(value)",
        },
        "string",
        ["a", "b"],
    ),
    (
        "outer_filter",
        {"type": "most_frequent", "value": C, "outer_filter": "value <> 'red'"},
        "string",
        "blue",
    ),
    (
        "outer_filter_before_outer_value",
        {"type": "list", "value": C, "outer_value": "upper(value)", "outer_filter": "value > 'c'"},
        "string",
        ["GREEN", "RED"],
    ),
    # event filters
    ("sources", {"type": "sum", "value": N, "sources": ["web"]}, "int", 12),
    ("types", {"type": "sum", "value": N, "types": ["purchase"]}, "int", 7),
    ("versions", {"type": "value", "value": C, "versions": ["2-0-0"]}, "string", "red"),
    ("version_alias", {"type": "list", "value": C, "version": ["2-0-0"]}, "string", ["red"]),
    ("filter", {"type": "sum", "value": N, "filter": "(payload->>'w')::int > 1"}, "int", 10),
    (
        "all_filters",
        {
            "type": "list",
            "value": C,
            "sources": ["web", "app"],
            "types": [],
            "filter": "payload ? 'tags'",
        },
        "string",
        ["blue", "red"],
    ),
    # data types
    ("string_from_jsonb_number", {"type": "min", "value": "payload->'n'"}, "string", "3"),
    ("int_from_jsonb", {"type": "max", "value": "payload->'n'"}, "int", 7),
    (
        "datetime_from_event_time",
        {"type": "last", "value": "event_time"},
        "datetime",
        "2024-01-01T00:04:00+00:00",
    ),
    ("date_from_event_time", {"type": "first", "value": "event_time"}, "date", "2024-01-01"),
    ("bool_max", {"type": "max", "value": "(payload->>'w')::int > 2"}, "bool", True),
    ("bool_min", {"type": "min", "value": "(payload->>'w')::int > 2"}, "bool", False),
    ("bool_list", {"type": "list", "value": "payload ? 'tags'"}, "bool", [False, True]),
    ("absent_when_no_values", {"type": "sum", "value": "payload->>'nope'"}, "int", None),
    ("absent_list", {"type": "list", "value": "payload->>'nope'"}, "string", None),
]


@pytest.mark.parametrize(
    ("name", "definition", "data_type", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_predefined_type(
    world: World, name: str, definition: dict[str, Any], data_type: str, expected: Any
) -> None:
    assert world.calc(definition, EVENTS, data_type) == pytest.approx(expected)


def test_all_cases_in_one_statement(world: World) -> None:
    """The fast path computes every attribute in one statement: same answers."""
    for name, definition, data_type, _ in CASES:
        world.attribute(name, definition, data_type)
    entity = world.entity(EVENTS)
    other = world.entity([ev({"n": 1, "c": "x"}, 1)])
    assert world.run() == 2
    got = world.attrs(entity)
    expected = {name: value for name, _, _, value in CASES if value is not None}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
    assert world.attrs(other)["sum"] == 1
    assert world.attrs(other)["list"] == ["x"]
    assert world.errors() == []


DATA = [
    ev(
        {
            "i": "3.0",
            "f": "2.5",
            "d": "2024-03-05",
            "t": "2024-03-05T10:00:00+02:00",
            "b": "true",
            "e": "",
        },
        1,
    ),
    ev({"i": 1, "f": 0.25, "d": "2024-03-04", "t": "2024-03-05 07:00:00Z", "b": False}, 2),
]


@pytest.mark.parametrize(
    ("definition", "data_type", "expected"),
    [
        ({"type": "max", "value": "payload->>'i'"}, "int", 3),
        ({"type": "list", "value": "payload->'i'"}, "int", [1, 3]),
        ({"type": "num_of_unique", "value": "payload->>'i'"}, "int", 2),
        ({"type": "sum", "value": "payload->>'f'"}, "float", 2.75),
        ({"type": "list", "value": "payload->'f'"}, "float", [0.25, 2.5]),
        ({"type": "min", "value": "payload->>'d'"}, "date", "2024-03-04"),
        ({"type": "max", "value": "payload->>'t'"}, "datetime", "2024-03-05T08:00:00+00:00"),
        ({"type": "list", "value": "payload->'b'"}, "bool", [False, True]),
        ({"type": "list", "value": "payload->>'e'"}, "int", None),  # '' is no number
        ({"type": "list", "value": "payload->>'e'"}, "string", [""]),
        (
            {"type": "value", "value": "payload->>'d'", "filter": "payload ? 'e'"},
            "date",
            "2024-03-05",
        ),
    ],
)
def test_data_types(
    world: World, definition: dict[str, Any], data_type: str, expected: Any
) -> None:
    assert world.calc(definition, DATA, data_type) == pytest.approx(expected)


def test_two_entities_do_not_mix(world: World) -> None:
    world.attribute("s", {"type": "sum", "value": N}, "int")
    world.attribute("l", {"type": "list", "value": C})
    a = world.entity([ev({"n": 1, "c": "a"}, 1), ev({"n": 2, "c": "b"}, 2)])
    b = world.entity([ev({"n": 10, "c": "z"}, 1)])
    empty = world.entity([ev({}, 1)])
    assert world.run() == 3
    assert world.attrs(a) == {"s": 3, "l": ["a", "b"]}
    assert world.attrs(b) == {"s": 10, "l": ["z"]}
    assert world.attrs(empty) == {}
    counts = dict(
        world.db.execute(
            "SELECT customer_entity_id, customer_events_count FROM customer_attributes"
        ).fetchall()
    )
    assert counts == {a: 2, b: 1, empty: 1}
