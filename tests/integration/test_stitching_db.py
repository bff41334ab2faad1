"""The stitcher against a real PostgreSQL: grouping, merges, purge signals, rules, blocklist."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest

from stream_cps import config
from stream_cps.db import schema
from stream_cps.db.arrays import TextArray
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev import embedded
from stream_cps_dev.sample import generator
from tests.support import (
    count_row_updates,
    event,
    expected,
    insert,
    observed,
    plan_scans,
    setup_rules,
    snapshot,
)


def stitch_all(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for _ in stitcher.sweep(conn):
        pass


def test_merge_marks_survivor_records_alias_and_outbox_delete(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1")])
    stitch_all(stitcher, db)
    assert db.execute("SELECT count(*) FROM customer_attributes").fetchone() == (2,)
    insert(db, [event("c", 20, email="x@a", cookie="c1")])
    result = stitcher.stitch(db, ["c"])
    assert (result.events, result.merges) == (1, 1)
    survivor, absorbed = entity_id_for("b"), entity_id_for("a")
    rows = db.execute(
        "SELECT customer_entity_id, identifiers, modified IS NOT NULL, calculated "
        "FROM customer_attributes"
    ).fetchall()
    assert rows == [(survivor, ["cookie:c1", "email:x@a"], True, None)]
    assert db.execute("SELECT old_id, new_id, reason FROM cdp_ps.entity_aliases").fetchall() == [
        (absorbed, survivor, "merge")
    ]
    assert db.execute("SELECT entity_id, op FROM cdp_attr.outbox").fetchall() == [
        (absorbed, "delete")
    ]
    assert observed(db) == expected(db)


def test_earlier_event_rekeys_entity_and_aliases_chain(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("late", 100, email="x@a")])
    stitch_all(stitcher, db)
    insert(db, [event("mid", 50, email="x@a")])
    stitch_all(stitcher, db)
    insert(db, [event("early", 1, email="x@a")])
    stitch_all(stitcher, db)
    live = entity_id_for("early")
    assert db.execute("SELECT customer_entity_id FROM customer_attributes").fetchall() == [(live,)]
    aliases = dict(db.execute("SELECT old_id, new_id FROM cdp_ps.entity_aliases").fetchall())
    # every old id resolves to the live one in one hop
    assert aliases == {entity_id_for("late"): live, entity_id_for("mid"): live}
    reasons = {r[0] for r in db.execute("SELECT reason FROM cdp_ps.entity_aliases")}
    assert reasons == {"rekey"}


def test_two_databases_fed_in_different_orders_end_identical(pg_server: Any) -> None:
    rows = list(generator.events(seed=11, persons=60, per_person=5))
    snapshots = []
    for n, seed in enumerate([1, 2]):
        name = f"order_{n}_{random.randrange(1 << 30)}"
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
        settings = config.load(flags={"dsn": dsn, "stitching.batch_size": 7 + 30 * n}, environ={})
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            conn.execute(generator.config_sql(settings.schemas))
            shuffled = rows[:]
            random.Random(seed).shuffle(shuffled)
            stitcher = Stitcher(settings)
            for start in range(0, len(shuffled), 50):
                insert(conn, shuffled[start : start + 50])
                stitch_all(stitcher, conn)
            assert observed(conn) == expected(conn)
            snapshots.append(snapshot(conn))
    assert snapshots[0] == snapshots[1]


def test_purge_signal_deletes_entity_frees_identifiers_and_queues_delete(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="y@a")])
    stitch_all(stitcher, db)
    gone = entity_id_for("a")
    db.execute(
        "UPDATE customer_attributes SET modified = NULL WHERE customer_entity_id = %s", [gone]
    )
    result = stitcher.stitch(db, [])
    assert result.purged == [gone]
    assert db.execute("SELECT customer_entity_id FROM customer_attributes").fetchall() == [
        (entity_id_for("b"),)
    ]
    assert db.execute(
        "SELECT count(*) FROM cdp_ps.identifier_entities WHERE entity_id = %s", [gone]
    ).fetchone() == (0,)
    assert db.execute("SELECT op FROM cdp_attr.outbox WHERE entity_id = %s", [gone]).fetchall() == [
        ("delete",)
    ]


def test_purge_takes_a_bounded_share_per_batch_round_the_entity_ids(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """A restitch of everything signals every entity at once: each batch purges at most
    ``stitching.batch_size`` of them (one transaction per share), going on in id order from
    where the last share stopped (a signal given meanwhile below it waits for the round to
    end), and all are gone in the end, each once."""
    setup_rules(db)
    stitcher = Stitcher(settings.replace(**{"stitching.batch_size": 3}))
    insert(db, [event(f"e{n}", n, email=f"p{n}@a") for n in range(10)])
    stitch_all(stitcher, db)
    entities = sorted(entity_id_for(f"e{n}") for n in range(10))
    signal = "UPDATE customer_attributes SET modified = NULL WHERE customer_entity_id = ANY(%s)"
    db.execute(signal, [entities[3:]])
    shares = [sorted(stitcher.stitch(db, []).purged)]
    db.execute(signal, [entities[:3]])
    shares += [sorted(stitcher.stitch(db, []).purged) for _ in range(4)]
    assert shares == [entities[3:6], entities[6:9], entities[9:], entities[:3], []]
    assert db.execute("SELECT count(*) FROM customer_attributes").fetchone() == (0,)
    assert db.execute(
        "SELECT count(*), count(DISTINCT entity_id) FROM cdp_attr.outbox WHERE op = 'delete'"
    ).fetchone() == (10, 10)
    # The purges reset the entities' events; restitched, they found the same entities.
    stitch_all(stitcher, db)
    assert observed(db) == expected(db)
    assert sorted({e for e in observed(db).values() if e}) == entities


def test_a_batch_gives_way_on_event_rows_another_transaction_holds(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    """The guide's ``UPDATE customer_events`` holds every row it passed until it commits
    (minutes at 10M). A batch that needs one of them (here its purge, resetting the events of
    the entities the script's first statement signalled) stops waiting after 50 ms and is
    retried: it never waits long enough for PostgreSQL to break a deadlock with the script by
    aborting the script, which it did in the bench's 10M restitch of everything."""
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="y@a")])
    stitch_all(stitcher, db)
    db.execute("UPDATE customer_attributes SET modified = NULL")
    with (
        psycopg.connect(pg_dsn) as script,
        psycopg.connect(pg_dsn, autocommit=True) as stitching,
    ):
        script.execute(  # the script's UPDATE, as far as row "a"
            "UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL WHERE id = 'a'"
        )
        worker = threading.Thread(target=stitch_all, args=(stitcher, stitching))
        worker.start()
        longest, since = 0.0, None  # the batch's longest wait on a lock, seconds
        deadline = time.monotonic() + 2.0
        while (now := time.monotonic()) < deadline:
            row = db.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                [stitching.info.backend_pid],
            ).fetchone()
            since = (since or now) if row and row[0] else None
            longest = max(longest, now - since if since else 0.0)
            time.sleep(0.01)
        script.execute("UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL")
        script.commit()
        worker.join(30)
    assert not worker.is_alive()
    assert longest < 0.5, f"the batch waited {longest:.2f} s on the script's row lock"
    stitch_all(stitcher, db)
    assert observed(db) == expected(db)
    assert sorted(str(e) for e in observed(db).values()) == sorted(
        [entity_id_for("a"), entity_id_for("b")]
    )


