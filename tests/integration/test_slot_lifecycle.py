"""The slot's life outside the service's control: invalidated by the server, or not creatable.

Each test runs its own embedded server, because each needs server settings (a tiny
``max_slot_wal_keep_size``, no free ``max_replication_slots``) the shared one must not get.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps_dev import embedded
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

SLOT = "stream_cps"


@pytest.fixture
def small_wal_server(tmp_path: Path) -> Iterator[embedded.EmbeddedPostgres]:
    """A server that invalidates a slot holding back more than 1 MB of WAL."""
    server = embedded.start(tmp_path / "pg", settings={"max_slot_wal_keep_size": "1MB"})
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, Schemas())
            setup_rules(conn)
            conn.execute("CREATE TABLE filler (x text)")
        yield server
    finally:
        keep_server_log(server, tmp_path)
        embedded.destroy(server)


def keep_server_log(server: embedded.EmbeddedPostgres, tmp_path: Path) -> None:
    """The server's log outlives its data directory, for a failure to be read afterwards."""
    log = server.datadir / "server.log"
    if log.exists():
        shutil.copy(log, tmp_path / "server.log")


def wal_status(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
    ).fetchone()
    return str(row[0]) if row else None


def slot_streaming(conn: psycopg.Connection[Any]) -> bool:
    return wal_status(conn) not in (None, "lost")


def invalidate_slot(conn: psycopg.Connection[Any]) -> None:
    """Write a few WAL segments past the slot and checkpoint: the server drops the WAL the slot
    still needs (max_slot_wal_keep_size) and marks it lost."""
    for _ in range(10):
        for _ in range(3):
            conn.execute("INSERT INTO filler VALUES ('x')")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        if wal_status(conn) == "lost":
            return
    raise AssertionError(f"slot not invalidated: wal_status {wal_status(conn)}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


@pytest.mark.parametrize("replication", ["stream", "peek"])
def test_a_slot_invalidated_while_the_service_was_away_is_recreated(
    small_wal_server: embedded.EmbeddedPostgres, tmp_path: Path, replication: str
) -> None:
    """wal_status = 'lost' at start: the slot is dropped and recreated, the sweep stitches
    what was inserted meanwhile, and new events stream as before."""
    dsn, log = small_wal_server.dsn, tmp_path / "run.log"
    env = {"STREAM_CPS_STITCHING_REPLICATION": replication}
    with psycopg.connect(dsn, autocommit=True) as conn:
        with service_process(dsn, log, **env) as proc:
            wait_until(lambda: slot_streaming(conn), what="the slot")
            insert(conn, [event("before", 1, email="x@a")])
            wait_until(lambda: unstitched(conn) == 0, timeout=10, what="first event")
            assert stop(proc) == 0
        insert(conn, [event(f"away{n}", 2 + n, email="x@a", cookie=f"c{n}") for n in range(5)])
        invalidate_slot(conn)
        with service_process(dsn, log, **env) as proc:
            wait_until(lambda: unstitched(conn) == 0, timeout=30, what="events of the gap")
            wait_until(lambda: slot_streaming(conn), what="a new slot")
            insert(conn, [event("after", 9, email="y@a", cookie="c1")])
            wait_until(lambda: unstitched(conn) == 0, timeout=10, what="a new event")
            assert observed(conn) == expected(conn)
            assert proc.poll() is None
            assert stop(proc) == 0
    output = log.read_text()
    assert f"WARNING stream_cps.sources.postgres.slot: replication slot {SLOT}" in output
    assert "dropped and recreated" in output and "Traceback" not in output


@pytest.mark.parametrize("replication", ["stream", "peek"])
def test_a_slot_invalidated_while_running_is_recreated(
    small_wal_server: embedded.EmbeddedPostgres, tmp_path: Path, replication: str
) -> None:
    """The service stalls (SIGSTOP) long enough for the server to invalidate its slot; when it
    goes on, the reader's error is recognised and the slot recreated, nothing lost."""
    dsn, log = small_wal_server.dsn, tmp_path / "run.log"
    env = {"STREAM_CPS_STITCHING_REPLICATION": replication}
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        service_process(dsn, log, **env) as proc,
    ):
        wait_until(lambda: slot_streaming(conn), what="the slot")
        insert(conn, [event("before", 1, email="x@a")])
        wait_until(lambda: unstitched(conn) == 0, timeout=10, what="first event")
        proc.send_signal(signal.SIGSTOP)
        try:
            insert(conn, [event(f"stalled{n}", 2 + n, email="x@a") for n in range(5)])
            invalidate_slot(conn)
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_until(lambda: unstitched(conn) == 0, timeout=30, what="events of the stall")
        wait_until(lambda: slot_streaming(conn), what="a new slot")
        insert(conn, [event("after", 9, email="y@a")])
        wait_until(lambda: unstitched(conn) == 0, timeout=10, what="a new event")
        assert observed(conn) == expected(conn)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert stop(proc) == 0
    output = log.read_text()
    assert "dropped and recreated" in output and "Traceback" not in output


def test_no_free_replication_slot_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """max_replication_slots used up: no retry for ever, one line naming the setting."""
    server = embedded.start(tmp_path / "pg", settings={"max_replication_slots": "1"})
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, Schemas())
            conn.execute("SELECT pg_create_physical_replication_slot('occupied')")
        init = subprocess.run(
            [sys.executable, "-m", "stream_cps", "init"],
            env={**os.environ, "STREAM_CPS_DSN": server.dsn},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 2, init.stderr
        assert "max_replication_slots" in init.stderr, init.stderr
        log = tmp_path / "run.log"
        with service_process(server.dsn, log) as proc:
            code = proc.wait(timeout=30)
        output = log.read_text()
        assert code == 2, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("stream-cps:")]
        assert len(lines) == 1 and "max_replication_slots" in lines[0], output[-3000:]
        assert "Traceback" not in output and "retrying" not in output
    finally:
        keep_server_log(server, tmp_path)
        embedded.destroy(server)
