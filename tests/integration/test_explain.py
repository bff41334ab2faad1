"""`stream-cps explain` against a real PostgreSQL, on entities built by the real Stitcher: the
JSON report of a merged entity, old ids through aliases, --why chains, and real pictures."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_cps import cli, config
from stream_cps.stitching.explain.queries import ExplainQueries
from stream_cps.stitching.grouping import entity_id_for
from stream_cps.stitching.stitcher import Stitcher
from tests.support import event, insert, plan_scans, setup_rules

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stitch_all(settings: config.Settings, conn: psycopg.Connection[Any]) -> None:
    for _ in Stitcher(settings).sweep(conn):
        pass


def explain(
    dsn: str, capsys: pytest.CaptureFixture[str], *args: str, code: int = 0
) -> dict[str, Any]:
    """Run the command line in-process and parse its JSON output."""
    assert cli.main(["explain", "--dsn", dsn, "--format", "json", *args]) == code
    out = capsys.readouterr().out
    return json.loads(out) if code == 0 else {"stderr": out}


def merged(db: psycopg.Connection[Any], settings: config.Settings) -> None:
    """Two entities (an e-mail, a cookie) merged by a third event carrying both."""
    setup_rules(db)
    insert(db, [event("a", 10, email="x@a"), event("b", 5, cookie="c1")])
    stitch_all(settings, db)
    insert(db, [event("c", 20, email="x@a", cookie="c1"), event("d", 30, "buy", phone="555")])
    stitch_all(settings, db)


def test_merged_entity_explained_in_json_with_merge_alias_and_why_chain(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    merged(db, settings)
    survivor, absorbed = entity_id_for("b"), entity_id_for("a")
    report = explain(pg_dsn, capsys, survivor)
    entity = report["entity"]
    assert entity["id"] == survivor
    assert entity["identifiers"] == {"cookie": ["cookie:c1"], "email": ["email:x@a"]}
    assert entity["identifier_count"] == 2
    assert [(e["id"], e["identifiers"]) for e in entity["events"]] == [
        ("b", ["cookie:c1"]),
        ("a", ["email:x@a"]),
        ("c", ["cookie:c1", "email:x@a"]),
    ]
    assert entity["event_count"] == 3 and entity["events_per_type"] == {"web/page_view": 3}
    assert [(m["old_id"], m["new_id"], m["reason"]) for m in entity["merged_in"]] == [
        (absorbed, survivor, "merge")
    ]
    assert entity["first_event"]["id"] == "b"
    assert entity["quarantined"] == []  # none touch it

    why = explain(pg_dsn, capsys, "--why", "email:x@a", "cookie:c1")["why"]
    assert why["connected"] is True
    assert why["linking_events"] == ["c"]
    assert [(n["kind"], n["key"]) for n in why["chain"]] == [
        ("identifier", "email:x@a"),
        ("event", "c"),
        ("identifier", "cookie:c1"),
    ]
    assert why["chain"][1]["identifiers"] == ["cookie:c1", "email:x@a"]

    # two events: the chain runs event a - email - event c - cookie - event b
    why = explain(pg_dsn, capsys, "--why", "a", "b")["why"]
    assert why["linking_events"] == ["a", "c", "b"]

    apart = explain(pg_dsn, capsys, "--why", "email:x@a", "phone:555")
    assert apart["entity"] is None and apart["why"]["connected"] is False
    assert apart["why"]["message"].startswith("not connected: email:x@a is in entity")


def test_old_id_resolves_through_its_aliases(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_rules(db)
    insert(db, [event("late", 100, email="x@a")])
    stitch_all(settings, db)
    insert(db, [event("mid", 50, email="x@a")])
    stitch_all(settings, db)
    insert(db, [event("early", 1, email="x@a")])
    stitch_all(settings, db)
    live, oldest = entity_id_for("early"), entity_id_for("late")
    report = explain(pg_dsn, capsys, oldest)
    assert report["entity"]["id"] == live
    assert [(h["old_id"], h["new_id"], h["reason"]) for h in report["resolved_through"]] == [
        (oldest, live, "rekey")
    ]
    assert {m["old_id"] for m in report["entity"]["merged_in"]} == {
        entity_id_for("late"),
        entity_id_for("mid"),
    }
    # an alias chain written by hand (aliases are compressed, an older database may not be)
    db.execute(
        "INSERT INTO cdp_ps.entity_aliases (old_id, new_id, reason) VALUES ('ancient', %s, "
        "'merge')",
        [live],
    )
    db.execute("UPDATE cdp_ps.entity_aliases SET new_id = 'ancient' WHERE old_id = %s", [oldest])
    report = explain(pg_dsn, capsys, oldest)
    assert [h["new_id"] for h in report["resolved_through"]] == ["ancient", live]
    assert report["entity"]["id"] == live
    by_identifier = explain(pg_dsn, capsys, "--identifier", "email:x@a")
    assert by_identifier["entity"]["id"] == live
    assert cli.main(["explain", "--dsn", pg_dsn, "nobody"]) == 1
    assert "no entity nobody" in capsys.readouterr().err


def test_blocked_and_quarantined_values_of_its_events_are_shown(
    db: psycopg.Connection[Any],
    settings: config.Settings,
    pg_dsn: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_rules(db)
    db.execute(
        "INSERT INTO cdp_ps.identifier_blocklist (attribute_id, value) VALUES (NULL, 'guest')"
    )
    insert(
        db,
        [
            event("a", 1, email="x@a", cookie="guest"),
            event("b", 2, email="x@a", cookie="0"),
            event("c", 3, email="x@a", cookie="c2"),
        ],
    )
    stitch_all(settings, db)
    entity = explain(pg_dsn, capsys, entity_id_for("a"))["entity"]
    assert [(b["identifier"], b["rule"], b["events"]) for b in entity["blocked"]] == [
        ("cookie:0", "built-in rule (only zeros and dashes)", ["b"]),
        ("cookie:guest", "identifier_blocklist (attribute_id NULL, value 'guest')", ["a"]),
    ]
    # a hub value that reached neither the event nor the entity (rows written by hand: the
    # guard itself keeps it in customer_events.identifiers, docs/stitching.md), so it is found
    # through the events' rules
    db.execute(
        "UPDATE cdp_ce.customer_events SET identifiers = array_remove(identifiers, 'cookie:c2')"
    )
    db.execute(
        "UPDATE customer_attributes SET identifiers = array_remove(identifiers, 'cookie:c2')"
    )
    db.execute("DELETE FROM cdp_ps.identifier_clusters WHERE identifier = 'cookie:c2'")
    db.execute(
        "INSERT INTO cdp_ps.quarantined_identifiers (identifier, attribute_id, value, "
        "other_attribute_id, cooccurring, limit_value, state, reason) VALUES "
        "('cookie:c2', 'cookie', 'c2', 'email', 501, 500, 'quarantined', 'hub'), "
        "('email:x@a', 'email', 'x@a', 'cookie', 3, 500, 'released', 'checked'), "
        "('email:other', 'email', 'other', 'cookie', 900, 500, 'quarantined', 'hub')"
    )
    entity = explain(pg_dsn, capsys, entity_id_for("a"))["entity"]
    assert [
        (q["identifier"], q["state"], q["on_entity"], q["events"]) for q in entity["quarantined"]
    ] == [("cookie:c2", "quarantined", False, ["c"]), ("email:x@a", "released", True, [])]


def test_picture_is_real_svg_and_png_with_the_linking_event(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str, tmp_path: Path
) -> None:
    merged(db, settings)
    svg, png = tmp_path / "why.svg", tmp_path / "why.png"
    for path, fmt in ((svg, "svg"), (png, "png")):
        # a real process, as an operator runs it
        subprocess.run(
            [sys.executable, "-m", "stream_cps", "explain", "--dsn", pg_dsn, "--format", fmt,
             "--output", str(path), "--why", "email:x@a", "cookie:c1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
    root = ET.fromstring(svg.read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "Generated by graphviz" in svg.read_text()
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"c", "email:x@a", "cookie:c1"} <= texts
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 1000


def test_thousand_identifier_entity_draws_fast_and_bounded(
    db: psycopg.Connection[Any], settings: config.Settings, pg_dsn: str, tmp_path: Path
) -> None:
    setup_rules(db)
    # one hub cookie on every event, each with its own e-mail: 1,000 identifiers (with the
    # hub quarantine off, which would otherwise split it: docs/stitching.md)
    insert(db, [event(f"e{n:04d}", n, email=f"u{n}@a", cookie="hub") for n in range(999)])
    stitch_all(settings.replace(**{"stitching.quarantine_limit": 0}), db)
    out = tmp_path / "hub.svg"
    args = ["--format", "svg", "--output", str(out), "--why", "email:u3@a", "email:u900@a"]
    started = time.monotonic()
    assert cli.main(["explain", "--dsn", pg_dsn, *args]) == 0
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"took {elapsed:.1f} s"
    root = ET.fromstring(out.read_bytes())
    nodes = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "node"]
    assert 10 < len(nodes) <= 80
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"email:u3@a", "email:u900@a", "cookie:hub", "e0003", "e0900"} <= texts
    assert any(t and t.startswith("+") and t.endswith("more email") for t in texts)


def test_events_of_a_many_identifier_entity_are_found_by_index(
    db: psycopg.Connection[Any], pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``identifiers && <the entity's identifiers>`` tests every event against the whole
    array: 15 s for a 5,000-identifier entity among 300,000 events. Explain must find its
    events by one index probe per identifier, as the purge does (``events_holding``)."""
    db.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload, "
        "stitched, identifiers) SELECT 'bg' || g, 'web', 'page_view', '1', now(), '{}', now(), "
        "ARRAY['bg:' || g] FROM generate_series(1, 60000) g"
    )
    db.execute(
        "INSERT INTO cdp_ce.customer_events (id, source_id, type, version, event_time, payload, "
        "stitched, identifiers) SELECT 'h' || g, 'shop', CASE WHEN g % 4 = 0 THEN 'buy' ELSE "
        "'visit' END, '1', now() + g * interval '1 s', '{}', now(), "
        "ARRAY['email:u' || g, 'cookie:kiosk'] FROM generate_series(1, 3000) g"
    )
    db.execute(
        "INSERT INTO customer_attributes (customer_entity_id, identifiers, first_event_time, "
        "first_event_id) SELECT 'hub', array_agg(x ORDER BY x), now(), 'h1' FROM (SELECT "
        "'email:u' || g AS x FROM generate_series(1, 3000) g UNION ALL SELECT 'cookie:kiosk') s"
    )
    db.execute("ANALYZE cdp_ce.customer_events, customer_attributes")
    queries = ExplainQueries(config.Schemas())
    wanted = [f"email:u{n}" for n in range(1, 3001)] + ["cookie:kiosk"]
    for statement in (queries.types.of(db), queries.events.of(db)):
        scans = plan_scans(db, statement, {"idents": wanted, "limit": 50})
        assert ("Seq Scan", "customer_events") not in scans
        assert ("Tid Scan", "customer_events") in scans
    report = explain(pg_dsn, capsys, "hub")
    assert report["entity"]["identifier_count"] == 3001
    assert report["entity"]["events_per_type"] == {"shop/buy": 750, "shop/visit": 2250}
