"""The Kafka source end to end: real broker (tests.fixtures.kafka), real PostgreSQL.

Each test produces real messages, runs the consumer (in a thread, or as a process that is
killed with SIGKILL) and compares the database with the offline oracle.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from infra.kafka import kafka_service as ks
from stream_cps import config
from stream_cps.db import schema
from stream_cps.service.backlog import Backlog
from stream_cps.service.kafka import KafkaLoop
from stream_cps.sources.changefeed.webhook import envelopes_of
from stream_cps.sources.kafka.avro import SchemaResolver
from stream_cps.sources.kafka.consumer import KafkaBatch, KafkaSource
from stream_cps.sources.kafka.replay import run_replay
from stream_cps.sources.messages import MAX_REASON, Envelope, decode
from stream_cps.stitching.ingest import Applier
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev.encode import avro_event, changefeed_message, json_event
from stream_cps_dev.sample import generator
from tests.fixtures.kafka import create_topics
from tests.support import count_row_updates, expected, observed, snapshot, wait_until
from tests.webhook_support import client_context, running, webhook_settings
from tests.webhook_support import post as webhook_post

Row = tuple[str, str, str, str, datetime, str]


def produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[bytes | None, bytes | None]],
    timestamp_ms: int | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in messages:
        if timestamp_ms is None:
            producer.produce(topic, key=key, value=value)
        else:
            producer.produce(topic, key=key, value=value, timestamp=timestamp_ms)
    assert producer.flush(30) == 0


def events_of(rows: list[Row]) -> list[tuple[bytes | None, bytes | None]]:
    """Alternate Avro and JSON, keyed by event id."""
    return [
        (row[0].encode(), avro_event(row) if n % 2 else json_event(row))
        for n, row in enumerate(rows)
    ]


@pytest.fixture
def kafka_env(
    kafka_broker: ks.KafkaBroker, settings: config.Settings, db: psycopg.Connection[Any]
) -> tuple[config.Settings, str]:
    """Settings pointing at a fresh topic + dead-letter topic + group, and the sample rules."""
    topic = f"events-{uuid.uuid4().hex[:10]}"
    create_topics(kafka_broker.bootstrap, topic, topic + "-dlq")
    db.execute(generator.config_sql(settings.schemas))
    return (
        settings.replace(
            **{
                "kafka.bootstrap_servers": kafka_broker.bootstrap,
                "kafka.topics": [topic],
                "kafka.group_id": f"g-{topic}",
                "kafka.dead_letter_topic": topic + "-dlq",
                "kafka.poll_timeout": 0.1,
                "kafka.session_timeout": 6.0,
                "kafka.batch_size": 100,
            }
        ),
        topic,
    )


@contextmanager
def member(settings: config.Settings, backlog: Backlog | None = None) -> Iterator[KafkaLoop]:
    """A consumer group member running in a thread until the block ends."""
    stop = threading.Event()
    service = KafkaLoop(settings, stop, backlog)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "member did not stop"
    assert not failure, failure


def count(conn: psycopg.Connection[Any], query: str, *params: Any) -> int:
    row = conn.execute(query, list(params)).fetchone()
    return int(row[0]) if row else -1


def all_stitched(conn: psycopg.Connection[Any], n: int) -> bool:
    return (
        count(conn, "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL") == n
    )


def sample(n: int, seed: int) -> list[Row]:
    rows = list(generator.events(seed=seed, persons=max(5, n // 2), per_person=4))
    assert len(rows) >= n
    return rows[:n]


def test_avro_and_json_events_stitched_and_redelivery_is_harmless(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    rows = sample(300, seed=3)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    with member(settings) as service:
        wait_until(lambda: all_stitched(db, len(rows)), 30, "all events stitched")
        assert observed(db) == expected(db)
        before = snapshot(db)
        # The same messages again (a producer retry, a replayed topic): nothing changes.
        produce(settings.kafka.bootstrap_servers, topic, events_of(rows[:150]))
        wait_until(lambda: service.progress.messages >= 450, 30, f"redelivery {service.progress}")
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events") == len(rows)
    assert service.progress.events_new == 300 and service.progress.events_seen == 150
    assert snapshot(db) == before
    assert observed(db) == expected(db)


def test_two_members_with_a_rebalance_end_equal_to_one_member_and_the_oracle(
    kafka_env: tuple[config.Settings, str],
    db: psycopg.Connection[Any],
    pg_server: Any,
) -> None:
    settings, topic = kafka_env
    rows = sample(900, seed=5)
    bootstrap = settings.kafka.bootstrap_servers
    produce(bootstrap, topic, events_of(rows[:300]))
    narrow = settings.replace(**{"kafka.batch_size": 40})
    batches = threading.Semaphore(0)
    with member(narrow) as first:
        first.on_batch = lambda _stats: batches.release()
        for _ in range(3):  # the second member joins while the first is mid-stream
            assert batches.acquire(timeout=30)
        with member(narrow) as second:
            wait_until(lambda: second.progress.batches > 0 or owns(second), 30, "second joined")
            produce(bootstrap, topic, events_of(rows[300:]))
            wait_until(lambda: all_stitched(db, len(rows)), 60, "all events stitched")
    assert first.progress.batches > 3 and second.progress.batches > 0, "both did work"
    # The first member's finished work was committed by the time partition 0 moved (the
    # revocation callback commits it at the latest), so nothing was delivered twice.
    assert first.progress.events_seen + second.progress.events_seen == 0
    assert observed(db) == expected(db)

    # The same topic into another database by one member of another group.
    name = "one_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
    single = narrow.replace(**{"dsn": dsn, "kafka.group_id": f"single-{topic}"})
    with psycopg.connect(dsn, autocommit=True) as other:
        schema.migrate(other, single.schemas)
        other.execute(generator.config_sql(single.schemas))
        with member(single.replace(**{"kafka.batch_size": 500})):
            wait_until(lambda: all_stitched(other, len(rows)), 60, "single member done")
        assert snapshot(other) == snapshot(db)


def _events_at_least(conn: psycopg.Connection[Any], n: int) -> bool:
    return count(conn, "SELECT count(*) FROM cdp_ce.customer_events") >= n


def owns(service: KafkaLoop) -> bool:
    return service.source.owns_partitions()


def _start_process(settings: config.Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **{config.env_var(k): _env(v) for k, v in settings.values.items()}}
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "run", "--source", "kafka"],
        env=env,
        stdout=handle,
        stderr=handle,
    )


def _env(value: Any) -> str:
    if value is None:
        return ""
    return ",".join(value) if isinstance(value, list) else str(value)


def test_kill_9_and_restart_loses_nothing_and_doubles_nothing(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings, topic = kafka_env
    settings = settings.replace(**{"kafka.batch_size": 50})
    rows = sample(1500, seed=9)
    bootstrap = settings.kafka.bootstrap_servers
    rng = random.Random(4)
    log = tmp_path / "service.log"
    sent = 0
    for trial in range(3):
        process = _start_process(settings, log)
        try:
            chunk = rows[sent : sent + 500]
            produce(bootstrap, topic, events_of(chunk))
            sent += len(chunk)
            target = count(db, "SELECT count(*) FROM cdp_ce.customer_events") + rng.randint(20, 400)
            wait_until(
                functools.partial(_events_at_least, db, target),
                60,
                f"progress before kill {trial}",
            )
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    process = _start_process(settings, log)
    try:
        wait_until(lambda: all_stitched(db, len(rows)), 60, "all events stitched after restart")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()[-3000:]
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events") == len(rows)
    assert count(db, "SELECT count(*) FROM cdp_ps.kafka_dead_letters") == 0
    assert observed(db) == expected(db)


def test_replay_from_time_and_from_beginning_restitches_to_the_same_entities(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    rows = sample(400, seed=13)
    early, late = rows[:200], rows[200:]
    now = int(time.time() * 1000)
    bootstrap = settings.kafka.bootstrap_servers
    produce(bootstrap, topic, events_of(early), timestamp_ms=now - 60_000)
    produce(bootstrap, topic, events_of(late), timestamp_ms=now - 30_000)
    middle = datetime.fromtimestamp((now - 45_000) / 1000, UTC).isoformat()
    with member(settings):
        wait_until(lambda: all_stitched(db, len(rows)), 30, "all events stitched")
        before = snapshot(db)
        # The guide's restitch-everything script; the Kafka path has no sweep, so only a
        # replay brings the events back.
        db.execute("UPDATE customer_attributes SET modified = NULL")
        db.execute("UPDATE customer_events SET stitched = NULL, identifiers = NULL")
        wait_until(lambda: count(db, "SELECT count(*) FROM customer_attributes") == 0, 10, "purge")

        out = io.StringIO()
        code = run_replay(
            settings, topic=None, beginning=False, offsets=None, since=middle, yes=False, out=out
        )
        assert code == 1 and "live" in out.getvalue() and "--yes" in out.getvalue()
        out = io.StringIO()
        assert (
            run_replay(
                settings, topic=None, beginning=False, offsets=None, since=middle, yes=True, out=out
            )
            == 0
        ), out.getvalue()
        assert "total: 200 message(s)" in out.getvalue(), out.getvalue()
        late_ids = [r[0] for r in late]
        wait_until(
            lambda: (
                count(
                    db,
                    "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL "
                    "AND id = ANY(%s)",
                    late_ids,
                )
                == len(late)
            ),
            30,
            "replayed late events stitched",
        )
        time.sleep(0.5)
        assert count(
            db, "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
        ) == len(late), "only messages after the time were replayed"

        out = io.StringIO()
        assert (
            run_replay(
                settings, topic=None, beginning=True, offsets=None, since=None, yes=True, out=out
            )
            == 0
        )
        assert "total: 400 message(s)" in out.getvalue(), out.getvalue()
        wait_until(lambda: all_stitched(db, len(rows)), 30, "all events restitched")
    assert snapshot(db) == before
    assert observed(db) == expected(db)

    # With no live member the offsets are moved directly.
    out = io.StringIO()
    assert (
        run_replay(
            settings, topic=None, beginning=False, offsets=["1:0"], since=None, yes=False, out=out
        )
        == 0
    )
    assert "offsets moved" in out.getvalue()
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": settings.kafka.group_id})
    try:
        [committed] = reader.committed([TopicPartition(topic, 1)], timeout=10)
    finally:
        reader.close()
    assert committed.offset == 0


def _changefeed_messages(rows: list[Row]) -> list[tuple[bytes | None, bytes | None]]:
    """What `CREATE CHANGEFEED FOR customer_events INTO 'kafka://...'` emits (wrapped, JSON)."""
    messages: list[tuple[bytes | None, bytes | None]] = []
    for n, row in enumerate(rows):
        value = json.dumps(changefeed_message(row, n))
        messages.append((json.dumps([row[0]]).encode(), value.encode()))
    return messages


def test_changefeed_messages_with_duplicates_resolved_and_deletes(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    rows = sample(200, seed=21)
    generator.copy_events(db.cursor(), generator_table(settings), rows)  # rows live in the DB
    messages = _changefeed_messages(rows)
    messages += messages[:60]  # re-emissions after a changefeed restart
    echo = json.loads(messages[0][1] or b"")
    echo["after"]["stitched"] = "2026-01-01T00:00:00+00:00"  # our own write, echoed back
    messages.append((messages[0][0], json.dumps(echo).encode()))
    deleted = rows[1][0]
    messages.append((json.dumps([deleted]).encode(), b'{"after": null, "updated": "9.0"}'))
    messages.append((b"gone", None))  # tombstone (a JSON-array key would be key_only)
    messages.append((None, b'{"something": "else"}'))  # unknown kind
    produce(settings.kafka.bootstrap_servers, topic, messages)
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    for partition in range(3):  # resolved timestamps go to every partition
        producer.produce(
            topic, value=b'{"resolved": "1800000000000000000.0000000000"}', partition=partition
        )
    assert producer.flush(10) == 0
    total = len(messages) + 3
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == total, 30, "all messages consumed")
        p = service.progress
        counts = (p.changefeed_rows, p.deletes, p.resolved, p.ignored, p.dead_letters)
        assert counts == (261, 1, 3, 2, 0)
        assert p.last_resolved == "1800000000000000000.0000000000"
        assert all_stitched(db, len(rows))
        assert observed(db) == expected(db)
        before = snapshot(db)

        # The guide's restitch-everything script on CockroachDB: the feed carries every
        # updated row (stitched now NULL) back, and the consumer restitches it.
        db.execute("UPDATE customer_attributes SET modified = NULL")
        db.execute("UPDATE customer_events SET stitched = NULL, identifiers = NULL")
        produce(settings.kafka.bootstrap_servers, topic, _changefeed_messages(rows))
        wait_until(lambda: all_stitched(db, len(rows)), 30, "restitched from the feed")
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events WHERE id = %s", deleted) == 1
    assert snapshot(db) == before
    assert observed(db) == expected(db)


def test_poison_messages_are_dead_letters_or_stitched_and_the_member_carries_on(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """JSON nested 50,000 deep, an event missing its id or its time: dead letters with a reason.
    Times PostgreSQL stores but Python cannot read back (year 0 in UTC, year 10000 in UTC):
    stitched, and recorded in stitching_errors. The member never stops."""
    settings, topic = kafka_env
    good = sample(20, seed=37)
    template = json.loads(json_event(good[0]))
    missing_id = {k: v for k, v in template.items() if k != "id"}
    missing_time = {**{k: v for k, v in template.items() if k != "event_time"}, "id": "no-time"}
    bad = [
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        json.dumps(missing_id).encode(),
        json.dumps(missing_time).encode(),
    ]
    edges = [
        json.dumps({**template, "id": "first-day", "event_time": "0001-01-01T00:00:00+14:00"}),
        json.dumps({**template, "id": "last-day", "event_time": "9999-12-31T23:59:59-14:00"}),
    ]
    messages = (
        events_of(good[:10])
        + [(b"bad", v) for v in bad]
        + [(b"edge", e.encode()) for e in edges]
        + events_of(good[10:])
    )
    produce(settings.kafka.bootstrap_servers, topic, messages)
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == len(messages), 30, "all consumed")
    assert all_stitched(db, len(good) + len(edges))
    reasons = [
        str(r[0])
        for r in db.execute("SELECT reason FROM cdp_ps.kafka_dead_letters ORDER BY kafka_offset")
    ]
    assert len(reasons) == 3
    assert "nested too deeply" in reasons[0]
    assert "id: required" in reasons[1] and "event_time" in reasons[2]
    recorded = {
        str(r[0])
        for r in db.execute(
            "SELECT event_id FROM cdp_ps.stitching_errors WHERE attribute_id IS NULL"
        )
    }
    assert recorded == {"first-day", "last-day"}


def generator_table(settings: config.Settings) -> Any:
    from psycopg import sql

    return sql.Identifier(settings.schemas.ce, "customer_events")


def test_malformed_messages_go_to_the_dead_letter_topic_and_table(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    good = sample(20, seed=31)
    bad_event = json.loads(json_event(good[0]))
    bad_event["id"], bad_event["event_time"] = "bad-time", "not a time"
    bad = [
        b"{definitely not json",
        b"\x00\x00\x00\x03\xe7\x02",  # Avro framing with an unknown schema id (999)
        json.dumps(bad_event).encode(),
        json.dumps({**json.loads(json_event(good[1])), "id": "x", "payload": "flat"}).encode(),
        # Decodes, but PostgreSQL refuses the lone surrogate: isolated by a savepoint.
        json.dumps(
            {**json.loads(json_event(good[2])), "id": "y", "payload": {"a": "\ud800"}}
        ).encode(),
    ]
    messages = events_of(good[:10]) + [(b"bad", v) for v in bad] + events_of(good[10:])
    produce(settings.kafka.bootstrap_servers, topic, messages)
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == len(messages), 30, "all consumed")
    assert all_stitched(db, len(good))
    dead = db.execute(
        "SELECT topic, kafka_partition, kafka_offset, message_key, message_value, reason "
        "FROM cdp_ps.kafka_dead_letters ORDER BY kafka_offset"
    ).fetchall()
    assert [bytes(r[4]) for r in dead] == bad  # all four share key b"bad": one partition
    assert {r[0] for r in dead} == {topic} and len({r[1] for r in dead}) == 1
    reasons = [r[5] for r in dead]
    assert "not valid JSON" in reasons[0] and "schema id 999" in reasons[1]
    assert "event_time" in reasons[2] and "payload" in reasons[3]
    assert "database refused" in reasons[4]

    reader = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": "dlq-reader",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([settings.kafka.dead_letter_topic])
    copies: list[Message] = []
    deadline = time.monotonic() + 20
    while len(copies) < len(bad) and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error() is None:
            copies.append(msg)
    reader.close()
    assert sorted(bytes(m.value() or b"") for m in copies) == sorted(bad)
    for msg in copies:
        raw = msg.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = {str(k): v if isinstance(v, bytes) else str(v).encode() for k, v in pairs}
        origin = headers["stream_cps.origin"].decode()
        row = next(r for r in dead if f"kafka:{topic}:{r[1]}:{r[2]}" == origin)
        assert headers["stream_cps.reason"].decode() == row[5]
        assert int(headers["stream_cps.offset"]) == row[2]


def test_webhook_accepts_changefeed_payloads_over_tls(
    settings: config.Settings, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    db.execute(generator.config_sql(settings.schemas))
    rows = sample(60, seed=41)
    generator.copy_events(db.cursor(), generator_table(settings), rows)
    hook = webhook_settings(  # authentication: tests/integration/test_webhook_security.py
        settings, tmp_path, **{"webhook.allow_unauthenticated": True}
    )
    with running(hook) as server:
        context = client_context(hook)

        def post(body: bytes) -> dict[str, Any]:
            status, answer = webhook_post(server, context, body)
            assert status == 200
            return answer

        entries = [
            {**json.loads(v or b""), "key": json.loads(k or b""), "topic": "customer_events"}
            for k, v in _changefeed_messages(rows)
        ]
        first = post(json.dumps({"payload": entries[:40], "length": 40}).encode())
        assert first == {"messages": 40, "stitched": 40, "dead_letters": 0}
        again = post(json.dumps({"payload": entries[:50], "length": 50}).encode())
        assert again["stitched"] == 10  # the 40 re-sent rows are stitched already
        post(json.dumps({"payload": entries[50:], "length": 10}).encode())
        post(b'{"resolved": "1700000000000000000.0000000000"}')
        bad = post(b'{"payload": [1], "length": 5}')
        assert bad["dead_letters"] == 1
    assert all_stitched(db, len(rows))
    assert observed(db) == expected(db)
    assert count(db, "SELECT count(*) FROM cdp_ps.kafka_dead_letters WHERE source = 'webhook'") == 1


def test_kafka_run_calculates_attributes_of_what_it_stitched(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    settings, topic = kafka_env
    rows = sample(300, seed=31)
    log = tmp_path / "service.log"
    process = _start_process(settings, log)
    try:
        produce(settings.kafka.bootstrap_servers, topic, events_of(rows))

        def done() -> bool:
            stitched = count(
                db, "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
            )
            due = count(
                db,
                "SELECT count(*) FROM customer_attributes "
                "WHERE calculated IS NULL OR calculated < modified",
            )
            return stitched == len(rows) and due == 0

        wait_until(done, 60, "stitching and calculation")
        with_attributes = count(
            db, "SELECT count(*) FROM customer_attributes WHERE attributes ? 'first_seen'"
        )
        assert with_attributes == count(db, "SELECT count(*) FROM customer_attributes") > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()[-3000:]


class RecordingBacklog(Backlog):
    def __init__(self) -> None:
        super().__init__()
        self.reports: list[bool] = []

    def report(self, busy: bool) -> None:
        self.reports.append(busy)
        super().report(busy)


def test_member_reports_a_backlog_while_polls_come_back_full(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """Calculation in the same process holds back while this member is behind."""
    settings, topic = kafka_env
    rows = sample(300, seed=17)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    backlog = RecordingBacklog()
    with member(settings.replace(**{"kafka.batch_size": 40}), backlog):
        wait_until(lambda: all_stitched(db, len(rows)), 60, "all events stitched")
        wait_until(lambda: not backlog.busy, 30, "the backlog reported cleared")
    assert True in backlog.reports  # full polls while the topic was ahead
    assert backlog.reports[-1] is False


def dead_letter_copies(settings: config.Settings, n: int) -> list[Message]:
    """The first ``n`` messages on the dead-letter topic (waits up to 20 s)."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"dlq-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([settings.kafka.dead_letter_topic])
    copies: list[Message] = []
    deadline = time.monotonic() + 20
    try:
        while len(copies) < n and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None and msg.error() is None:
                copies.append(msg)
    finally:
        reader.close()
    return copies


