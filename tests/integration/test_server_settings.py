"""``init`` warns about the PostgreSQL settings that make stitching slow as the data grows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import psycopg.conninfo

from stream_cps.db.server_settings import slow_collation, slow_settings
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
            assert slow_settings(conn) == []
    finally:
        embedded.destroy(server)


def test_a_locale_collation_is_named_and_the_builtin_one_is_not(pg_dsn: str) -> None:
    """The embedded server compares bytes (builtin C.UTF-8); a database of libc's C.UTF-8
    collation on the same server gets the warning, naming its locale and the remedy."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert slow_collation(conn) is None
        conn.execute("DROP DATABASE IF EXISTS collation_libc")
        conn.execute(
            "CREATE DATABASE collation_libc TEMPLATE template0 LOCALE_PROVIDER libc "
            "LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
        )
    try:
        other = psycopg.conninfo.make_conninfo(pg_dsn, dbname="collation_libc")
        with psycopg.connect(other) as conn:
            warning = slow_collation(conn)
            assert warning is not None
            assert warning.startswith("the database's collation is C.UTF-8 (libc)")
            assert "BUILTIN_LOCALE 'C.UTF-8'" in warning
            assert slow_settings(conn)[-1] == warning
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP DATABASE collation_libc WITH (FORCE)")
