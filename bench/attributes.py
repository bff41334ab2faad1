"""Attribute calculation throughput vs one hand-written set-based statement.

Creates a data set in an embedded PostgreSQL (entities with a skewed number of events from three
sources), 20 definitions (18 predefined of mixed types, two custom: one reads a meta attribute,
one a context value), then reports

* the entities/s of ``CalculationWorker`` (everything: events, all 20 attributes, storing,
  outbox), and
* the entities/s of ONE hand-written statement computing the 18 predefined attributes for all
  entities (select only, nothing stored),

and their ratio (target: at least 0.3). Usage: ``python bench/attributes.py [--entities N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from stream_cps import config
from stream_cps.attributes.statement import statement
from stream_cps.attributes.worker import CalculationWorker
from stream_cps.db import schema
from stream_cps_dev import embedded

P = "payload"
DEFINITIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "revenue": ("float", {"type": "sum", "value": f"{P}->>'price'", "types": ["purchase"]}),
    "avg_price": ("float", {"type": "avg", "value": f"{P}->>'price'", "types": ["purchase"]}),
    "max_price": ("float", {"type": "max", "value": f"{P}->>'price'"}),
    "min_price": ("float", {"type": "min", "value": f"{P}->>'price'"}),
    "items": ("int", {"type": "sum", "value": f"{P}->>'quantity'", "weight": "1"}),
    "first_seen": ("datetime", {"type": "first", "value": "event_time"}),
    "last_seen": ("datetime", {"type": "last", "value": "event_time"}),
    "first_source": ("string", {"type": "first", "value": "source_id"}),
    "last_url": ("string", {"type": "last", "value": f"{P}->>'url'", "types": ["page_view"]}),
    "fav_category": (
        "string",
        {
            "type": "most_frequent",
            "value": f"{P}->>'category'",
            "weight": f"({P}->>'quantity')::int",
        },
    ),
    "rare_category": ("string", {"type": "least_frequent", "value": f"{P}->>'category'"}),
    "categories": ("string", {"type": "list", "value": f"{P}->>'category'"}),
    "tags": ("string", {"type": "list", "value": f"jsonb_array_elements_text({P}->'tags')"}),
    "n_tags": (
        "int",
        {
            "type": "num_of_unique",
            "value": f"{P}->'tags'",
            "outer_value": "jsonb_array_elements_text(value)",
        },
    ),
    "n_sources": ("int", {"type": "num_of_unique", "value": "source_id"}),
    "newsletter": ("bool", {"type": "max", "value": f"{P}->>'newsletter'"}),
    "country": ("string", {"type": "value", "value": f"{P}->>'country'", "sources": ["crm"]}),
    "signup_date": (
        "date",
        {"type": "min", "value": "event_time", "types": ["login"], "filter": f"{P} ? 'first'"},
    ),
    "purchase_count": (
        "int",
        {"type": "custom", "query": "SELECT count(*) AS value FROM purchases"},
    ),
    "engagement": (
        "float",
        {
            "type": "custom",
            "query": "SELECT round(count(*)::numeric / (SELECT value::numeric FROM "
            "public.context WHERE key = 'avg_events'), 3) AS value FROM base",
        },
    ),
}
META = (
    "purchases",
    "SELECT id, (payload->>'price')::numeric AS price FROM base WHERE type = 'purchase'",
)
CONTEXT = ("avg_events", "SELECT avg(customer_events_count) AS value FROM customer_attributes")

HAND_COMPUTED = """
WITH ev AS MATERIALIZED (
  SELECT ca.customer_entity_id AS eid, e.id, e.source_id, e.type, e.event_time, e.payload
  FROM public.customer_attributes ca
  JOIN cdp_ce.customer_events e ON e.identifiers && ca.identifiers
), cat AS (
  SELECT eid, payload->>'category' AS c, sum((payload->>'quantity')::int) AS w, count(*) AS n
  FROM ev WHERE payload->>'category' IS NOT NULL GROUP BY 1, 2
), fav AS (
  SELECT eid, (array_agg(c ORDER BY w DESC, c))[1] AS fav,
         (array_agg(c ORDER BY n, c))[1] AS rare, jsonb_agg(c ORDER BY c) AS cats
  FROM cat GROUP BY eid
), tags AS (
  SELECT eid, jsonb_agg(DISTINCT t ORDER BY t) AS tags, count(DISTINCT t) AS n_tags
  FROM ev, jsonb_array_elements_text(payload->'tags') t GROUP BY eid
), agg AS (
  SELECT eid,
    sum((payload->>'price')::numeric) FILTER (WHERE type = 'purchase') AS revenue,
    avg((payload->>'price')::numeric) FILTER (WHERE type = 'purchase') AS avg_price,
    max((payload->>'price')::numeric) AS max_price,
    min((payload->>'price')::numeric) AS min_price,
    sum((payload->>'quantity')::numeric) AS items,
    min(event_time) AS first_seen, max(event_time) AS last_seen,
    (array_agg(source_id ORDER BY event_time, id))[1] AS first_source,
    (array_agg(payload->>'url' ORDER BY event_time DESC, id DESC)
       FILTER (WHERE type = 'page_view' AND payload ? 'url'))[1] AS last_url,
    count(DISTINCT source_id) AS n_sources,
    bool_or((payload->>'newsletter')::boolean) AS newsletter,
    (array_agg(payload->>'country' ORDER BY event_time, id) FILTER (WHERE source_id = 'crm'
       AND payload ? 'country'))[1] AS country,
    min(event_time::date) FILTER (WHERE type = 'login' AND payload ? 'first') AS signup_date
  FROM ev GROUP BY eid
)
SELECT agg.eid, jsonb_strip_nulls(jsonb_build_object(
    'revenue', revenue, 'avg_price', avg_price, 'max_price', max_price, 'min_price', min_price,
    'items', items, 'first_seen', first_seen, 'last_seen', last_seen,
    'first_source', first_source, 'last_url', last_url, 'fav_category', fav, 'rare_category',
    rare, 'categories', cats, 'tags', tags.tags, 'n_tags', n_tags, 'n_sources', n_sources,
    'newsletter', newsletter, 'country', country, 'signup_date', signup_date)) AS attributes
  FROM agg LEFT JOIN fav USING (eid) LEFT JOIN tags USING (eid)
