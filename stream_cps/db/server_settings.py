"""PostgreSQL settings that make stitching slow as the database grows (docs/benchmarks.md).

Measured with bench/scale.py: on PostgreSQL's defaults (shared_buffers 128 MB, max_wal_size
1 GB, checkpoint_timeout 5 min) the per-event cost of a burst into a grown database was 2-4x
that into an empty one; checkpoints every few seconds (each first touch of a page after one
writes the whole page to WAL) and the hot indexes outgrowing the buffer cache are the cause.
``init`` logs a warning per setting below these floors and ``status`` shows them; nothing is
refused.
"""

from __future__ import annotations

from typing import Any

import psycopg

# (setting, floor in bytes or seconds, the floor as postgresql.conf writes it, why)
FLOORS: tuple[tuple[str, float, str, str], ...] = (
    ("shared_buffers", 512 * 2**20, "512MB", "the identifier indexes stop fitting in memory"),
    ("max_wal_size", 4 * 2**30, "4GB", "checkpoints come every few seconds under a backlog"),
    ("checkpoint_timeout", 600, "10min", "frequent checkpoints rewrite whole pages to WAL"),
)


def slow_settings(conn: psycopg.Connection[Any]) -> list[str]:
    """One warning line per setting that will make stitching slow."""
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
    return warnings