def test_batch_purges_the_signalled_entities_it_touches_beyond_its_share(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """An event of an entity waiting to be purged never joins it: the batch that touches it
    purges it, whatever its share of the other signals, and the event founds the entity
    again (the restitch-one script's order, but with nine other entities signalled)."""
    setup_rules(db)
    stitcher = Stitcher(settings.replace(**{"stitching.batch_size": 2}))
    insert(db, [event(f"e{n}", n, email=f"p{n}@a") for n in range(10)])
    stitch_all(stitcher, db)
    db.execute("UPDATE customer_attributes SET modified = NULL")
    touched = max((entity_id_for(f"e{n}"), n) for n in range(10))[1]  # not in the first share
    insert(db, [event("new", 50, email=f"p{touched}@a")])
    result = stitcher.stitch(db, ["new"])
    assert entity_id_for(f"e{touched}") in result.purged and len(result.purged) == 3
    stitch_all(stitcher, db)
    pending = db.execute("SELECT count(*) FROM customer_attributes WHERE modified IS NULL")
    assert pending.fetchone() == (0,)
    # e{touched} was reset by its entity's purge and restitched with "new": both in one entity
    assert observed(db) == expected(db)
    assert observed(db)["new"] == observed(db)[f"e{touched}"] == entity_id_for(f"e{touched}")


def test_restitch_all_after_config_change_without_waiting(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a", cookie="c"), event("b", 2, email="y@a", cookie="c")])
    stitch_all(stitcher, db)
    assert len(set(observed(db).values())) == 1  # glued together by the shared cookie
    db.execute("DELETE FROM cdp_ps.stitching_attributes_config WHERE attribute_id = 'cookie'")
    psql = embedded.bin_dir() / "psql"
    subprocess.run(
        [
            str(psql),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            pg_dsn,
            "-c",
            "UPDATE customer_attributes SET modified = NULL;",
            "-c",
            "UPDATE customer_events SET stitched = NULL, identifiers = NULL;",
        ],
        check=True,
        capture_output=True,
    )
    stitch_all(stitcher, db)
    assert observed(db) == expected(db) == {"a": entity_id_for("a"), "b": entity_id_for("b")}


def test_restitch_one_customer_script(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="x@a"), event("c", 3, email="z@a")])
    stitch_all(stitcher, db)
    target = entity_id_for("a")
    db.execute(
        "WITH entities AS (UPDATE customer_attributes SET modified = NULL "
        "WHERE customer_entity_id = %s RETURNING identifiers) "
        "UPDATE customer_events SET stitched = NULL, identifiers = NULL "
        "FROM entities WHERE customer_events.identifiers <@ entities.identifiers",
        [target],
    )
    reset = db.execute("SELECT id FROM customer_events WHERE stitched IS NULL ORDER BY id")
    assert [r[0] for r in reset] == ["a", "b"]
    stitch_all(stitcher, db)
    assert observed(db) == expected(db)
    assert db.execute(
        "SELECT op FROM cdp_attr.outbox WHERE entity_id = %s", [target]
    ).fetchall() == [("delete",)]


