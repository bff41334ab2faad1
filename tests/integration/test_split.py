"""Split (unmerge) by an admin's decision against a real PostgreSQL: the real CLI, the
Stitcher's sweep, a restitch of everything, undo, the dry run, and a Kafka replay."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import psycopg

from stream_cps import config
from stream_cps.service import process
from stream_cps.sources.kafka.replay import run_replay
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from stream_cps_dev.sample import generator
from tests.integration import test_kafka_source
from tests.integration.test_kafka_source import (
    all_stitched,
    count,
    events_of,
    member,
    produce,
    sample,
)
from tests.support import event, expected, insert, observed, setup_rules, snapshot, wait_until

kafka_env = test_kafka_source.kafka_env  # the fixture: a fresh topic, group and sample rules


def sweep(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> None:
    for _ in stitcher.sweep(conn):
        pass


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", "split", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )


def restitch_all(conn: psycopg.Connection[Any]) -> None:
    """The guide's restitch-everything script."""
    conn.execute("UPDATE customer_attributes SET modified = NULL")
    conn.execute("UPDATE customer_events SET stitched = NULL, identifiers = NULL")


def rows(conn: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return conn.execute(query).fetchall()


P, Q = entity_id_for("p0"), entity_id_for("q0")


def test_cut_identifier_splits_keeps_the_old_id_survives_restitch_all_and_undo_rejoins(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    insert(db, [event("p0", 1, email="p@x", cookie="home"), event("q0", 5, email="q@x")])
    sweep(stitcher, db)
    # q used p's home computer: the shared cookie merges q into p (alias Q -> P)
    insert(db, [event("m", 10, email="q@x", cookie="home")])
    sweep(stitcher, db)
    assert observed(db) == {"p0": P, "q0": P, "m": P}
    assert rows(db, "SELECT old_id, new_id, reason FROM cdp_ps.entity_aliases") == [(Q, P, "merge")]
    outbox_before = rows(db, "SELECT count(*) FROM cdp_attr.outbox")[0][0]

    done = cli(pg_dsn, P, "--cut-identifier", "cookie:home", "--reason", "a family's shared PC")
    assert done.returncode == 0, done.stderr
    assert f"cut cookie:home in entity {P}" in done.stdout
    sweep(stitcher, db)
    # the part with the earliest event keeps the old id; the other gets its own (Q again)
    split_mapping = {"p0": P, "q0": Q, "m": Q}
    assert observed(db) == expected(db) == split_mapping
    assert rows(
        db,
        "SELECT kind, entity_id, identifier, event_id, reason, decided_by, undone "
        "FROM cdp_ps.split_decisions",
    ) == [("cut", P, "cookie:home", None, "a family's shared PC", "postgres", None)]
    assert rows(db, "SELECT identifiers FROM cdp_ce.customer_events WHERE id = 'm'") == [
        (["email:q@x"],)
    ]
    assert rows(
        db, "SELECT count(*) FROM cdp_ps.identifier_entities WHERE identifier = 'cookie:home'"
    ) == [(0,)]
    # Q is live again, so its alias is gone; the purge queued an OpenSearch delete of P
    assert rows(db, "SELECT count(*) FROM cdp_ps.entity_aliases") == [(0,)]
    assert rows(
        db, f"SELECT entity_id, op FROM cdp_attr.outbox ORDER BY seq OFFSET {outbox_before}"
    ) == [(P, "delete")]

    # the cut links no one, anywhere: a later event with it founds nothing new with it
    insert(db, [event("p1", 20, email="p@x", cookie="home"), event("r0", 21, cookie="home")])
    sweep(stitcher, db)
    assert observed(db) == expected(db) == {**split_mapping, "p1": P, "r0": None}
    before = snapshot(db)
    restitch_all(db)
    sweep(stitcher, db)
    assert snapshot(db) == before

    again = cli(pg_dsn, P, "--cut-identifier", "cookie:home", "--reason", "twice")
    assert again.returncode == 1 and "already cuts" in again.stderr
    undo = cli(pg_dsn, "--undo", "1")
    assert undo.returncode == 0, undo.stderr
    sweep(stitcher, db)
    assert observed(db) == expected(db) == {"p0": P, "q0": P, "m": P, "p1": P, "r0": P}
    assert rows(db, "SELECT undone IS NOT NULL, undone_by FROM cdp_ps.split_decisions") == [
        (True, "postgres")
    ]
    assert cli(pg_dsn, "--undo", "1").returncode == 1


A, B = entity_id_for("a0"), entity_id_for("b0")


def _agent_world(db: psycopg.Connection[Any], stitcher: Stitcher) -> None:
    """b; a; and a support agent logged in as a from b's machine: one entity B."""
    insert(
        db,
        [
            event("b0", 0, email="b@x", cookie="pc-b"),
            event("a0", 1, email="a@x"),
            event("agent", 3, email="a@x", cookie="pc-b"),
            event("a1", 4, email="a@x", cookie="pc-a"),
        ],
    )
    sweep(stitcher, db)
    assert set(observed(db).values()) == {B}


def test_dry_run_prints_the_parts_and_writes_nothing(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    setup_rules(db)
    _agent_world(db, Stitcher(settings))
    before = snapshot(db), rows(db, "SELECT * FROM customer_attributes ORDER BY 1")
    outbox = rows(db, "SELECT count(*) FROM cdp_attr.outbox")
    dry = cli(pg_dsn, B, "--detach-event", "agent", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == f"entity {B} with detach agent would become (nothing written):"
    assert lines[1].startswith(f"{B}\tkeeps the old id\tfirst b0 ")
    assert lines[1].endswith("\t1 events\tcookie:pc-b, email:b@x")
    assert lines[2].startswith(f"{A}\tnew id\tfirst a0 ")
    assert lines[2].endswith("\t2 events\tcookie:pc-a, email:a@x")
    assert lines[3:] == ["linking nothing: agent"]
    cut = cli(pg_dsn, B, "--cut-identifier", "cookie:pc-b", "--dry-run")
    assert cut.returncode == 0, cut.stderr
    assert f"{A}\tnew id" in cut.stdout and "linking nothing" not in cut.stdout
    assert (snapshot(db), rows(db, "SELECT * FROM customer_attributes ORDER BY 1")) == before
    assert rows(db, "SELECT count(*) FROM cdp_attr.outbox") == outbox
    assert rows(db, "SELECT count(*) FROM cdp_ps.split_decisions") == [(0,)]

    no_reason = cli(pg_dsn, B, "--detach-event", "agent")
    assert no_reason.returncode == 2 and "--reason is required" in no_reason.stderr
    stranger = cli(pg_dsn, B, "--detach-event", "nope", "--reason", "x")
    assert stranger.returncode == 1 and "is not one of entity" in stranger.stderr
    other = cli(pg_dsn, B, "--cut-identifier", "email:nobody@x", "--reason", "x")
    assert other.returncode == 1 and "does not link entity" in other.stderr


def test_detach_event_splits_survives_restitch_all_and_undo_rejoins(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    _agent_world(db, stitcher)
    done = cli(
        pg_dsn, B, "--detach-event", "agent", "--reason", "support agent session", "--by", "alice"
    )
    assert done.returncode == 0, done.stderr
    assert "(by alice)" in done.stdout
    sweep(stitcher, db)
    split_mapping = {"b0": B, "a0": A, "a1": A, "agent": None}
    assert observed(db) == expected(db) == split_mapping
    assert rows(db, "SELECT identifiers FROM cdp_ce.customer_events WHERE id = 'agent'") == [([],)]
    assert rows(db, "SELECT kind, event_id, decided_by FROM cdp_ps.split_decisions") == [
        ("detach", "agent", "alice")
    ]
    assert (B, "delete") in rows(db, "SELECT entity_id, op FROM cdp_attr.outbox")
    before = snapshot(db)
    restitch_all(db)
    sweep(stitcher, db)
    assert snapshot(db) == before
    twice = cli(pg_dsn, A, "--detach-event", "agent", "--reason", "x")
    assert twice.returncode == 1 and "live decision 1 already detaches" in twice.stderr

    undo = cli(pg_dsn, "--undo", "1", "--by", "bob")
    assert undo.returncode == 0, undo.stderr
    assert "1 events set to be restitched" in undo.stdout
    sweep(stitcher, db)
    assert observed(db) == expected(db) == dict.fromkeys(split_mapping, B)
    assert rows(db, "SELECT undone_by FROM cdp_ps.split_decisions") == [("bob",)]


def _login(eid: str, minute: int, cookie: str, email: str, user: str) -> Any:
    row = event(eid, minute)
    payload = f'{{"cookie_id": "{cookie}", "email": "{email}", "user_id": "{user}"}}'
    return (row[0], "web", "login", generator.VERSION, row[4], payload)


def test_a_split_survives_a_kafka_replay_and_a_restitch_by_replay(
    kafka_env: tuple[config.Settings, str], db: psycopg.Connection[Any]
) -> None:
    settings, topic = kafka_env
    family = [
        _login("p0", 1, "home", "p@x", "up"),
        _login("q0", 5, "qc", "q@x", "uq"),
        _login("m", 10, "home", "q@x", "uq"),
    ]
    messages = family + sample(40, seed=21)
    bootstrap = settings.kafka.bootstrap_servers

    def replay() -> None:
        out = io.StringIO()
        code = run_replay(
            settings, topic=None, beginning=True, offsets=None, since=None, yes=True, out=out
        )
        assert code == 0, out.getvalue()

    with member(settings):
        produce(bootstrap, topic, events_of(messages))
        wait_until(lambda: all_stitched(db, len(messages)), 30, "all events stitched")
        assert {observed(db)[e] for e in ("p0", "q0", "m")} == {P}
        process.split_decide(settings, P, "cut", "stitching_meiro_id:home", "shared PC", None)
        # a member applies the purge signal while idle; the Kafka path has no sweep, so the
        # reset events come back with a replay
        wait_until(
            lambda: (
                count(
                    db, "SELECT count(*) FROM customer_attributes WHERE customer_entity_id = %s", P
                )
                == 0
            ),
            15,
            "the purge",
        )
        replay()
        wait_until(lambda: all_stitched(db, len(messages)), 30, "restitched by the replay")
        mapping = observed(db)
        assert mapping == expected(db)
        assert (mapping["p0"], mapping["q0"], mapping["m"]) == (P, Q, Q)
        before = snapshot(db)

        restitch_all(db)
        wait_until(lambda: count(db, "SELECT count(*) FROM customer_attributes") == 0, 15, "purge")
        replay()
        wait_until(lambda: all_stitched(db, len(messages)), 30, "all events restitched")
    assert snapshot(db) == before
    assert observed(db) == expected(db)
