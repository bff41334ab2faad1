"""The outbox relay against a real PostgreSQL and a real OpenSearch 2.19 node.

Deletes come from the real stitcher (merges, purge signals); upserts are written the way
attribute calculation writes them: attributes, a new version and an outbox row in one
transaction (``calculate`` below).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from opensearchpy import OpenSearch

from infra.opensearch import opensearch_service as service
from stream_cps import config
from stream_cps.sinks import kafka_commands
from stream_cps.sinks.commands import Action, Command, Outcome, Planned, collapse
from stream_cps.sinks.memory import MemorySink
from stream_cps.sinks.opensearch import (
    BulkWriter,
    OpenSearchUnavailable,
    classify,
    ensure_index,
)
from stream_cps.sinks.relay import Relay, prepare_index
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev import embedded
from tests.fixtures.opensearch import restart_opensearch
from tests.support import event, insert, setup_rules, wait_until

CALCULATE = """
WITH due AS (
    SELECT customer_entity_id FROM customer_attributes
    WHERE calculated IS NULL OR calculated < modified FOR UPDATE
), calc AS (
    UPDATE customer_attributes ca SET
        attributes = jsonb_build_object(
            'events', (SELECT count(*) FROM cdp_ce.customer_events e
                       WHERE e.identifiers <@ ca.identifiers AND e.identifiers <> '{}'),
            'ids', cardinality(ca.identifiers)),
        calculated = clock_timestamp(),
        version = nextval('cdp_ps.entity_version_seq')
    FROM due WHERE ca.customer_entity_id = due.customer_entity_id
    RETURNING ca.customer_entity_id, ca.version
)
INSERT INTO cdp_attr.outbox (entity_id, op, version)
SELECT customer_entity_id, 'upsert', version FROM calc
"""


def calculate(conn: psycopg.Connection[Any]) -> None:
    """What attribute calculation does: new attributes and an upsert command, atomically."""
    with conn.transaction():
        conn.execute(CALCULATE)


def set_attributes(conn: psycopg.Connection[Any], entity: str, attrs: str) -> int:
    """Store attributes (JSON text) for one entity and queue its upsert; return the version."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE customer_attributes SET attributes = %s::jsonb, calculated = now(), "
            "version = nextval('cdp_ps.entity_version_seq') WHERE customer_entity_id = %s "
            "RETURNING version",
            [attrs, entity],
        ).fetchone()
        assert row is not None, entity
        conn.execute(
            "INSERT INTO cdp_attr.outbox (entity_id, op, version) VALUES (%s, 'upsert', %s)",
            [entity, row[0]],
        )
        return int(row[0])


def stitch_all(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for _ in stitcher.sweep(conn):
        pass


@pytest.fixture
def os_settings(settings: config.Settings, opensearch_node: Any) -> config.Settings:
    """Settings pointing at the session node, with an index of this test's own."""
    return settings.replace(
        **{
            "opensearch.url": opensearch_node.url,
            "opensearch.index": f"entities-{uuid.uuid4().hex[:10]}",
            "opensearch.replicas": 0,
            "opensearch.poll_interval": 0.05,
            "opensearch.max_backoff": 2.0,
            "opensearch.timeout": 5.0,
        }
    )


def client_for(settings: config.Settings) -> OpenSearch:
    return OpenSearch(hosts=[settings.opensearch.url], timeout=30)


def drain(relay: Relay, conn: psycopg.Connection[Any]) -> int:
    total = 0
    while n := relay.run_once(conn):
        total += n
    return total


def index_docs(settings: config.Settings) -> dict[str, tuple[int, dict[str, Any]]]:
    """id -> (_version, _source) of every document in the test's index."""
    client = client_for(settings)
    index = settings.opensearch.index
    client.indices.refresh(index=index)
    hits = client.search(
        index=index, body={"query": {"match_all": {}}, "version": True}, size=10000
    )
    return {h["_id"]: (h["_version"], h["_source"]) for h in hits["hits"]["hits"]}


def live_entities(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """What the index must converge to: id -> (version, document) of every live entity."""
    rows = conn.execute(
        "SELECT customer_entity_id, identifiers, attributes, calculated, version "
        "FROM customer_attributes"
    ).fetchall()
    return {
        r[0]: (
            r[4],
            {
                "customer_entity_id": r[0],
                "identifiers": list(r[1]),
                "attributes": r[2],
                "calculated": r[3].isoformat() if r[3] else None,
            },
        )
        for r in rows
    }


def outbox_state(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE delivered IS NULL AND NOT parked), "
        "count(*) FILTER (WHERE parked), count(*) FILTER (WHERE delivered IS NOT NULL) "
        "FROM cdp_attr.outbox"
    ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]))


