"""PostgreSQL settings that make stitching slow as the database grows (docs/benchmarks.md).

Measured with bench/scale.py: on PostgreSQL's defaults (shared_buffers 128 MB, max_wal_size
1 GB, checkpoint_timeout 5 min) the per-event cost of a burst into a grown database was 2-4x
that into an empty one; checkpoints every few seconds (each first touch of a page after one
writes the whole page to WAL) and the hot indexes outgrowing the buffer cache are the cause.
The database's collation is checked too: under a locale-aware one (libc other than C/POSIX,
ICU) every comparison in the text indexes (event ids, identifiers, entity ids) is a locale
comparison, not a byte comparison, and stitching was 6-10% slower in bench/stitch.py even
with libc's C.UTF-8. And shared_buffers is compared with what it has to hold: the tables every
batch probes at random (about 2 GB at 10M events). ``init`` logs a warning per finding and
``status`` shows them; nothing is refused.
"""

from __future__ import annotations

from typing import Any

import psycopg

from stream_cps.config import Schemas
from stream_cps.db.connect import is_cockroach

# (setting, floor in bytes or seconds, the floor as postgresql.conf writes it, why)
FLOORS: tuple[tuple[str, float, str, str], ...] = (
    ("shared_buffers", 512 * 2**20, "512MB", "the identifier indexes stop fitting in memory"),
    ("max_wal_size", 4 * 2**30, "4GB", "checkpoints come every few seconds under a backlog"),
    ("checkpoint_timeout", 600, "10min", "frequent checkpoints rewrite whole pages to WAL"),
)


def slow_settings(conn: psycopg.Connection[Any], schemas: Schemas) -> list[str]:
    """One warning line per setting (and for the database's collation, and a buffer cache
    smaller than the tables it must hold) that will make stitching slow."""
    rows = conn.execute(
        "SELECT name, setting::numeric * CASE unit WHEN '8kB' THEN 8192 WHEN 'kB' THEN 1024 "
        "WHEN 'MB' THEN 1048576 WHEN 'min' THEN 60 WHEN 'ms' THEN 0.001 ELSE 1 END, "
        "current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
        [[name for name, *_ in FLOORS]],
    ).fetchall()
    found = {name: (float(value), shown) for name, value, shown in rows}
    warnings = []
    for name, floor, wanted, why in FLOORS:
        if name in found and found[name][0] < floor:
            warnings.append(
                f"{name} is {found[name][1]} (at least {wanted} recommended): {why} "
                "(docs/benchmarks.md, 'PostgreSQL settings')"
            )
    for warning in (slow_collation(conn), outgrown_cache(conn, schemas)):
        if warning is not None:
            warnings.append(warning)
    return warnings


def hot_relations(schemas: Schemas) -> list[str]:
    """What every batch probes at random (the lock lookup, the entity upsert, the marking's
    GIN entries), with their indexes: at 10M events identifier_clusters 675 MB,
    customer_attributes 909 MB, the GIN index 389 MB. With shared_buffers of 2 GB the bench's
    bursts at 10M read almost nothing from outside it; with 128 MB the marking read 300,000
    blocks per 100,000 events (docs/benchmarks.md, 'PostgreSQL settings')."""
    names = [
        (schemas.ps, "identifier_clusters"),
        (schemas.cdp, "customer_attributes"),
        (schemas.ce, "customer_events_identifiers_idx"),
    ]
    return [f'"{schema}"."{name}"' for schema, name in names]


def outgrown_cache(conn: psycopg.Connection[Any], schemas: Schemas) -> str | None:
    """A warning when the hot tables are larger than shared_buffers, else None. The floor in
    ``FLOORS`` is for a small database; this one grows with the data."""
    if is_cockroach(conn):
        return None
    row = conn.execute(
        "SELECT current_setting('shared_buffers'), "
        "pg_size_bytes(current_setting('shared_buffers')), total, pg_size_pretty(total) "
        "FROM (SELECT sum(pg_total_relation_size(to_regclass(r))) AS total "
        "FROM unnest(%s::text[]) AS r) hot",
        [hot_relations(schemas)],
    ).fetchone()
    if row is None or row[2] is None or row[2] <= row[1]:
        return None
    return (
        f"shared_buffers is {row[0]}, less than the {row[3]} of identifier_clusters, "
        "customer_attributes and the identifiers GIN index, which every batch probes at "
        "random: their pages are read from outside the buffer cache (a restitch of everything "
        "wants about twice their size; docs/benchmarks.md, 'PostgreSQL settings')"
    )


# Collations whose comparisons are byte comparisons: libc's C and POSIX, and every locale of
# PostgreSQL 17's builtin provider (code point order).
_BYTE_ORDER_LIBC = frozenset({"C", "POSIX"})


def slow_collation(conn: psycopg.Connection[Any]) -> str | None:
    """A warning when the database compares text by locale rules, else None (CockroachDB
    has collations of its own, not PostgreSQL's catalog)."""
    if is_cockroach(conn):
        return None
    row = conn.execute(
        "SELECT to_jsonb(d) FROM pg_database d WHERE datname = current_database()"
    ).fetchone()
    if row is None:
        return None
    db: dict[str, Any] = row[0]
    provider = {"b": "builtin", "c": "libc", "i": "icu"}.get(db.get("datlocprovider", "c"), "?")
    if provider == "builtin" or (provider == "libc" and db.get("datcollate") in _BYTE_ORDER_LIBC):
        return None
    locale = db.get("datlocale") or db.get("daticulocale") or db.get("datcollate")
    return (
        f"the database's collation is {locale} ({provider}): every text index comparison "
        "(event ids, identifiers, entity ids) follows locale rules, which made stitching 6-10% "
        "slower even for libc's C.UTF-8; a database created with TEMPLATE template0 "
        "LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8' (PostgreSQL 17+) or LC_COLLATE 'C' "
        "compares bytes (docs/benchmarks.md, 'PostgreSQL settings')"
    )
