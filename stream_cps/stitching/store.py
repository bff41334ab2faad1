"""All SQL of the stitching state: read what a batch touches, write what its plan decided.

Every statement is set-based (arrays in, one round trip per step) and is meant to stay in the
subset CockroachDB also speaks (unnest, ON CONFLICT, RETURNING, nextval, FOR UPDATE OF,
clock_timestamp, array casts); that is documented, not verified here (no CockroachDB server).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from stream_cps import telemetry
from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray, array_texts
from stream_cps.db.timestamps import fetch_all
from stream_cps.stitching.grouping import BatchPlan, EventKey, StitchEvent
from stream_cps.stitching.rules import RuleFailure


@dataclass(frozen=True)
class EventMarks:
    """The parameters of marking a batch's events stitched, built ahead of the transaction."""

    ids: list[str]
    literals: list[str]  # each event's identifiers as array text (ragged: one text per event)

    @classmethod
    def of(cls, events: Iterable[StitchEvent]) -> EventMarks:
        batch = list(events)
        return cls([ev.id for ev in batch], array_texts([ev.identifiers for ev in batch]))


@dataclass(frozen=True)
class Written:
    """What one batch changed, for progress lines and metrics."""

    events: int
    created: int
    merged: int
    absorbed: int


class StitchStore:
    """SQL for one configured set of schemas."""

    def __init__(self, schemas: Schemas, outbox: bool = True) -> None:
        self.outbox = outbox  # False: no relay will deliver commands (opensearch.outbox)
        ids = {
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "ce": sql.Identifier(schemas.ce, "customer_events"),
            "ie": sql.Identifier(schemas.ps, "identifier_entities"),
            "al": sql.Identifier(schemas.ps, "entity_aliases"),
            "err": sql.Identifier(schemas.ps, "stitching_errors"),
            "seq": sql.Literal(sql.Identifier(schemas.ps, "entity_version_seq").as_string()),
            "outbox": sql.Identifier(schemas.attr, "outbox"),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        self.count_waiting = q(
            "SELECT count(*) FROM (SELECT 1 FROM {ce} WHERE stitched IS NULL LIMIT %(cap)s) w"
        )
        self.has_purge = q("SELECT EXISTS (SELECT 1 FROM {ca} WHERE modified IS NULL)")
        self.has_work = q(
            "SELECT EXISTS (SELECT 1 FROM {ce} WHERE stitched IS NULL) "
            "OR EXISTS (SELECT 1 FROM {ca} WHERE modified IS NULL)"
        )
        self.purge_entities = q(
            "DELETE FROM {ca} WHERE modified IS NULL RETURNING customer_entity_id, identifiers"
        )
        self.reset_orphans = q(
            "UPDATE {ce} SET stitched = NULL, identifiers = NULL "
            "WHERE identifiers && %(idents)b::text[] AND stitched IS NOT NULL"
        )
        self.free_identifiers = q("DELETE FROM {ie} WHERE entity_id = ANY(%(ids)b)")
        self.outbox_deletes = q(
            # The writing span's traceparent: the relay links its delivery to this batch.
            "INSERT INTO {outbox} (entity_id, op, version, traceparent) "
            "SELECT id, 'delete', nextval({seq}), %(trace)s::text "
            "FROM unnest(%(ids)b::text[]) AS d(id)"
        )
        # Locks the touched entities in id order (lockers cannot deadlock on each other).
        self.lock_lookup = q(
            "SELECT ie.identifier, ie.entity_id, ca.first_event_time, ca.first_event_id "
            "FROM {ie} ie JOIN {ca} ca ON ca.customer_entity_id = ie.entity_id "
            "WHERE ie.identifier = ANY(%(idents)b) ORDER BY ca.customer_entity_id "
            "FOR UPDATE OF ca"
        )
        self.absorb = q(
            "DELETE FROM {ca} WHERE customer_entity_id = ANY(%(old)b) "
            "RETURNING customer_entity_id, identifiers"
        )
        self.repoint = q(
            "UPDATE {ie} AS ie SET entity_id = m.new_id "
            "FROM unnest(%(old)b::text[], %(new)b::text[]) AS m(old_id, new_id) "
            "WHERE ie.entity_id = m.old_id"
        )
        self.alias_insert = q(
            "INSERT INTO {al} (old_id, new_id, reason) "
            "SELECT * FROM unnest(%(old)b::text[], %(new)b::text[], %(why)b::text[]) "
            "ON CONFLICT (old_id) DO UPDATE SET new_id = excluded.new_id, "
            "reason = excluded.reason, created = now()"
        )
        self.alias_compress = q(
            "UPDATE {al} AS al SET new_id = m.new_id "
            "FROM unnest(%(old)b::text[], %(new)b::text[]) AS m(old_id, new_id) "
            "WHERE al.new_id = m.old_id"
        )
        # A join, not ``= ANY``: on a small aliases table the planner picks a sequential scan
        # and tests every row against the whole array (44 ms per 5,000-entity batch).
        self.alias_live = q(
            "DELETE FROM {al} AS al USING unnest(%(ids)b::text[]) AS d(id) WHERE al.old_id = d.id"
        )
        self.claim = q(
            "INSERT INTO {ie} (identifier, entity_id) "
            "SELECT * FROM unnest(%(idents)b::text[], %(owners)b::text[]) "
            "ON CONFLICT (identifier) DO UPDATE SET entity_id = excluded.entity_id"
        )
        # modified is the statement's clock, not the transaction's start: when this batch had
        # to wait for a calculation's row lock, the change must still sort after that
        # calculation's ``calculated``, or the entity would not be due again.
        # Identifier sets travel as array literals (one text per entity or event): ragged
        # arrays cannot be passed as one parameter, and this avoids a GROUP BY per batch.
        # An entity's added identifiers are disjoint from its own (an identifier has one owner),
        # so concatenation is a union; re-sorting keeps the arrays independent of arrival order.
        self.upsert_entities = q(
            "INSERT INTO {ca} AS ca (customer_entity_id, identifiers, modified, "
            "first_event_time, first_event_id, version) "
            "SELECT k.id, k.idents::text[], clock_timestamp(), k.t, k.e, nextval({seq}) "
            "FROM unnest(%(ids)b::text[], %(idents)b::text[], %(times)b::timestamptz[], "
            "%(firsts)b::text[]) AS k(id, idents, t, e) "
            "ON CONFLICT (customer_entity_id) DO UPDATE SET "
            "identifiers = CASE WHEN cardinality(excluded.identifiers) = 0 THEN ca.identifiers "
            "ELSE ARRAY(SELECT x FROM unnest(ca.identifiers || excluded.identifiers) AS u(x) "
            "ORDER BY x) END, "
            "modified = clock_timestamp(), first_event_time = excluded.first_event_time, "
            "first_event_id = excluded.first_event_id, version = excluded.version"
        )
        # Returns the oldest marked event's wait since its insert (the latency metric).
        self.mark_events = q(
            "WITH m AS (UPDATE {ce} AS ev SET stitched = clock_timestamp(), "
            "identifiers = k.idents::text[] "
            "FROM unnest(%(ids)b::text[], %(idents)b::text[]) AS k(id, idents) WHERE ev.id = k.id "
            "RETURNING ev.stitched, ev.created) "
            "SELECT extract(epoch FROM max(stitched - created))::float8 FROM m"
        )
        self.record_errors = q(
            "INSERT INTO {err} (attribute_id, event_id, message) "
            "SELECT * FROM unnest(%(attrs)b::text[], %(events)b::text[], %(msgs)b::text[])"
        )

    # -- purge -------------------------------------------------------------------------------

    def purge(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Delete entities whose ``modified`` was set to NULL, free their identifiers and queue
        OpenSearch deletes (the guide's clean-up routine).

        Every event of a deleted entity that is still stitched is reset for the sweep: an
        event never stays stitched inside no entity. The guide's restitch-one script resets
        the events its statement's snapshot saw; one the stitcher added to the entity just
        after that snapshot (before the script locked the row) was missed, and a later event
        with the same identifier then founded a second entity."""
        rows = conn.execute(self.purge_entities).fetchall()
        ids = [r[0] for r in rows]
        if ids:
            idents = sorted({i for r in rows for i in r[1] or ()})
            if idents:
                conn.execute(self.reset_orphans, {"idents": TextArray(idents)})
            conn.execute(self.free_identifiers, {"ids": TextArray(ids)})
            if self.outbox:
                conn.execute(
                    self.outbox_deletes, {"ids": TextArray(ids), "trace": telemetry.traceparent()}
                )
        return ids

    def waiting(self, conn: psycopg.Connection[Any], cap: int) -> int:
        """Events not stitched yet, counted up to ``cap`` (the partial index on unstitched
        rows: an index-only scan of at most ``cap`` entries)."""
        row = conn.execute(self.count_waiting, {"cap": cap}).fetchone()
        return int(row[0]) if row else 0

    def pending_purge(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute(self.has_purge).fetchone()
        return bool(row and row[0])

    def pending_work(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether a sweep would find anything: an unstitched row or a purge signal."""
        row = conn.execute(self.has_work).fetchone()
        return bool(row and row[0])

    # -- read --------------------------------------------------------------------------------

    def lock_owners(
        self, conn: psycopg.Connection[Any], identifiers: list[str]
    ) -> tuple[dict[str, str], dict[str, EventKey]]:
        """Lock the entities owning ``identifiers``; return each identifier's entity and each
        entity's first event key.

        Called before purge signals are read: a purge committed later waits for this batch.
        """
        owner: dict[str, str] = {}
        keys: dict[str, EventKey] = {}
        if not identifiers:
            return owner, keys
        # first_event_time of an entity founded by an out-of-range event is the clamped end of
        # datetime's range, which a session time zone east of UTC shows as year 10000.
        for ident, entity, first_time, first_id in fetch_all(
            conn, self.lock_lookup, {"idents": TextArray(identifiers)}
        ):
            owner[ident] = entity
            keys[entity] = (first_time, first_id)
        return owner, keys

    # -- write -------------------------------------------------------------------------------

    def mark(
        self, conn: psycopg.Connection[Any], marks: EventMarks, failures: list[RuleFailure]
    ) -> psycopg.Cursor[Any] | None:
        """Mark events stitched with their identifiers; record the rule failures met. The
        cursor returned gives the oldest event's wait in seconds (fetched after a pipeline)."""
        marked = None
        if marks.ids:
            marked = conn.execute(
                self.mark_events,
                {"ids": TextArray(marks.ids), "idents": TextArray(marks.literals)},
            )
        if failures:
            conn.execute(
                self.record_errors,
                {
                    "attrs": [f.attribute_id for f in failures],
                    "events": [f.event_id for f in failures],
                    "msgs": [f.message for f in failures],
                },
            )
        return marked

    def write(self, conn: psycopg.Connection[Any], plan: BatchPlan, events: int) -> Written:
        """Apply a plan: absorb, claim identifiers, upsert survivors."""
        old, new, why = [], [], []
        for comp in plan.components:
            for absorbed in comp.absorbed:
                old.append(absorbed)
                new.append(comp.entity_id)
                why.append(comp.absorb_reason)
        absorbed_identifiers: dict[str, list[str]] = {}
        if old:
            for entity, idents in conn.execute(self.absorb, {"old": TextArray(old)}).fetchall():
                absorbed_identifiers[entity] = list(idents)
            conn.execute(self.repoint, {"old": TextArray(old), "new": TextArray(new)})
            conn.execute(self.alias_compress, {"old": TextArray(old), "new": TextArray(new)})
            conn.execute(
                self.alias_insert,
                {"old": TextArray(old), "new": TextArray(new), "why": TextArray(why)},
            )
            if self.outbox:
                conn.execute(
                    self.outbox_deletes, {"ids": TextArray(old), "trace": telemetry.traceparent()}
                )

        claim_idents, claim_owners = [], []
        ids, added, times, firsts = [], [], [], []
        for comp in plan.components:
            for ident in sorted(comp.new_identifiers):
                claim_idents.append(ident)
                claim_owners.append(comp.entity_id)
            new_to_entity = set(comp.new_identifiers)
            for absorbed in comp.absorbed:
                new_to_entity.update(absorbed_identifiers.get(absorbed, ()))
            if comp.entity_id not in comp.existing:
                new_to_entity.update(comp.event_identifiers)
            ids.append(comp.entity_id)
            added.append(sorted(new_to_entity))
            times.append(comp.first_key[0])
            firsts.append(comp.first_key[1])
        if claim_idents:
            conn.execute(
                self.claim,
                {"idents": TextArray(claim_idents), "owners": TextArray(claim_owners)},
            )
        if ids:
            conn.execute(self.alias_live, {"ids": TextArray(ids)})
            conn.execute(
                self.upsert_entities,
                {
                    "ids": TextArray(ids),
                    "idents": TextArray(array_texts(added)),
                    "times": times,
                    "firsts": TextArray(firsts),
                },
            )
        return Written(events, plan.created, plan.merges, len(old))
