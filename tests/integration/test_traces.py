"""Traces of a running service as a collector receives them (OTLP/HTTP, tests/otlp_receiver).

Each test runs ``stream-cps run`` as a process against the real PostgreSQL (and the real Kafka
broker or OpenSearch node) and asserts on the exported span tree: one trace per batch, from the
poll to the acknowledgement, nothing while idle, links to the producers' traces and from the
relay to the batch that wrote its outbox rows.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from infra.kafka import kafka_service as ks
from stream_cps import config, telemetry
from stream_cps_dev.encode import json_event
from tests.fixtures.kafka import create_topics
from tests.otlp_receiver import OtlpReceiver, Span, by_id, children
from tests.support import event, insert, setup_rules, unstitched, wait_until

SERVER, CLIENT, CONSUMER = 2, 3, 5  # opentelemetry.proto.trace.v1.Span.SpanKind
STAGES = {
    telemetry.SPAN_STITCH_PURGE,
    telemetry.SPAN_STITCH_EXTRACT,
    telemetry.SPAN_STITCH_GROUP,
    telemetry.SPAN_STITCH_WRITE,
}
ROOTS = {  # every trace starts with one of these
    telemetry.SPAN_SOURCE_BATCH,
    telemetry.SPAN_STITCH_SWEEP,
    telemetry.SPAN_ATTR_BATCH,
    telemetry.SPAN_ATTR_CACHE,
    telemetry.SPAN_ATTR_CONTEXT,
    telemetry.SPAN_OUTBOX_RELAY,
}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def otel_env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    """Our own endpoint points nowhere: the standard variables must win (docs/configuration)."""
    return {
        "STREAM_CPS_TELEMETRY_EXPORTER": "otlp",
        "STREAM_CPS_TELEMETRY_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "run", *args],
        env={**os.environ, **env},
        stdout=handle,
        stderr=handle,
    )


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise
    assert code == 0, log.read_text()[-3000:]


def slot_active(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND active"
    ).fetchone()
    return bool(row and row[0])


def assert_idle(receiver: OtlpReceiver, settle: float = 1.0, window: float = 2.5) -> None:
    """Nothing at all is exported while there is nothing to do (polls, sweeps, purge checks)."""
    time.sleep(settle)
    before = len(receiver.spans())
    time.sleep(window)
    new = receiver.spans()[before:]
    assert not new, f"exported while idle: {sorted({s.name for s in new})}"


def assert_well_formed(spans: list[Span]) -> None:
    """Every parent was exported, in the same trace; only the known roots start traces."""
    ids = by_id(spans)
    for s in spans:
        if s.parent_id is None:
            assert s.name in ROOTS, f"{s.name} is a root span"
        else:
            parent = ids.get(s.parent_id)
            assert parent is not None, f"{s.name}: parent never exported"
            assert parent.trace_id == s.trace_id


def assert_stitch_batch(spans: list[Span], batch: Span) -> None:
    """A child per stage; a batch that found nothing (a sweep's last) only reads and purges."""
    names = {c.name for c in children(spans, batch)}
    if batch.attributes.get("events.stitched"):
        assert names == STAGES, names
    else:
        assert names <= STAGES and telemetry.SPAN_STITCH_PURGE in names, names


def one_trace_per_batch(spans: list[Span], last: str) -> list[tuple[Span, list[Span]]]:
    """(root, its children) of each ``source.batch`` trace that stitched events."""
    out = []
    for root in spans:
        if root.name != telemetry.SPAN_SOURCE_BATCH:
            continue
        kids = children(spans, root)
        stitched = [k for k in kids if k.name == telemetry.SPAN_STITCH_BATCH]
        if any(k.attributes.get("events.stitched") for k in stitched):
            names = [k.name for k in kids]
            assert names[0] == telemetry.SPAN_SOURCE_POLL and names[-1] == last, names
            for k in stitched:
                assert_stitch_batch(spans, k)
            out.append((root, kids))
    return out


def exported_stitching(spans: list[Span]) -> int:
    """Events stitched by batches whose whole trace (up to its root) has been exported."""
    ids = by_id(spans)

    def rooted(s: Span) -> bool:
        while s.parent_id is not None:
            parent = ids.get(s.parent_id)
            if parent is None:
                return False
            s = parent
        return True

    return stitched_in(spans, [s for s in spans if rooted(s)])


def exported_by(count: int, spans: list[Span]) -> bool:
    return exported_stitching(spans) >= count


def through_the_slot(
    db: psycopg.Connection[Any],
    receiver: OtlpReceiver,
    slot: str,
    rows: Callable[[int], list[tuple[Any, ...]]],
) -> tuple[list[Span], Span, list[Span]]:
    """Insert ``rows(attempt)`` until the slot's batch stitches them: (spans, its root, the
    root's children).

    The 0.5 s sweep (kept for the idle checks) races the slot for rows inserted while idle:
    when it finds them committed before the slot delivers them, it stitches them in a trace of
    its own and the slot's batch finds nothing. Then, once the slot has acknowledged that
    insert (so that its rows cannot join the next set's batch), a new set is inserted; three
    lost races in a row fail."""
    done = exported_stitching(receiver.spans())
    lost: list[str] = []
    for attempt in range(3):
        batch = rows(attempt)
        insert(db, batch)
        row = db.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        inserted = row[0]
        wait_until(lambda: unstitched(db) == 0, what="stitching")
        done += len(batch)
        spans = receiver.wait_for(
            functools.partial(exported_by, done), what="the trace that stitched them"
        )
        found = [
            (root, kids)
            for root, kids in one_trace_per_batch(spans, telemetry.SPAN_SOURCE_ACK)
            if stitched_in(spans, kids) == len(batch)
        ]
        assert len(found) <= 1, f"{len(found)} slot traces stitched the same {len(batch)} rows"
        if found:
            return spans, *found[0]
        lost.append(", ".join(sorted(root_names(spans))))

        def acknowledged(lsn: str = inserted) -> bool:
            ack = db.execute(
                "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (lsn, slot),
            ).fetchone()
            return bool(ack and ack[0])

        wait_until(acknowledged, what="the slot past the lost insert")
    raise AssertionError(f"the slot's batch never stitched the rows; traces seen: {lost}")


def root_names(spans: list[Span]) -> set[str]:
    return {s.name for s in spans if s.parent_id is None}


def stitched_in(spans: list[Span], kids: list[Span]) -> int:
    return sum(
        int(k.attributes.get("events.stitched", 0))
        for k in kids
        if k.name == telemetry.SPAN_STITCH_BATCH
    )


def test_replication_one_trace_per_batch_from_poll_to_ack_and_nothing_while_idle(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    setup_rules(db)
    service = f"cps-{uuid.uuid4().hex[:8]}"
    slot = f"traces_{uuid.uuid4().hex[:12]}"  # slot names are per server, which suites share
    env = {
        **otel_env(receiver, service),
        "STREAM_CPS_DSN": pg_dsn,
        "STREAM_CPS_STITCHING_POLL_INTERVAL": "0.02",
        "STREAM_CPS_STITCHING_SWEEP_INTERVAL": "0.5",
        "STREAM_CPS_STITCHING_BATCH_SIZE": "5",
        "STREAM_CPS_STITCHING_SLOT_NAME": slot,
    }
    log = tmp_path / "run.log"
    proc = start([], env, log)
    try:
        wait_until(lambda: slot_active(db), what="the service holding the slot")
        assert_idle(receiver)

        # Two events: the slot's batch, stitched by ids.
        spans, root, kids = through_the_slot(
            db,
            receiver,
            slot,
            lambda n: [event(f"a{n}", 1, email=f"x{n}@a"), event(f"b{n}", 2, email=f"x{n}@a")],
        )
        assert [k.name for k in kids] == [
            telemetry.SPAN_SOURCE_POLL,
            telemetry.SPAN_STITCH_BATCH,
            telemetry.SPAN_SOURCE_ACK,
        ]
        assert stitched_in(spans, kids) == 2
        assert root.attributes["stream_cps.events"] == 2
        assert root.resource["service.name"] == service
        assert root.resource["deployment.environment.name"] == "test"

        # A backlog (more than a batch in one transaction): the sweep, reading ahead in a
        # thread; every batch, its extract included, stays in the poll's trace.
        spans, root, kids = through_the_slot(
            db,
            receiver,
            slot,
            lambda n: [event(f"s{n}-{i}", 10 + i, email=f"s{n}-{i % 4}@a") for i in range(17)],
        )
        batches = [k for k in kids if k.name == telemetry.SPAN_STITCH_BATCH]
        assert len(batches) >= 4  # 17 events in batches of 5
        assert_idle(receiver)
    finally:
        stop(proc, log)
    spans = receiver.spans()
    assert_well_formed(spans)
    extracts = [s for s in spans if s.name == telemetry.SPAN_STITCH_EXTRACT]
    assert extracts and all(
        by_id(spans)[s.parent_id or ""].name == telemetry.SPAN_STITCH_BATCH for s in extracts
    )


def _producer_context(n: int) -> tuple[str, str]:
    return f"{n + 1:032x}", f"{n + 1:016x}"


def test_kafka_batch_trace_links_to_each_producer_and_follows_messaging_conventions(
    kafka_broker: ks.KafkaBroker,
    settings: config.Settings,
    db: psycopg.Connection[Any],
    tmp_path: Path,
    receiver: OtlpReceiver,
) -> None:
    from stream_cps_dev.sample import generator

    topic = f"events-{uuid.uuid4().hex[:10]}"
    create_topics(kafka_broker.bootstrap, topic, topic + "-dlq")
    db.execute(generator.config_sql(settings.schemas))
    group = f"g-{topic}"
    env = {
        **otel_env(receiver, "cps-kafka"),
        "STREAM_CPS_DSN": settings.dsn,
        "STREAM_CPS_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "STREAM_CPS_KAFKA_TOPICS": topic,
        "STREAM_CPS_KAFKA_GROUP_ID": group,
        "STREAM_CPS_KAFKA_DEAD_LETTER_TOPIC": topic + "-dlq",
        "STREAM_CPS_KAFKA_POLL_TIMEOUT": "0.1",
        "STREAM_CPS_KAFKA_SESSION_TIMEOUT": "6",
    }
    rows = list(generator.events(seed=3, persons=4, per_person=2))[:8]
    log = tmp_path / "kafka.log"
    proc = start(["--source", "kafka"], env, log)
    try:
        producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
        sent: dict[str, tuple[str, str]] = {}
        for n, row in enumerate(rows):
            trace_id, span_id = _producer_context(n)
            sent[trace_id] = (span_id, row[0])
            producer.produce(
                topic,
                key=row[0].encode(),
                value=json_event(row),
                headers=[("traceparent", f"00-{trace_id}-{span_id}-01".encode())],
            )
        assert producer.flush(30) == 0
        wait_until(lambda: unstitched(db) == 0 and _count_events(db) == len(rows), 60, "events")
        spans = receiver.wait_for(
            lambda s: (
                sum(stitched_in(s, k) for _, k in one_trace_per_batch(s, "source.commit"))
                >= len(rows)
            ),
            what="the batches' traces",
        )
        assert_idle(receiver)
    finally:
        stop(proc, log)
    spans = receiver.spans()
    assert_well_formed(spans)
    linked: dict[str, dict[str, Any]] = {}
    for root, kids in one_trace_per_batch(spans, telemetry.SPAN_SOURCE_COMMIT):
        assert root.kind == CONSUMER
        a = root.attributes
        assert a["messaging.system"] == "kafka"
        assert a["messaging.operation.type"] == "process"
        assert a["messaging.consumer.group.name"] == group
        assert a["messaging.destination.name"] == topic
        assert a["messaging.batch.message_count"] == len(root.links)
        poll, commit = kids[0], kids[-1]
        assert poll.attributes["messaging.operation.type"] == "receive"
        assert poll.kind == CLIENT and commit.kind == CLIENT
        for link in root.links:
            assert sent[link.trace_id][0] == link.span_id
            linked[link.trace_id] = link.attributes
    assert set(linked) == set(sent)
    for attributes in linked.values():
        assert attributes["messaging.destination.name"] == topic
        assert attributes["messaging.destination.partition.id"] in {"0", "1", "2"}
        assert isinstance(attributes["messaging.kafka.message.offset"], int)


def _count_events(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM cdp_ce.customer_events").fetchone()
    return int(row[0]) if row else -1


def test_relay_delivery_links_to_the_batch_that_wrote_its_outbox_rows(
    db: psycopg.Connection[Any],
    pg_dsn: str,
    tmp_path: Path,
    receiver: OtlpReceiver,
    opensearch_node: Any,
) -> None:
    setup_rules(db)
    env = {
        **otel_env(receiver, "cps-relay"),
        "STREAM_CPS_DSN": pg_dsn,
        "STREAM_CPS_STITCHING_POLL_INTERVAL": "0.02",
        "STREAM_CPS_STITCHING_SLOT_NAME": f"traces_{uuid.uuid4().hex[:12]}",
        "STREAM_CPS_OPENSEARCH_URL": opensearch_node.url,
        "STREAM_CPS_OPENSEARCH_INDEX": f"traces-{uuid.uuid4().hex[:8]}",
        "STREAM_CPS_OPENSEARCH_REPLICAS": "0",
        "STREAM_CPS_OPENSEARCH_POLL_INTERVAL": "0.05",
    }
    log = tmp_path / "relay.log"
    proc = start([], env, log)
    try:
        wait_until(lambda: slot_active(db), what="the service holding the slot")
        insert(db, [event("a", 1, email="x@a")])
        wait_until(lambda: unstitched(db) == 0, what="a")
        insert(db, [event("b", 2, cookie="y")])
        wait_until(lambda: unstitched(db) == 0, what="b")
        insert(db, [event("c", 3, email="x@a", cookie="y")])  # merges b's entity into a's
        wait_until(lambda: unstitched(db) == 0 and _delivered(db), what="delivery")
        spans = receiver.wait_for(
            lambda s: (
                any(k.attributes.get("entities.merged") for k in s)
                and any(r.name == telemetry.SPAN_OUTBOX_RELAY and r.links for r in s)
            ),
            what="the merge and a relay span",
        )
        assert_idle(receiver)
    finally:
        stop(proc, log)
    spans = receiver.spans()
    assert_well_formed(spans)
    [merge] = [s for s in spans if s.attributes.get("entities.merged")]
    calculations = {s.trace_id for s in spans if s.name == telemetry.SPAN_ATTR_BATCH}
    linked = {
        link.trace_id for s in spans if s.name == telemetry.SPAN_OUTBOX_RELAY for link in s.links
    }
    assert merge.trace_id in linked  # the delete of the absorbed entity
    assert calculations and calculations <= linked  # every upsert
    rows = db.execute("SELECT op, traceparent FROM cdp_attr.outbox ORDER BY seq").fetchall()
    assert rows and all(t and t.split("-")[1] in linked for _, t in rows)


def _delivered(conn: psycopg.Connection[Any]) -> bool:
    """A delete (the merge) and upserts (calculation) are in the outbox, all delivered."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE op = 'delete'), count(*) FILTER (WHERE op = 'upsert'), "
        "count(*) FILTER (WHERE delivered IS NULL) FROM cdp_attr.outbox"
    ).fetchone()
    return row is not None and row[0] > 0 and row[1] > 0 and row[2] == 0
