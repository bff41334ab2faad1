"""Calculate and store the attributes of one batch of due entities.

One READ COMMITTED transaction per batch:

1. the batch's events go into a temporary table (one GIN-indexed join for all entities);
2. inside a read-only, time-limited savepoint every attribute is computed for the whole batch,
   all in one statement; only when that fails, attribute by attribute, and only for a failing
   attribute, entity by entity;
3. the savepoint is rolled back (it wrote nothing that must stay) and the results are stored
   with ``WHERE modified = <the value read>``, so an entity the stitcher changed meanwhile stays
   due; each stored entity gets a new version and an outbox ``upsert`` in the same transaction.
   ``calculated`` is ``greatest(now(), modified read)``: the stitcher stamps ``modified`` with
   ``clock_timestamp()``, which can be later than this transaction's start even for the change
   we computed, and that entity must not look due again.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from stream_cps import telemetry
from stream_cps.attributes.compiler import EVENTS, EVENTS_TABLE, CompiledAttribute
from stream_cps.attributes.plan import Plan
from stream_cps.attributes.statement import statement
from stream_cps.config import Schemas
from stream_cps.db import roles, sandbox
from stream_cps.errors import Stopped

log = logging.getLogger(__name__)

# After this many entities in a row time out on one attribute, the rest of the batch is
# reported as timed out without trying: a definition slow for everyone must not cost
# batch_size x statement_timeout.
MAX_TIMEOUTS_IN_A_ROW = 3


@dataclass(frozen=True)
class Failure:
    """An attribute that could not be computed; ``entity_id`` None means the whole batch."""

    attribute_id: str
    entity_id: str | None
    message: str


@dataclass
class BatchOutcome:
    picked: int
    stored: int
    failures: list[Failure] = field(default_factory=list)


@dataclass
class _Results:
    # JSON object texts per entity: usually one (the fast path), merged only when isolating
    values: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    failures: list[Failure] = field(default_factory=list)


SESSION_ENDED = (
    "its SQL ended the database session twice in a row; skipped until the definitions change"
)

# What is stored for one entity: (id, modified read, attributes JSON, event count, kept ids)
_Row = tuple[str, datetime, str, int, str | None]

# One store statement carries at most this much attribute JSON: a jsonb array is limited to
# 256 MB, and a batch of entities each near ``max_value_bytes`` must still be stored.
STORE_CHUNK_BYTES = 32 * 1024 * 1024


def _chunks(
    rows: list[_Row],
) -> list[list[_Row]]:
    """``rows`` in order, cut so that no chunk's JSON is over ``STORE_CHUNK_BYTES``."""
    chunks: list[list[_Row]] = [[]]
    size = 0
    for row in rows:
        if chunks[-1] and size + len(row[2]) > STORE_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += len(row[2])
    return [chunk for chunk in chunks if chunk]


