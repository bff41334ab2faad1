"""The slot's life outside the service's control: invalidated by the server, or not creatable.

Each test runs its own embedded server, because each needs server settings (a tiny
``max_slot_wal_keep_size``, no free ``max_replication_slots``) the shared one must not get.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps_dev import embedded
from tests.support import service_process


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
        embedded.destroy(server)
