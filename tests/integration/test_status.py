"""`stream-cps status` against real processes: active, standby, stopped, unreachable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tests.support import event, insert, service_process, setup_rules, unstitched, wait_until


def _slot(dsn: str) -> str:
    """A slot of this test's own: slot names are per server, shared with other suites."""
    return "obs_" + dsn.rsplit("dbname=", 1)[1].split()[0]


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAM_CPS_DSN": dsn, "STREAM_CPS_STITCHING_SLOT_NAME": _slot(dsn)}
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", *args], capture_output=True, text=True, env=env
    )


def _status(dsn: str) -> tuple[int, dict[str, Any]]:
    result = _cli("status", "--json", dsn=dsn)
    return result.returncode, json.loads(result.stdout)


def test_status_shows_the_active_process_its_standby_and_a_stopped_service(
    pg_dsn: str, tmp_path: Path
) -> None:
    assert _cli("init", dsn=pg_dsn).returncode == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        setup_rules(conn)
    env = {"STREAM_CPS_STITCHING_SLOT_NAME": _slot(pg_dsn)}
    with service_process(pg_dsn, tmp_path / "a.log", **env) as active:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            insert(conn, [event(f"e{i}", i, email=f"p{i % 3}@x") for i in range(20)])
            wait_until(lambda: unstitched(conn) == 0, what="stitched")
        wait_until(lambda: _status(pg_dsn)[0] == 0, what="status exit 0")
        code, snap = _status(pg_dsn)
        assert snap["role"] == "active" and snap["holder"]["pid"] > 0
        assert snap["health"] == "ok" and snap["events_waiting"] == 0
        assert snap["slot"]["exists"] and snap["slot"]["active"]
        assert snap["last_stitched"] is not None
        text = _cli("status", dsn=pg_dsn)
        assert text.returncode == 0, text.stderr
        assert "role          active: pid" in text.stdout
        assert "health        ok" in text.stdout

        with service_process(pg_dsn, tmp_path / "b.log", **env):
            wait_until(lambda: len(_status(pg_dsn)[1]["standbys"]) == 1, what="a standby")
            code, snap = _status(pg_dsn)
            assert code == 0 and snap["role"] == "active"
            assert "1 standby" in _cli("status", dsn=pg_dsn).stdout
        active.terminate()
        active.wait(timeout=30)
    code, snap = _status(pg_dsn)
    assert code == 1 and snap["role"] == "none"
    assert any("no process holds the lease" in p for p in snap["problems"])


def test_waiting_events_make_status_degraded(pg_dsn: str) -> None:
    """Events inserted long ago and never stitched (no service running)."""
    assert _cli("init", dsn=pg_dsn).returncode == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        setup_rules(conn)
        insert(conn, [event("old", 1, email="a@x")])
        conn.execute("UPDATE cdp_ce.customer_events SET created = now() - interval '2 minutes'")
    code, snap = _status(pg_dsn)
    assert code == 1
    assert snap["events_waiting"] == 1 and snap["events_waiting_oldest_age"] > 100
    assert any("events wait unstitched" in p for p in snap["problems"])


def test_unreachable_database_or_missing_schema_is_exit_2(pg_dsn: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = _cli("status", "--json", dsn=f"host=127.0.0.1 port={port} dbname=x user=postgres")
    assert down.returncode == 2
    assert json.loads(down.stdout)["health"] == "unreachable"
    assert "Traceback" not in down.stderr
    bare = _cli("status", dsn=pg_dsn)  # a database without `init`
    assert bare.returncode == 2, bare.stdout + bare.stderr
    assert "init" in bare.stderr and "Traceback" not in bare.stderr


def test_status_names_the_server_settings_that_will_make_stitching_slow(pg_dsn: str) -> None:
    """The test server runs PostgreSQL's defaults: status shows each (health unaffected)."""
    assert _cli("init", dsn=pg_dsn).returncode == 0
    _, snap = _status(pg_dsn)
    assert [w.split(" is ")[0] for w in snap["settings"]] == [
        "shared_buffers",
        "max_wal_size",
        "checkpoint_timeout",
    ]
    assert not any("shared_buffers" in p for p in snap["problems"])
    assert "settings      shared_buffers is 128MB" in _cli("status", dsn=pg_dsn).stdout