def _merge(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    merged: dict[str, Any] = {}
    for text in texts:
        merged.update(json.loads(text))
    return json.dumps(merged)


class BatchCalculator:
    """Computes and stores one batch; remembers which attributes need running on their own."""

    def __init__(
        self, schemas: Schemas, timeout_ms: int, max_value_bytes: int, outbox: bool = True
    ) -> None:
        self._schemas = schemas
        self._outbox = outbox  # False: no relay will deliver commands (opensearch.outbox)
        self._timeout_ms = timeout_ms
        self._max_value_bytes = max_value_bytes
        self._alone: set[str] = set()
        # attributes in a statement that ended the session, and those that did it alone
        self._suspects: set[str] = set()
        self._killers: set[str] = set()
        self._reported: set[tuple[str, str]] = set()
        self._plan_key: str | None = None
        self._batch_len = 0
        self.stopping = False  # set on stop: no further admin statement is started

    def run(
        self,
        conn: psycopg.Connection[Any],
        plan: Plan,
        entities: Sequence[tuple[str, datetime]],
        large: bool = False,
    ) -> BatchOutcome:
        """Calculate ``entities`` (id, modified read) inside the caller's transaction;
        ``large``: entities with very many identifiers (their events are found identifier by
        identifier)."""
        if plan.fingerprint != self._plan_key:  # new definitions: give every one a fresh try
            self._alone = set()
            self._suspects = set()
            self._killers = set()
            self._reported = set()
            self._plan_key = plan.fingerprint
        ids = [entity_id for entity_id, _ in entities]
        self._batch_len = len(ids)
        self._ensure_events_table(conn)
        # our own statements run outside the sandbox: its timeout is for admin-written SQL
        self._load_events(conn, ids, large)
        counts = dict(
            conn.execute(
                sql.SQL("SELECT entity_id, count(*)::int FROM {} GROUP BY entity_id").format(EVENTS)
            ).fetchall()
        )
        with sandbox.read_only(conn, self._timeout_ms, roles.ATTRIBUTES):
            results = self._compute(conn, plan.attributes, ids)
        stored = self._store(conn, entities, counts, results, plan.invalid_ids)
        self._record(conn, results.failures)
        return BatchOutcome(len(entities), stored, results.failures)

    # -- computing -----------------------------------------------------------------------------

    def _compute(
        self, conn: psycopg.Connection[Any], attrs: Sequence[CompiledAttribute], ids: list[str]
    ) -> _Results:
        results = _Results()
        for attr in attrs:
            if attr.attribute_id in self._killers:
                self._fail_everywhere(results, attr.attribute_id, ids, SESSION_ENDED)
        attrs = [a for a in attrs if a.attribute_id not in self._killers]
        single = self._alone | self._suspects
        together = [a for a in attrs if a.attribute_id not in single]
        alone = [a for a in attrs if a.attribute_id in single]
        if together:
            rows = self._fetch(conn, together, ids)
            if isinstance(rows, sandbox.SqlFailure):
                log.info("fast path failed (%s); isolating attributes", rows.message)
                alone = together + alone
            else:
                self._collect(results, rows)
        for attr in alone:
            self._compute_alone(conn, attr, ids, results)
        return results

    def _compute_alone(
        self,
        conn: psycopg.Connection[Any],
        attr: CompiledAttribute,
        ids: list[str],
        results: _Results,
    ) -> None:
        rows = self._fetch(conn, [attr], ids)
        if not isinstance(rows, sandbox.SqlFailure):
            self._collect(results, rows)
            return
        self._alone.add(attr.attribute_id)
        aid = attr.attribute_id
        if rows.definition_level:
            self._fail_everywhere(results, aid, ids, rows.message)
            return
        if len(ids) == 1:  # a data error of a one-entity batch names that entity
            results.failed[aid].update(ids)
            results.failures.append(Failure(aid, ids[0], rows.message))
            return
        timeouts = 0
        for position, entity_id in enumerate(ids):
            one = self._fetch(conn, [attr], [entity_id])
            if not isinstance(one, sandbox.SqlFailure):
                timeouts = 0
                self._collect(results, one)
                continue
            results.failures.append(Failure(aid, entity_id, one.message))
            results.failed[aid].add(entity_id)
            timeouts = timeouts + 1 if one.timeout else 0
            if timeouts >= MAX_TIMEOUTS_IN_A_ROW:
                for rest in ids[position + 1 :]:
                    results.failures.append(Failure(aid, rest, one.message + " (not retried)"))
                    results.failed[aid].add(rest)
                return

    def _fail_everywhere(self, results: _Results, aid: str, ids: list[str], message: str) -> None:
        """SQL that is wrong whatever the data: failed for the whole batch, reported once per
        definition (entity NULL), not per batch or entity."""
        results.failed[aid].update(ids)
        if (aid, message) not in self._reported:
            self._reported.add((aid, message))
            results.failures.append(Failure(aid, None, message))

    def _fetch(
        self, conn: psycopg.Connection[Any], attrs: Sequence[CompiledAttribute], ids: list[str]
    ) -> list[tuple[Any, ...]] | sandbox.SqlFailure:
        query, params = statement(attrs, self._max_value_bytes)
        params["ids"] = ids
        params["whole"] = len(ids) == self._batch_len
        if self.stopping:
            raise Stopped()
        try:
            rows = sandbox.fetch(conn, query, params)
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._session_ended([a.attribute_id for a in attrs])
            raise
        if self.stopping:  # cancelled on stop: not a failure of the definition
            raise Stopped()
        for attr in attrs:
            self._suspects.discard(attr.attribute_id)
        return rows

    def _session_ended(self, attribute_ids: list[str]) -> None:
        """The connection died inside admin SQL (``pg_terminate_backend``, or a restart of
        the database). The batch is retried after the reconnect with these attributes run one
        by one; one that ends the session again on its own is skipped, reported once, until
        the definitions change, so one definition cannot stop every calculation for good."""
        if len(attribute_ids) == 1 and attribute_ids[0] in self._suspects:
            self._killers.add(attribute_ids[0])
            log.error("attribute %s: %s", attribute_ids[0], SESSION_ENDED)
        self._suspects.update(attribute_ids)

    def _collect(self, results: _Results, rows: list[tuple[Any, ...]]) -> None:
        for entity_id, values, over in rows:
            results.values[entity_id].append(values)
            for aid in over or ():
                results.failed[aid].add(entity_id)
                results.failures.append(
                    Failure(
                        aid,
                        entity_id,
                        f"value larger than attributes.max_value_bytes "
                        f"({self._max_value_bytes} bytes); previous value kept",
                    )
                )

    # -- events table --------------------------------------------------------------------------

    def _ensure_events_table(self, conn: psycopg.Connection[Any]) -> None:
        """Created once per session, outside the read-only savepoint (DDL is refused there).

        ON COMMIT DELETE ROWS truncates it in place at every commit: the rows each batch
        inserts (and rolls back with the savepoint) never pile up as dead tuples, which no
        autovacuum would clean in a temporary table. Entity and event ids use the "C" collation:
        they are grouped and sorted a lot, and byte order is all they need.
        """
        found = conn.execute("SELECT to_regclass(%s)", [f"pg_temp.{EVENTS_TABLE}"]).fetchone()
        if found and found[0] is not None:
            return
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE {name} ON COMMIT DELETE ROWS AS SELECT "
                '\'\'::text COLLATE "C" AS entity_id, id::text COLLATE "C" AS id, '
                "source_id, type, version, event_time, payload FROM {ce} WITH NO DATA"
            ).format(
                name=sql.Identifier(EVENTS_TABLE),
                ce=sql.Identifier(self._schemas.ce, "customer_events"),
            )
        )
        conn.execute(sql.SQL("CREATE INDEX ON {} (entity_id)").format(sql.Identifier(EVENTS_TABLE)))
        # the batch's own events are all the sandbox role may read
        conn.execute(
            sql.SQL("GRANT SELECT ON {} TO {}").format(EVENTS, sql.Identifier(roles.ATTRIBUTES))
        )

    def _load_events(
        self, conn: psycopg.Connection[Any], ids: list[str], large: bool = False
    ) -> None:
        """The entities' events into the temporary table, by one GIN-indexed overlap join.

        ``&&`` compares every element of one array with every element of the other, so for an
        entity of 50,000 identifiers and as many events it costs 2.5e9 comparisons (132 s): a
        large entity's events are found identifier by identifier instead (one index lookup
        each, then each event once)."""
        if large:
            query = (
                "INSERT INTO {events} SELECT DISTINCT ON (e.id) ca.customer_entity_id, e.id, "
                "e.source_id, e.type, e.version, e.event_time, e.payload FROM {ca} AS ca "
                "CROSS JOIN LATERAL unnest(ca.identifiers) AS i(identifier) JOIN {ce} AS e "
                "ON e.identifiers @> ARRAY[i.identifier] WHERE ca.customer_entity_id = ANY(%s) "
                "ORDER BY e.id"
            )
        else:
            query = (
                "INSERT INTO {events} SELECT ca.customer_entity_id, e.id, e.source_id, e.type, "
                "e.version, e.event_time, e.payload FROM {ca} AS ca JOIN {ce} AS e "
                "ON e.identifiers && ca.identifiers WHERE ca.customer_entity_id = ANY(%s)"
            )
        conn.execute(
            sql.SQL(query).format(
                events=EVENTS,
                ca=sql.Identifier(self._schemas.cdp, "customer_attributes"),
                ce=sql.Identifier(self._schemas.ce, "customer_events"),
            ),
            [ids],
        )

    # -- storing -------------------------------------------------------------------------------

    def _store(
        self,
        conn: psycopg.Connection[Any],
        entities: Sequence[tuple[str, datetime]],
        counts: dict[str, int],
        results: _Results,
        invalid_ids: Sequence[str],
    ) -> int:
        """Write what was computed; failed and invalid attributes keep their previous value."""
        failed_by_entity: dict[str, list[str]] = defaultdict(list)
        for aid, entity_ids in results.failed.items():
            for entity_id in entity_ids:
                failed_by_entity[entity_id].append(aid)
        # Lock in id order, skipping rows the stitcher holds: it locks in id order too, so the
        # two never deadlock (a deadlock costs deadlock_timeout, 1 s, of stitching latency),
        # and a skipped entity is being changed anyway, so it stays due.
        free = {
            row[0]
            for row in conn.execute(
                sql.SQL(
                    "SELECT customer_entity_id FROM {} WHERE customer_entity_id = ANY(%s) "
                    "ORDER BY 1 FOR UPDATE SKIP LOCKED"
                ).format(sql.Identifier(self._schemas.cdp, "customer_attributes")),
                [[entity_id for entity_id, _ in entities]],
            )
        }
        rows: list[_Row] = []
        for entity_id, read_modified in entities:
            if entity_id not in free:
                continue
            kept = [*invalid_ids, *failed_by_entity.get(entity_id, ())]
            rows.append(
                (
                    entity_id,
                    read_modified,
                    _merge(results.values.get(entity_id, [])),
                    counts.get(entity_id, 0),
                    chr(31).join(kept) if kept else None,
                )
            )
        return sum(self._store_chunk(conn, chunk) for chunk in _chunks(rows))

    def _store_chunk(
        self,
        conn: psycopg.Connection[Any],
        rows: Sequence[_Row],
    ) -> int:
        update = sql.SQL(
            "UPDATE {ca} AS ca SET attributes = CASE WHEN r.keep_csv IS NULL "
            "THEN r.attrs ELSE r.attrs || coalesce(("
            "SELECT jsonb_object_agg(k, ca.attributes -> k) "
            "FROM unnest(string_to_array(r.keep_csv, chr(31))) AS k "
            "WHERE ca.attributes ? k), '{{}}'::jsonb) END, "
            "calculated = greatest(now(), r.modified), customer_events_count = r.cnt, "
            "version = nextval({seq}::regclass) FROM r "
            "WHERE ca.customer_entity_id = r.id AND ca.modified = r.modified"
        )
        tail = (
            sql.SQL(
                ", u AS ({update} RETURNING ca.customer_entity_id, ca.version) "
                # The writing span's traceparent: the relay links its delivery to it.
                "INSERT INTO {outbox} (entity_id, op, version, traceparent) "
                "SELECT customer_entity_id, 'upsert', version, %(trace)s::text FROM u"
            )
            if self._outbox
            else sql.SQL(" {update}")
        )
        cur = conn.execute(
            sql.SQL(
                "WITH r AS (SELECT * FROM unnest(%(ids)s::text[], %(modified)s::timestamptz[], "
                "%(counts)s::int[], %(keep)s::text[]) WITH ORDINALITY "
                "AS r(id, modified, cnt, keep_csv, n) "
                "JOIN jsonb_array_elements(%(attrs)s::jsonb) WITH ORDINALITY AS a(attrs, n) "
                "USING (n)){tail}"
            ).format(
                tail=tail.format(
                    update=update.format(
                        ca=sql.Identifier(self._schemas.cdp, "customer_attributes"),
                        seq=sql.Literal(
                            sql.Identifier(self._schemas.ps, "entity_version_seq").as_string()
                        ),
                    ),
                    outbox=sql.Identifier(self._schemas.attr, "outbox"),
                )
            ),
            {
                "ids": [r[0] for r in rows],
                "modified": [r[1] for r in rows],
                # one JSON document: a text[] of JSON texts costs a regex escape per element
                "attrs": "[" + ",".join(r[2] for r in rows) + "]",
                "counts": [r[3] for r in rows],
                "keep": [r[4] for r in rows],
                "trace": telemetry.traceparent(),
            },
        )
        return cur.rowcount

    def _record(self, conn: psycopg.Connection[Any], failures: Sequence[Failure]) -> None:
        """Failures go to the log and to ``attribute_errors`` (users can query it)."""
        if not failures:
            return
        for f in failures[:20]:
            log.warning(
                "attribute %s failed%s: %s",
                f.attribute_id,
                f" for entity {f.entity_id}" if f.entity_id else "",
                f.message,
            )
        if len(failures) > 20:
            log.warning("... and %d more attribute failures in this batch", len(failures) - 20)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (attribute_id, customer_entity_id, message) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
            ).format(sql.Identifier(self._schemas.attr, "attribute_errors")),
            [
                [f.attribute_id for f in failures],
                [f.entity_id for f in failures],
                [f.message for f in failures],
            ],
        )
