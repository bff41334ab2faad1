"""`stream-cps init`: contract tables, idempotence, newer schemas refused, the guide's scripts."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.db import schema
from stream_cps.errors import SchemaError
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev import embedded
from tests.support import event, expected, insert, observed, setup_rules

CONTRACT_TABLES = {
    "public": {
        "sources",
        "events",
        "attributes",
        "meta_attributes",
        "context",
        "customer_attributes",
    },
    "cdp_ce": {"customer_events"},
    "cdp_ps": {"stitching_attributes_config"},
    "cdp_attr": {
        "cached_attributes_counts_customers_per_attribute",
        "cached_attribute_values_counts",
    },
}

GUIDE_SCRIPTS = [
    "UPDATE customer_attributes SET calculated = NULL;",
    "UPDATE customer_attributes SET calculated = NULL "
    "WHERE customer_entity_id = '0002b1f7-53e6-9d3f-705c-68320c05baa9';",
    "UPDATE customer_attributes SET modified = NULL;\n"
    "UPDATE customer_events SET stitched = NULL, identifiers = NULL;",
    "UPDATE customer_attributes SET modified = NULL, identifiers = ARRAY[]::text[];",
    "WITH entities AS (\nUPDATE customer_attributes\nSET modified = NULL\n"
    "WHERE customer_entity_id = '0002b1f7-53e6-9d3f-705c-68320c05baa9' RETURNING identifiers\n)\n"
    "UPDATE customer_events SET stitched = NULL, identifiers = NULL\n"
    "FROM entities WHERE customer_events.identifiers <@ entities.identifiers;",
    "UPDATE cdp_attr.context SET modified = NULL;",
    "UPDATE cdp_attr.cached_attributes_counts_customers_per_attribute SET modified = NULL;",
    "UPDATE cdp_attr.cached_attribute_values_counts SET modified = NULL;",
    "UPDATE cdp_attr.customer_entities SET calculated = NULL;",  # the PostgreSQL runbook's name
]


def psql(dsn: str, script: str) -> str:
    result = subprocess.run(
        [str(embedded.bin_dir() / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def catalog(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT n.nspname, c.relname, c.relkind, pg_get_viewdef(c.oid) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname IN ('public', 'cdp_ce', 'cdp_ps', 'cdp_attr') ORDER BY 1, 2"
    ).fetchall()


def init(dsn: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", "init", "--dsn", dsn, *flags],
        capture_output=True,
        text=True,
        check=False,
    )


def test_init_twice_creates_contract_tables_and_changes_nothing(pg_dsn: str) -> None:
    first = init(pg_dsn)
    assert first.returncode == 0, first.stderr
    with psycopg.connect(pg_dsn) as conn:
        before = catalog(conn)
    second = init(pg_dsn)
    assert second.returncode == 0, second.stderr
    assert "applied" not in second.stdout
    with psycopg.connect(pg_dsn) as conn:
        assert catalog(conn) == before
    for schema_name, tables in CONTRACT_TABLES.items():
        listing = psql(pg_dsn, f"\\dt {schema_name}.*")
        for table in tables:
            assert f" {table} " in listing, (schema_name, table, listing)


def test_guide_scripts_run_in_plain_psql(db: psycopg.Connection[Any], pg_dsn: str) -> None:
    for script in GUIDE_SCRIPTS:
        psql(pg_dsn, script)


def test_the_runbooks_customer_entities_name_makes_every_entity_due(
    db: psycopg.Connection[Any], pg_dsn: str
) -> None:
    db.execute(
        "INSERT INTO customer_attributes (customer_entity_id, identifiers, modified, calculated, "
        "first_event_time, first_event_id) VALUES ('e1', ARRAY['email:a@x'], now(), now(), "
        "now(), 'ev1')"
    )
    psql(pg_dsn, "UPDATE cdp_attr.customer_entities SET calculated = NULL;")
    assert db.execute(
        "SELECT calculated FROM customer_attributes WHERE customer_entity_id = 'e1'"
    ).fetchone() == (None,)


def test_guide_stitching_config_ddl_indexes(db: psycopg.Connection[Any]) -> None:
    indexes = {
        row[0]
        for row in db.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'cdp_ps' "
            "AND tablename = 'stitching_attributes_config'"
        )
    }
    assert any("UNIQUE" in i and "(event_id, attribute_id)" in i for i in indexes)
    assert any("(attribute_id)" in i for i in indexes)
    assert any("(event_id)" in i and "UNIQUE" not in i for i in indexes)


def test_newer_schema_is_refused(db: psycopg.Connection[Any], settings: config.Settings) -> None:
    db.execute(
        "INSERT INTO cdp_ps.stream_cps_schema (version, name) VALUES (%s, 'from the future')",
        [schema.latest_version() + 1],
    )
    with pytest.raises(SchemaError, match="newer than this stream-cps understands"):
        schema.migrate(db, settings.schemas)
    with pytest.raises(SchemaError, match="newer"):
        schema.check(db, settings.schemas)


def test_run_refuses_uninitialised_database(pg_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_cps", "run", "--dsn", pg_dsn],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "run `stream-cps init` first" in result.stderr


def test_configured_schema_names_are_used(pg_dsn: str) -> None:
    custom = config.load(
        flags={
            "dsn": pg_dsn,
            "cdp_schema": "cdp",
            "ce_schema": "ce",
            "ps_schema": "ps",
            "attr_schema": "attr",
        },
        environ={},
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        schema.migrate(conn, custom.schemas)
        schema.check(conn, custom.schemas)
        with pytest.raises(SchemaError, match="run `stream-cps init` first"):
            schema.check(conn, config.Schemas())
    for script in GUIDE_SCRIPTS[:5]:
        psql(pg_dsn, script)  # unqualified names resolve through the public views


def test_postgres_runs_with_logical_wal(db: psycopg.Connection[Any]) -> None:
    row = db.execute("SHOW wal_level").fetchone()
    assert row == ("logical",)


def slots_of(conn: psycopg.Connection[Any], database: str) -> list[str]:
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [database]
        )
    ]


def test_two_databases_on_one_server_cannot_share_a_slot_name(
    pg_server: Any, tmp_path: Path
) -> None:
    """Slot names are per server: a second database with the default slot name is refused at
    once, by init and by run, with a line naming stitching.slot_name (it used to "hold the
    lease" and hang); --no-replication sets up a Kafka-only database without any slot."""
    names = [f"two_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    dsns = [f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={n}" for n in names]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            assert init(dsns[0]).returncode == 0
            assert slots_of(admin, names[0]) == ["stream_cps"]
            refused = init(dsns[1])
            assert refused.returncode == 2
            assert "stitching.slot_name" in refused.stderr and names[0] in refused.stderr
            errors = [line for line in refused.stderr.splitlines() if "stream-cps:" in line]
            assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
            kafka_only = init(dsns[1], "--no-replication")
            assert kafka_only.returncode == 0, kafka_only.stderr
            assert slots_of(admin, names[1]) == []
            run = subprocess.run(
                [sys.executable, "-m", "stream_cps", "run", "--dsn", dsns[1]],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert run.returncode == 2, run.stderr[-2000:]
            assert "stitching.slot_name" in run.stderr and "Traceback" not in run.stderr
        finally:
            for name in names:
                admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s AND NOT active",
                    [name],
                )
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_identifier_clusters_migration_keeps_a_stitched_database(
    pg_dsn: str, settings: config.Settings
) -> None:
    """Migration 0012 on a database stitched before it: identifier_entities (then a table)
    becomes clusters with the same mapping, read through the view of the same name, and
    stitching carries on from there (a new event joins a migrated entity)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with conn.transaction():  # the schema as it was at version 11
            conn.execute("CREATE SCHEMA cdp_ps")
            conn.execute(
                "CREATE TABLE cdp_ps.stream_cps_schema (version integer PRIMARY KEY, "
                "name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())"
            )
            for version, name, template in schema.migrations():
                if version > 11:
                    break
                conn.execute(schema.render(template, settings.schemas))
                conn.execute(
                    "INSERT INTO cdp_ps.stream_cps_schema (version, name) VALUES (%s, %s)",
                    [version, name],
                )
        setup_rules(conn)
        insert(conn, [event("a", 1, email="x@a", cookie="c1"), event("b", 2, cookie="c2")])
        a, b = entity_id_for("a"), entity_id_for("b")
        conn.execute(  # what the stitcher of version 11 wrote for them
            "INSERT INTO cdp_ps.identifier_entities VALUES "
            "('email:x@a', %(a)s), ('cookie:c1', %(a)s), ('cookie:c2', %(b)s)",
            {"a": a, "b": b},
        )
        conn.execute(
            "INSERT INTO customer_attributes (customer_entity_id, identifiers, modified, "
            "first_event_time, first_event_id) SELECT %s, %s, now(), event_time, id "
            "FROM cdp_ce.customer_events WHERE id = %s",
            [a, ["cookie:c1", "email:x@a"], "a"],
        )
        conn.execute(
            "INSERT INTO customer_attributes (customer_entity_id, identifiers, modified, "
            "first_event_time, first_event_id) SELECT %s, %s, now(), event_time, id "
            "FROM cdp_ce.customer_events WHERE id = %s",
            [b, ["cookie:c2"], "b"],
        )
        conn.execute(
            "UPDATE cdp_ce.customer_events SET stitched = now(), identifiers = CASE id "
            "WHEN 'a' THEN ARRAY['cookie:c1', 'email:x@a'] ELSE ARRAY['cookie:c2'] END"
        )

        assert schema.migrate(conn, settings.schemas) == [12]
        assert dict(
            conn.execute("SELECT identifier, entity_id FROM cdp_ps.identifier_entities")
        ) == {"email:x@a": a, "cookie:c1": a, "cookie:c2": b}
        assert sorted(
            r[0] for r in conn.execute("SELECT entity_id FROM cdp_ps.entity_clusters")
        ) == sorted([a, b])

        insert(conn, [event("c", 3, email="x@a", cookie="c2")])  # joins both: a merge
        for _ in Stitcher(settings).sweep(conn):
            pass
        assert observed(conn) == expected(conn)
        assert {r[0] for r in conn.execute("SELECT entity_id FROM cdp_ps.identifier_entities")} == {
            a
        }
