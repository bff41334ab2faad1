"""Generated events against a small Python model of the contract's semantics.

Ties in time, NULLs, numbers given as JSON numbers or strings (with halves, to check rounding),
weights and repeated values are all generated; every predefined type is compared, in one run, for
several entities at once (so the shared-scan fast path is what is checked).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_cps import config
from tests.integration.test_attributes_helpers import World, ev

_ids = itertools.count(1)

number = st.one_of(
    st.none(),
    st.integers(-20, 20),
    st.integers(-40, 40).map(lambda i: str(Decimal(i) / 2)),  # "2.5", "-3.0", ...
)
event = st.fixed_dictionaries(
    {
        "minute": st.integers(0, 4),
        "n": number,
        "c": st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"])),
        "w": st.integers(1, 3),
        "tags": st.lists(st.sampled_from(["x", "y", "z"]), max_size=3),
    }
)
entity = st.lists(event, min_size=0, max_size=8)

SRF_TYPES = ["first", "last", "most_frequent", "least_frequent", "list", "num_of_unique"]
TYPES = [
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "most_frequent",
    "least_frequent",
    "list",
    "num_of_unique",
]


def as_int(value: Any) -> int:
    return int(Decimal(str(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def model(kind: str, rows: list[tuple[tuple[Any, ...], Any, int]]) -> Any:
    """rows: (order key, value, weight), values already in their domain."""
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return None
    values = [r[1] for r in rows]
    ordered = [r[1] for r in sorted(rows, key=lambda r: r[0])]
    totals: Counter[Any] = Counter()
    for _, value, weight in rows:
        totals[value] += weight
    pick: dict[str, Callable[[], Any]] = {
        "min": lambda: min(values),
        "max": lambda: max(values),
        "first": lambda: ordered[0],
        "last": lambda: ordered[-1],
        "most_frequent": lambda: sorted(totals, key=lambda v: (-totals[v], v))[0],
        "least_frequent": lambda: sorted(totals, key=lambda v: (totals[v], v))[0],
        "list": lambda: sorted(set(values)),
        "num_of_unique": lambda: len({str(v) for v in values}),
    }
    return pick[kind]()


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


def define(world: World) -> None:
    for kind in TYPES:
        weighted = kind in ("most_frequent", "least_frequent")
        extra = {"weight": "(payload->>'w')::int"} if weighted else {}
        if kind not in ("sum", "avg"):
            world.attribute(f"c_{kind}", {"type": kind, "value": "payload->>'c'", **extra})
        world.attribute(f"n_{kind}", {"type": kind, "value": "payload->'n'", **extra}, "int")
    world.attribute("n_avg", {"type": "avg", "value": "payload->>'n'"}, "float")
    for kind in SRF_TYPES:  # set-returning values: the general (CTE) form
        world.attribute(
            f"t_{kind}", {"type": kind, "value": "jsonb_array_elements_text(payload->'tags')"}
        )
    world.attribute(
        "c_outer",
        {
            "type": "list",
            "value": "payload->>'c'",
            "outer_value": "upper(value)",
            "outer_filter": "value <> 'a'",
        },
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entities=st.lists(entity, min_size=1, max_size=4))
def test_worker_matches_the_model(world: World, entities: list[list[dict[str, Any]]]) -> None:
    world.db.execute("DELETE FROM customer_attributes")
    if not world.db.execute("SELECT count(*) FROM public.attributes").fetchone()[0]:  # type: ignore[index]
        define(world)
    made = []
    for events in entities:
        rows = [(e, f"x{next(_ids):08d}") for e in events]
        entity_id = world.entity(
            [
                ev(
                    {"n": e["n"], "c": e["c"], "w": e["w"], "tags": e["tags"]},
                    e["minute"],
                    id=event_id,
                )
                for e, event_id in rows
            ]
        )
        made.append((entity_id, rows))
    assert world.run() == len(made)
    for entity_id, rows in made:
        got = world.attrs(entity_id)
        keys = [((e["minute"], i), e, e["w"]) for e, i in rows]
        ints = [(k, None if e["n"] is None else as_int(e["n"]), w) for k, e, w in keys]
        texts = [(k, e["c"], w) for k, e, w in keys]
        expected: dict[str, Any] = {}
        for kind in TYPES:
            if kind == "sum":
                nums = [Decimal(str(e["n"])) for _, e, _ in keys if e["n"] is not None]
                expected["n_sum"] = as_int(sum(nums)) if nums else None
            elif kind == "avg":
                nums = [Decimal(str(e["n"])) for _, e, _ in keys if e["n"] is not None]
                expected["n_avg"] = float(sum(nums) / len(nums)) if nums else None
            else:
                expected[f"n_{kind}"] = model(kind, ints)
                expected[f"c_{kind}"] = model(kind, texts)
        if expected["c_num_of_unique"] is not None:  # the count, stored as data type string
            expected["c_num_of_unique"] = str(expected["c_num_of_unique"])
        # distinct values are compared as text: 2 and "2.0" are two values
        raw = [(k, None if e["n"] is None else str(e["n"]), w) for k, e, w in keys]
        expected["n_num_of_unique"] = model("num_of_unique", raw)
        # several values per event: ordered by (time, event id, value)
        tags = [((e["minute"], i, t), t, 1) for e, i in rows for t in e["tags"]]
        for kind in SRF_TYPES:
            expected[f"t_{kind}"] = model(kind, tags)
        if expected["t_num_of_unique"] is not None:
            expected["t_num_of_unique"] = str(expected["t_num_of_unique"])
        outer = [(k, e["c"].upper(), w) for k, e, w in keys if e["c"] not in (None, "a")]
        expected["c_outer"] = model("list", outer)
        expected = {k: v for k, v in expected.items() if v is not None}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), (key, rows)
