"""Helpers shared by the stitching tests: rules, events, the observed state, a service process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.stitching import quarantine
from tests import oracle

T0 = datetime(2026, 1, 1, tzinfo=UTC)

RULES = [
    ("email", "pv", "payload->>'email'"),
    (
        "cookie",
        "pv",
        "json_array_elements_text(json_build_array(payload->>'cookie', payload->'inbound'->>0))",
    ),
    ("email", "buy", "payload->>'email'"),
    ("phone", "buy", "payload->>'phone'"),
]


def setup_rules(
    conn: psycopg.Connection[Any], rules: Iterable[tuple[str, str, str]] = RULES
) -> None:
    conn.execute(
        "INSERT INTO sources VALUES ('web', 'Web'), ('shop', 'Shop') ON CONFLICT DO NOTHING"
    )
    conn.execute(
        "INSERT INTO events VALUES ('pv', 'web', 'page_view', '1', 'PV'), "
        "('buy', 'shop', 'purchase', '1', 'Buy') ON CONFLICT DO NOTHING"
    )
    conn.execute(
        "INSERT INTO attributes (id, name) VALUES ('email', 'Email'), ('cookie', 'Cookie'), "
        "('phone', 'Phone'), ('num', 'Num') ON CONFLICT DO NOTHING"
    )
    for attribute_id, event_id, expression in rules:
        conn.execute(
            "INSERT INTO cdp_ps.stitching_attributes_config VALUES (%s, %s, %s)",
            [attribute_id, event_id, expression],
        )


def event(eid: str, minutes: int, kind: str = "pv", **payload: object) -> tuple[Any, ...]:
    source, etype = ("web", "page_view") if kind == "pv" else ("shop", "purchase")
    return (eid, source, etype, "1", T0 + timedelta(minutes=minutes), json.dumps(payload))


def insert(conn: psycopg.Connection[Any], rows: Iterable[tuple[Any, ...]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO cdp_ce.customer_events "
            "(id, source_id, type, version, event_time, payload) VALUES (%s, %s, %s, %s, %s, %s)",
            list(rows),
        )


def observed(conn: psycopg.Connection[Any]) -> dict[str, str | None]:
    """event id -> entity id as the database says, after checking its internal consistency.

    Quarantined identifiers are not in what events store (``quarantined_events`` says where
    they occurred)."""
    events = conn.execute(
        "SELECT id, event_time, identifiers FROM cdp_ce.customer_events ORDER BY id"
    ).fetchall()
    assert all(idents is not None for _, _, idents in events), "unstitched events remain"
    out = _excluded(conn)
    assert not any(set(idents) & out for _, _, idents in events), "quarantined id stored"
    owner = dict(conn.execute("SELECT identifier, entity_id FROM cdp_ps.identifier_entities"))
    rows = {
        r[0]: set(r[1])
        for r in conn.execute("SELECT customer_entity_id, identifiers FROM customer_attributes")
    }
    mapping: dict[str, str | None] = {}
    union: dict[str, set[str]] = {}
    for eid, _, idents in events:
        if not idents:
            mapping[eid] = None
            continue
        owners = {owner[i] for i in idents}
        assert len(owners) == 1, f"event {eid} spans entities {owners}"
        entity = owners.pop()
        mapping[eid] = entity
        union.setdefault(entity, set()).update(idents)
    assert union == rows, "customer_attributes.identifiers differ from the union of events"
    return mapping


def expected(
    conn: psycopg.Connection[Any], limits: quarantine.Limits | None = None
) -> dict[str, str | None]:
    """The oracle's answer over the identifiers the database extracted, with every identifier
    over its limit (``limits``: the default settings') blocked from the start, except those an
    admin released, and the live split decisions applied from the start; the database must
    list exactly the oracle's over-limit identifiers."""
    # what the rules extracted: the stored identifiers plus the quarantined ones dropped
    dropped: dict[str, list[str]] = {}
    for ident, event_id in conn.execute(
        "SELECT identifier, event_id FROM cdp_ps.quarantined_events"
    ):
        dropped.setdefault(event_id, []).append(ident)
    events = [
        (eid, when, sorted({*(idents or []), *dropped.get(eid, [])}))
        for eid, when, idents in conn.execute(
            "SELECT id, event_time, identifiers FROM cdp_ce.customer_events"
        )
    ]
    over = oracle.quarantined(events, (limits or quarantine.Limits()).of)
    listed = dict(conn.execute("SELECT identifier, state FROM cdp_ps.quarantined_identifiers"))
    assert set(listed) == over, "quarantined_identifiers differs from the oracle's hubs"
    released = {i for i, state in listed.items() if state == quarantine.RELEASED}
    cut, detached = live_splits(conn)
    return oracle.partition(events, (over - released) | cut, detached)


def live_splits(conn: psycopg.Connection[Any]) -> tuple[set[str], set[str]]:
    """The identifiers cut and the events detached by live split decisions."""
    rows = conn.execute(
        "SELECT kind, coalesce(identifier, event_id) FROM cdp_ps.split_decisions "
        "WHERE undone IS NULL"
    ).fetchall()
    return {t for k, t in rows if k == "cut"}, {t for k, t in rows if k == "detach"}


def _excluded(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT identifier FROM cdp_ps.quarantined_identifiers WHERE state <> 'released'"
    )
    return {r[0] for r in rows} | live_splits(conn)[0]


def snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Everything the contract exposes about stitching, for comparing two databases."""
    return (
        conn.execute("SELECT id, identifiers FROM cdp_ce.customer_events ORDER BY id").fetchall(),
        conn.execute(
            "SELECT customer_entity_id, identifiers, first_event_id FROM customer_attributes "
            "ORDER BY 1"
        ).fetchall(),
    )


def plan_scans(
    conn: psycopg.Connection[Any], statement: sql.Composed, params: dict[str, Any]
) -> set[tuple[str, str]]:
    """(scan, table) of every node of a statement's plan that reads a table, planned for these
    ``params`` (``%(idents)b`` sent as a literal array: the custom plan a batch of that size
    gets)."""
    text = statement.as_string(conn).replace("%(idents)b", "%(idents)s")
    with conn.transaction():
        row = conn.execute("EXPLAIN (FORMAT JSON) " + text, params).fetchone()
    assert row is not None
    found: set[tuple[str, str]] = set()
    nodes = [row[0][0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if "Relation Name" in node and node["Node Type"] != "ModifyTable":
            found.add((str(node["Node Type"]), str(node["Relation Name"])))
    return found


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unstitched(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NULL"
    ).fetchone()
    return int(row[0]) if row else -1


@contextmanager
def service_process(dsn: str, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`stream-cps run` for the block; killed at the end if the block did not stop it."""
    proc = start_service(dsn, log, **env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def start_service(dsn: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "STREAM_CPS_DSN": dsn,
        "STREAM_CPS_STITCHING_POLL_INTERVAL": "0.02",
        "STREAM_CPS_STITCHING_STANDBY_POLL": "0.5",
        "STREAM_CPS_STITCHING_SWEEP_INTERVAL": "1",
        **env,
    }
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "run"], env=environment, stdout=handle, stderr=handle
    )


def count_row_updates(conn: psycopg.Connection[Any], table: str) -> Callable[[], int]:
    """Install a trigger counting the row UPDATEs of ``table`` (``schema.name``); the function
    returned gives the count since its last call."""
    schema_name, _, table_name = table.partition(".")
    ids = {
        "t": sql.Identifier(schema_name, table_name),
        "n": sql.Identifier("count_updates_" + table_name),
    }
    for statement in (
        "CREATE TABLE {n} (n bigint NOT NULL)",
        "CREATE FUNCTION {n}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO {n} VALUES (1); RETURN NEW; END$$",
        "CREATE TRIGGER {n} BEFORE UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {n}()",
    ):
        conn.execute(sql.SQL(statement).format(**ids))
    taken = sql.SQL("WITH d AS (DELETE FROM {n} RETURNING 1) SELECT count(*) FROM d").format(**ids)

    def updates() -> int:
        row = conn.execute(taken).fetchone()
        return int(row[0]) if row else -1

    return updates