# -- pure parts ----------------------------------------------------------------------------


def test_collapse_keeps_newest_op_and_highest_version_per_entity() -> None:
    commands = [
        Command(1, "a", "upsert", 10),
        Command(2, "b", "upsert", 11),
        Command(3, "a", "delete", 12),
        Command(4, "b", "upsert", 14),
        Command(5, "c", "delete", 9),
    ]
    assert collapse(commands) == [
        Planned("a", "delete", 12, (1, 3)),
        Planned("b", "upsert", 14, (2, 4)),
        Planned("c", "delete", 9, (5,)),
    ]


@pytest.mark.parametrize(
    ("item", "is_delete", "outcome"),
    [
        ({"index": {"status": 201, "result": "created"}}, False, Outcome.DELIVERED),
        ({"delete": {"status": 404, "result": "not_found"}}, True, Outcome.DELIVERED),
        (
            {"index": {"status": 409, "error": {"type": "version_conflict_engine_exception"}}},
            False,
            Outcome.STALE,
        ),
        (
            {"index": {"status": 429, "error": {"type": "es_rejected_execution_exception"}}},
            False,
            Outcome.RETRY,
        ),
        ({"index": {"status": 503, "error": {"type": "unavailable_shards"}}}, False, Outcome.RETRY),
        (
            {"index": {"status": 403, "error": {"type": "cluster_block_exception"}}},
            False,
            Outcome.RETRY,
        ),
        (
            {"index": {"status": 400, "error": {"type": "mapper_parsing_exception"}}},
            False,
            Outcome.PARK,
        ),
    ],
)
def test_bulk_items_are_classified(item: dict[str, Any], is_delete: bool, outcome: Outcome) -> None:
    action = Action("e", 1, None if is_delete else {"customer_entity_id": "e"})
    assert classify(action, item).outcome is outcome


def test_kafka_commands_round_trip_through_the_avro_schema() -> None:
    upsert = Action(
        "e1",
        7,
        {
            "customer_entity_id": "e1",
            "identifiers": ["email:x@a"],
            "attributes": {"n": 1},
            "calculated": "2026-01-01T00:00:00+00:00",
        },
    )
    assert kafka_commands.decode(kafka_commands.encode(upsert, "ix")) == {
        "entity_id": "e1",
        "op": "upsert",
        "version": 7,
        "index": "ix",
        "identifiers": ["email:x@a"],
        "attributes_json": '{"n": 1}',
        "calculated": "2026-01-01T00:00:00+00:00",
    }
    deleted = kafka_commands.decode(kafka_commands.encode(Action("e2", 8, None), "ix"))
    assert (deleted["op"], deleted["version"], deleted["identifiers"]) == ("delete", 8, None)


# -- against PostgreSQL and OpenSearch -----------------------------------------------------


