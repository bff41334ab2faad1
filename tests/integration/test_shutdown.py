"""After SIGTERM or kill -9, no backend keeps running the service's query."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.test_service import slot_active, stop
from tests.support import event, insert, service_process, setup_rules, wait_until

SLOW = '{"type": "custom", "query": "SELECT count(*) AS value FROM base, pg_sleep(60)"}'


def our_running_queries(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stream-cps attributes' "
        "AND state = 'active' AND query LIKE '%pg_sleep(60)%'"
    ).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_backend_keeps_running_our_query(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path, sig: int
) -> None:
    """Before: a 60 s definition kept its backend busy for the whole minute after exit."""
    setup_rules(db)
    db.execute(
        "INSERT INTO public.attributes (id, name, data_type, definition) "
        "VALUES ('slow', 'slow', 'int', %s::jsonb)",
        [SLOW],
    )
    with service_process(
        pg_dsn, tmp_path / "run.log", STREAM_CPS_ATTRIBUTES_STATEMENT_TIMEOUT_MS="120000"
    ) as proc:
        wait_until(lambda: slot_active(db), what="the slot")
        insert(db, [event("a", 1, email="x@a")])
        wait_until(lambda: our_running_queries(db) == 1, timeout=30, what="the slow query")
        code = stop(proc, sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    wait_until(lambda: our_running_queries(db) == 0, timeout=6, what="the backend to stop")
