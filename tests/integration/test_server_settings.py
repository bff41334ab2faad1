"""``init`` warns about the PostgreSQL settings that make stitching slow as the data grows."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps.db.server_settings import outgrown_cache, slow_collation, slow_settings
from stream_cps_dev import embedded


def test_init_warns_about_the_defaults(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        shown = conn.execute("SHOW shared_buffers").fetchone()
    done = subprocess.run(
        [sys.executable, "-m", "stream_cps", "init", "--no-replication"],
        env={**os.environ, "STREAM_CPS_DSN": pg_dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert shown is not None
    # the test server runs PostgreSQL's defaults (128MB, 1GB, 5min)
    assert (
        f"WARNING stream_cps: shared_buffers is {shown[0]} (at least 512MB recommended)"
        in done.stderr
    )
    assert "WARNING stream_cps: max_wal_size is 1GB" in done.stderr
    assert "WARNING stream_cps: checkpoint_timeout is 5min" in done.stderr


def test_no_warning_on_a_tuned_server(tmp_path: Path) -> None:
    server = embedded.start(
        tmp_path / "pg",
        settings={
            "shared_buffers": "512MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "15min",
        },
    )
    try:
        with psycopg.connect(server.dsn) as conn:
            assert slow_settings(conn, Schemas()) == []
    finally:
        embedded.destroy(server)


@pytest.mark.parametrize(
    ("locale", "slow"),
    [
        ("LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'", False),
        ("LOCALE_PROVIDER libc LC_COLLATE 'C' LC_CTYPE 'C.UTF-8'", False),
        ("LOCALE_PROVIDER libc LC_COLLATE 'POSIX' LC_CTYPE 'C.UTF-8'", False),
        ("LOCALE_PROVIDER libc LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'", True),
    ],
)
def test_a_locale_collation_is_named_and_byte_order_ones_are_not(
    pg_dsn: str, locale: str, slow: bool
) -> None:
    """Databases of each kind on the test server: only libc's C.UTF-8 (strcoll) gets the
    warning, naming its locale and the remedy."""
    name = f"collation_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 {locale}")
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(pg_dsn, dbname=name)) as conn:
            warning = slow_collation(conn)
            if not slow:
                assert warning is None
                return
            assert warning is not None
            assert warning.startswith("the database's collation is C.UTF-8 (libc)")
            assert "TEMPLATE template0 LOCALE_PROVIDER builtin BUILTIN_LOCALE" in warning
            assert slow_settings(conn, Schemas())[-1] == warning
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_the_embedded_server_compares_bytes(tmp_path: Path) -> None:
    """What the demo, the tests and the benches run on (``embedded.start``'s initdb)."""
    server = embedded.start(tmp_path / "pg")
    try:
        with psycopg.connect(server.dsn) as conn:
            assert slow_collation(conn) is None
            row = conn.execute(
                "SELECT datlocprovider FROM pg_database WHERE datname = current_database()"
            ).fetchone()
            assert row == ("b",)
    finally:
        embedded.destroy(server)


def test_a_buffer_cache_smaller_than_the_hot_tables_is_named(tmp_path: Path) -> None:
    """The floors are for a small database; what shared_buffers must hold grows with the
    data. A server with 1MB of it: no warning while the tables are empty, one naming both
    sizes once identifier_clusters outgrows it (``init`` logs it, ``status`` lists it)."""
    server = embedded.start(tmp_path / "pg", settings={"shared_buffers": "1MB"})
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert outgrown_cache(conn, Schemas()) is None  # not initialised yet
            schema.migrate(conn, Schemas())
            assert outgrown_cache(conn, Schemas()) is None
            conn.execute(
                "INSERT INTO cdp_ps.identifier_clusters (identifier, cluster) "
                "SELECT 'email:person' || g || '@example.com', g FROM generate_series(1, 30000) g"
            )
            warning = outgrown_cache(conn, Schemas())
            assert warning is not None
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('cdp_ps.identifier_clusters') "
                "+ pg_total_relation_size('customer_attributes') "
                "+ pg_total_relation_size('cdp_ce.customer_events_identifiers_idx'))"
            ).fetchone()
            assert size is not None
            assert warning.startswith(f"shared_buffers is 1MB, less than the {size[0]} of ")
            assert warning in slow_settings(conn, Schemas())
    finally:
        embedded.destroy(server)
