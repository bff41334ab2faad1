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
from stream_cps.db.connect import is_cockroach
from stream_cps.db.timestamps import fetch_all
from stream_cps.stitching.grouping import BatchPlan, EventKey, StitchEvent
from stream_cps.stitching.rules import RuleFailure


def events_holding(schemas: Schemas, cockroach: bool = False) -> sql.Composable:
    """A condition on ``customer_events`` for the events that hold any identifier of
    ``%(idents)b``: on PostgreSQL their row addresses, one GIN probe per identifier.

    ``identifiers && %(idents)b`` is the same set, but with a few thousand identifiers
    PostgreSQL plans it as a scan of every row, each tested against the whole array: 145 s
    for one purge share of 2,000 entities (3,189 identifiers) on a 3M-event database, 0.3 s
    this way. By address, not by id, so that the rows are visited in physical order, as the
    guide's scripts visit them (a sequential or bitmap scan): in primary-key order, a share
    resetting events and the guide's ``UPDATE customer_events`` deadlocked, and PostgreSQL
    aborted the script. A row another transaction changed meanwhile is left alone, as the old
    ``&&`` recheck left it: within the contract that transaction reset or deleted it.

    The condition is ``ctid = ANY(...)`` on PostgreSQL and, as ``ctid`` is PostgreSQL's,
    ``identifiers && %(idents)b`` on CockroachDB (its own planner; not measured here)."""
    ce = sql.Identifier(schemas.ce, "customer_events")
    if cockroach:
        return sql.SQL("identifiers && %(idents)b::text[]")
    return sql.SQL(
        "ctid = ANY(ARRAY(SELECT e.ctid FROM unnest(%(idents)b::text[]) AS i(x) CROSS JOIN "
        "LATERAL (SELECT ctid FROM {ce} WHERE identifiers @> ARRAY[i.x]) e))"
    ).format(ce=ce)


@dataclass(frozen=True)
class OnEventsHolding:
    """A statement over the events holding ``%(idents)b`` (``{ce}``, ``{holding}`` in its
    template), in each server's spelling (``events_holding``); ``of`` picks per connection."""

    postgres: sql.Composed
    cockroach: sql.Composed

    @classmethod
    def build(cls, schemas: Schemas, template: str) -> OnEventsHolding:
        ce = sql.Identifier(schemas.ce, "customer_events")
        postgres, cockroach = (
            sql.SQL(template).format(ce=ce, holding=events_holding(schemas, crdb))
            for crdb in (False, True)
        )
        return cls(postgres, cockroach)

    def of(self, conn: psycopg.Connection[Any]) -> sql.Composed:
        return self.cockroach if is_cockroach(conn) else self.postgres


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
class Owners:
    """What the lock lookup found for a batch's identifiers."""

    owner: dict[str, str]  # identifier -> entity id
    keys: dict[str, EventKey]  # entity id -> its first event (time, id)
    clusters: dict[str, int]  # entity id -> its cluster


