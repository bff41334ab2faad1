"""All SQL of the outbox relay: the relay lock, pending commands, entities, outcomes.

Writers (stitching, purge, attribute calculation) insert commands in the transaction of the
change that causes them; only the relay reads and marks them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.sinks.commands import Command, Entity


class OutboxStore:
    """SQL for one configured set of schemas."""

    def __init__(self, schemas: Schemas) -> None:
        ids = {
            "outbox": sql.Identifier(schemas.attr, "outbox"),
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "attrs": sql.Identifier(schemas.cdp, "attributes"),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        # One relay delivers at a time (a session lock: held while its connection lives), so
        # commands for an entity never overtake each other and rows need no row locks.
        self.lock_key = zlib.crc32(f"stream-cps outbox relay {schemas.attr}".encode())
        self._lock = sql.SQL("SELECT pg_try_advisory_lock(%(key)s::bigint)")
        self._claim = q(
            "SELECT seq, entity_id, op, version, traceparent, "
            "extract(epoch FROM clock_timestamp() - created)::float8 FROM {outbox} "
            "WHERE delivered IS NULL AND NOT parked ORDER BY seq LIMIT %(limit)s"
        )
        self._entities = q(
            "SELECT customer_entity_id, identifiers, attributes, calculated, version "
            "FROM {ca} WHERE customer_entity_id = ANY(%(ids)s)"
        )
        self._mark = q(
            # A row that another relay delivered meanwhile (no real lock) stays delivered.
            "UPDATE {outbox} AS o SET attempts = o.attempts + 1, "
            "delivered = CASE WHEN r.outcome = 'delivered' THEN now() END, "
            "parked = (r.outcome = 'parked'), last_error = r.error "
            "FROM unnest(%(seqs)s::bigint[], %(outcomes)s::text[], %(errors)s::text[]) "
            "AS r(seq, outcome, error) WHERE o.seq = r.seq AND o.delivered IS NULL"
        )
        self._prune = q(
            # Looks only at the oldest delivered rows (primary key order): bounded work.
            "DELETE FROM {outbox} WHERE seq IN (SELECT seq FROM {outbox} "
            "WHERE delivered IS NOT NULL ORDER BY seq LIMIT %(limit)s) "
            "AND delivered < now() - make_interval(secs => %(seconds)s)"
        )
        self._attribute_types = q(
            "SELECT id, CASE WHEN data_type = 'int' AND definition->>'type' = 'avg' "
            "THEN 'float' ELSE data_type END FROM {attrs} WHERE definition IS NOT NULL"
        )
        self._pending = q("SELECT count(*) FROM {outbox} WHERE delivered IS NULL AND NOT parked")
        self._queue_all = q(
            "INSERT INTO {outbox} (entity_id, op, version) SELECT customer_entity_id, "
            "'upsert', version FROM {ca} WHERE calculated IS NOT NULL ORDER BY 1"
        )

    def queue_all(self, conn: psycopg.Connection[Any]) -> int:
        """An upsert for every calculated entity (``stream-cps reindex``): fills a new or
        emptied index, or one that missed commands nobody wrote (``opensearch.outbox``)."""
        return conn.execute(self._queue_all).rowcount

    def try_lock(self, conn: psycopg.Connection[Any]) -> bool:
        """Become the delivering relay for this connection's lifetime; False if another is."""
        row = conn.execute(self._lock, {"key": self.lock_key}).fetchone()
        return bool(row and row[0])

    def claim(self, conn: psycopg.Connection[Any], limit: int) -> list[Command]:
        """The oldest pending commands (call while holding the relay lock)."""
        rows = conn.execute(self._claim, {"limit": limit}).fetchall()
        return [Command(int(s), e, op, int(v), t, w) for s, e, op, v, t, w in rows]

    def entities(self, conn: psycopg.Connection[Any], ids: Iterable[str]) -> dict[str, Entity]:
        rows = conn.execute(self._entities, {"ids": sorted(set(ids))}).fetchall()
        return {r[0]: Entity(r[0], list(r[1]), dict(r[2] or {}), r[3], int(r[4])) for r in rows}

    def mark(
        self,
        conn: psycopg.Connection[Any],
        seqs: Sequence[int],
        outcomes: Sequence[str],
        errors: Sequence[str | None],
    ) -> None:
        """Record one outcome per command: 'delivered', 'parked' or 'pending' (retry later)."""
        if seqs:
            conn.execute(
                self._mark, {"seqs": list(seqs), "outcomes": list(outcomes), "errors": list(errors)}
            )

    def prune(self, conn: psycopg.Connection[Any], seconds: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` rows delivered more than ``seconds`` ago; return how many."""
        return conn.execute(self._prune, {"seconds": seconds, "limit": limit}).rowcount

    def attribute_types(self, conn: psycopg.Connection[Any]) -> dict[str, str]:
        """Calculated attribute id -> the JSON type its values have (an int average is not)."""
        return {r[0]: r[1] for r in conn.execute(self._attribute_types).fetchall()}

    def pending(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(self._pending).fetchone()
        return int(row[0]) if row else 0
