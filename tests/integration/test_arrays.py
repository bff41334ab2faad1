"""The hand-built text[] parameters read back exactly in a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_cps.db.arrays import TextArray, array_texts

# Any text PostgreSQL can store (no NUL, no lone surrogates).
pg_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"))


def test_edge_values_round_trip(db: psycopg.Connection[Any]) -> None:
    values = ["", "a", 'quo"te', "back\\slash", "{brace,comma}", "NULL", " ", "é€😀", "x" * 5000]
    row = db.execute("SELECT %b::text[]", [TextArray(values)]).fetchone()
    assert row is not None and row[0] == values
    row = db.execute("SELECT cardinality(%b::text[])", [TextArray([])]).fetchone()
    assert row == (0,)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sets=st.lists(st.lists(pg_text, max_size=4), max_size=6))
def test_ragged_sets_round_trip_as_array_texts(pg_dsn: str, sets: list[list[str]]) -> None:
    """The same database for every example is fine: nothing is written."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT t::text[] FROM unnest(%b::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
            [TextArray(array_texts(sets))],
        ).fetchall()
    assert [list(r[0]) for r in rows] == sets


def test_array_texts_fast_and_escaping_paths(db: psycopg.Connection[Any]) -> None:
    for sets in ([["NULL", "{a,b}", " x "], [], ["é"]], [['say "hi"', "c:\\d"], ["plain"]]):
        rows = db.execute(
            "SELECT t::text[] FROM unnest(%b::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
            [TextArray(array_texts(sets))],
        ).fetchall()
        assert [list(r[0]) for r in rows] == sets
