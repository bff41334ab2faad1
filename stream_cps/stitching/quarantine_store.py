"""All SQL of the hub quarantine: counting per batch, the list, and the admin's decisions.

Per batch the stitcher sends the batch's distinct cross-attribute pairs once: the pairs new to
``identifier_pairs`` add to ``identifier_cooccurrence`` in the same statement, which returns
only the counts that passed the lowest limit. Then one probe of the (small) quarantine list
for the batch's identifiers, ``FOR SHARE``: an admin's release waits for the batches that read
the old state, and a batch that starts later waits for the release and reads the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray
from stream_cps.errors import StreamCpsError
from stream_cps.stitching import quarantine
from stream_cps.stitching.grouping import StitchEvent


class UnknownIdentifier(StreamCpsError):
    """The admin named an identifier that is not on the quarantine list."""


@dataclass(frozen=True)
class Listed:
    """One row of ``cdp_ps.quarantined_identifiers``."""

    identifier: str
    other_attribute_id: str
    cooccurring: int
    limit_value: int
    state: str
    created: datetime
    decided: datetime | None
    reason: str | None


@dataclass(frozen=True)
class Decision:
    """What an admin's release or block changed."""

    identifier: str
    before: str
    after: str
    restitched: int  # entities set to be purged and rebuilt
    reset: int  # events with no entity reset for the sweep


