"""``stream-cps erase`` on real PostgreSQL, Kafka and OpenSearch: the person stays gone.

Each path that could bring an erased event back is tried: a row re-inserted under the
replication path (the stitcher deletes it), a Kafka replay from the beginning with a live
member (the ingest drops it), and a plain re-send of an erased identifier with ``--suppress``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import psycopg

from stream_cps import config
from stream_cps.cli import main
from stream_cps.service import process
from stream_cps.sinks.relay import Relay, prepare_index
from stream_cps.sources.kafka.replay import run_replay
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from tests.integration.test_kafka_source import (
    all_stitched,
    count,
    events_of,
    kafka_env,
    member,
    produce,
    sample,
)
from tests.integration.test_outbox_relay import drain, index_docs, os_settings, set_attributes
from tests.support import event, expected, insert, observed, setup_rules, snapshot, wait_until

__all__ = ["kafka_env", "os_settings"]  # fixtures used here

ALICE = "alice.erased@example.org"
PRIVATE_TABLES = ("erasures", "erased_events", "erased_identifiers")

# Alice: three events that first found two entities, then merge (an alias); Bob: two events.
ROWS = [
    event("ev-alice-mail", 2, email=ALICE),
    event("ev-alice-cookie", 1, cookie="cookie-alice"),
    event("ev-alice-both", 3, email=ALICE, cookie="cookie-alice"),
    event("ev-bob-1", 4, email="bob@example.org", cookie="cookie-bob"),
    event("ev-bob-2", 5, kind="buy", email="bob@example.org", phone="555-0100"),
]
ALICE_EVENTS = ["ev-alice-cookie", "ev-alice-mail", "ev-alice-both"]


def stitch_one_by_one(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for row in ROWS:
        insert(conn, [row])
        stitcher.stitch(conn, [row[0]])


def rest_of(snap: tuple[Any, ...], entity: str) -> tuple[Any, ...]:
    """A snapshot without Alice's events and entity."""
    events, entities = snap
    return (
        [e for e in events if not e[0].startswith("ev-alice")],
        [e for e in entities if e[0] != entity],
    )


def assert_no_personal_data(conn: psycopg.Connection[Any], secrets: list[str]) -> None:
    for table in PRIVATE_TABLES:
        for (text,) in conn.execute(f"SELECT t::text FROM cdp_ps.{table} t"):
            for secret in secrets:
                assert secret not in text, f"{secret!r} stored in {table}: {text}"