def free_identifiers(schemas: Schemas) -> sql.Composed:
    """Free every identifier of the entities ``%(ids)b`` (a purge, an erase)."""
    return sql.SQL(
        "WITH gone AS (DELETE FROM {cl} WHERE entity_id = ANY(%(ids)b::text[]) RETURNING cluster) "
        "DELETE FROM {ic} AS ic USING gone WHERE ic.cluster = gone.cluster"
    ).format(
        cl=sql.Identifier(schemas.ps, "entity_clusters"),
        ic=sql.Identifier(schemas.ps, "identifier_clusters"),
    )


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
            "ic": sql.Identifier(schemas.ps, "identifier_clusters"),
            "cl": sql.Identifier(schemas.ps, "entity_clusters"),
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
        # A bounded share of the purge signals per batch (a restitch of everything signals
        # every entity at once): those among the batch's own (locked) entities, so no event
        # joins an entity that is about to go, and up to %(limit)s more after %(after)s in id
        # order (the purge index in order: the dead entries of the entities purged before
        # are not walked again).
        self.purge_entities = q(
            "WITH p AS (SELECT customer_entity_id FROM {ca} WHERE modified IS NULL "
            "AND customer_entity_id = ANY(%(owners)b::text[]) "
            "UNION (SELECT customer_entity_id FROM {ca} WHERE modified IS NULL "
            "AND customer_entity_id > %(after)s ORDER BY 1 LIMIT %(limit)s)) "
            "DELETE FROM {ca} AS ca USING p WHERE ca.customer_entity_id = p.customer_entity_id "
            "AND ca.modified IS NULL RETURNING ca.customer_entity_id, ca.identifiers"
        )
        # An event of a purged entity still stitched (docs/stitching.md).
        self.reset_orphans = OnEventsHolding.build(
            schemas,
            "UPDATE {ce} SET stitched = NULL, identifiers = NULL "
            "WHERE stitched IS NOT NULL AND {holding}",
        )
        # After its entities are locked, a batch stops waiting for rows other transactions
        # hold after 50 ms and is retried (55P03 is a lost conflict, retry.CONFLICT), well
        # inside deadlock_timeout (1 s by default): so in a cycle with the guide's
        # ``UPDATE customer_events`` (every row, in physical order, for minutes at 10M) the
        # batch gives way, never the script (PostgreSQL aborted it in the bench's 10M run).
        self.give_way = sql.SQL("SET LOCAL lock_timeout = '50ms'")
        self.free_identifiers = free_identifiers(schemas)
        self.outbox_deletes = q(
            # The writing span's traceparent: the relay links its delivery to this batch.
            "INSERT INTO {outbox} (entity_id, op, version, traceparent) "
            "SELECT id, 'delete', nextval({seq}), %(trace)s::text "
            "FROM unnest(%(ids)b::text[]) AS d(id)"
        )
        # Locks the touched entities in id order (lockers cannot deadlock on each other).
        # The cluster of each identifier found is looked up by its key (LATERAL ... OFFSET 0
        # keeps it a nested loop): planned for a batch's own 12,000 identifiers, which it
        # expects all to be found, PostgreSQL chose a hash join over a sequential scan of all
        # entity_clusters instead, 220 of a 480 ms lookup at 1.3M entities (docs/benchmarks.md).
        self.lock_lookup = q(
            "SELECT ic.identifier, cl.entity_id, ca.first_event_time, ca.first_event_id, "
            "ic.cluster "
            "FROM {ic} ic CROSS JOIN LATERAL (SELECT c.entity_id FROM {cl} c "
            "WHERE c.cluster = ic.cluster OFFSET 0) cl "
            "JOIN {ca} ca ON ca.customer_entity_id = cl.entity_id "
            "WHERE ic.identifier = ANY(%(idents)b) ORDER BY ca.customer_entity_id "
            "FOR UPDATE OF ca"
        )
        self.absorb = q(
            "DELETE FROM {ca} WHERE customer_entity_id = ANY(%(old)b) "
            "RETURNING customer_entity_id, identifiers"
        )
        # Clusters merged into a larger one: theirs are the only identifiers that move.
        self.drop_clusters = q("DELETE FROM {cl} WHERE cluster = ANY(%(clusters)s::bigint[])")
        self.repoint = q(
            "UPDATE {ic} AS ic SET cluster = m.keep "
            "FROM unnest(%(old)s::bigint[], %(keep)s::bigint[]) AS m(old, keep) "
            "WHERE ic.cluster = m.old"
        )
        # A cluster row whose entity row is gone (deleted by hand, not through the purge)
        # must not keep the id a surviving cluster takes now; its identifiers dangle and are
        # claimed again (the lock lookup does not find them).
        self.drop_stale_clusters = q(
            "DELETE FROM {cl} WHERE entity_id = ANY(%(ids)b::text[]) "
            "AND cluster <> ALL(%(clusters)s::bigint[])"
        )
        # A surviving cluster takes the entity's new id: one row, however large the entity.
        self.rename_clusters = q(
            "UPDATE {cl} AS cl SET entity_id = m.id "
            "FROM unnest(%(clusters)s::bigint[], %(ids)b::text[]) AS m(cluster, id) "
            "WHERE cl.cluster = m.cluster"
        )
        # A left-over row of the same entity id (see drop_stale_clusters) is taken over.
        self.new_clusters = q(
            "INSERT INTO {cl} (entity_id) SELECT * FROM unnest(%(ids)b::text[]) "
            "ON CONFLICT (entity_id) DO NOTHING"
        )
        # Only when clusters merge (rare): the identifiers of each, from the cluster index.
        self.cluster_sizes = q(
            "SELECT cluster, count(*) FROM {ic} WHERE cluster = ANY(%(clusters)s::bigint[]) "
            "GROUP BY cluster"
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
            "INSERT INTO {ic} (identifier, cluster) SELECT u.ident, cl.cluster "
            "FROM unnest(%(idents)b::text[], %(owners)b::text[]) AS u(ident, owner) "
            "JOIN {cl} cl ON cl.entity_id = u.owner "
            "ON CONFLICT (identifier) DO UPDATE SET cluster = excluded.cluster"
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

    def purge(
        self, conn: psycopg.Connection[Any], owners: Iterable[str], limit: int, after: str = ""
    ) -> list[str]:
        """Delete entities whose ``modified`` was set to NULL, free their identifiers and queue
        OpenSearch deletes (the guide's clean-up routine): every such entity among ``owners``
        (the batch's locked entities) and up to ``limit`` others, the first after ``after``
        in id order. The rest waits for the next batch, so a restitch of everything costs
        many bounded transactions instead of one that resets every event and holds every
        entity's identifiers in memory.

        Every event of a deleted entity that is still stitched is reset for the sweep: an
        event never stays stitched inside no entity. The guide's restitch-one script resets
        the events its statement's snapshot saw; one the stitcher added to the entity just
        after that snapshot (before the script locked the row) was missed, and a later event
        with the same identifier then founded a second entity."""
        rows = conn.execute(
            self.purge_entities,
            {"owners": TextArray(sorted(owners)), "limit": limit, "after": after},
        ).fetchall()
        ids = [r[0] for r in rows]
        if ids:
            idents = sorted({i for r in rows for i in r[1] or ()})
            if idents:
                conn.execute(self.reset_orphans.of(conn), {"idents": TextArray(idents)})
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

    def lock_owners(self, conn: psycopg.Connection[Any], identifiers: list[str]) -> Owners:
        """Lock the entities owning ``identifiers``; return each identifier's entity, and each
        entity's first event key and cluster.

        Called before purge signals are read: a purge committed later waits for this batch.
        """
        owners = Owners({}, {}, {})
        if not identifiers:
            return owners
        # first_event_time of an entity founded by an out-of-range event is the clamped end of
        # datetime's range, which a session time zone east of UTC shows as year 10000.
        for ident, entity, first_time, first_id, cluster in fetch_all(
            conn, self.lock_lookup, {"idents": TextArray(identifiers)}
        ):
            owners.owner[ident] = entity
            owners.keys[entity] = (first_time, first_id)
            owners.clusters[entity] = int(cluster)
        return owners

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

    def write(
        self, conn: psycopg.Connection[Any], plan: BatchPlan, events: int, owners: Owners
    ) -> Written:
        """Apply a plan: absorb, merge clusters, claim identifiers, upsert survivors."""
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
        self._write_clusters(conn, plan, owners.clusters)
        if old:
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

    def _write_clusters(
        self, conn: psycopg.Connection[Any], plan: BatchPlan, clusters: dict[str, int]
    ) -> None:
        """Each component's entities become one cluster, the largest of them (union by size):
        only the smaller clusters' identifiers are re-pointed, and a new entity id (re-key or
        merge) renames the surviving cluster's row. Nothing is written for an entity that only
        gains identifiers: they are claimed afterwards (``claim``, by entity id)."""
        merging = [c for c in plan.components if len(c.existing) > 1]
        sizes: dict[int, int] = {}
        if merging:
            wanted = sorted({clusters[e] for c in merging for e in c.existing})
            for cluster, count in conn.execute(self.cluster_sizes, {"clusters": wanted}):
                sizes[int(cluster)] = int(count)
        dropped, keep_of, renamed, renamed_ids, founded = [], [], [], [], []
        for comp in plan.components:
            if not comp.existing:
                founded.append(comp.entity_id)
                continue
            members = sorted(
                (clusters[e] for e in comp.existing), key=lambda c: (-sizes.get(c, 0), c)
            )
            keep = members[0]
            for cluster in members[1:]:
                dropped.append(cluster)
                keep_of.append(keep)
            if comp.absorbed:  # the entity's id changes (re-key or merge)
                renamed.append(keep)
                renamed_ids.append(comp.entity_id)
        if dropped:
            conn.execute(self.drop_clusters, {"clusters": dropped})
            conn.execute(self.repoint, {"old": dropped, "keep": keep_of})
        if renamed:
            params = {"clusters": renamed, "ids": TextArray(renamed_ids)}
            conn.execute(self.drop_stale_clusters, params)
            conn.execute(self.rename_clusters, params)
        if founded:
            conn.execute(self.new_clusters, {"ids": TextArray(founded)})