class QuarantineStore:
    """SQL for one configured set of schemas."""

    def __init__(self, schemas: Schemas) -> None:
        ids = {
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "ce": sql.Identifier(schemas.ce, "customer_events"),
            "ie": sql.Identifier(schemas.ps, "identifier_entities"),
            "pairs": sql.Identifier(schemas.ps, "identifier_pairs"),
            "co": sql.Identifier(schemas.ps, "identifier_cooccurrence"),
            "q": sql.Identifier(schemas.ps, "quarantined_identifiers"),
            "qe": sql.Identifier(schemas.ps, "quarantined_events"),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        # split_part: an identifier is attribute_id:value and attribute ids hold no ':'.
        self.count = q(
            "WITH new AS (INSERT INTO {pairs} (a, b) "
            "SELECT * FROM unnest(%(a)b::text[], %(b)b::text[]) "
            "ON CONFLICT DO NOTHING RETURNING a, b), "
            "side AS (SELECT a AS identifier, split_part(b, ':', 1) AS other FROM new "
            "UNION ALL SELECT b, split_part(a, ':', 1) FROM new), "
            "grown AS (INSERT INTO {co} AS co (identifier, other_attribute_id, count) "
            "SELECT identifier, other, count(*) FROM side GROUP BY 1, 2 ORDER BY 1, 2 "
            "ON CONFLICT (identifier, other_attribute_id) DO UPDATE "
            "SET count = co.count + excluded.count "
            "RETURNING identifier, other_attribute_id, count) "
            "SELECT identifier, other_attribute_id, count FROM grown WHERE count > %(lowest)s"
        )
        self.add = q(
            "INSERT INTO {q} (identifier, attribute_id, value, other_attribute_id, cooccurring, "
            "limit_value) SELECT * FROM unnest(%(idents)b::text[], %(attrs)b::text[], "
            "%(values)b::text[], %(others)b::text[], %(counts)s::int[], %(limits)s::int[]) "
            "ON CONFLICT (identifier) DO NOTHING RETURNING identifier"
        )
        # A join, not ``= ANY``: on a small list the planner scans it and tests every row
        # against the whole array (as on entity_aliases, store.py).
        self.states = q(
            "SELECT qi.identifier, qi.state FROM unnest(%(idents)b::text[]) AS t(x) "
            "JOIN {q} qi ON qi.identifier = t.x ORDER BY qi.identifier FOR SHARE OF qi"
        )
        self.purge_owners = q(
            "UPDATE {ca} SET modified = NULL WHERE customer_entity_id IN "
            "(SELECT entity_id FROM {ie} WHERE identifier = ANY(%(idents)b::text[]))"
        )
        self.listing = q(
            "SELECT identifier, other_attribute_id, cooccurring, limit_value, state, created, "
            "decided, reason FROM {q} WHERE %(state)s::text IS NULL OR state = %(state)s "
            "ORDER BY created, identifier"
        )
        self.lock_one = q("SELECT state FROM {q} WHERE identifier = %(ident)s FOR UPDATE")
        self.set_state = q(
            "UPDATE {q} SET state = %(state)s, decided = now(), reason = %(reason)s "
            "WHERE identifier = %(ident)s"
        )
        # The entities of every identifier that shares an event with it (the events are in
        # quarantined_events), so the sweep rebuilds them with it linking again.
        self.purge_touching = q(
            "UPDATE {ca} SET modified = NULL WHERE customer_entity_id IN "
            "(SELECT ie.entity_id FROM {qe} qe JOIN {ce} e ON e.id = qe.event_id "
            "CROSS JOIN LATERAL unnest(e.identifiers) AS i(x) "
            "JOIN {ie} ie ON ie.identifier = i.x WHERE qe.identifier = %(ident)s)"
        )
        # Its events are restitched with it (those that had only it belong to no entity).
        self.reset_events = q(
            "UPDATE {ce} SET stitched = NULL, identifiers = NULL WHERE id IN "
            "(SELECT event_id FROM {qe} WHERE identifier = %(ident)s) AND stitched IS NOT NULL"
        )
        self.forget_events = q("DELETE FROM {qe} WHERE identifier = %(ident)s")
        self.remember_events = q(
            "INSERT INTO {qe} (identifier, event_id) SELECT * FROM "
            "unnest(%(idents)b::text[], %(events)b::text[]) ON CONFLICT DO NOTHING"
        )

    # -- per batch ---------------------------------------------------------------------------

    def record(
        self,
        conn: psycopg.Connection[Any],
        events: Iterable[StitchEvent],
        limits: quarantine.Limits,
    ) -> list[quarantine.Trip]:
        """Count the batch's new distinct pairs; list the identifiers that crossed their limit.
        Returns the trips newly listed (an identifier already listed, e.g. released, stays)."""
        if not limits.enabled:
            return []
        found = quarantine.pairs(events)
        if not found:
            return []
        rows = conn.execute(
            self.count,
            {
                "a": TextArray([a for a, _ in found]),
                "b": TextArray([b for _, b in found]),
                "lowest": limits.lowest,
            },
        ).fetchall()
        trips = quarantine.trips(rows, limits)
        if not trips:
            return []
        added = conn.execute(
            self.add,
            {
                "idents": TextArray([t.identifier for t in trips]),
                "attrs": TextArray([t.attribute for t in trips]),
                "values": TextArray([t.value for t in trips]),
                "others": TextArray([t.other for t in trips]),
                "counts": [t.count for t in trips],
                "limits": [t.limit for t in trips],
            },
        ).fetchall()
        new = {r[0] for r in added}
        fresh = [t for t in trips if t.identifier in new]
        if fresh:
            # Their entities are locked already (lock_owners): the purge that follows in this
            # batch deletes them and resets their events, which the sweep restitches without.
            conn.execute(self.purge_owners, {"idents": TextArray([t.identifier for t in fresh])})
        return fresh

    def remember(
        self, conn: psycopg.Connection[Any], events: Iterable[StitchEvent], excluded: frozenset[str]
    ) -> None:
        """Which of ``events`` carried an ``excluded`` identifier (dropped from what they
        store): a release restitches exactly those."""
        pairs = [(i, ev.id) for ev in events for i in ev.identifiers if i in excluded]
        if pairs:
            conn.execute(
                self.remember_events,
                {
                    "idents": TextArray([p[0] for p in pairs]),
                    "events": TextArray([p[1] for p in pairs]),
                },
            )

    def excluded_later(
        self, conn: psycopg.Connection[Any], identifiers: list[str]
    ) -> Callable[[], frozenset[str]]:
        """Those of ``identifiers`` that link nothing (quarantined or blocked): the statement
        is sent now and its answer read by the function returned, so in a pipeline the next
        statement goes out with it (one round trip)."""
        if not identifiers:
            return frozenset
        cursor = conn.execute(self.states, {"idents": TextArray(identifiers)})
        return lambda: frozenset(
            ident for ident, state in cursor.fetchall() if state != quarantine.RELEASED
        )

    # -- the admin ---------------------------------------------------------------------------

    def list(self, conn: psycopg.Connection[Any], state: str | None = None) -> list[Listed]:
        return [Listed(*row) for row in conn.execute(self.listing, {"state": state})]

    def decide(
        self, conn: psycopg.Connection[Any], identifier: str, state: str, reason: str | None
    ) -> Decision:
        """Set ``identifier``'s state, in the caller's transaction, and restitch what the change
        affects: a release rebuilds every entity sharing an event with it (and resets events
        that had only it); quarantining or blocking a released one rebuilds its entity."""
        if state not in quarantine.STATES:
            raise ValueError(state)
        row = conn.execute(self.lock_one, {"ident": identifier}).fetchone()
        if row is None:
            raise UnknownIdentifier(
                f"{identifier!r} is not in quarantined_identifiers "
                "(`stream-cps quarantine list` shows them)"
            )
        before = str(row[0])
        conn.execute(self.set_state, {"ident": identifier, "state": state, "reason": reason})
        restitched = reset = 0
        links_before, links_after = before == quarantine.RELEASED, state == quarantine.RELEASED
        if links_after and not links_before:
            restitched, reset = self.relink(conn, identifier)
        elif links_before and not links_after:
            restitched = conn.execute(
                self.purge_owners, {"idents": TextArray([identifier])}
            ).rowcount
        return Decision(identifier, before, state, restitched, reset)

    def relink(self, conn: psycopg.Connection[Any], identifier: str) -> tuple[int, int]:
        """Restitch where ``identifier`` was dropped (``quarantined_events``), so it links
        again unless something still excludes it (a batch then drops and remembers it anew):
        purge every entity sharing an event with it, reset those events, forget them. Returns
        (entities set to be restitched, events reset). A release and a split's undo."""
        restitched = conn.execute(self.purge_touching, {"ident": identifier}).rowcount
        reset = conn.execute(self.reset_events, {"ident": identifier}).rowcount
        conn.execute(self.forget_events, {"ident": identifier})
        return restitched, reset
