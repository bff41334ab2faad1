"""PostgreSQL settings that make stitching slow as the database grows (docs/benchmarks.md).

Measured with bench/scale.py: on PostgreSQL's defaults (shared_buffers 128 MB, max_wal_size
1 GB, checkpoint_timeout 5 min) the per-event cost of a burst into a grown database was 2-4x
that into an empty one; checkpoints every few seconds (each first touch of a page after one
writes the whole page to WAL) and the hot indexes outgrowing the buffer cache are the cause.
The database's collation is checked too: under a locale-aware one (libc other than C/POSIX,
ICU) every comparison in the text indexes (event ids, identifiers, entity ids) is a locale
comparison, not a byte comparison, and stitching was 6-10% slower in bench/stitch.py even
with libc's C.UTF-8. ``init`` logs a warning per finding and ``status`` shows them; nothing is
refused.
"""

from __future__ import annotations

from typing import Any

import psycopg

from stream_cps.db.connect import is_cockroach

# (setting, floor in bytes or seconds, the floor as postgresql.conf writes it, why)
FLOORS: tuple[tuple[str, float, str, str], ...] = (
    ("shared_buffers", 512 * 2**20, "512MB", "the identifier indexes stop fitting in memory"),
    ("max_wal_size", 4 * 2**30, "4GB", "checkpoints come every few seconds under a backlog"),
    ("checkpoint_timeout", 600, "10min", "frequent checkpoints rewrite whole pages to WAL"),
)


def slow_settings(conn: psycopg.Connection[Any]) -> list[str]:
    """One warning line per setting (and for the database's collation) that will make
    stitching slow."""
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
    collation = slow_collation(conn)
    if collation is not None:
        warnings.append(collation)
    return warnings


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