def test_blocklist_table_global_and_per_attribute(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    db.execute(
        "INSERT INTO cdp_ps.identifier_blocklist (attribute_id, value) VALUES "
        "(NULL, 'guest'), ('email', 'test@test.com')"
    )
    stitcher = Stitcher(settings)
    insert(
        db,
        [
            event("a", 1, email="GUEST", cookie="test@test.com"),
            event("b", 2, email="test@test.com", cookie="None"),
            event("c", 3, email=" 42.0 ", cookie="0000"),
        ],
    )
    stitch_all(stitcher, db)
    identifiers = dict(db.execute("SELECT id, identifiers FROM customer_events").fetchall())
    assert identifiers == {"a": ["cookie:test@test.com"], "b": [], "c": ["email:42"]}


def test_failing_rule_is_reported_by_attribute_and_event_and_rest_works(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(
        db,
        [
            ("email", "pv", "payload->>'email'"),
            ("num", "pv", "((payload->>'n')::int * 2)::text"),
        ],
    )
    stitcher = Stitcher(settings)
    insert(db, [event("ok", 1, email="x@a", n="21"), event("bad", 2, email="y@a", n="abc")])
    stitch_all(stitcher, db)
    identifiers = dict(db.execute("SELECT id, identifiers FROM customer_events").fetchall())
    assert identifiers == {"ok": ["email:x@a", "num:42"], "bad": ["email:y@a"]}
    errors = db.execute(
        "SELECT attribute_id, event_id, message FROM cdp_ps.stitching_errors"
    ).fetchall()
    assert [(a, e) for a, e, _ in errors] == [("num", "bad")]
    assert "invalid input syntax for type integer" in errors[0][2]


def test_broken_rule_is_named_at_load_and_skipped(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db, [("email", "pv", "payload->>'email'"), ("cookie", "pv", "payload->>>'x' +")])
    stitcher = Stitcher(settings)
    insert(db, [event("a", 1, email="x@a", x="1")])
    stitch_all(stitcher, db)
    broken = stitcher.rulebook.current.broken
    assert [b.name for b in broken] == ["stitching rule cookie/pv"]
    assert db.execute("SELECT identifiers FROM customer_events").fetchall() == [(["email:x@a"],)]


def test_event_without_identifiers_is_stitched_to_no_entity(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    insert(db, [event("anon", 1, email="undefined")])
    stitch_all(Stitcher(settings), db)
    row = db.execute("SELECT stitched IS NOT NULL, identifiers FROM customer_events").fetchone()
    assert row == (True, [])
    assert db.execute("SELECT count(*) FROM customer_attributes").fetchone() == (0,)


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_batch_boundaries_do_not_change_the_result(
    db: psycopg.Connection[Any], settings: config.Settings, batch_size: int
) -> None:
    db.execute(generator.config_sql(settings.schemas))
    insert(db, list(generator.events(seed=5, persons=15, per_person=3)))
    stitcher = Stitcher(settings.replace(**{"stitching.batch_size": batch_size}))
    stitch_all(stitcher, db)
    assert observed(db) == expected(db)


def test_rule_failing_on_some_events_of_a_large_batch_isolates_exactly_those(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db, [("num", "pv", "((payload->>'n')::int)::text")])
    bad = {"e07", "e20", "e33"}
    rows = [event(f"e{k:02d}", k, n="x" if f"e{k:02d}" in bad else str(k + 1)) for k in range(40)]
    insert(db, rows)
    stitch_all(Stitcher(settings), db)
    failed = {r[0] for r in db.execute("SELECT event_id FROM cdp_ps.stitching_errors")}
    assert failed == bad
    identifiers = dict(db.execute("SELECT id, identifiers FROM customer_events").fetchall())
    for k in range(40):
        eid = f"e{k:02d}"
        assert identifiers[eid] == ([] if eid in bad else [f"num:{k + 1}"])


def test_read_ahead_sweep_pass_equals_the_oracle_and_the_plain_sweep(pg_server: Any) -> None:
    """The service's sweep (next batch read on a second connection while the current one is
    written) ends where the one-connection sweep ends, across many small batches."""
    import threading

    rows = list(generator.events(seed=13, persons=40, per_person=6))
    snapshots = []
    for mode in ("plain", "read-ahead"):
        name = f"sweep_{mode.replace('-', '_')}_{random.randrange(1 << 30)}"
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
        local = config.load(flags={"dsn": dsn, "stitching.batch_size": 9}, environ={})
        with (
            psycopg.connect(dsn, autocommit=True) as conn,
            psycopg.connect(dsn, autocommit=True) as reader,
        ):
            schema.migrate(conn, local.schemas)
            conn.execute(generator.config_sql(local.schemas))
            stitcher = Stitcher(local)
            for start in range(0, len(rows), 120):  # more arrives between passes
                insert(conn, rows[start : start + 120])
                if mode == "plain":
                    stitch_all(stitcher, conn)
                    continue
                results = list(stitcher.sweep(conn, reader, threading.Event()))
                assert len(results) > 1  # several batches, read ahead
                assert sum(r.events for r in results) == len(rows[start : start + 120])
            assert observed(conn) == expected(conn)
            assert conn.execute(
                "SELECT count(*) FROM customer_events WHERE stitched IS NULL"
            ).fetchone() == (0,)
            snapshots.append(snapshot(conn))
    assert snapshots[0] == snapshots[1]


def test_rule_failing_on_every_event_is_disabled_once_until_its_row_changes(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Before: one error row and one ERROR line per event, for ever."""
    setup_rules(
        db, [("email", "pv", "payload->>'email'"), ("num", "pv", "(payload->>'n')::int::text")]
    )
    stitcher = Stitcher(
        settings.replace(**{"stitching.rule_max_failures": 5, "stitching.batch_size": 4})
    )
    insert(db, [event(f"a{k:02d}", k, email=f"p{k}@a", n="bad") for k in range(30)])
    stitch_all(stitcher, db)
    errors = db.execute(
        "SELECT attribute_id, event_id, message FROM cdp_ps.stitching_errors ORDER BY id"
    ).fetchall()
    per_event = [e for e in errors if e[1] is not None]
    notices = [e for e in errors if e[1] is None]
    assert 5 <= len(per_event) <= 8  # the batch that reached the limit is finished
    assert [(a, m.split(" disabled")[0]) for a, _, m in notices] == [
        ("num", "stitching rule num/pv")
    ]
    assert db.execute("SELECT count(*) FROM customer_events WHERE stitched IS NULL").fetchone() == (
        0,
    )
    assert db.execute(
        "SELECT count(*) FROM customer_events WHERE identifiers = ARRAY['email:p29@a']"
    ).fetchone() == (1,)
    # a fixed row is a new rule: enabled again, counted from zero
    db.execute(
        "UPDATE cdp_ps.stitching_attributes_config SET value_expression = "
        "'nullif(payload->>''n'', ''bad'')' WHERE attribute_id = 'num'"
    )
    insert(db, [event("b01", 100, email="q@a", n="7")])
    stitch_all(stitcher, db)
    assert db.execute("SELECT identifiers FROM customer_events WHERE id = 'b01'").fetchone() == (
        ["email:q@a", "num:7"],
    )


def test_waiting_events_are_counted_up_to_a_cap(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """What the progress line of a long job asks, against the real partial index."""
    setup_rules(db)
    insert(db, [event(f"w{k:02d}", k, email=f"p{k}@a") for k in range(12)])
    store = Stitcher(settings).store
    assert store.waiting(db, 100) == 12
    assert store.waiting(db, 5) == 5
    stitch_all(Stitcher(settings), db)
    assert store.waiting(db, 100) == 0


def test_rekey_and_merge_cost_the_smaller_side_not_the_large_entity(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Issue 15: an earlier event next to a large entity renames one cluster row instead of
    re-pointing its thousands of identifiers, and a merge moves only the smaller entity's
    identifiers; ids, aliases and the partition stay as the rule says."""
    setup_rules(db)
    stitcher = Stitcher(settings)
    steps = 1500  # a chain e_k - c_k - e_k' - c_{k+1}: 3,001 identifiers, none a hub
    rows = []
    for k in range(steps):
        rows.append(event(f"big{k:04d}a", 100 + 2 * k, email=f"m{k}@a", cookie=f"c{k}"))
        rows.append(event(f"big{k:04d}b", 101 + 2 * k, email=f"m{k}@a", cookie=f"c{k + 1}"))
    insert(db, rows)
    insert(db, [event("small", 50, email="s@a", cookie="s1")])
    stitch_all(stitcher, db)
    big, small = entity_id_for("big0000a"), entity_id_for("small")
    sizes = dict(
        db.execute(
            "SELECT entity_id, count(*) FROM cdp_ps.identifier_entities GROUP BY 1"
        ).fetchall()
    )
    assert sizes == {big: 2 * steps + 1, small: 2}
    moves = count_row_updates(db, "cdp_ps.identifier_clusters")

    insert(db, [event("early", 60, cookie="c7")])  # re-keys the large entity
    stitch_all(stitcher, db)
    assert moves() == 0
    rekeyed = entity_id_for("early")
    assert db.execute(
        "SELECT new_id, reason FROM cdp_ps.entity_aliases WHERE old_id = %s", [big]
    ).fetchone() == (rekeyed, "rekey")

    insert(db, [event("link", 5000, email="s@a", cookie="c9")])  # merges small into it
    stitch_all(stitcher, db)
    assert moves() == 2  # s@a and s1, not the 3,001 of the large side
    # the public id is the earliest event's, the small entity's, whichever cluster survived
    sizes = dict(
        db.execute(
            "SELECT entity_id, count(*) FROM cdp_ps.identifier_entities GROUP BY 1"
        ).fetchall()
    )
    assert sizes == {small: 2 * steps + 3}
    assert dict(db.execute("SELECT old_id, new_id FROM cdp_ps.entity_aliases").fetchall()) == {
        big: small,
        rekeyed: small,
    }
    assert db.execute(
        "SELECT customer_entity_id, cardinality(identifiers) FROM customer_attributes"
    ).fetchall() == [(small, 2 * steps + 3)]
    assert observed(db) == expected(db)


def test_entity_rows_deleted_by_hand_then_restitched_stitch_again(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """customer_attributes rows deleted directly (not through the purge) leave their clusters
    behind; restitching their events must not trip over them, for founded, re-keyed and
    merged entities alike."""
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(
        db,
        [
            event("a1", 10, email="a@x", cookie="ca"),
            event("b1", 20, email="b@x"),
            event("c1", 30, cookie="cc"),
        ],
    )
    stitch_all(stitcher, db)
    db.execute("DELETE FROM customer_attributes")
    db.execute("UPDATE cdp_ce.customer_events SET stitched = NULL, identifiers = NULL")
    insert(  # a re-key of a1's entity, and a merge of b's and c's
        db, [event("a0", 5, cookie="ca"), event("bc", 40, email="b@x", cookie="cc")]
    )
    stitch_all(stitcher, db)
    assert observed(db) == expected(db)
    assert {r[0] for r in db.execute("SELECT customer_entity_id FROM customer_attributes")} == {
        entity_id_for("a0"),
        entity_id_for("b1"),
    }


def test_the_lock_lookup_finds_clusters_by_key_however_many_identifiers_a_batch_has(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """The planner expects every identifier of a batch to be found, and for a batch of 12,000
    it read all of entity_clusters into a hash instead (220 ms at 1.3M entities, growing
    with them); the lookup must stay index probes."""
    db.execute(
        "INSERT INTO cdp_ps.entity_clusters (cluster, entity_id) "
        "SELECT g, 'e' || g FROM generate_series(1, 60000) g"
    )
    db.execute(
        "INSERT INTO customer_attributes (customer_entity_id, identifiers, first_event_time, "
        "first_event_id) SELECT 'e' || g, ARRAY['id:' || g], now(), 'ev' || g "
        "FROM generate_series(1, 60000) g"
    )
    db.execute(
        "INSERT INTO cdp_ps.identifier_clusters (identifier, cluster) "
        "SELECT 'id:' || g, g FROM generate_series(1, 60000) g"
    )
    db.execute("ANALYZE cdp_ps.entity_clusters, cdp_ps.identifier_clusters, customer_attributes")
    store = Stitcher(settings).store
    wanted = [f"id:{n}" for n in range(1, 60000, 5)]
    assert ("Seq Scan", "entity_clusters") not in plan_scans(
        db, store.lock_lookup, {"idents": wanted}
    )
    with db.transaction():
        owners = store.lock_owners(db, wanted)
    assert len(owners.owner) == len(wanted)
    assert owners.owner["id:6"] == "e6" and owners.clusters["e6"] == 6


def test_events_of_many_identifiers_are_found_by_index_not_by_testing_every_row(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """A purge share's reset of its entities' events: with 3,000 identifiers PostgreSQL
    planned ``identifiers && <array>`` as a scan of every event, each tested against the
    whole array (145 s a share at 3M events); it must stay one index probe per identifier,
    and update the rows by address, in physical order as the guide's scripts do (in
    primary-key order it deadlocked with the guide's restitch of everything)."""
    db.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload, "
        "stitched, identifiers) SELECT 'ev' || g, 'web', 'page_view', '1', now(), '{}', now(), "
        "ARRAY['id:' || g, 'cookie:' || (g % 7000)] FROM generate_series(1, 60000) g"
    )
    db.execute("ANALYZE cdp_ce.customer_events")
    store = Stitcher(settings).store
    wanted = [f"id:{n}" for n in range(1, 60000, 20)]
    assert plan_scans(db, store.reset_orphans.postgres, {"idents": wanted}) == {
        ("Bitmap Heap Scan", "customer_events"),  # the probes, one per identifier
        ("Tid Scan", "customer_events"),  # the update, in physical order
    }
    db.execute(store.reset_orphans.of(db), {"idents": TextArray(wanted)})
    reset_ids = db.execute("SELECT id FROM cdp_ce.customer_events WHERE stitched IS NULL")
    assert sorted(r[0] for r in reset_ids) == sorted(f"ev{n}" for n in range(1, 60000, 20))