def test_ensure_index_sets_mapping_and_gc_deletes_and_is_idempotent(
    os_settings: config.Settings,
) -> None:
    types = {"born": "date", "code": "string", "n": "int", "avg": "float", "ok": "bool"}
    ensure_index(os_settings, attribute_types=types)
    ensure_index(os_settings, attribute_types={**types, "code": "int"})  # a changed data_type
    client = client_for(os_settings)
    index = os_settings.opensearch.index
    got = client.indices.get(index=index)[index]
    assert got["settings"]["index"]["gc_deletes"] == "1d"
    props = got["mappings"]["properties"]
    assert props["customer_entity_id"]["type"] == "keyword"
    assert props["identifiers"]["type"] == "keyword"
    assert got["mappings"]["dynamic"] == "strict"
    attrs = props["attributes"]["properties"]
    assert {k: v["type"] for k, v in attrs.items()} == {
        "born": "date",
        "code": "keyword",  # kept: changing a field's type needs a reindex
        "n": "long",
        "avg": "double",
        "ok": "boolean",
    }
    # No date detection: a string attribute that first looks like a date stays a string.
    for n, value in enumerate(["2026-01-01", "soon"]):
        doc = {"customer_entity_id": f"d{n}", "attributes": {"maybe": value}}
        client.index(index=index, id=f"d{n}", body=doc)
    # A deleted index comes back with our mapping on the next write (the template).
    client.indices.delete(index=index)
    client.index(index=index, id="x", body={"customer_entity_id": "x", "attributes": {"s": "v"}})
    again = client.indices.get(index=index)[index]
    assert again["settings"]["index"]["gc_deletes"] == "1d"
    assert again["mappings"]["properties"]["attributes"]["properties"]["s"]["type"] == "keyword"


def test_calculation_upserts_documents_with_current_attributes(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="x@a"), event("c", 3, cookie="k")])
    stitch_all(stitcher, db)
    calculate(db)
    x, k = entity_id_for("a"), entity_id_for("c")
    # Two more calculations of one entity before the relay runs: collapsed, newest wins.
    set_attributes(db, k, '{"tier": "silver", "score": 1}')
    newest = set_attributes(db, k, '{"tier": "gold", "score": 2}')

    relay = Relay(os_settings)
    assert drain(relay, db) == 4
    docs = index_docs(os_settings)
    assert docs == live_entities(db)
    assert docs[x][1]["attributes"] == {"events": 2, "ids": 1}
    assert docs[x][1]["identifiers"] == ["email:x@a"]
    assert docs[k] == (newest, live_entities(db)[k][1])
    assert docs[k][1]["attributes"] == {"tier": "gold", "score": 2}
    assert outbox_state(db) == (0, 0, 4)
    assert db.execute("SELECT max(attempts), min(attempts) FROM cdp_attr.outbox").fetchone() == (
        1,
        1,
    )


def merge_and_purge(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    relay: Relay,
    before: Callable[[], None] | None = None,
) -> None:
    """Three entities delivered; then a merges into b and p is purged, delivered again.
    ``before`` checks what was delivered before the merge."""
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1"), event("p", 1, email="p@")])
    stitch_all(stitcher, db)
    calculate(db)
    drain(relay, db)
    if before is not None:
        before()
    insert(db, [event("c", 20, email="x@a", cookie="c1")])  # merges a into b
    stitch_all(stitcher, db)
    db.execute(  # the guide's purge signal
        "UPDATE customer_attributes SET modified = NULL WHERE customer_entity_id = %s",
        [entity_id_for("p")],
    )
    stitcher.stitch(db, [])
    calculate(db)
    drain(relay, db)


