"""The benchmarks' per-process CPU figures keep the CPU of server processes that exited."""

from __future__ import annotations

import psycopg

from stream_cps_dev import embedded
from stream_cps_dev.procstat import cpu_seconds, server_cpu, server_pid, stat_fields
from tests.support import wait_until

EXITED = "exited server processes"


def test_a_closed_sessions_cpu_stays_in_the_servers_total(
    pg_server: embedded.EmbeddedPostgres,
) -> None:
    """A walsender whose stream the service closes, or a finished autovacuum worker, used to
    drop out of the figures: a change that replaced one long process by short ones looked
    like it saved their CPU."""
    postmaster = server_pid(pg_server.datadir)
    with psycopg.connect(pg_server.dsn, autocommit=True) as watcher:
        before = server_cpu(watcher, postmaster)
        with psycopg.connect(pg_server.dsn, autocommit=True) as busy:
            busy.execute("SELECT count(*) FROM generate_series(1, 5000000)")
            row = busy.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            used = cpu_seconds(stat_fields(int(row[0])))
        assert used >= 0.1  # the session did use CPU worth measuring
        # The postmaster reaps the backend soon after the connection closes.
        wait_until(
            lambda: server_cpu(watcher, postmaster)[EXITED] - before[EXITED] >= used - 0.02,
            timeout=10,
            what="the closed session's CPU counted as exited",
        )
        after = server_cpu(watcher, postmaster)
    assert after[EXITED] - before[EXITED] >= used - 0.02  # one clock tick of rounding
    assert sum(after.values()) - sum(before.values()) >= used - 0.02