"""
# Every attribute must really be computed: a bare count(*) would let the planner drop the
# unused aggregates and joins.
HAND_WRITTEN = f"SELECT count(*), sum(length(attributes::text)) FROM ({HAND_COMPUTED}) AS computed"


def populate(conn: psycopg.Connection[Any], entities: int, events_per_entity: int) -> int:
    """Entities with a skewed number of events (a few heavy ones), three sources, four types."""
    conn.execute("SELECT setseed(0.42)")
    total = entities * events_per_entity
    conn.execute(
        """
        INSERT INTO public.sources (id, name) VALUES ('web', 'Web'), ('app', 'App'),
            ('crm', 'CRM');
        """
    )
    conn.execute(
        """
        INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload,
            stitched, identifiers)
        SELECT 'ev' || g,
               (ARRAY['web', 'web', 'app', 'crm'])[1 + (g %% 4)],
               (ARRAY['page_view', 'page_view', 'purchase', 'login'])[1 + ((g / 4) %% 4)],
               '1-0-0',
               timestamptz '2024-01-01' + g * interval '37 seconds',
               jsonb_strip_nulls(jsonb_build_object(
                 'price', CASE WHEN random() < 0.6 THEN round((random() * 200)::numeric, 2) END,
                 'quantity', 1 + (random() * 4)::int,
                 'category', (ARRAY['shoes', 'bags', 'hats', 'socks', 'coats'])
                             [1 + (random() * 4)::int],
                 'tags', to_jsonb(ARRAY[(ARRAY['a','b','c','d','e','f'])[1 + (g %% 6)],
                                        (ARRAY['a','b','c','d','e','f'])[1 + (g %% 5)]]),
                 'url', '/page/' || (g %% 97),
                 'newsletter', CASE WHEN g %% 11 = 0 THEN 'true' ELSE 'false' END,
                 'country', CASE WHEN g %% 4 = 3 THEN (ARRAY['CZ','SK','DE'])[1 + g %% 3] END,
                 'first', CASE WHEN g %% 13 = 0 THEN true END)),
               now(),
               ARRAY['email:' || (floor(%(n)s * power(random(), 1.3)))::int]
        FROM generate_series(1, %(total)s) AS g
        """,
        {"n": entities, "total": total},
    )
    conn.execute(
        """
        INSERT INTO public.customer_attributes (customer_entity_id, identifiers, modified,
            first_event_time, first_event_id)
        SELECT md5(identifiers[1])::uuid::text, identifiers, now(), min(event_time), min(id)
        FROM cdp_ce.customer_events GROUP BY identifiers
        """
    )
    # steady state: the GIN pending list merged (see docs/benchmarks.md)
    conn.execute("VACUUM ANALYZE")
    row = conn.execute("SELECT count(*) FROM public.customer_attributes").fetchone()
    assert row is not None
    return int(row[0])


def define(conn: psycopg.Connection[Any]) -> None:
    for attribute_id, (data_type, definition) in DEFINITIONS.items():
        conn.execute(
            "INSERT INTO public.attributes (id, name, data_type, definition) "
            "VALUES (%s, %s, %s, %s)",
            [attribute_id, attribute_id, data_type, Jsonb(definition)],
        )
    conn.execute("INSERT INTO public.meta_attributes (id, definition) VALUES (%s, %s)", META)
    conn.execute("INSERT INTO public.context (key, query) VALUES (%s, %s)", CONTEXT)


def generated_statement(
    conn: psycopg.Connection[Any], worker: CalculationWorker, settings: config.Settings
) -> None:
    """The worker's own SQL for the predefined attributes over every entity at once (events
    copied into the temporary table, one statement, nothing stored): how far the generated SQL
    is from the hand-written one, apart from batching, custom queries and storing."""
    plan = worker._plans.load(conn)
    predefined = [a for a in plan.attributes if a.definition.type != "custom"]
    ids = [r[0] for r in conn.execute("SELECT customer_entity_id FROM public.customer_attributes")]
    calculator = worker._calculator
    with conn.transaction(force_rollback=True):
        calculator._ensure_events_table(conn)
        calculator._load_events(conn, ids)
        query, params = statement(predefined, settings.attributes.max_value_bytes)
        params["ids"] = ids
        params["whole"] = True
        conn.execute(query, params).fetchall()


def cross_check(conn: psycopg.Connection[Any]) -> str:
    """Do the worker's stored values equal the hand-written statement's, entity by entity?"""
    hand = dict(conn.execute(HAND_COMPUTED).fetchall())
    stored = dict(
        conn.execute(
            "SELECT customer_entity_id, attributes FROM public.customer_attributes"
        ).fetchall()
    )
    differ = [
        entity
        for entity, values in hand.items()
        if {
            k: v
            for k, v in stored[entity].items()
            if k in DEFINITIONS and DEFINITIONS[k][1]["type"] != "custom"
        }
        != values
    ]
    if not differ:
        return f"cross-check: all {len(hand)} entities equal to the hand-written results"
    entity = differ[0]
    return (
        f"cross-check: {len(differ)} of {len(hand)} entities differ, e.g. {entity}: "
        f"hand {hand[entity]} vs worker {stored[entity]}"
    )


def best_of(n: int, run: Callable[[], object]) -> float:
    """The fastest of n runs: the machine may be busy with other work."""
    timings = []
    for _ in range(n):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=20000)
    parser.add_argument("--events-per-entity", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs of each side")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="bench-attributes-"))
    server = embedded.start(workdir / "data")
    try:
        settings = config.load(
            # the outbox rows a deployment with OpenSearch writes are part of the cost
            flags={
                "dsn": server.dsn,
                "attributes.batch_size": args.batch_size,
                "opensearch.outbox": "always",
            },
            environ={},
        )
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            entities = populate(conn, args.entities, args.events_per_entity)
            define(conn)
            events = conn.execute("SELECT count(*) FROM cdp_ce.customer_events").fetchone()
            print(
                f"data: {entities} entities, {events[0] if events else 0} events, "
                f"{len(DEFINITIONS)} definitions"
            )

            hand = best_of(args.repeat, lambda: conn.execute(HAND_WRITTEN).fetchone())
            print(f"hand-written statement: {hand:.2f} s ({entities / hand:.0f} entities/s)")

            worker = CalculationWorker(settings, max_batches=1_000_000)
            done = worker.run_pass(conn)  # first pass: also fills context and caches
            assert done == entities, done

            def recalculate() -> None:
                conn.execute("UPDATE public.customer_attributes SET calculated = NULL")
                conn.execute("VACUUM public.customer_attributes")
                started = time.perf_counter()
                assert worker.run_pass(conn) == entities
                timings.append(time.perf_counter() - started)

            timings: list[float] = []
            for _ in range(args.repeat):
                recalculate()
            elapsed = min(timings)
            print(
                f"CalculationWorker: {done} entities in {elapsed:.2f} s "
                f"({done / elapsed:.0f} entities/s; runs: "
                f"{', '.join(f'{t:.2f}' for t in timings)} s)"
            )
            errors = conn.execute("SELECT count(*) FROM cdp_attr.attribute_errors").fetchone()
            sample = conn.execute(
                "SELECT attributes FROM public.customer_attributes "
                "ORDER BY customer_events_count DESC LIMIT 1"
            ).fetchone()
            print(
                f"errors: {errors[0] if errors else '?'}; heaviest entity: "
                f"{json.dumps(sample[0] if sample else None)[:300]}"
            )
            generated = best_of(args.repeat, lambda: generated_statement(conn, worker, settings))
            print(
                f"generated SQL for the 18 predefined, all entities in one batch: "
                f"{generated:.2f} s ({entities / generated:.0f} entities/s; "
                f"hand-written / generated = {hand / generated:.2f})"
            )
            print(f"ratio (worker / hand-written): {hand / elapsed:.2f} (target >= 0.3)")
            print(cross_check(conn))
    finally:
        embedded.destroy(server)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
