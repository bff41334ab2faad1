"""Property-based poison suite on the Kafka path (with a kill -9 in the middle) and the webhook.

Hypothesis draws malformed messages (random bytes, any JSON, events with broken or missing
fields, times PostgreSQL takes but Python cannot read) and mixes them with good events. For
each draw, against the real broker and PostgreSQL: the service stays up and consumes every
message; each one that is not a tombstone or an unknown kind is recorded exactly once, as an
event or as a dead letter with a reason; the good events are stitched as the offline oracle
says. The replication path has its own suite (``test_poison_rows.py``).
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from infra.kafka import kafka_service as ks
from stream_cps import config
from stream_cps.db import schema
from stream_cps.errors import InvalidInput
from stream_cps.sources import messages
from stream_cps.sources.kafka.avro import SchemaResolver
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev.encode import json_event
from stream_cps_dev.sample import generator
from tests.fixtures.kafka import create_topics
from tests.integration.test_kafka_source import (
    _start_process,
    committed_total,
    generator_table,
    produce,
    sample,
)
from tests.support import expected, observed, wait_until
from tests.webhook_support import client_context, post, running, webhook_settings

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
TIMES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "2026-13-01T00:00:00Z",
            "yesterday",
            "2026-01-01T00:00:00",
            "",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.integers(),
    st.none(),
)


@st.composite
def broken_event(draw: st.DrawFn, n: int) -> bytes:
    """An event object with any of its fields broken, missing or of the wrong type."""
    fields: dict[str, Any] = {}
    kind = draw(st.sampled_from(["ok", "missing", "empty", "number"]))
    if kind != "missing":
        fields["id"] = {"ok": f"poison-{n}", "empty": "", "number": n}[kind]
    for name in ("source_id", "type", "version"):
        if draw(st.booleans()):
            fields[name] = draw(st.one_of(st.sampled_from(["web", "pv", "1"]), JSON))
    if draw(st.booleans()):
        fields["event_time"] = draw(TIMES)
    if draw(st.booleans()):
        fields["payload"] = draw(
            st.one_of(st.dictionaries(st.sampled_from(["email", "cookie"]), JSON), JSON)
        )
    return json.dumps(fields).encode()


def poison(n: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=40),
        JSON.map(lambda v: json.dumps(v).encode()),
        broken_event(n),
    )


@st.composite
def mixes(draw: st.DrawFn) -> list[bytes]:
    return [draw(poison(n)) for n in range(draw(st.integers(5, 25)))]


def recorded_kinds(values: list[bytes]) -> int:
    """How many messages must leave a record (an event row or a dead letter)."""
    resolver = SchemaResolver(None)
    recorded = 0
    for value in values:
        try:
            decoded = messages.decode(None, value, "auto", resolver)
        except InvalidInput:
            recorded += 1
            continue
        recorded += not isinstance(decoded, messages.Ignored | messages.Resolved)
    return recorded


def records(db: psycopg.Connection[Any], topic: str) -> tuple[int, int]:
    """(poison events stored, dead letters of ``topic``)."""
    events = db.execute(
        "SELECT count(*) FROM cdp_ce.customer_events WHERE id LIKE 'poison-%'"
    ).fetchone()
    dead = db.execute(
        "SELECT count(*) FROM cdp_ps.kafka_dead_letters WHERE topic = %s", [topic]
    ).fetchone()
    assert events is not None and dead is not None
    return int(events[0]), int(dead[0])


def fresh_database(pg_server: Any, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"


def drop_database(pg_server: Any, dsn: str) -> None:
    name = dsn.rsplit("dbname=", 1)[1]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def prepared(dsn: str) -> config.Settings:
    settings = config.load(flags={"dsn": dsn}, environ={})
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.migrate(conn, settings.schemas)
        conn.execute(generator.config_sql(settings.schemas))
    return settings


@hyp_settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(bad=mixes())
def test_kafka_poison_with_a_kill_9_loses_nothing(
    pg_server: Any, kafka_broker: ks.KafkaBroker, tmp_path: Path, bad: list[bytes]
) -> None:
    dsn = fresh_database(pg_server, "poison_kafka")
    try:
        topic = f"poison-{uuid.uuid4().hex[:10]}"
        create_topics(kafka_broker.bootstrap, topic, topic + "-dlq")
        settings = prepared(dsn).replace(
            **{
                "kafka.bootstrap_servers": kafka_broker.bootstrap,
                "kafka.topics": [topic],
                "kafka.group_id": f"g-{topic}",
                "kafka.dead_letter_topic": topic + "-dlq",
                "kafka.poll_timeout": 0.1,
                "kafka.session_timeout": 6.0,
                "kafka.batch_size": 7,
            }
        )
        good = sample(30, seed=len(bad))
        values = [json_event(row) for row in good]
        mixed: list[bytes] = []
        for n, value in enumerate(values):
            mixed.append(value)
            if n < len(bad):
                mixed.append(bad[n])
        mixed += bad[len(values) :]
        produce(kafka_broker.bootstrap, topic, [(None, v) for v in mixed])
        log = tmp_path / f"{topic}.log"
        with psycopg.connect(dsn, autocommit=True) as db:
            first = _start_process(settings, log)
            try:  # kill -9 once something was applied, whatever it was
                wait_until(lambda: sum(records(db, topic)) > 0 or stitched(db) > 0, 60, "progress")
            finally:
                first.send_signal(signal.SIGKILL)
                first.wait(timeout=10)
            second = _start_process(settings, log)
            try:
                wait_until(
                    lambda: committed_total(settings, topic) == len(mixed), 90, "every offset"
                )
                assert second.poll() is None, log.read_text()[-3000:]
            finally:
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=20) == 0, log.read_text()[-3000:]
            assert sum(records(db, topic)) == recorded_kinds(bad)
            reasons = db.execute("SELECT reason FROM cdp_ps.kafka_dead_letters").fetchall()
            assert all(r[0] for r in reasons)
            good_ids = [row[0] for row in good]
            assert stitched(db, good_ids) == len(good_ids)
            assert observed(db) == expected(db)
    finally:
        drop_database(pg_server, dsn)


def stitched(db: psycopg.Connection[Any], ids: list[str] | None = None) -> int:
    if ids is None:
        row = db.execute(
            "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
        ).fetchone()
    else:
        row = db.execute(
            "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL "
            "AND id = ANY(%s)",
            [ids],
        ).fetchone()
    return int(row[0]) if row else -1


ENTRIES = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"after": st.one_of(JSON, st.dictionaries(st.sampled_from(["id", "stitched"]), JSON))},
        optional={"key": JSON, "topic": st.one_of(st.just("customer_events"), JSON)},
    ),
)
BODIES = st.one_of(
    st.binary(max_size=60),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(ENTRIES, max_size=6).map(
        lambda entries: json.dumps({"payload": entries, "length": len(entries)}).encode()
    ),
)


@hyp_settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(bodies=st.lists(BODIES, min_size=1, max_size=6))
def test_webhook_poison_is_answered_and_the_rest_is_stitched(
    pg_server: Any, tmp_path: Path, bodies: list[bytes]
) -> None:
    dsn = fresh_database(pg_server, "poison_webhook")
    try:
        settings = webhook_settings(
            prepared(dsn), tmp_path / "tls", **{"webhook.allow_unauthenticated": True}
        )
        with running(settings) as server, psycopg.connect(dsn, autocommit=True) as db:
            context = client_context(settings)
            good = sample(6, seed=len(bodies))
            generator.copy_events(db.cursor(), generator_table(settings), good)
            for body in bodies:
                status, _ = post(server, context, body)
                assert status in (200, 400, 413), body  # never a 5xx: nothing is retried
            rows = [{"after": {"id": row[0]}, "key": [row[0]]} for row in good]
            body = json.dumps({"payload": rows, "length": len(rows)}).encode()
            assert post(server, context, body)[0] == 200
            assert stitched(db, [row[0] for row in good]) == len(good)
            for _ in Stitcher(settings).sweep(db):  # anything a poison body reset
                pass
            assert observed(db) == expected(db)
    finally:
        drop_database(pg_server, dsn)
