"""Outbox relay throughput, next to the raw bulk API in the same run.

    python bench/outbox.py [--entities 50000] [--batch-size 500] [--deletes 0.1] [--rounds 3]

Baseline and subject run against the same PostgreSQL and OpenSearch (machines here are noisy):
1. Raw bulk: the same documents and deletes sent with ``external_gte`` versions in bulk
   requests of the same size, built in memory: what OpenSearch takes at all from one client.
   Run once to warm the JVM first.
2. Relay: the same number of outbox commands (an upsert for every entity, then deletes for
   ids merged away, as merges make) delivered by ``Relay.run_once`` until the outbox is
   empty: claim, read entities, bulk, mark, commit per batch.
Raw and relay alternate for ``--rounds`` rounds, each into a fresh index; reported as medians
in commands/s and as a fraction of (1). Both services are started here unless
``--dsn`` / ``--opensearch-url`` point at running ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from opensearchpy import OpenSearch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run as a script from anywhere

from infra.opensearch import opensearch_service  # noqa: E402
from stream_cps import config  # noqa: E402
from stream_cps.db import schema  # noqa: E402
from stream_cps.sinks.opensearch import ensure_index  # noqa: E402
from stream_cps.sinks.relay import Relay  # noqa: E402
from stream_cps_dev import embedded  # noqa: E402


def seed(conn: psycopg.Connection[Any], entities: int, delete_share: float) -> int:
    """Live entities with attributes and an upsert each; deletes for merged-away ids."""
    conn.execute(
        "INSERT INTO customer_attributes (customer_entity_id, identifiers, attributes, "
        "modified, calculated, first_event_time, first_event_id, version) "
        "SELECT 'e' || g, ARRAY['email:u' || g || '@x', 'cookie:c' || g], "
        "jsonb_build_object('orders', g %% 17, "
        " 'tier', (ARRAY['gold','silver','bronze'])[g %% 3 + 1],"
        " 'revenue', (g %% 1000) * 1.5, 'last_seen', '2026-01-01T00:00:00Z', "
        " 'tags', jsonb_build_array('a' || g %% 5, 'b' || g %% 7)), "
        "now(), now(), now(), 'ev' || g, nextval('cdp_ps.entity_version_seq') "
        "FROM generate_series(1, %(n)s) AS g",
        {"n": entities},
    )
    conn.execute(
        "INSERT INTO cdp_attr.outbox (entity_id, op, version) "
        "SELECT customer_entity_id, 'upsert', version FROM customer_attributes "
        "ORDER BY customer_entity_id"
    )
    deletes = int(entities * delete_share)
    conn.execute(  # ids merged away earlier: their documents must go
        "INSERT INTO cdp_attr.outbox (entity_id, op, version) "
        "SELECT 'm' || g, 'delete', nextval('cdp_ps.entity_version_seq') "
        "FROM generate_series(1, %(n)s) AS g",
        {"n": deletes},
    )
    return entities + deletes


def raw_bulk(
    client: OpenSearch, index: str, docs: list[dict[str, Any]], deletes: list[str], batch: int
) -> float:
    """Seconds to send the relay's op mix (index every doc, then the deletes) with versioned
    bulk requests of the same size, straight from memory."""
    ops: list[tuple[str, dict[str, Any] | None]] = [(d["customer_entity_id"], d) for d in docs]
    ops += [(entity_id, None) for entity_id in deletes]
    started = time.perf_counter()
    for i in range(0, len(ops), batch):
        body: list[dict[str, Any]] = []
        for n, (entity_id, doc) in enumerate(ops[i : i + batch], start=i + 1):
            meta = {"_index": index, "_id": entity_id, "version": n, "version_type": "external_gte"}
            body.append({"index" if doc is not None else "delete": meta})
            if doc is not None:
                body.append(doc)
        response = client.bulk(body=body)
        if any(
            item[next(iter(item))].get("status", 500) >= 300
            and item[next(iter(item))].get("status") != 404
            for item in response["items"]
        ):
            raise SystemExit("raw bulk baseline had item errors")
    return time.perf_counter() - started


def relay_round(
    conn: psycopg.Connection[Any], settings: config.Settings, index: str, commands: int
) -> float:
    """Seconds for a fresh relay to drain every command into a fresh index."""
    conn.execute("UPDATE cdp_attr.outbox SET delivered = NULL, attempts = 0")
    relay = Relay(settings.replace(**{"opensearch.index": index}))
    relay.ensure_index(conn)
    started = time.perf_counter()
    delivered = 0
    while n := relay.run_once(conn):
        delivered += n
    elapsed = time.perf_counter() - started
    if delivered != commands:
        raise SystemExit(f"relay delivered {delivered} of {commands} commands")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--entities", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--deletes", type=float, default=0.1, help="share of entities deleted")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="a PostgreSQL server to use (a database is created)")
    parser.add_argument("--opensearch-url", help="a running OpenSearch")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stream-cps-bench-outbox-"))
    server = None if args.dsn else embedded.start(workdir / "pg")
    admin_dsn = args.dsn or (server.dsn if server else "")
    service = None if args.opensearch_url else opensearch_service
    node = service.start(workdir / "os") if service else None
    url = args.opensearch_url or (node.url if node else "")
    dbname = "bench_" + uuid.uuid4().hex[:8]
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{dbname}"')
        dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=dbname)
        suffix = uuid.uuid4().hex[:8]
        settings = config.load(
            flags={
                "dsn": dsn,
                "opensearch.url": url,
                "opensearch.batch_size": args.batch_size,
                "opensearch.replicas": 0,
            },
            environ={},
        )
        baseline_settings = settings
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, settings.schemas)
            commands = seed(conn, args.entities, args.deletes)
            rows = conn.execute(
                "SELECT customer_entity_id, identifiers, attributes, calculated "
                "FROM customer_attributes"
            ).fetchall()
            docs = [
                {
                    "customer_entity_id": r[0],
                    "identifiers": r[1],
                    "attributes": json.loads(json.dumps(r[2])),
                    "calculated": r[3].isoformat(),
                }
                for r in rows
            ]
            deletes = [
                r[0]
                for r in conn.execute(
                    "SELECT entity_id FROM cdp_attr.outbox WHERE op = 'delete' ORDER BY seq"
                ).fetchall()
            ]
            client = OpenSearch(hosts=[url], timeout=60)
            warm = baseline_settings.replace(**{"opensearch.index": f"bench-warm-{suffix}"})
            ensure_index(warm, client)
            raw_bulk(client, warm.opensearch.index, docs, deletes, args.batch_size)  # JIT
            client.indices.delete(index=warm.opensearch.index)
            raw_s, relay_s = [], []
            for n in range(args.rounds):  # alternate, so drift and neighbours hit both alike
                raw = baseline_settings.replace(**{"opensearch.index": f"bench-raw-{suffix}-{n}"})
                ensure_index(raw, client)
                raw_s.append(raw_bulk(client, raw.opensearch.index, docs, deletes, args.batch_size))
                client.indices.delete(index=raw.opensearch.index)
                relay_s.append(relay_round(conn, settings, f"bench-relay-{suffix}-{n}", commands))
                client.indices.delete(index=f"bench-relay-{suffix}-{n}")
        raw_rate = commands / statistics.median(raw_s)
        relay_rate = commands / statistics.median(relay_s)
        ratios = sorted(r / q for r, q in zip(raw_s, relay_s, strict=True))
        print(
            f"batch size {args.batch_size}, {commands} commands ({len(deletes)} deletes), "
            f"{args.rounds} rounds, medians"
        )
        print(
            f"raw bulk API (external_gte): {raw_rate:,.0f} ops/s "
            f"(s: {', '.join(f'{x:.2f}' for x in raw_s)})"
        )
        print(
            f"outbox relay: {relay_rate:,.0f} commands/s "
            f"(s: {', '.join(f'{x:.2f}' for x in relay_s)})"
        )
        print(
            f"relay / raw bulk: {relay_rate / raw_rate:.2f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    finally:
        if service is not None:
            service.stop(workdir / "os")
        if server is not None:
            embedded.destroy(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
