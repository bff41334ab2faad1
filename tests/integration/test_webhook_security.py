"""The webhook's controls (docs/security.md) against the real server over real TLS, with the
real PostgreSQL behind it: who may post, what a post may carry, how much of it is read, how
many requests and database sessions run at once, where the server listens."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.errors import ConfigError
from stream_cps.service.process import webhook_server
from stream_cps.sources.changefeed.webhook import MAX_BODY
from stream_cps_dev.encode import json_event
from stream_cps_dev.sample import generator
from tests.support import expected, observed
from tests.webhook_support import (
    SECRET,
    changefeed_body,
    client_context,
    client_pki,
    post,
    raw_post,
    running,
    webhook_settings,
)

Row = tuple[Any, ...]


def count(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


STITCHED = "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"


@pytest.fixture
def rows(settings: config.Settings, db: psycopg.Connection[Any]) -> list[Row]:
    """Sample rules and 20 events in the table, unstitched (a changefeed would carry them)."""
    db.execute(generator.config_sql(settings.schemas))
    events = list(generator.events(seed=7, persons=10, per_person=4))[:20]
    from psycopg import sql

    generator.copy_events(
        db.cursor(), sql.Identifier(settings.schemas.ce, "customer_events"), events
    )
    return events


def test_client_certificates_are_verified_against_the_client_ca(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    trusted = client_pki(tmp_path / "trusted", "changefeed")
    stranger = client_pki(tmp_path / "stranger", "stranger")
    s = webhook_settings(settings, tmp_path, **{"webhook.client_ca_file": str(trusted.ca)})
    with running(s) as server:
        for context in (client_context(s), client_context(s, stranger)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                post(server, context, changefeed_body(rows[:5]))
        assert count(db, STITCHED) == 0
        status, answer = post(server, client_context(s, trusted), changefeed_body(rows))
    assert (status, answer["stitched"]) == (200, len(rows))


def test_a_secret_header_is_required_and_compared_whole(
    settings: config.Settings,
    db: psycopg.Connection[Any],
    rows: list[Row],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    s = webhook_settings(settings, tmp_path, **{"webhook.auth_secret": SECRET})
    with running(s) as server:
        context = client_context(s)
        body = changefeed_body(rows[:5])
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET[:-1]}):
            status, _ = post(server, context, body, headers)
            assert status == 401
        assert count(db, STITCHED) == 0
        status, answer = post(server, context, changefeed_body(rows), {"Authorization": SECRET})
    assert (status, answer["stitched"]) == (200, len(rows))
    assert SECRET not in caplog.text and "s3cr3t" not in caplog.text


def test_the_secret_comes_from_the_environment_or_a_file_and_the_header_is_configurable(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")  # the trailing newline is not part of it
    env = {"STREAM_CPS_WEBHOOK_AUTH_SECRET": "from-env"}
    from_env = config.load(flags=dict(settings.values), environ=env)
    from_file = settings.replace(
        **{"webhook.auth_secret_file": str(secret_file), "webhook.auth_header": "X-Feed-Token"}
    )
    cases = [(from_env, "Authorization", "from-env"), (from_file, "X-Feed-Token", "from-a-file")]
    for n, (base, header, secret) in enumerate(cases):
        s = webhook_settings(base, tmp_path / str(n))
        with running(s) as server:
            context = client_context(s)
            assert post(server, context, changefeed_body(rows[:1]))[0] == 401
            status, _ = post(server, context, changefeed_body(rows), {header: secret})
            assert status == 200
    assert count(db, STITCHED) == len(rows)


def test_without_any_client_authentication_the_server_refuses_to_start(
    settings: config.Settings, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    s = webhook_settings(settings, tmp_path)
    with pytest.raises(ConfigError, match="webhook.allow_unauthenticated"):
        webhook_server(s)
    tls = ["--cert", str(s.webhook.cert_file), "--key", str(s.webhook.key_file)]
    cli = subprocess.run(
        [sys.executable, "-m", "stream_cps.cli", "webhook", "--dsn", settings.dsn, *tls],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("STREAM_CPS_WEBHOOK")},
    )
    assert cli.returncode == 2
    [line] = cli.stderr.strip().splitlines()
    assert line.startswith("stream-cps: webhook:") and "allow_unauthenticated" in line


def test_an_explicitly_unauthenticated_server_serves_anyone(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    s = webhook_settings(settings, tmp_path, **{"webhook.allow_unauthenticated": True})
    with running(s) as server:
        status, answer = post(server, client_context(s), changefeed_body(rows))
    assert (status, answer["stitched"]) == (200, len(rows))


def _secured(settings: config.Settings, tmp_path: Path, **changes: Any) -> config.Settings:
    return webhook_settings(settings, tmp_path, **{"webhook.auth_secret": SECRET, **changes})


AUTH = {"Authorization": SECRET}


def test_plain_customer_events_are_dead_letters_unless_accepted(
    settings: config.Settings, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """The webhook is a changefeed's: a body of plain events would write rows no table change
    produced, so they are refused unless webhook.accept_events says otherwise."""
    db.execute(generator.config_sql(settings.schemas))
    events = list(generator.events(seed=9, persons=5, per_person=4))[:8]
    entries = [json.loads(json_event(row)) for row in events]

    def body(part: list[Any]) -> bytes:
        return json.dumps({"payload": part, "length": len(part)}).encode()

    off = _secured(settings, tmp_path / "off")
    with running(off) as server:
        status, answer = post(server, client_context(off), body(entries[:4]), AUTH)
    assert (status, answer["dead_letters"]) == (200, 4)
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events") == 0
    reasons = db.execute(
        "SELECT DISTINCT reason FROM cdp_ps.kafka_dead_letters WHERE source = 'webhook'"
    ).fetchall()
    assert reasons == [
        ("a plain customer event, not a changefeed row (webhook.accept_events is off)",)
    ]
    on = _secured(settings, tmp_path / "on", **{"webhook.accept_events": True})
    with running(on) as server:
        status, answer = post(server, client_context(on), body(entries[4:]), AUTH)
    assert (status, answer["stitched"], answer["dead_letters"]) == (200, 4, 0)
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events") == 4


def test_the_body_limit_holds_for_the_bytes_actually_read(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    s = _secured(settings, tmp_path)
    auth = f"Authorization: {SECRET}\r\n"
    forty_mb = 40 * 1024 * 1024
    with running(s) as server:
        context = client_context(s)
        # A negative length once read to the end of the stream: 40 MB became a dead letter.
        status, taken = raw_post(server, context, auth + "Content-Length: -1\r\n", more=forty_mb)
        assert status == 400
        assert taken < 16 * 1024 * 1024, taken  # stopped reading: not the 40 MB
        assert raw_post(server, context, auth + "Content-Length: many\r\n")[0] == 400
        assert (
            raw_post(server, context, auth + "Content-Length: 5\r\nContent-Length: 6\r\n")[0] == 400
        )
        assert raw_post(server, context, auth)[0] == 411  # no length at all
        assert raw_post(server, context, auth + "Transfer-Encoding: chunked\r\n")[0] == 411
        too_big = f"Content-Length: {MAX_BODY + 1}\r\n"
        status, taken = raw_post(server, context, auth + too_big, more=forty_mb)
        assert (status, taken < 16 * 1024 * 1024) == (413, True)
        # The server still serves a proper request afterwards.
        status, answer = post(server, context, changefeed_body(rows), AUTH)
        assert (status, answer["stitched"]) == (200, len(rows))
    assert count(db, "SELECT count(*) FROM cdp_ps.kafka_dead_letters") == 0


def _webhook_sessions(conn: psycopg.Connection[Any]) -> int:
    return count(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'stream-cps webhook%'",
    )


def test_concurrent_posts_are_capped_and_none_is_lost(
    settings: config.Settings, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """40 posts at once, at most 3 applied at a time: never more than 3 webhook sessions, and
    each post is applied (200, its rows stitched) or refused with 503 (the sink retries)."""
    db.execute(generator.config_sql(settings.schemas))
    events = list(generator.events(seed=11, persons=60, per_person=4))[:200]
    from psycopg import sql

    generator.copy_events(
        db.cursor(), sql.Identifier(settings.schemas.ce, "customer_events"), events
    )
    parts = [events[n : n + 5] for n in range(0, len(events), 5)]
    s = _secured(settings, tmp_path, **{"webhook.max_connections": 3, "webhook.max_wait": 0.5})
    peak, watching = [0], threading.Event()

    def watch() -> None:
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            while not watching.is_set():
                peak[0] = max(peak[0], _webhook_sessions(conn))
                time.sleep(0.005)

    with running(s) as server:
        context = client_context(s)
        start = threading.Barrier(len(parts))

        def send(n: int) -> int:
            start.wait()
            return post(server, context, changefeed_body(parts[n], first=5 * n), AUTH)[0]

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(len(parts)) as pool:
            statuses = list(pool.map(send, range(len(parts))))
        after = _webhook_sessions(db)
        applied = {e[0] for n, part in enumerate(parts) if statuses[n] == 200 for e in part}
        stitched = db.execute(
            "SELECT id FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
        ).fetchall()
        assert applied and applied <= {eid for (eid,) in stitched}
        for n, status in enumerate(statuses):  # the sink's retry of what was refused
            if status == 503:
                assert post(server, context, changefeed_body(parts[n], first=5 * n), AUTH)[0] == 200
        watching.set()
        watcher.join()
    assert set(statuses) <= {200, 503}, statuses
    assert peak[0] <= 3 and after <= 3, (peak[0], after)
    assert count(db, STITCHED) == len(events)
    assert observed(db) == expected(db)


def test_a_request_without_a_free_slot_is_answered_503_after_max_wait(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    """Two requests hold both slots (their bodies still on the way); a third waits
    webhook.max_wait and gets 503 with Retry-After, and is applied once retried."""
    import socket

    s = _secured(settings, tmp_path, **{"webhook.max_connections": 2, "webhook.max_wait": 0.3})
    with running(s) as server:
        context = client_context(s)
        held = []
        for n in range(2):
            body = changefeed_body(rows[n * 5 : n * 5 + 5], first=n * 5)
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(
                f"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            held.append((tls, body))
        time.sleep(0.3)  # both requests are in, waiting for their bodies
        started = time.monotonic()
        status, answer = post(server, context, changefeed_body(rows[10:]), AUTH)
        assert status == 503 and answer["error"].startswith("busy")
        assert time.monotonic() - started >= 0.3
        for tls, body in held:
            tls.sendall(body)
            assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")
            tls.close()
        assert post(server, context, changefeed_body(rows[10:], first=10), AUTH)[0] == 200
    assert count(db, STITCHED) == len(rows)


def _other_local_addresses() -> list[str]:
    """This machine's addresses other than 127.0.0.1 (e.g. 127.0.1.1, the outbound one)."""
    import socket

    found = set()
    with contextlib.suppress(OSError):
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
        found.add(probe.getsockname()[0])
    found.add("127.0.0.2")  # loopback too, but not the address we bind
    return sorted(found - {"127.0.0.1", "0.0.0.0"})


def test_by_default_the_server_listens_on_loopback_only(
    settings: config.Settings, db: psycopg.Connection[Any], rows: list[Row], tmp_path: Path
) -> None:
    import socket

    s = _secured(settings, tmp_path)
    s = s.replace(**{"webhook.host": config.FIELDS["webhook.host"].default})
    with running(s) as server:
        assert server.httpd.server_address[0] == "127.0.0.1"
        for address in _other_local_addresses():
            with pytest.raises(OSError):
                socket.create_connection((address, server.port), timeout=2).close()
        status, answer = post(server, client_context(s), changefeed_body(rows), AUTH)
    assert (status, answer["stitched"]) == (200, len(rows))
