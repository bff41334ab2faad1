"""All SQL of split decisions: record, undo, the per-batch probe, and the dry run's read.

A decision is a row of ``split_decisions``; the stitcher reads the live ones that concern its
batch after it locked the batch's entities, ``FOR SHARE`` (as quarantine states are read), so:

- recording one locks the split entity first: a batch that locked it earlier commits before the
  decision's purge signal is set, and one that locks it later reads the decision;
- undoing one updates the row: it waits for every batch that read it as live, and a later
  batch reads it undone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray
from stream_cps.db.timestamps import fetch_all
from stream_cps.errors import StreamCpsError
from stream_cps.stitching import split
from stream_cps.stitching.grouping import StitchEvent
from stream_cps.stitching.quarantine_store import QuarantineStore


class SplitRefused(StreamCpsError):
    """The admin's split does not apply: unknown entity, identifier or event not in it, a live
    decision already says so, or an unknown or undone decision to undo."""


@dataclass(frozen=True)
class Recorded:
    """A decision stored, and what it set to be restitched."""

    id: int
    kind: str
    entity_id: str  # the live entity split (an alias given on the command line resolved)
    target: str  # the identifier cut or the event detached
    decided_by: str
    created: datetime


@dataclass(frozen=True)
class Undone:
    id: int
    kind: str
    target: str
    restitched: int  # entities set to be purged and rebuilt
    reset: int  # events reset for the sweep


@dataclass(frozen=True)
class Live:
    """The live decisions that concern one batch."""

    cut: frozenset[str]
    detached: frozenset[str]


class SplitStore:
    """SQL for one configured set of schemas."""

    def __init__(self, schemas: Schemas) -> None:
        self.quarantine = QuarantineStore(schemas)
        ids = {
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "ce": sql.Identifier(schemas.ce, "customer_events"),
            "ie": sql.Identifier(schemas.ps, "identifier_entities"),
            "al": sql.Identifier(schemas.ps, "entity_aliases"),
            "sd": sql.Identifier(schemas.ps, "split_decisions"),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        # IN (subquery): a hashed lookup per decision row, whatever the batch's size.
        self.probe = q(
            "SELECT d.kind, d.identifier, d.event_id FROM {sd} d WHERE d.undone IS NULL AND ("
            "(d.kind = 'cut' AND d.identifier IN (SELECT unnest(%(idents)b::text[]))) OR "
            "(d.kind = 'detach' AND d.event_id IN (SELECT unnest(%(events)b::text[])))) "
            "ORDER BY d.id FOR SHARE OF d"
        )
        self.resolve = q(
            "SELECT ca.customer_entity_id FROM {ca} ca WHERE ca.customer_entity_id = "
            "coalesce((SELECT new_id FROM {al} WHERE old_id = %(id)s), %(id)s)"
        )
        self.lock_entity = q(
            "SELECT customer_entity_id FROM {ca} WHERE customer_entity_id = %(id)s FOR UPDATE"
        )
        self.owner_of = q("SELECT entity_id FROM {ie} WHERE identifier = %(ident)s")
        self.event_owners = q(
            "SELECT e.identifiers, array(SELECT DISTINCT ie.entity_id FROM {ie} ie "
            "WHERE ie.identifier = ANY(e.identifiers)) FROM {ce} e WHERE e.id = %(event)s"
        )
        self.live_one = q(
            "SELECT id FROM {sd} WHERE undone IS NULL AND kind = %(kind)s "
            "AND coalesce(identifier, event_id) = %(target)s"
        )
        self.insert = q(
            "INSERT INTO {sd} (kind, entity_id, identifier, event_id, reason, decided_by) "
            "VALUES (%(kind)s, %(entity)s, %(ident)s, %(event)s, %(reason)s, "
            "coalesce(%(by)s, current_user)) RETURNING id, decided_by, created"
        )
        self.purge = q("UPDATE {ca} SET modified = NULL WHERE customer_entity_id = %(id)s")
        self.lock_one = q(
            "SELECT kind, coalesce(identifier, event_id), undone FROM {sd} WHERE id = %(id)s "
            "FOR UPDATE"
        )
        self.set_undone = q(
            "UPDATE {sd} SET undone = now(), undone_by = coalesce(%(by)s, current_user) "
            "WHERE id = %(id)s"
        )
        self.reset_event = q(
            "UPDATE {ce} SET stitched = NULL, identifiers = NULL "
            "WHERE id = %(event)s AND stitched IS NOT NULL"
        )
        # The entity's events as stored (already without what links nothing); the GIN index.
        self.entity_events = q(
            "SELECT e.id, e.event_time, e.identifiers FROM {ce} e, {ca} ca "
            "WHERE ca.customer_entity_id = %(id)s AND e.identifiers && ca.identifiers "
            "ORDER BY e.event_time, e.id"
        )

    # -- per batch ---------------------------------------------------------------------------

    def live_later(
        self, conn: psycopg.Connection[Any], identifiers: list[str], event_ids: list[str]
    ) -> Callable[[], Live]:
        """The live cuts among ``identifiers`` and detaches among ``event_ids`` (``FOR SHARE``:
        an undo waits for this batch): the statement is sent now and its answer read by the
        function returned, so in a pipeline the next statement goes out with it."""
        if not identifiers and not event_ids:
            return lambda: Live(frozenset(), frozenset())
        cursor = conn.execute(
            self.probe, {"idents": TextArray(identifiers), "events": TextArray(event_ids)}
        )

        def read() -> Live:
            rows = cursor.fetchall()
            return Live(
                frozenset(i for kind, i, _ in rows if kind == split.CUT),
                frozenset(e for kind, _, e in rows if kind == split.DETACH),
            )

        return read

    # -- the admin ---------------------------------------------------------------------------

    def entity(self, conn: psycopg.Connection[Any], entity_id: str) -> str:
        """The live entity ``entity_id`` names (itself, or what its alias points at)."""
        row = conn.execute(self.resolve, {"id": entity_id}).fetchone()
        if row is None:
            raise SplitRefused(f"no entity {entity_id!r} (nor an alias of one)")
        return str(row[0])

    def check(self, conn: psycopg.Connection[Any], entity: str, kind: str, target: str) -> None:
        """Refuse a decision that does not split ``entity``: the identifier (event) must be
        linking in it, and no live decision may already say the same."""
        live = conn.execute(self.live_one, {"kind": kind, "target": target}).fetchone()
        if live is not None:
            verb = "cuts" if kind == split.CUT else "detaches"
            raise SplitRefused(f"live decision {live[0]} already {verb} {target!r}")
        if kind == split.CUT:
            row = conn.execute(self.owner_of, {"ident": target}).fetchone()
            if row is None or row[0] != entity:
                raise SplitRefused(
                    f"{target!r} does not link entity {entity} "
                    "(`stream-cps explain ENTITY_ID` lists its identifiers)"
                )
        elif kind == split.DETACH:
            found = conn.execute(self.event_owners, {"event": target}).fetchone()
            if found is None or not found[0] or list(found[1]) != [entity]:
                raise SplitRefused(f"event {target!r} is not one of entity {entity}'s events")
        else:
            raise ValueError(kind)

    def record(
        self,
        conn: psycopg.Connection[Any],
        entity_id: str,
        kind: str,
        target: str,
        reason: str,
        by: str | None,
    ) -> Recorded:
        """Store a decision and set the entity's purge signal, in the caller's READ COMMITTED
        transaction: the sweep (or a Kafka member) then rebuilds its events with it applied."""
        entity = self.entity(conn, entity_id)
        # Lock, then check: a batch that merged the entity away meanwhile is seen, and a batch
        # that comes later waits for this decision and reads it.
        if conn.execute(self.lock_entity, {"id": entity}).fetchone() is None:
            raise SplitRefused(f"entity {entity} changed meanwhile; try again")
        self.check(conn, entity, kind, target)
        row = conn.execute(
            self.insert,
            {
                "kind": kind,
                "entity": entity,
                "ident": target if kind == split.CUT else None,
                "event": target if kind == split.DETACH else None,
                "reason": reason,
                "by": by,
            },
        ).fetchone()
        assert row is not None
        conn.execute(self.purge, {"id": entity})
        return Recorded(int(row[0]), kind, entity, target, str(row[1]), row[2])

    def undo(self, conn: psycopg.Connection[Any], decision: int, by: str | None) -> Undone:
        """Mark a decision undone and restitch what it kept apart: the entities sharing an
        event with a cut identifier and those events (as a quarantine release does), or the
        detached event (the sweep stitches it back, merging what it links)."""
        row = conn.execute(self.lock_one, {"id": decision}).fetchone()
        if row is None:
            raise SplitRefused(f"no split decision {decision}")
        kind, target, undone = str(row[0]), str(row[1]), row[2]
        if undone is not None:
            raise SplitRefused(f"split decision {decision} was undone at {undone:%Y-%m-%d %H:%M}")
        conn.execute(self.set_undone, {"id": decision, "by": by})
        if kind == split.CUT:
            restitched, reset = self.quarantine.relink(conn, target)
            return Undone(decision, kind, target, restitched, reset)
        reset = conn.execute(self.reset_event, {"event": target}).rowcount
        return Undone(decision, kind, target, 0, reset)

    def events_of(self, conn: psycopg.Connection[Any], entity: str) -> list[StitchEvent]:
        """``entity``'s events as stored, for the dry run's grouping."""
        return [
            StitchEvent(eid, when, tuple(sorted(idents)))
            for eid, when, idents in fetch_all(conn, self.entity_events, {"id": entity})
        ]
