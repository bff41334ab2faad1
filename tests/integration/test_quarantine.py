"""Hub quarantine against a real PostgreSQL: a kiosk cookie splits into its people, the result
does not depend on order or batching, admins release and block, the service goes on."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from stream_cps import config
from stream_cps.db import schema
from stream_cps.stitching import quarantine
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import BatchResult, Stitcher
from stream_cps_dev.sample import generator
from tests.support import (
    T0,
    event,
    expected,
    insert,
    observed,
    service_process,
    setup_rules,
    snapshot,
    unstitched,
    wait_until,
)


def sweep(stitcher: Stitcher, conn: psycopg.Connection[Any]) -> list[BatchResult]:
    return list(stitcher.sweep(conn))


def kiosk(conn: psycopg.Connection[Any], n: int, cookie: str = "kiosk-1", first: int = 0) -> None:
    """``n`` people who each logged in once on the shared kiosk: e-mail uN plus its cookie."""
    conn.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload) "
        "SELECT 'k' || lpad(g::text, 6, '0'), 'web', 'page_view', '1', "
        "%s::timestamptz + g * interval '1 s', "
        "json_build_object('email', 'u' || g || '@x', 'cookie', %s::text) "
        "FROM generate_series(%s::int, %s::int) g",
        [T0, cookie, first, first + n - 1],
    )


def person_with_30_cookies(conn: psycopg.Connection[Any]) -> None:
    insert(
        conn, [event(f"p{n:02d}", 5000 + n, email="me@x", cookie=f"mine-{n}") for n in range(30)]
    )


def entity_of(conn: psycopg.Connection[Any], identifier: str) -> str | None:
    row = conn.execute(
        "SELECT entity_id FROM cdp_ps.identifier_entities WHERE identifier = %s", [identifier]
    ).fetchone()
    return None if row is None else str(row[0])


def entities(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM customer_attributes").fetchone()
    return int(row[0]) if row else -1


def test_a_kiosk_cookie_with_20000_emails_is_quarantined_and_people_stay_apart(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """Before: one entity of 20,001 identifiers."""
    setup_rules(db)
    kiosk(db, 20_000)
    person_with_30_cookies(db)
    insert(db, [event("own-cookie", 9000, email="u7@x", cookie="home-7")])
    stitcher = Stitcher(settings)
    results = sweep(stitcher, db)
    assert [i for r in results for i in r.quarantined] == ["cookie:kiosk-1"]
    rows = db.execute(
        "SELECT identifier, attribute_id, value, other_attribute_id, cooccurring >= 101, "
        "limit_value, state, decided FROM cdp_ps.quarantined_identifiers"
    ).fetchall()
    assert rows == [
        ("cookie:kiosk-1", "cookie", "kiosk-1", "email", True, 100, "quarantined", None)
    ]
    assert entities(db) == 20_000 + 1
    assert entity_of(db, "cookie:kiosk-1") is None
    assert entity_of(db, "email:u7@x") == entity_of(db, "cookie:home-7")
    assert entity_of(db, "email:u7@x") != entity_of(db, "email:u8@x")
    me = entity_of(db, "email:me@x")
    assert me == entity_id_for("p00")
    assert {entity_of(db, f"cookie:mine-{n}") for n in range(30)} == {me}
    # the cookie is dropped from what the event stores (the guide's `<@` test finds every
    # event of its entity), and remembered for a release
    assert db.execute(
        "SELECT identifiers FROM cdp_ce.customer_events WHERE id = 'k000003'"
    ).fetchone() == (["email:u3@x"],)
    assert db.execute(
        "SELECT count(*) FROM cdp_ps.quarantined_events WHERE identifier = 'cookie:kiosk-1' "
        "AND event_id = 'k000003'"
    ).fetchone() == (1,)
    assert db.execute(
        "SELECT count(*) FROM cdp_ce.customer_events e WHERE NOT EXISTS (SELECT 1 FROM "
        "customer_attributes ca WHERE e.identifiers <@ ca.identifiers)"
    ).fetchone() == (0,)
    assert observed(db) == expected(db)


def test_a_glued_entity_is_split_when_its_hub_crosses_the_limit(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    kiosk(db, 60)
    sweep(stitcher, db)
    glued = entity_id_for("k000000")
    assert [r[0] for r in db.execute("SELECT customer_entity_id FROM customer_attributes")] == [
        glued
    ]
    kiosk(db, 60, first=60)
    results = sweep(stitcher, db)
    assert sum(len(r.quarantined) for r in results) == 1
    assert glued in {e for r in results for e in r.purged}
    assert entities(db) == 120
    # its deletion went to the outbox like any purge; the people got upserts queued by calc
    assert db.execute(
        "SELECT op FROM cdp_attr.outbox WHERE entity_id = %s", [glued]
    ).fetchall() == [("delete",)]
    assert observed(db) == expected(db)


def _world(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    rows = list(generator.events(seed=5, persons=40, per_person=4))
    rows += [event(f"k{n:04d}", n % 97, email=f"u{n}@x", cookie="kiosk") for n in range(150)]
    # an e-mail shared by a whole office's cookies, and a phone shared by three people
    rows += [
        event(f"o{n:04d}", n % 53, kind="buy", email="office@x", phone=f"+{n}") for n in range(120)
    ]
    rows += [event(f"f{n}", n, kind="buy", email=f"fam{n}@x", phone="+999") for n in range(3)]
    rows += [event(f"p{n:02d}", n, email="me@x", cookie=f"mine-{n}") for n in range(30)]
    return rows


def test_two_databases_fed_in_different_orders_and_batches_end_identical(pg_server: Any) -> None:
    snapshots = []
    for n, (seed, size, chunk) in enumerate([(1, 7, 40), (2, 500, 333)]):
        name = f"quarantine_{n}_{random.randrange(1 << 30)}"
        with psycopg.connect(pg_server.dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname={name}"
        settings = config.load(flags={"dsn": dsn, "stitching.batch_size": size}, environ={})
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            conn.execute(generator.config_sql(settings.schemas))
            setup_rules(conn)
            rows = _world(conn)
            random.Random(seed).shuffle(rows)
            stitcher = Stitcher(settings)
            for start in range(0, len(rows), chunk):
                insert(conn, rows[start : start + chunk])
                sweep(stitcher, conn)
            assert observed(conn) == expected(conn)
            listed = conn.execute(
                "SELECT identifier, state FROM cdp_ps.quarantined_identifiers ORDER BY 1"
            ).fetchall()
            assert listed == [("cookie:kiosk", "quarantined"), ("email:office@x", "quarantined")]
            snapshots.append((snapshot(conn), listed))
    assert snapshots[0] == snapshots[1]


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_cps", "quarantine", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_release_stitches_it_again_and_block_keeps_it_out(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str
) -> None:
    setup_rules(db)
    stitcher = Stitcher(settings)
    kiosk(db, 150)
    insert(db, [event("only-kiosk", 1, cookie="kiosk-1")])  # an event with nothing else
    sweep(stitcher, db)
    assert entities(db) == 150
    listing = cli(pg_dsn, "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.startswith("cookie:kiosk-1\tquarantined\t")

    released = cli(pg_dsn, "release", "cookie:kiosk-1", "--reason", "it is one family")
    assert released.returncode == 0, released.stderr
    assert "quarantined -> released; 150 entities and 151 events" in released.stdout
    sweep(stitcher, db)
    assert entities(db) == 1
    assert (
        entity_of(db, "cookie:kiosk-1") == entity_of(db, "email:u3@x") == entity_id_for("k000000")
    )
    assert observed(db) == expected(db)
    row = db.execute(
        "SELECT state, decided IS NOT NULL, reason FROM cdp_ps.quarantined_identifiers"
    ).fetchone()
    assert row == ("released", True, "it is one family")
    # more people on the kiosk: released is final, it is not quarantined again
    kiosk(db, 10, first=150)
    sweep(stitcher, db)
    assert entities(db) == 1

    blocked = cli(pg_dsn, "block", "cookie:kiosk-1")
    assert blocked.returncode == 0, blocked.stderr
    assert "released -> blocked; 1 entities" in blocked.stdout
    sweep(stitcher, db)
    assert entities(db) == 160
    assert entity_of(db, "cookie:kiosk-1") is None
    assert cli(pg_dsn, "list", "--state", "blocked").stdout.startswith("cookie:kiosk-1\tblocked")
    mapping = observed(db)
    assert mapping["only-kiosk"] is None
    assert mapping == oracle_blocked(db, {"cookie:kiosk-1"})

    unknown = cli(pg_dsn, "release", "cookie:nope")
    assert unknown.returncode == 1
    assert "not in quarantined_identifiers" in unknown.stderr


def oracle_blocked(conn: psycopg.Connection[Any], blocked: set[str]) -> dict[str, str | None]:
    from tests import oracle

    events = conn.execute("SELECT id, event_time, identifiers FROM cdp_ce.customer_events")
    return oracle.partition(((e, t, i or []) for e, t, i in events), blocked)


def test_per_pair_limits_and_zero_turns_it_off(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    setup_rules(db)
    kiosk(db, 150)
    loose = settings.replace(**{"stitching.quarantine_limits": {"cookie:email": "200"}})
    sweep(Stitcher(loose), db)
    assert entities(db) == 1
    kiosk(db, 60, first=150)
    sweep(Stitcher(loose), db)
    assert entities(db) == 210
    limits = quarantine.Limits.parse(100, {"cookie:email": "200"})
    assert observed(db) == expected(db, limits)
    off = settings.replace(**{"stitching.quarantine_limit": 0})
    kiosk(db, 150, cookie="kiosk-2", first=1000)
    sweep(Stitcher(off), db)
    assert entity_of(db, "cookie:kiosk-2") is not None
    assert db.execute("SELECT count(*) FROM cdp_ps.quarantined_identifiers").fetchone() == (1,)


def test_the_service_quarantines_a_hub_and_keeps_stitching_the_others(
    db: psycopg.Connection[Any], pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    with service_process(pg_dsn, tmp_path / "run.log"):
        kiosk(db, 20_000)
        for n in range(100):
            insert(db, [event(f"x{n}", 10_000 + n, email=f"other{n % 20}@x", cookie=f"oc{n}")])
        wait_until(lambda: unstitched(db) == 0, timeout=120, what="stitching")
        wait_until(lambda: entities(db) == 20_000 + 20, timeout=60, what="the people apart")
    assert observed(db) == expected(db)
    log = (tmp_path / "run.log").read_text()
    assert "identifier cookie:kiosk-1 quarantined" in log