def headers_of(msg: Message) -> dict[str, bytes]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {str(k): v if isinstance(v, bytes) else str(v).encode() for k, v in pairs}


def committed_total(settings: config.Settings, topic: str) -> int:
    """The sum of the group's committed offsets over the topic's three partitions."""
    reader = Consumer(
        {"bootstrap.servers": settings.kafka.bootstrap_servers, "group.id": settings.kafka.group_id}
    )
    try:
        parts = reader.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    finally:
        reader.close()
    return sum(max(tp.offset, 0) for tp in parts)


def test_dead_letter_reasons_are_capped_in_the_table_and_on_the_topic(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """A reason quoting a 5,000-character value is cut to MAX_REASON with an ellipsis."""
    settings, topic = kafka_env
    template = json.loads(json_event(sample(1, seed=43)[0]))
    value = json.dumps({**template, "id": "long-time", "event_time": "x" * 5000}).encode()
    produce(settings.kafka.bootstrap_servers, topic, [(b"bad", value)])
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == 1, 30, "consumed")
    [(reason,)] = db.execute("SELECT reason FROM cdp_ps.kafka_dead_letters").fetchall()
    assert str(reason).startswith("event_time: not ISO 8601: 'xxx")
    assert len(reason) == MAX_REASON and str(reason).endswith("…")
    [copy] = dead_letter_copies(settings, 1)
    assert headers_of(copy)["stream_cps.reason"].decode() == reason