def test_merges_and_purges_delete_documents(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    def delivered_all_three() -> None:
        assert set(index_docs(os_settings)) == {entity_id_for(e) for e in "abp"}

    merge_and_purge(db, settings, Relay(os_settings), delivered_all_three)
    docs = index_docs(os_settings)
    assert set(docs) == {entity_id_for("b")}
    assert docs == live_entities(db)
    assert docs[entity_id_for("b")][1]["attributes"] == {"events": 3, "ids": 2}
    assert outbox_state(db)[:2] == (0, 0)


def test_relay_to_the_in_memory_sink_converges_like_the_index(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """The same merges and purges, delivered to ``MemorySink``: the relay needs no node to be
    tested, and ends in the same state (the contract suite holds the two sinks to the same
    behaviour)."""
    sink = MemorySink()
    merge_and_purge(db, settings, Relay(settings, sink=sink))
    live = {e: found for e in sink.stored if (found := sink.get(e)) is not None}
    assert live == live_entities(db)
    assert set(live) == {entity_id_for("b")}
    assert outbox_state(db)[:2] == (0, 0)


def test_late_older_upsert_does_not_resurrect_merged_id(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    relay = Relay(os_settings)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1")])
    stitch_all(stitcher, db)
    calculate(db)
    drain(relay, db)
    gone = entity_id_for("a")
    old_version, old_doc = index_docs(os_settings)[gone]

    insert(db, [event("c", 20, email="x@a", cookie="c1")])
    stitch_all(stitcher, db)
    drain(relay, db)
    assert gone not in index_docs(os_settings)

    # A late upsert command with the old version (e.g. a calculation that committed late):
    # the entity row is gone, so the relay writes nothing.
    db.execute(
        "INSERT INTO cdp_attr.outbox (entity_id, op, version) VALUES (%s, 'upsert', %s)",
        [gone, old_version],
    )
    assert drain(relay, db) == 1
    assert gone not in index_docs(os_settings)
    assert outbox_state(db)[:2] == (0, 0)

    # A stale write that reaches OpenSearch anyway (a replayed in-flight request, a Kafka
    # consumer) meets the delete's tombstone, which gc_deletes keeps for a day.
    writer = BulkWriter(client_for(os_settings), os_settings.opensearch.index)
    (result,) = writer.write([Action(gone, old_version, old_doc)])
    assert result.outcome is Outcome.STALE
    assert gone not in index_docs(os_settings)


def test_per_item_errors_are_read_and_unrecoverable_commands_parked(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event(e, i, email=f"{e}@x") for i, e in enumerate("abc")])
    stitch_all(Stitcher(settings), db)
    a, b, c = (entity_id_for(e) for e in "abc")
    relay = Relay(os_settings)
    set_attributes(db, a, '{"score": 5}')
    drain(relay, db)  # maps attributes.score as a number

    set_attributes(db, b, '{"score": "high"}')  # can never be indexed: mapping error
    set_attributes(db, c, '{"score": 7}')
    assert relay.run_once(db) == 2  # one 200 response holding a success and a failure
    assert relay.run_once(db) == 0  # the parked command is not tried again
    parked = db.execute(
        "SELECT entity_id, parked, delivered, attempts, last_error FROM cdp_attr.outbox "
        "WHERE parked"
    ).fetchall()
    assert len(parked) == 1
    entity, _, delivered, attempts, reason = parked[0]
    assert (entity, delivered, attempts) == (b, None, 1)
    assert "400 mapper_parsing_exception" in reason and "attributes.score" in reason
    assert set(index_docs(os_settings)) == {a, c}

    # A write block answers every item with an error: retried, never parked, nothing lost.
    client = client_for(os_settings)
    index = os_settings.opensearch.index
    client.indices.put_settings(index=index, body={"index.blocks.write": True})
    try:
        newest = set_attributes(db, c, '{"score": 8}')
        with pytest.raises(OpenSearchUnavailable):
            relay.run_once(db)
        row = db.execute(
            "SELECT delivered, parked, attempts, last_error FROM cdp_attr.outbox "
            "WHERE version = %s",
            [newest],
        ).fetchone()
        assert row is not None
        assert row[:3] == (None, False, 1)
        assert "cluster_block_exception" in row[3]
    finally:
        client.indices.put_settings(index=index, body={"index.blocks.write": None})
    assert drain(relay, db) == 1
    assert index_docs(os_settings)[c][1]["attributes"] == {"score": 8}


@pytest.mark.slow
def test_opensearch_down_20s_while_events_flow_converges_and_drains(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    os_settings: config.Settings,
    opensearch_node: Any,
) -> None:
    setup_rules(db)
    stop_writing, stop_relay = threading.Event(), threading.Event()
    commit_times: list[float] = []
    errors: list[BaseException] = []

    def write_events() -> None:
        """Events keep arriving: stitched (merges queue deletes) and calculated (upserts)."""
        rng = random.Random(7)
        stitcher = Stitcher(settings)
        n = 0
        try:
            with psycopg.connect(settings.dsn, autocommit=True) as conn:
                while not stop_writing.is_set():
                    batch = []
                    for _ in range(10):
                        n += 1
                        batch.append(
                            event(
                                f"e{n}",
                                n,
                                email=f"u{rng.randrange(4000)}@x",
                                cookie=f"k{rng.randrange(4000)}",
                            )
                        )
                    started = time.monotonic()
                    insert(conn, batch)
                    stitcher.stitch(conn, [b[0] for b in batch])
                    if rng.random() < 0.1:  # now and then a purge signal
                        conn.execute(
                            "UPDATE customer_attributes SET modified = NULL WHERE "
                            "customer_entity_id = (SELECT min(customer_entity_id) "
                            "FROM customer_attributes)"
                        )
                        stitcher.stitch(conn, [])
                    calculate(conn)
                    commit_times.append(time.monotonic() - started)
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    relay = Relay(os_settings)
    relay_thread = threading.Thread(target=relay.run_forever, args=(stop_relay,), daemon=True)
    writer = threading.Thread(target=write_events, daemon=True)
    relay_thread.start()
    writer.start()
    try:
        time.sleep(4)
        assert index_docs(os_settings), "the relay delivered nothing before the outage"
        service.stop(opensearch_node.workdir)
        outage_started = time.monotonic()
        written_before = len(commit_times)
        time.sleep(20)
        assert service.health(opensearch_node.url) is None
        during = commit_times[written_before:]
        assert len(during) > 20, "stitching and calculation stalled while OpenSearch was down"
        assert max(during) < 2.0, "a batch waited on OpenSearch"
        pending_during = outbox_state(db)[0]
        assert pending_during > 0
        restart_opensearch(opensearch_node)
        assert time.monotonic() - outage_started >= 20
        time.sleep(3)
    finally:
        stop_writing.set()
        writer.join(30)
    assert not errors, errors

    deadline = time.monotonic() + 90
    while outbox_state(db)[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_relay.set()
    relay_thread.join(30)
    assert not relay_thread.is_alive()
    pending, parked, delivered = outbox_state(db)
    assert (pending, parked) == (0, 0)
    assert delivered > pending_during
    assert db.execute("SELECT count(*) FROM cdp_attr.outbox WHERE op = 'delete'").fetchone() != (
        0,
    ), "the run had no merges or purges"
    retried = db.execute("SELECT count(*) FROM cdp_attr.outbox WHERE attempts > 1").fetchone()
    assert retried is not None and retried[0] > 0, "nothing was retried: was OpenSearch down?"
    live = live_entities(db)
    assert index_docs(os_settings) == live


def test_old_delivered_rows_are_pruned_pending_and_parked_kept(
    db: psycopg.Connection[Any], os_settings: config.Settings
) -> None:
    db.execute(
        "INSERT INTO cdp_attr.outbox (entity_id, op, version, delivered, parked) VALUES "
        "('old', 'delete', 1, now() - interval '2 days', false), "
        "('new', 'delete', 2, now() - interval '1 hour', false), "
        "('stuck', 'delete', 3, NULL, true), ('todo', 'delete', 4, NULL, false)"
    )
    store = Relay(os_settings).store
    assert store.prune(db, seconds=24 * 3600) == 1
    rows = db.execute("SELECT entity_id FROM cdp_attr.outbox ORDER BY seq").fetchall()
    assert rows == [("new",), ("stuck",), ("todo",)]


def test_commands_are_also_produced_to_kafka_avro_keyed_by_entity(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    os_settings: config.Settings,
    kafka_broker: Any,
    kafka_topic: str,
) -> None:
    from confluent_kafka import Consumer

    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1")])
    stitch_all(stitcher, db)
    calculate(db)
    insert(db, [event("c", 20, email="x@a", cookie="c1")])  # merges a into b
    stitch_all(stitcher, db)
    calculate(db)
    kafka_settings = os_settings.replace(
        **{"opensearch.kafka_topic": kafka_topic, "kafka.bootstrap_servers": kafka_broker.bootstrap}
    )
    relay = Relay(kafka_settings)
    assert drain(relay, db) == 4

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_broker.bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([kafka_topic])
    got: list[tuple[str, dict[str, Any]]] = []
    deadline, quiet = time.monotonic() + 30, 0
    while time.monotonic() < deadline and quiet < 4:  # after the first, 2 s without more
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            quiet += 1 if got else 0
            continue
        key, value = msg.key(), msg.value()
        assert isinstance(key, bytes) and isinstance(value, bytes)
        got.append((key.decode(), kafka_commands.decode(value)))
    consumer.close()
    # One batch: a's upsert and delete collapse to the delete; b gets its newest upsert.
    by_entity = {key: value for key, value in got}
    survivor, gone = entity_id_for("b"), entity_id_for("a")
    assert len(got) == 2, got
    assert by_entity[gone]["op"] == "delete"
    assert by_entity[survivor]["op"] == "upsert"
    assert by_entity[survivor]["identifiers"] == ["cookie:c1", "email:x@a"]
    assert json.loads(by_entity[survivor]["attributes_json"]) == {"events": 3, "ids": 2}
    assert by_entity[survivor]["version"] == index_docs(os_settings)[survivor][0]


def test_gc_deletes_decides_whether_a_late_older_write_resurrects(
    os_settings: config.Settings,
) -> None:
    """Why the index keeps tombstones for a day: with OpenSearch pruning them at once, a late
    write with an older version brings a deleted id back."""
    client = client_for(os_settings)
    outcomes = {}
    for gc in ("0s", "1d"):
        s = os_settings.replace(
            **{
                "opensearch.gc_deletes": gc,
                "opensearch.index": f"{os_settings.opensearch.index}-{gc}",
            }
        )
        ensure_index(s, client)
        writer = BulkWriter(client, s.opensearch.index)
        doc: dict[str, Any] = {
            "customer_entity_id": "m",
            "identifiers": [],
            "attributes": {},
            "calculated": None,
        }
        assert writer.write([Action("m", 5, doc)])[0].outcome is Outcome.DELIVERED
        assert writer.write([Action("m", 6, None)])[0].outcome is Outcome.DELIVERED
        time.sleep(0.5)
        client.indices.refresh(index=s.opensearch.index)  # prunes expired tombstones
        time.sleep(0.5)
        client.indices.refresh(index=s.opensearch.index)
        outcomes[gc] = writer.write([Action("m", 5, doc)])[0].outcome
    assert outcomes == {"0s": Outcome.DELIVERED, "1d": Outcome.STALE}


def test_only_one_relay_delivers_at_a_time(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event("a", 1, email="x@a")])
    stitch_all(Stitcher(settings), db)
    first, second = Relay(os_settings), Relay(os_settings)
    with psycopg.connect(settings.dsn, autocommit=True) as other:
        calculate(db)
        assert first.run_once(other) == 1  # first holds the lock while its session lives
        set_attributes(db, entity_id_for("a"), '{"n": 2}')
        assert second.run_once(db) == 0  # returns at once, delivers nothing
        assert outbox_state(db)[0] == 1
    # first's session ended: the server frees its lock as the backend exits (soon after).
    deadline = time.monotonic() + 10
    while not (done := second.run_once(db)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done == 1
    assert index_docs(os_settings)[entity_id_for("a")][1]["attributes"] == {"n": 2}


def test_relay_backs_off_while_opensearch_is_unreachable_and_stops_promptly(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event("a", 1, email="x@a")])
    stitch_all(Stitcher(settings), db)
    calculate(db)
    relay = Relay(os_settings)
    relay.ensure_index(db)  # then the cluster "goes away": a port nobody listens on
    assert isinstance(relay.writer, BulkWriter)
    relay.writer.client = OpenSearch(hosts=[f"http://127.0.0.1:{embedded.free_port()}"], timeout=2)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run_forever, args=(stop,), daemon=True)
    thread.start()
    time.sleep(3)
    stop.set()
    started = time.monotonic()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 3, "the relay did not stop promptly"
    row = db.execute(
        "SELECT delivered, parked, attempts, last_error FROM cdp_attr.outbox"
    ).fetchone()
    assert row is not None
    delivered, parked, attempts, error = row
    assert (delivered, parked) == (None, False)
    assert attempts >= 2 and error.startswith("bulk request failed: ConnectionError")


def test_relay_reconnects_when_its_database_session_is_killed(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event("a", 1, email="x@a")])
    stitch_all(Stitcher(settings), db)
    calculate(db)
    stop = threading.Event()
    thread = threading.Thread(target=Relay(os_settings).run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: outbox_state(db)[0] == 0, 30, "first delivery")
        killed = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'stream-cps relay' AND datname = current_database()"
        ).fetchall()
        assert killed == [(True,)]
        set_attributes(db, entity_id_for("a"), '{"after": "reconnect"}')
        wait_until(lambda: outbox_state(db)[0] == 0, 30, "delivery after reconnect")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    docs = index_docs(os_settings)
    assert docs[entity_id_for("a")][1]["attributes"] == {"after": "reconnect"}


