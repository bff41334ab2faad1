"""Non-default schema names: every table is found through the settings, and custom queries still
read context values as ``public.context``."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from stream_cps import config
from stream_cps.attributes.worker import CalculationWorker
from stream_cps.db import schema


def test_custom_schema_names(pg_dsn: str) -> None:
    settings = config.load(
        flags={
            "dsn": pg_dsn,
            "cdp_schema": "crm",
            "ce_schema": "ev",
            "ps_schema": "ps2",
            "attr_schema": "attr2",
            "opensearch.outbox": "always",
        },
        environ={},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        schema.migrate(conn, settings.schemas)
        add_data(conn)
        assert CalculationWorker(settings).run_pass(conn) == 1
        row = conn.execute("SELECT attributes FROM crm.customer_attributes").fetchone()
        assert row is not None
        assert row[0] == {"total": 7, "share": 2}
        assert conn.execute("SELECT op FROM attr2.outbox").fetchall() == [("upsert",)]
        assert conn.execute("SELECT value FROM crm.context").fetchone() == ("1",)
        assert conn.execute(
            "SELECT attribute_id, count FROM "
            "attr2.cached_attributes_counts_customers_per_attribute ORDER BY 1"
        ).fetchall() == [("share", 1), ("total", 1)]


def add_data(conn: psycopg.Connection[Any]) -> None:
    for attribute_id, data_type, definition in [
        ("total", "int", {"type": "sum", "value": "payload->>'n'"}),
        (
            "share",
            "int",
            {
                "type": "custom",
                "query": "SELECT count(*) * (SELECT value::int FROM public.context "
                "WHERE key = 'entities') AS value FROM base",
            },
        ),
    ]:
        conn.execute(
            "INSERT INTO crm.attributes (id, data_type, definition) VALUES (%s, %s, %s)",
            [attribute_id, data_type, Jsonb(definition)],
        )
    conn.execute(
        "INSERT INTO crm.context (key, query) VALUES "
        "('entities', 'SELECT count(*) AS value FROM crm.customer_attributes')"
    )
    for event_id, n in (("a", 3), ("b", 4)):
        conn.execute(
            "INSERT INTO ev.customer_events (id, source_id, type, version, event_time, payload, "
            "stitched, identifiers) VALUES (%s, 'web', 'x', '1', now(), %s, now(), "
            "ARRAY['email:1'])",
            [event_id, Jsonb({"n": n})],
        )
    conn.execute(
        "INSERT INTO crm.customer_attributes (customer_entity_id, identifiers, modified, "
        "first_event_time, first_event_id) VALUES ('ent-1', ARRAY['email:1'], now(), now(), 'a')"
    )
