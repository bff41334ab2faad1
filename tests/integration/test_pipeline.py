"""End to end through the CLI: init creates the index; run stitches, calculates and relays;
`stream-cps relay` delivers on its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg

from stream_cps import config
from stream_cps.config import Schemas
from stream_cps_dev.sample import generator
from tests.integration.test_outbox_relay import index_docs, live_entities
from tests.support import insert, start_service, wait_until


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def os_env(pg_dsn: str, opensearch_node: Any) -> dict[str, str]:
    return {
        "STREAM_CPS_DSN": pg_dsn,
        "STREAM_CPS_OPENSEARCH_URL": opensearch_node.url,
        "STREAM_CPS_OPENSEARCH_INDEX": f"pipeline-{uuid.uuid4().hex[:8]}",
        "STREAM_CPS_OPENSEARCH_REPLICAS": "0",
        "STREAM_CPS_OPENSEARCH_POLL_INTERVAL": "0.05",
    }


def index_settings(env: dict[str, str]) -> config.Settings:
    return config.load(environ=env)


def test_run_stitches_calculates_and_indexes_every_live_entity(
    pg_dsn: str, opensearch_node: Any, tmp_path: Path
) -> None:
    env = os_env(pg_dsn, opensearch_node)
    result = cli("init", env=env)
    assert result.returncode == 0, result.stderr
    assert f"OpenSearch index {env['STREAM_CPS_OPENSEARCH_INDEX']} ready" in result.stdout
    settings_view = index_settings(env)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(generator.config_sql(Schemas()))
        proc = start_service(pg_dsn, tmp_path / "run.log", **env)
        try:
            insert(conn, list(generator.events(seed=17, persons=80, per_person=5)))

            def converged() -> bool:
                pending = conn.execute(
                    "SELECT (SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NULL)"
                    " + (SELECT count(*) FROM customer_attributes "
                    "    WHERE calculated IS NULL OR calculated < modified)"
                    " + (SELECT count(*) FROM cdp_attr.outbox WHERE delivered IS NULL)"
                ).fetchone()
                return pending == (0,)

            wait_until(converged, timeout=60, what="stitch, calculate and relay")
            docs = index_docs(settings_view)
            live = live_entities(conn)
            assert docs == live
            assert all("first_seen" in source["attributes"] for _, source in docs.values())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_relay_command_delivers_alone_and_needs_a_url(
    db: psycopg.Connection[Any], pg_dsn: str, opensearch_node: Any, tmp_path: Path
) -> None:
    result = cli("relay", env={"STREAM_CPS_DSN": pg_dsn})
    assert result.returncode == 2
    assert "opensearch.url: required" in result.stderr
    env = os_env(pg_dsn, opensearch_node)
    db.execute(
        "INSERT INTO customer_attributes (customer_entity_id, identifiers, attributes, modified, "
        "calculated, first_event_time, first_event_id, version) VALUES "
        "('e1', ARRAY['email:x'], '{\"a\": 1}', now(), now(), now(), 'ev1', 7)"
    )
    db.execute("INSERT INTO cdp_attr.outbox (entity_id, op, version) VALUES ('e1', 'upsert', 7)")
    log = (tmp_path / "relay.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "relay"],
        env={**os.environ, **env},
        stdout=log,
        stderr=log,
    )
    try:
        settings_view = index_settings(env)

        def delivered() -> bool:
            row = db.execute(
                "SELECT count(*) FROM cdp_attr.outbox WHERE delivered IS NULL"
            ).fetchone()
            return row == (0,)

        wait_until(delivered, timeout=30, what="relay delivery")
        docs = index_docs(settings_view)
        assert docs["e1"][0] == 7
        assert docs["e1"][1]["attributes"] == {"a": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