def test_prepare_index_types_attributes_from_their_data_type(
    db: psycopg.Connection[Any], os_settings: config.Settings
) -> None:
    db.execute(
        "INSERT INTO attributes (id, name, data_type, definition) VALUES "
        "('orders', 'Orders', 'int', '{\"type\": \"num_of_unique\"}'), "
        "('avg_basket', 'Avg', 'int', '{\"type\": \"avg\"}'), "
        "('last_seen', 'Seen', 'datetime', '{\"type\": \"last\"}'), "
        "('email', 'Email', 'string', NULL)"  # not calculated: a stitching attribute
    )
    prepare_index(os_settings, db)
    index = os_settings.opensearch.index
    mapping = client_for(os_settings).indices.get_mapping(index=index)[index]["mappings"]
    attrs = mapping["properties"]["attributes"]["properties"]
    assert {k: v["type"] for k, v in attrs.items()} == {
        "orders": "long",
        "avg_basket": "double",
        "last_seen": "date",
    }


RELAY_PROCESS = """
import signal, threading
from stream_cps import config
from stream_cps.service import process
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
process.relay(config.load(), stop)
"""


@pytest.mark.slow
def test_relay_process_killed_at_random_points_converges(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event(f"e{n}", n, email=f"u{n}@x") for n in range(600)])
    stitch_all(Stitcher(settings), db)
    calculate(db)
    env = {
        **os.environ,
        "STREAM_CPS_DSN": settings.dsn,
        "STREAM_CPS_OPENSEARCH_URL": str(os_settings.opensearch.url),
        "STREAM_CPS_OPENSEARCH_INDEX": os_settings.opensearch.index,
        "STREAM_CPS_OPENSEARCH_REPLICAS": "0",
        "STREAM_CPS_OPENSEARCH_BATCH_SIZE": "40",
        "STREAM_CPS_OPENSEARCH_POLL_INTERVAL": "0.05",
    }
    rng = random.Random(11)
    ids = [r[0] for r in db.execute("SELECT customer_entity_id FROM customer_attributes")]
    kills = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", RELAY_PROCESS], env=env)
        try:
            deadline = time.monotonic() + rng.uniform(1.5, 3.0)
            while time.monotonic() < deadline:  # changes keep coming while it runs
                entity = rng.choice(ids)
                if rng.random() < 0.2:
                    with db.transaction():
                        gone = db.execute(
                            "DELETE FROM customer_attributes WHERE customer_entity_id = %s "
                            "RETURNING customer_entity_id",
                            [entity],
                        ).fetchone()
                        if gone:
                            db.execute(
                                "INSERT INTO cdp_attr.outbox (entity_id, op, version) VALUES "
                                "(%s, 'delete', nextval('cdp_ps.entity_version_seq'))",
                                [entity],
                            )
                    ids.remove(entity)
                else:
                    set_attributes(db, entity, json.dumps({"n": rng.randrange(1000)}))
                time.sleep(0.005)
        finally:
            proc.kill()  # SIGKILL: no clean-up, wherever it was
            proc.wait(10)
            kills += 1
    assert outbox_state(db)[2] > 0, "the killed relays delivered nothing"
    proc = subprocess.Popen([sys.executable, "-c", RELAY_PROCESS], env=env)
    try:
        wait_until(lambda: outbox_state(db)[0] == 0, 60, "the outbox to drain")
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    assert kills == 5
    assert outbox_state(db)[1] == 0
    assert index_docs(os_settings) == live_entities(db)