def test_a_dead_letter_too_large_for_the_dead_letter_topic_goes_as_a_reference(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """A 2 MB message on a topic allowing 8 MB is over the dead-letter producer's limit, a
    10 KB one over the dead-letter topic's (4 KB): both are whole in the table, on the topic
    without their value, and the member carries on and stores the offsets."""
    settings, topic = kafka_env
    bootstrap = settings.kafka.bootstrap_servers
    wide, narrow = topic + "-8mb", topic + "-dlq-4kb"
    create_topics(bootstrap, wide, config={"max.message.bytes": str(8 * 1024 * 1024)})
    create_topics(bootstrap, narrow, config={"max.message.bytes": "4096"})
    settings = settings.replace(**{"kafka.topics": [wide], "kafka.dead_letter_topic": narrow})
    huge = b'{"id": "' + b"x" * (2 * 1024 * 1024)  # not JSON: cut off
    big = b'{"id": "' + b"y" * (10 * 1024)
    good = sample(10, seed=47)
    messages = [*events_of(good[:5]), (b"huge", huge), (b"big", big), *events_of(good[5:])]
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10 * 1024 * 1024})
    for key, value in messages:
        producer.produce(wide, key=key, value=value)
    assert producer.flush(30) == 0
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == len(messages), 60, "all consumed")
    assert all_stitched(db, len(good))
    stored = {
        bytes(r[0]): (bytes(r[1]), str(r[2]))
        for r in db.execute(
            "SELECT message_key, message_value, id FROM cdp_ps.kafka_dead_letters"
        ).fetchall()
    }
    assert {k: v[0] for k, v in stored.items()} == {b"huge": huge, b"big": big}
    copies = dead_letter_copies(settings, 2)
    assert len(copies) == 2
    for msg in copies:
        headers = headers_of(msg)
        key = headers["stream_cps.key"]
        assert msg.value() == b""
        assert headers["stream_cps.value_dropped"] == str(len(stored[key][0])).encode()
        assert headers["stream_cps.origin"].decode() == stored[key][1]
        assert "not valid JSON" in headers["stream_cps.reason"].decode()
    assert committed_total(settings, wide) == len(messages)