def test_erase_deletes_everything_and_a_reinserted_row_is_dropped(
    settings: config.Settings, db: psycopg.Connection[Any], capsys: Any
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    stitch_one_by_one(stitcher, db)
    alice = entity_id_for("ev-alice-cookie")
    old_alice = entity_id_for("ev-alice-mail")  # absorbed by the merge: an alias
    assert count(db, "SELECT count(*) FROM cdp_ps.entity_aliases WHERE new_id = %s", alice) == 1
    db.execute(
        "UPDATE customer_attributes SET attributes = jsonb_build_object('email', identifiers)"
    )
    db.execute(
        "INSERT INTO cdp_attr.cached_attribute_values_counts "
        "(attribute_id, value, count, modified) VALUES ('email', %s, 1, now())",
        [ALICE],
    )
    before = snapshot(db)
    dsn = ["--dsn", settings.dsn]

    # Without --yes: what would go, nothing gone, exit 1.
    assert main(["erase", "--entity", old_alice, *dsn]) == 1
    out = capsys.readouterr()
    assert f"entity {alice}: would erase 3 events, 1 entities, 2 identifiers, 1 aliases" in out.out
    assert "nothing erased" in out.err
    assert snapshot(db) == before

    assert (
        main(["erase", "--identifier", f"email:{ALICE}", "--reason", "ticket 42", "--yes", *dsn])
        == 0
    )
    assert "erased 3 events" in capsys.readouterr().out
    for query in (
        "SELECT count(*) FROM cdp_ce.customer_events WHERE id LIKE 'ev-alice%%'",
        "SELECT count(*) FROM customer_attributes WHERE customer_entity_id = %s",
        "SELECT count(*) FROM cdp_ps.identifier_entities WHERE entity_id = %s",
        "SELECT count(*) FROM cdp_ps.entity_aliases WHERE old_id = %s OR new_id = %s",
        "SELECT count(*) FROM cdp_ps.identifier_pairs "
        "WHERE a LIKE '%%alice%%' OR b LIKE '%%alice%%'",
        "SELECT count(*) FROM cdp_ps.identifier_cooccurrence WHERE identifier LIKE '%%alice%%'",
        "SELECT count(*) FROM cdp_attr.cached_attribute_values_counts WHERE value LIKE '%%alice%%'",
    ):
        assert count(db, query, *[alice] * query.count("%s")) == 0, query
    # (no OpenSearch configured: no outbox row; the OpenSearch test below has one)
    audit = db.execute("SELECT reason, suppressed, counts FROM cdp_ps.erasures").fetchall()
    assert len(audit) == 1 and audit[0][0] == "ticket 42" and not audit[0][1]
    assert audit[0][2]["events"] == 3 and audit[0][2]["aliases"] == 1
    assert count(db, "SELECT count(*) FROM cdp_ps.erased_events") == 3
    assert_no_personal_data(db, [ALICE, "cookie-alice", alice, *ALICE_EVENTS])
    assert rest_of(snapshot(db), alice) == rest_of(before, alice)
    assert observed(db) == expected(db)

    # The replication path: the row comes back (a restore, a re-run import); it is deleted.
    insert(db, [ROWS[0]])
    result = stitcher.stitch(db, ["ev-alice-mail"])
    assert result.erased == 1 and result.events == 0
    assert count(db, "SELECT count(*) FROM cdp_ce.customer_events WHERE id LIKE 'ev-alice%%'") == 0
    # ... and so does the sweep, for a row the slot never carried.
    insert(db, [ROWS[2]])
    assert sum(r.erased for r in stitcher.sweep(db)) == 1
    assert count(db, "SELECT count(*) FROM customer_attributes") == 1
    assert rest_of(snapshot(db), alice) == rest_of(before, alice)
    assert observed(db) == expected(db)

    # Without --suppress, a new event with the e-mail is new data: it stitches.
    insert(db, [event("ev-alice-new", 9, email=ALICE)])
    assert stitcher.stitch(db, ["ev-alice-new"]).events == 1
    assert (
        count(
            db,
            "SELECT count(*) FROM cdp_ps.identifier_entities WHERE identifier = %s",
            f"email:{ALICE}",
        )
        == 1
    )


def test_suppress_keeps_an_erased_identifier_from_linking_again(
    settings: config.Settings, db: psycopg.Connection[Any]
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    stitch_one_by_one(stitcher, db)
    before = snapshot(db)
    alice = entity_id_for("ev-alice-cookie")
    done = process.erase(settings, alice, None, None, suppress=True, yes=True)
    assert done.counts["suppressed_identifiers"] == 2
    assert_no_personal_data(db, [ALICE, "cookie-alice", alice, *ALICE_EVENTS])

    # Re-sent: alone (no entity), and with Bob's cookie (Bob's entity, without the e-mail).
    insert(
        db,
        [
            event("ev-alice-again", 10, email=ALICE),
            event("ev-alice-bob", 11, email=ALICE, cookie="cookie-bob"),
        ],
    )
    stitcher.stitch(db, ["ev-alice-again", "ev-alice-bob"])
    stored = dict(
        db.execute(
            "SELECT id, identifiers FROM cdp_ce.customer_events WHERE id LIKE 'ev-alice%%'"
        ).fetchall()
    )
    assert stored == {"ev-alice-again": [], "ev-alice-bob": ["cookie:cookie-bob"]}
    for table, column in (
        ("cdp_ps.identifier_entities", "identifier"),
        ("cdp_ps.identifier_pairs", "a"),
        ("cdp_ps.identifier_pairs", "b"),
        ("cdp_ps.identifier_cooccurrence", "identifier"),
        ("cdp_ps.quarantined_events", "identifier"),
    ):
        assert count(db, f"SELECT count(*) FROM {table} WHERE {column} LIKE '%%alice%%'") == 0
    bob = entity_id_for("ev-bob-1")
    assert count(db, "SELECT count(*) FROM customer_attributes") == 1
    assert (
        rest_of(snapshot(db), alice)[1]
        == [(bob, ["cookie:cookie-bob", "email:bob@example.org", "phone:555-0100"], "ev-bob-1")]
        == rest_of(before, alice)[1]
    )
    assert observed(db) == expected(db)


def test_an_erased_customer_stays_gone_after_a_kafka_replay_from_the_beginning(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    rows = sample(300, seed=21)
    produce(settings.kafka.bootstrap_servers, topic, events_of(rows))
    with member(settings) as service:
        wait_until(lambda: all_stitched(db, len(rows)), 30, "all events stitched")
        row = db.execute(
            "SELECT ca.customer_entity_id, ca.identifiers, "
            "ARRAY(SELECT e.id FROM cdp_ce.customer_events e "
            "WHERE e.identifiers && ca.identifiers) "
            "FROM customer_attributes ca ORDER BY cardinality(ca.identifiers) DESC, 1 LIMIT 1"
        ).fetchone()
        assert row is not None
        entity, identifiers, erased_ids = row
        assert len(erased_ids) >= 2
        before = snapshot(db)
        done = process.erase(settings, entity, None, "replay test", suppress=False, yes=True)
        assert done.counts["events"] == len(erased_ids)

        out = io.StringIO()
        assert (
            run_replay(
                settings, topic=None, beginning=True, offsets=None, since=None, yes=True, out=out
            )
            == 0
        ), out.getvalue()
        wait_until(
            lambda: service.progress.messages >= 2 * len(rows), 60, f"replayed {service.progress}"
        )
    assert service.progress.erased == len(erased_ids)
    assert (
        count(db, "SELECT count(*) FROM cdp_ce.customer_events WHERE id = ANY(%s)", erased_ids) == 0
    )
    assert (
        count(db, "SELECT count(*) FROM customer_attributes WHERE customer_entity_id = %s", entity)
        == 0
    )
    assert (
        count(
            db,
            "SELECT count(*) FROM cdp_ps.identifier_entities WHERE identifier = ANY(%s)",
            identifiers,
        )
        == 0
    )
    kept = [r for r in before[0] if r[0] not in set(erased_ids)]
    assert snapshot(db) == (kept, [e for e in before[1] if e[0] != entity])
    assert observed(db) == expected(db)
    assert_no_personal_data(db, [*identifiers, *erased_ids])


def test_the_opensearch_document_of_an_erased_customer_is_deleted(
    os_settings: config.Settings, db: psycopg.Connection[Any]
) -> None:
    setup_rules(db)
    stitcher = Stitcher(os_settings)
    stitch_one_by_one(stitcher, db)
    relay = Relay(os_settings)
    prepare_index(os_settings, db)
    alice, bob = entity_id_for("ev-alice-cookie"), entity_id_for("ev-bob-1")
    set_attributes(db, alice, json.dumps({"email": ALICE}))
    set_attributes(db, bob, '{"email": "bob@example.org"}')
    drain(relay, db)
    assert set(index_docs(os_settings)) == {alice, bob}

    process.erase(os_settings, None, f"email:{ALICE}", None, suppress=False, yes=True)
    drain(relay, db)
    docs = index_docs(os_settings)
    assert set(docs) == {bob}
    assert ALICE not in str(docs)