def test_without_opensearch_no_commands_are_written_and_reindex_fills_an_index_later(
    db: psycopg.Connection[Any], settings: config.Settings, os_settings: config.Settings
) -> None:
    """Before: with no opensearch.url the outbox grew without bound (nobody delivers it)."""
    from stream_cps.attributes.worker import CalculationWorker

    plain = settings.replace(**{"opensearch.outbox": "auto"})  # and no opensearch.url
    assert not plain.opensearch.writes_outbox
    setup_rules(db)
    db.execute(
        "INSERT INTO public.attributes (id, name, data_type, definition) VALUES "
        "('n', 'n', 'int', '{\"type\": \"num_of_unique\", \"value\": \"payload->>''email''\"}')"
    )
    stitcher = Stitcher(plain)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1"), event("p", 1, email="p@")])
    stitch_all(stitcher, db)
    insert(db, [event("c", 20, email="x@a", cookie="c1")])  # a merge: a delete command before
    stitch_all(stitcher, db)
    assert CalculationWorker(plain).run_pass(db) == 2
    assert outbox_state(db) == (0, 0, 0)
    # OpenSearch configured later: one command fills the index with every entity
    done = subprocess.run(
        [sys.executable, "-m", "stream_cps", "reindex"],
        env={**os.environ, "STREAM_CPS_DSN": settings.dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "queued 2 entities" in done.stdout
    relay = Relay(os_settings)
    assert drain(relay, db) == 2
    docs = index_docs(os_settings)
    assert docs == live_entities(db)
    assert set(docs) == {entity_id_for("b"), entity_id_for("p")}


def test_a_relay_backlog_reports_progress_with_pending_and_an_eta(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reindex (or a backlog after OpenSearch was away) says how far it is; idle says nothing."""
    from stream_cps.sinks import relay as relay_module
    from stream_cps.sinks.outbox import OutboxStore

    monkeypatch.setattr(relay_module, "PROGRESS_EVERY", 0.0)
    setup_rules(db)
    insert(db, [event(f"r{n:02d}", n, email=f"p{n}@x") for n in range(30)])
    stitch_all(Stitcher(settings), db)
    calculate(db)
    db.execute("UPDATE cdp_attr.outbox SET delivered = now()")
    assert OutboxStore(settings.schemas).queue_all(db) == 30
    relay = Relay(settings.replace(**{"opensearch.batch_size": 10}), sink=MemorySink())
    stop = threading.Event()
    thread = threading.Thread(target=relay.run_forever, args=(stop,), daemon=True)
    with caplog.at_level(logging.INFO, logger="stream_cps.sinks.relay"):
        thread.start()
        wait_until(lambda: outbox_state(db)[0] == 0, 30, "the backlog delivered")
        stop.set()
        thread.join(timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay: ")]
    assert lines and lines[0].startswith("relay: 10 commands finished")
    assert "20 pending (about " in lines[0]
    assert lines[-1].startswith("relay: 30 commands finished") and "0 pending" in lines[-1]


def test_claimed_commands_carry_how_long_they_waited(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """What the ``stream_cps.outbox.latency`` histogram records per relay batch."""
    from stream_cps.sinks.outbox import OutboxStore

    db.execute(
        "INSERT INTO cdp_attr.outbox (entity_id, op, version, created) VALUES "
        "('x', 'delete', 1, now() - interval '90 seconds'), ('y', 'delete', 2, now())"
    )
    with db.transaction():
        claimed = OutboxStore(settings.schemas).claim(db, 10)
    waits = {c.entity_id: c.waited for c in claimed}
    assert waits["x"] is not None and 90 <= waits["x"] < 120
    assert waits["y"] is not None and 0 <= waits["y"] < 30
