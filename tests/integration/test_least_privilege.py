"""``stream-cps run`` as a non-superuser: REPLICATION plus what ``init --service-role`` grants.

The schema owner (here the superuser) runs ``init``; the service role owns nothing, cannot
create roles, read files or the catalogs' secrets, and still stitches and calculates."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_service import slot_active, stop
from tests.support import (
    event,
    expected,
    insert,
    observed,
    service_process,
    setup_rules,
    unstitched,
    wait_until,
)


@pytest.fixture
def service_user(pg_dsn: str) -> Iterator[str]:
    """A LOGIN REPLICATION role that owns nothing (dropped after the test)."""
    user = "svc_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{user}" LOGIN REPLICATION')
    yield user
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'DROP OWNED BY "{user}"')
        admin.execute(f'DROP ROLE "{user}"')


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", *args],
        env={**os.environ, "STREAM_CPS_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


def as_user(dsn: str, user: str) -> str:
    return dsn.replace("user=postgres", f"user={user}")


def test_run_as_a_non_superuser_with_the_grants_init_applies(
    pg_dsn: str, tmp_path: Path, service_user: str
) -> None:
    done = cli(pg_dsn, "init", "--service-role", service_user)
    assert done.returncode == 0, done.stderr
    assert f"granted {service_user}" in done.stdout
    with psycopg.connect(pg_dsn, autocommit=True) as db:
        setup_rules(db)
        db.execute(
            "INSERT INTO public.attributes (id, name, data_type, definition) VALUES "
            "('n', 'n', 'int', '{\"type\": \"num_of_unique\", \"value\": \"payload->>''email''\"}')"
        )
        service_dsn = as_user(pg_dsn, service_user)
        with psycopg.connect(service_dsn) as svc:
            row = svc.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (False,)
        with service_process(service_dsn, tmp_path / "run.log") as proc:
            wait_until(lambda: slot_active(db), what="the slot")
            insert(db, [event(f"e{n}", n, email=f"p{n % 3}@x") for n in range(12)])
            wait_until(lambda: unstitched(db) == 0, what="stitching")
            wait_until(
                lambda: (
                    db.execute(
                        "SELECT count(*) FROM customer_attributes WHERE calculated IS NOT NULL"
                    ).fetchone()
                    == (3,)
                ),
                what="calculation",
            )
            assert stop(proc) == 0
        assert observed(db) == expected(db)
        attrs = db.execute("SELECT attributes FROM customer_attributes").fetchall()
        assert [a[0] for a in attrs] == [{"n": 1}] * 3
    assert "Traceback" not in (tmp_path / "run.log").read_text()


def test_run_without_the_grants_is_one_line_and_exit_2(pg_dsn: str, service_user: str) -> None:
    assert cli(pg_dsn, "init").returncode == 0
    run = cli(as_user(pg_dsn, service_user), "run")
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("stream-cps:")]
    assert len(lines) == 1, run.stderr
    assert "stream-cps init --service-role" in lines[0]