def test_a_redelivered_id_with_different_content_is_a_dead_letter(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """Same id, other payload or time: a dead letter naming the id, the stored version kept.
    The same content again (even in the other encoding) stays a silent redelivery count."""
    settings, topic = kafka_env
    bootstrap = settings.kafka.bootstrap_servers
    rows = sample(10, seed=53)
    produce(bootstrap, topic, events_of(rows))
    changed = (*rows[0][:5], json.dumps({**json.loads(rows[0][5]), "extra": "changed"}))
    later = (*rows[1][:4], rows[1][4] + timedelta(seconds=1), rows[1][5])
    twin = ("twin", *rows[5][1:])
    twin_changed = (*twin[:5], json.dumps({"other": "content"}))
    again: list[tuple[bytes | None, bytes | None]] = [
        (changed[0].encode(), json_event(changed)),
        (later[0].encode(), avro_event(later)),
        # the other encoding than the first time: equal content all the same
        (rows[3][0].encode(), json_event(rows[3])),
        (rows[4][0].encode(), avro_event(rows[4])),
        (b"twin", json_event(twin)),
        (b"twin", json_event(twin_changed)),
    ]
    with member(settings) as service:
        wait_until(lambda: all_stitched(db, len(rows)), 30, "all events stitched")
        produce(bootstrap, topic, again)
        total = len(rows) + len(again)
        wait_until(lambda: service.progress.messages == total, 30, "redeliveries consumed")
    assert (service.progress.events_new, service.progress.events_seen) == (11, 2)
    reasons = {
        str(r[0]) for r in db.execute("SELECT reason FROM cdp_ps.kafka_dead_letters").fetchall()
    }
    assert reasons == {
        f"event id {eid} already stored with different content (the first version stays)"
        for eid in (rows[0][0], rows[1][0], "twin")
    }
    stored = db.execute(
        "SELECT event_time, payload FROM cdp_ce.customer_events WHERE id = ANY(%s) ORDER BY id",
        [[rows[0][0], rows[1][0]]],
    ).fetchall()
    firsts = sorted([rows[0], rows[1]])
    assert [(t, p) for t, p in stored] == [(r[4], json.loads(r[5])) for r in firsts]
    [(twin_payload,)] = db.execute(
        "SELECT payload FROM cdp_ce.customer_events WHERE id = 'twin'"
    ).fetchall()
    assert twin_payload == json.loads(twin[5])


def _after(row: Row) -> dict[str, Any]:
    """A customer_events row as a changefeed carries it."""
    after: dict[str, Any] = changefeed_message(row, 0)["after"]
    return after


# What `envelope = enriched, enriched_properties = 'source,schema'` adds around the payload.
ENRICHED_SCHEMA = {
    "type": "struct",
    "name": "cockroachdb.envelope",
    "optional": False,
    "fields": [
        {
            "field": "after",
            "type": "struct",
            "optional": True,
            "fields": [{"field": c} for c in "x" * 60],
        },
        {"field": "op", "type": "string", "optional": False},
        {"field": "ts_ns", "type": "int64", "optional": False},
    ],
}
KEY_ONLY = "key_only changefeed message carries no row; use envelope=wrapped/bare/enriched"


def _envelopes(rows: list[Row]) -> list[tuple[bytes | None, bytes | None]]:
    """Rows 0-9 enriched without schema, 10-19 enriched with schema, 20-29 bare (with
    ``__crdb__``), 30-34 key_only (no value), then an enriched delete with schema."""
    out: list[tuple[bytes | None, bytes | None]] = []
    for n, row in enumerate(rows[:35]):
        key = json.dumps([row[0]]).encode()
        payload = {"after": _after(row), "op": "c", "ts_ns": 1772366400000000000 + n}
        if n < 10:
            value: dict[str, Any] | None = payload
        elif n < 20:
            value = {
                "payload": {**payload, "source": {"table_name": "customer_events"}},
                "schema": ENRICHED_SCHEMA,
            }
        elif n < 30:
            value = {**_after(row), "__crdb__": {"updated": f"{1772366400 + n}.0000000000"}}
        else:
            value = None
        out.append((key, None if value is None else json.dumps(value).encode()))
    gone = rows[35]
    delete = {
        "payload": {"after": None, "before": _after(gone), "op": "d", "ts_ns": 1},
        "schema": ENRICHED_SCHEMA,
    }
    out.append((json.dumps([gone[0]]).encode(), json.dumps(delete).encode()))
    return out


def test_enriched_bare_and_key_only_changefeeds_are_stitched_or_dead_letters(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """Enriched (with and without schema) and bare rows are stitched; key_only messages carry
    no row and are dead letters saying so; ``__crdb__`` resolved messages are counted."""
    settings, topic = kafka_env
    rows = sample(36, seed=59)
    generator.copy_events(db.cursor(), generator_table(settings), rows)
    messages = _envelopes(rows)
    produce(settings.kafka.bootstrap_servers, topic, messages)
    producer = Producer({"bootstrap.servers": settings.kafka.bootstrap_servers})
    for partition in range(3):
        producer.produce(
            topic, value=b'{"__crdb__": {"resolved": "1800000000.0000000000"}}', partition=partition
        )
    assert producer.flush(10) == 0
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == len(messages) + 3, 30, "all consumed")
    p = service.progress
    assert (p.changefeed_rows, p.deletes, p.resolved, p.ignored) == (30, 1, 3, 0)
    assert p.last_resolved == "1800000000.0000000000"
    stitched = {
        str(r[0])
        for r in db.execute("SELECT id FROM cdp_ce.customer_events WHERE stitched IS NOT NULL")
    }
    assert stitched == {r[0] for r in rows[:30]}
    dead = db.execute(
        "SELECT message_key, reason FROM cdp_ps.kafka_dead_letters ORDER BY message_key"
    ).fetchall()
    assert [(bytes(k), str(r)) for k, r in dead] == sorted(
        (json.dumps([r[0]]).encode(), KEY_ONLY) for r in rows[30:35]
    )


def test_webhook_enriched_key_only_and_crdb_resolved(
    settings: config.Settings, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """The webhook path: enriched entries stitched, a key_only entry dead-lettered, a
    ``__crdb__`` resolved body counted as resolved (not a dead letter)."""
    db.execute(generator.config_sql(settings.schemas))
    rows = sample(12, seed=61)
    generator.copy_events(db.cursor(), generator_table(settings), rows)
    hook = webhook_settings(  # authentication: tests/integration/test_webhook_security.py
        settings, tmp_path, **{"webhook.allow_unauthenticated": True}
    )
    with running(hook) as server:
        context = client_context(hook)

        def post(body: bytes) -> dict[str, Any]:
            status, answer = webhook_post(server, context, body)
            assert status == 200
            return answer

        resolved = b'{"__crdb__": {"resolved": "1800000000.0000000000"}}'
        entries: list[Any] = [
            {
                "payload": {"after": _after(row), "op": "c", "ts_ns": n},
                "schema": ENRICHED_SCHEMA,
                "key": [row[0]],
                "topic": "customer_events",
            }
            for n, row in enumerate(rows[:10])
        ]
        entries.append({"after": _after(rows[10]), "op": "u", "key": [rows[10][0]]})
        entries.append({"key": [rows[11][0]], "topic": "customer_events"})  # key_only
        answer = post(json.dumps({"payload": entries, "length": len(entries)}).encode())
        assert answer == {"messages": 12, "stitched": 11, "dead_letters": 1}
        assert post(resolved) == {"messages": 1, "stitched": 0, "dead_letters": 0}
    [(reason,)] = db.execute(
        "SELECT reason FROM cdp_ps.kafka_dead_letters WHERE source = 'webhook'"
    ).fetchall()
    assert reason == KEY_ONLY
    # The same body through the webhook's decoding and the shared ingest: counted as resolved.
    stats = Applier(settings.schemas, Stitcher(settings)).apply(db, envelopes_of(resolved))
    assert (stats.resolved, stats.last_resolved) == (1, "1800000000.0000000000")


def test_member_lag_counts_the_messages_behind_and_reaches_zero(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """What the ``stream_cps.kafka.lag`` gauge and the progress line's ETA read."""
    settings, topic = kafka_env
    rows = sample(60, seed=43)
    lags: list[int | None] = []
    with member(settings.replace(**{"kafka.batch_size": 10})) as service:
        service.on_batch = lambda _stats: lags.append(service.lag)
        wait_until(service.source.owns_partitions, 30, "an assignment")
        produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
        wait_until(lambda: service.progress.messages == len(rows), 30, "all consumed")
    assert len(lags) >= 2 and all(lag is not None for lag in lags)
    assert max(lag or 0 for lag in lags) > 0  # behind while the batches of 10 came
    assert lags[-1] == 0


def test_status_reads_the_group_lag_from_the_real_broker(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """``status --source kafka``: per-partition lag of the group; zero once a member caught up."""
    settings, topic = kafka_env
    rows = sample(30, seed=47)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    env = {**os.environ, **{config.env_var(k): _env(v) for k, v in settings.values.items()}}

    def status() -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "stream_cps", "status", "--source", "kafka", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    before = status()
    assert {p["topic"] for p in before["kafka"]} == {topic}
    assert sum(p["lag"] for p in before["kafka"]) == len(rows)
    with member(settings) as service:
        wait_until(lambda: service.progress.messages == len(rows), 30, "all consumed")
    wait_until(lambda: sum(p["lag"] for p in status()["kafka"]) == 0, 30, "the lag at zero")


def restitched_by_the_sweep(db: psycopg.Connection[Any], settings: config.Settings) -> Any:
    """The contract's tables after the guide's restitch of everything, done by the sweep (the
    replication path's reader): what the Kafka path must have written in the first place."""
    db.execute("UPDATE customer_attributes SET modified = NULL")
    db.execute("UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL")
    for _ in Stitcher(settings).sweep(db):
        pass
    return snapshot(db)


def test_kafka_events_are_stored_stitched_in_one_write(
    kafka_broker: ks.KafkaBroker,
    kafka_env: tuple[config.Settings, str],
    db: psycopg.Connection[Any],
) -> None:
    """The rules run over the messages before the insert, so the row is written once, already
    stitched (issue 15: no second write of every event); it is what the sweep would write."""
    settings, topic = kafka_env
    updates = count_row_updates(db, "cdp_ce.customer_events")
    rows = sample(400, seed=73)
    produce(kafka_broker.bootstrap, topic, events_of(rows))
    with member(settings):
        wait_until(lambda: all_stitched(db, len(rows)), what="all stitched")
        # the rules of each batch were evaluated ahead, on the member's second connection
        assert (
            count(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'stream-cps kafka-read-ahead'",
            )
            == 1
        )
    assert updates() == 0
    assert observed(db) == expected(db)
    stored = snapshot(db)
    assert restitched_by_the_sweep(db, settings) == stored


def test_a_rule_failing_before_the_insert_falls_back_to_stitching_the_stored_rows(
    kafka_broker: ks.KafkaBroker,
    kafka_env: tuple[config.Settings, str],
    db: psycopg.Connection[Any],
) -> None:
    """A rule that fails on one event of a batch: the batch is inserted unmarked and stitched
    by id, which isolates the failure; the other events are stitched as ever."""
    settings, topic = kafka_env
    rows = sample(60, seed=79)
    bad = next(row[0] for row in rows if row[2] == "purchase")
    db.execute(  # the purchase rules fail on that one event (at run time, not when planned)
        "UPDATE cdp_ps.stitching_attributes_config SET value_expression = format("
        "'CASE WHEN id = %%L THEN (1 / (length(id) - length(id)))::text ELSE %%s END', "
        "%s::text, value_expression) WHERE event_id = 'shop_purchase'",
        [bad],
    )
    updates = count_row_updates(db, "cdp_ce.customer_events")
    produce(kafka_broker.bootstrap, topic, events_of(rows))
    with member(settings):
        wait_until(lambda: all_stitched(db, len(rows)), what="all stitched")
    assert updates() > 0  # the stored-rows path ran
    assert count(db, "SELECT count(*) FROM cdp_ps.stitching_errors WHERE event_id = %s", bad) >= 1
    assert observed(db) == expected(db)


def _held_batch(source: KafkaSource, want: int, timeout: float = 30.0) -> KafkaBatch:
    """Consume until one batch holds ``want`` messages (the whole topic: the settings' poll
    waits long enough for every partition's fetch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        consumed = source.consume()
        if len(consumed.messages) >= want:
            return source.decode(consumed)
        assert not consumed.messages, "the topic should arrive as one batch"
    raise AssertionError("no batch arrived")


def _patient(settings: config.Settings) -> config.Settings:
    return settings.replace(**{"kafka.poll_timeout": 3.0})


def test_a_replay_seek_drops_the_sought_partition_from_the_batch_in_hand(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    """The loop decodes batch N+1 while N is applied, so a seek finds a batch in hand: its
    messages of that partition must not be applied (nor their offsets stored over the
    seek's); the seek delivers them again."""
    settings, topic = kafka_env
    settings = _patient(settings)
    rows = sample(60, seed=21)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    source = KafkaSource(settings.kafka, settings.schemas, "member-a")
    source.open()
    try:
        held = _held_batch(source, len(rows))
        assert {p for _, p in held.next_offsets} == {0, 1, 2}
        db.execute(
            "INSERT INTO cdp_ps.kafka_replay_requests (group_id, topic, kafka_partition, "
            "kafka_offset) VALUES (%s, %s, 1, 0)",
            [settings.kafka.group_id, topic],
        )
        source.apply_replays(db)
        again = source.consume()
        kept = source.fresh(held)
        assert {p for _, p in kept.next_offsets} == {0, 2}
        assert {e.partition for e in kept.envelopes} == {0, 2}
        assert len(kept.envelopes) == len(held.envelopes) - sum(
            1 for e in held.envelopes if e.partition == 1
        )
        # Batches consumed after the seek are untouched: partition 1 again, from offset 0.
        replayed = source.fresh(source.decode(again)) if again.messages else None
        deadline = time.monotonic() + 30
        while replayed is None or not replayed.envelopes:
            assert time.monotonic() < deadline, "the seek delivered nothing again"
            replayed = source.fresh(source.decode(source.consume()))
        assert {e.partition for e in replayed.envelopes} == {1}
        assert min(e.offset or 0 for e in replayed.envelopes) == 0
    finally:
        source.close()


def test_a_rebalance_drops_the_revoked_partitions_from_the_batch_in_hand(
    kafka_env: tuple[config.Settings, str],
) -> None:
    """A member joins while the first one holds a batch of every partition: the partitions
    it gives up are the newcomer's to deliver, so they leave the batch in hand."""
    settings, topic = kafka_env
    settings = _patient(settings)
    rows = sample(60, seed=22)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    first = KafkaSource(settings.kafka, settings.schemas, "member-a")
    second = KafkaSource(settings.kafka, settings.schemas, "member-b")
    first.open()
    stop = threading.Event()

    def newcomer() -> None:
        second.open()
        while not stop.is_set():
            second.consume()

    thread = threading.Thread(target=newcomer, daemon=True)
    try:
        held = _held_batch(first, len(rows))
        thread.start()
        deadline = time.monotonic() + 60
        while len(first.consumer.assignment()) == 3 and time.monotonic() < deadline:
            first.consume()  # the revocation's callback runs in here
        owned = {tp.partition for tp in first.consumer.assignment()}
        assert 0 < len(owned) < 3, "the newcomer took no partition"
        kept = first.fresh(held)
        assert {p for _, p in kept.next_offsets} == owned
        assert {e.partition for e in kept.envelopes} == owned
        first.commit(kept)  # storing only owned partitions' offsets is accepted
    finally:
        stop.set()
        thread.join(timeout=30)
        first.close()
        second.close()


def envelopes(batch: list[Row]) -> list[Envelope]:
    """The rows as decoded envelopes of one partition (Avro and JSON, as ``events_of`` makes
    them), for driving the Applier without a broker."""
    avro = SchemaResolver(None)
    return [
        Envelope(f"kafka:t:0:{n}", "kafka", "t", 0, n, k, v, None, decode(k, v, "auto", avro))
        for n, (k, v) in enumerate(events_of(batch))
    ]


def test_rules_evaluated_ahead_on_another_connection_are_what_the_batch_stores(
    settings: config.Settings, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member evaluates a batch's rules on its read-ahead connection while the batch
    before is written; the batch's transaction then stores that result without evaluating
    them again, redelivered twins included once. If the rules changed in between, the
    transaction evaluates them again: a rule change applies to the next batch committed."""
    db.execute(generator.config_sql(settings.schemas))
    rows = sample(80, seed=83)

    stitcher = Stitcher(settings)
    applier = Applier(settings.schemas, stitcher)
    first, second = envelopes(rows[:40] + rows[:3]), envelopes(rows[40:])  # 3 redelivered
    with psycopg.connect(settings.dsn, autocommit=True) as ahead:
        ruled = applier.rule_ahead(ahead, first)
    assert ruled.prepared is not None and len(ruled.prepared.events) == 40
    evaluated: list[int] = []
    prepare_rows = stitcher.prepare_rows

    def counted(conn: psycopg.Connection[Any], *args: Any) -> Any:
        if conn is db:  # in the batch's transaction, not ahead
            evaluated.append(1)
        return prepare_rows(conn, *args)

    monkeypatch.setattr(stitcher, "prepare_rows", counted)
    updates = count_row_updates(db, "cdp_ce.customer_events")
    stats = applier.apply(db, first, ruled)
    assert (stats.events_new, stats.events_seen) == (40, 3)
    assert evaluated == [] and updates() == 0  # the ahead result, stored in one write
    assert observed(db) == expected(db)  # what the sample rules extract, grouped right
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events WHERE identifiers <> '{}'") > 0

    with psycopg.connect(settings.dsn, autocommit=True) as ahead:
        ruled = applier.rule_ahead(ahead, second)
    db.execute("UPDATE cdp_ps.stitching_attributes_config SET value_expression = 'NULL'")
    stats = applier.apply(db, second, ruled)
    assert stats.events_new == len(second) and evaluated == [1] and updates() == 0
    ids = [row[0] for row in rows[40:]]
    assert count(
        db,
        "SELECT count(*) FROM cdp_ce.customer_events WHERE id = ANY(%s) AND identifiers = '{}'",
        ids,
    ) == len(ids), "the batch kept identifiers of the rules it was evaluated with ahead"


def test_a_calculation_storing_after_the_batch_began_does_not_make_it_retry(
    settings: config.Settings, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its rules evaluated ahead, a batch locks its entities in its transaction's first
    statement. Attribute calculation stores into just those entities (the ones stitching has
    changed), skipping the rows it finds locked; had it stored into one after the batch's
    snapshot, the lock would fail the batch at REPEATABLE READ (40001) and it would start over."""
    db.execute(generator.config_sql(settings.schemas))
    rows = sample(40, seed=84)

    applier = Applier(settings.schemas, Stitcher(settings))
    applier.apply(db, envelopes(rows))
    entities = count(db, "SELECT count(*) FROM customer_attributes")
    # The same people again (same identifiers), as new events.
    again = envelopes([(f"{row[0]}-again", *row[1:]) for row in rows])
    with psycopg.connect(settings.dsn, autocommit=True) as ahead:
        ruled = applier.rule_ahead(ahead, again)
    stored: list[int] = []  # rows the "calculation" stored into
    attempts: list[int] = []
    lock_first = applier.stitcher.lock_first
    once = applier._once

    def then_calculation_stores(conn: psycopg.Connection[Any], prepared: Any) -> Any:
        found = lock_first(conn, prepared)  # the batch's snapshot exists by now
        if not stored:
            with psycopg.connect(settings.dsn, autocommit=True) as calc:
                stored.append(
                    calc.execute(
                        "UPDATE customer_attributes SET calculated = now() "
                        "WHERE customer_entity_id IN (SELECT customer_entity_id "
                        "FROM customer_attributes ORDER BY 1 FOR UPDATE SKIP LOCKED)"
                    ).rowcount
                )
        return found

    def counted(*args: Any) -> Any:
        attempts.append(1)
        return once(*args)

    monkeypatch.setattr(applier.stitcher, "lock_first", then_calculation_stores)
    monkeypatch.setattr(applier, "_once", counted)
    stats = applier.apply(db, again, ruled)
    assert len(attempts) == 1, f"the batch started over {len(attempts) - 1} time(s)"
    assert stored == [0] and entities > 0  # every entity of the batch was locked: skipped
    assert stats.events_new == len(rows)
    assert observed(db) == expected(db)


def test_new_events_are_inserted_in_the_write_pipeline_and_a_redelivery_goes_step_by_step(
    settings: config.Settings, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of new events is inserted inside the pipeline of its stitching writes (it runs
    in PostgreSQL while Python groups). A batch holding events stored before is rolled back
    and applied step by step, insert first, with the same outcome; so are the batches after
    it until one holds no stored event. A row the database refuses is isolated as ever."""
    db.execute(generator.config_sql(settings.schemas))
    rows = sample(160, seed=86)
    applier = Applier(settings.schemas, Stitcher(settings))
    sends: list[bool] = []  # per insert sent: inside a pipeline?
    steps: list[int] = []  # per step-by-step insert: its events
    send_insert, insert = applier._send_insert, applier._insert

    def sent(conn: psycopg.Connection[Any], *args: Any) -> Any:
        sends.append(conn.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF)
        return send_insert(conn, *args)

    def stepped(conn: psycopg.Connection[Any], events: list[Any], *args: Any) -> Any:
        steps.append(len(events))
        return insert(conn, events, *args)

    monkeypatch.setattr(applier, "_send_insert", sent)
    monkeypatch.setattr(applier, "_insert", stepped)

    def apply(batch: list[Row]) -> Any:
        found = envelopes(batch)
        with psycopg.connect(settings.dsn, autocommit=True) as ahead:
            return applier.apply(db, found, applier.rule_ahead(ahead, found))

    stats = apply(rows[:40])
    assert (stats.events_new, sends, steps) == (40, [True], [])
    # 10 redelivered, 30 new: the pipelined try is rolled back, then insert first
    stats = apply(rows[30:70])
    assert (stats.events_new, stats.events_seen, stats.stored_before) == (30, 10, 10)
    assert sends == [True, True, False] and steps == [40] and not applier.pipelined
    stats = apply(rows[70:100])  # all new, step by step once more, then pipelined again
    assert (stats.events_new, steps[-1], applier.pipelined) == (30, 30, True)
    sends.clear()
    steps.clear()
    stats = apply(rows[100:130])
    assert (stats.events_new, sends, steps) == (30, [True], [])
    # a constraint a DBA added refuses one row, which the rules took: the pipelined try
    # fails, and step by step that row alone is a dead letter
    db.execute(
        psycopg.sql.SQL(
            "ALTER TABLE cdp_ce.customer_events ADD CONSTRAINT refused CHECK (id <> {}) NOT VALID"
        ).format(rows[130][0])
    )
    before = len(sends)
    stats = apply(rows[130:160])
    db.execute("ALTER TABLE cdp_ce.customer_events DROP CONSTRAINT refused")
    # pipelined, then the batch's insert and one insert per row (savepoints)
    assert sends[before:] == [True, False] + [False] * 30 and steps[-1] == 30
    assert applier.pipelined
    assert stats.events_new == 29 and [d.origin for d in stats.dead_letters] == ["kafka:t:0:0"]
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events") == 159
    assert observed(db) == expected(db)
