"""Shared fixtures: one real PostgreSQL (wal_level=logical) per test session.

A service that cannot start FAILS the run with its reason; nothing is skipped.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.db import schema
from stream_cps_dev import embedded

# Service fixtures for Kafka and OpenSearch live beside this file, one module per service.
pytest_plugins = ["tests.kafka_fixtures", "tests.opensearch_fixtures"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[embedded.EmbeddedPostgres]:
    """The server .ci/run started (STREAM_CPS_TEST_PG_DIR), else one of our own."""
    shared = os.environ.get("STREAM_CPS_TEST_PG_DIR")
    if shared:
        port_file = Path(shared) / "port"
        if not port_file.exists():
            pytest.fail(f"STREAM_CPS_TEST_PG_DIR={shared} has no running server", pytrace=False)
        port = int(port_file.read_text())
        server = embedded.EmbeddedPostgres(Path(shared).resolve() / "data", port)
        try:
            psycopg.connect(server.dsn, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL from STREAM_CPS_TEST_PG_DIR is not reachable: {exc}")
        yield server
        return
    workdir = Path(tempfile.mkdtemp(prefix="stream-cps-pg-"))
    try:
        server = embedded.start(workdir / "data")
    except Exception as exc:  # any failure to start is a test failure, never a skip
        pytest.fail(f"PostgreSQL could not start: {exc}", pytrace=False)
    yield server
    embedded.destroy(server)


@pytest.fixture
def pg_dsn(pg_server: embedded.EmbeddedPostgres) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
    yield dsn
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        # A killed service's walsender may hold its slot for a moment: end it, then drop.
        for _ in range(50):
            admin.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active",
                [name],
            )
            admin.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s AND NOT active",
                [name],
            )
            left = admin.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE database = %s", [name]
            ).fetchone()
            if left == (0,):
                break
            time.sleep(0.1)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(pg_dsn: str) -> config.Settings:
    return config.load(flags={"dsn": pg_dsn}, environ={})


@pytest.fixture
def db(settings: config.Settings) -> Iterator[psycopg.Connection[Any]]:
    """An initialised database (``stream-cps init`` applied), autocommit connection."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        schema.migrate(conn, settings.schemas)
        yield conn
