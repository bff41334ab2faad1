"""All SQL of the GDPR erase: the erase itself, and the per-batch tombstone checks.

Erased events and (with ``--suppress``) erased identifiers are kept only as
``sha256(salt || kind || ':' || text)``, the salt being the database's own
(``cdp_ps.erasure_salt``). Hashing happens in SQL, so the salt never travels and a batch's
check is one statement: the batch's ids in, the erased ones out, over a primary-key index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from stream_cps import telemetry
from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray
from stream_cps.errors import StreamCpsError
from stream_cps.stitching.store import OnEventsHolding, free_identifiers

# What an erase counts, in the order it reports them.
KINDS = (
    "events",
    "entities",
    "identifiers",
    "aliases",
    "identifier_pairs",
    "cooccurrence",
    "quarantined_events",
    "stitching_errors",
    "attribute_errors",
    "dead_letters",
    "outbox_deletes",
    "suppressed_identifiers",
)


class UnknownSubject(StreamCpsError):
    """The entity or identifier to erase is not in the database."""


@dataclass(frozen=True)
class Erasure:
    """What one erase deleted (or, in a dry run, would delete)."""

    erasure_id: int
    entity_id: str
    counts: dict[str, int]
    suppressed: bool
    unstitched: int  # events not stitched yet (up to a cap): a person's may be among them


def _hash(kind: str, value: str) -> str:
    """The SQL of a salted hash of the text expression ``value``.

    The salt is a scalar subquery (evaluated once per statement), not a joined row: joined,
    the planner guessed a thousand salt rows and a plan that hashed every tombstone."""
    return f"sha256((SELECT salt FROM {{salt}}) || convert_to('{kind}:' || {value}, 'UTF8'))"


class ErasureStore:
    """SQL for one configured set of schemas."""

    def __init__(self, schemas: Schemas, outbox: bool = True) -> None:
        self.outbox = outbox
        ids = {
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "ce": sql.Identifier(schemas.ce, "customer_events"),
            "ie": sql.Identifier(schemas.ps, "identifier_entities"),
            "al": sql.Identifier(schemas.ps, "entity_aliases"),
            "pairs": sql.Identifier(schemas.ps, "identifier_pairs"),
            "co": sql.Identifier(schemas.ps, "identifier_cooccurrence"),
            "qe": sql.Identifier(schemas.ps, "quarantined_events"),
            "err": sql.Identifier(schemas.ps, "stitching_errors"),
            "dead": sql.Identifier(schemas.ps, "kafka_dead_letters"),
            "aerr": sql.Identifier(schemas.attr, "attribute_errors"),
            "outbox": sql.Identifier(schemas.attr, "outbox"),
            "seq": sql.Literal(sql.Identifier(schemas.ps, "entity_version_seq").as_string()),
            "salt": sql.Identifier(schemas.ps, "erasure_salt"),
            "audit": sql.Identifier(schemas.ps, "erasures"),
            "ee": sql.Identifier(schemas.ps, "erased_events"),
            "ei": sql.Identifier(schemas.ps, "erased_identifiers"),
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        # -- per batch (the stitcher and the ingest) --
        # A plain join, left to the planner: at few tombstones it probes the primary key,
        # at many it hashes them. Measured per 5,000-id batch: 1.2 ms with none, 10 ms at
        # 100,000 (forcing index probes with LATERAL ... LIMIT 1: 6 and 11 ms).
        self.erased_events = q(
            "SELECT t.id FROM unnest(%(ids)b::text[]) AS t(id) "
            f"JOIN {{ee}} ee ON ee.hash = {_hash('event', 't.id')}"
        )
        self.erased_identifiers = q(
            "SELECT t.x FROM unnest(%(idents)b::text[]) AS t(x) "
            f"JOIN {{ei}} ei ON ei.hash = {_hash('identifier', 't.x')}"
        )
        self.count_unstitched = q(
            "SELECT count(*) FROM (SELECT 1 FROM {ce} WHERE stitched IS NULL LIMIT 1000) w"
        )
        self.drop_events = q("DELETE FROM {ce} WHERE id = ANY(%(ids)b::text[])")

        # -- the erase --
        self.live = q(
            "SELECT customer_entity_id, identifiers FROM {ca} "
            "WHERE customer_entity_id = %(id)s FOR UPDATE"
        )
        self.alias_target = q("SELECT new_id FROM {al} WHERE old_id = %(id)s")
        self.owner_of = q("SELECT entity_id FROM {ie} WHERE identifier = %(ident)s")
        self.audit_open = q(
            "INSERT INTO {audit} (reason, suppressed, counts, entity_hash) "
            "VALUES (%(reason)s, %(suppress)s, '{{}}'::jsonb, "
            f"{_hash('entity', '%(id)s::text')}) RETURNING id"
        )
        self.audit_close = q("UPDATE {audit} SET counts = %(counts)s WHERE id = %(erasure)s")
        self.delete_events = OnEventsHolding.build(
            schemas, "DELETE FROM {ce} WHERE {holding} RETURNING id"
        )
        self.tombstone_events = q(
            f"INSERT INTO {{ee}} (hash, erasure_id) SELECT {_hash('event', 't.id')}, "
            "%(erasure)s FROM unnest(%(ids)b::text[]) AS t(id) "
            "ON CONFLICT (hash) DO NOTHING"
        )
        self.tombstone_identifiers = q(
            f"INSERT INTO {{ei}} (hash, erasure_id) SELECT {_hash('identifier', 't.x')}, "
            "%(erasure)s FROM unnest(%(idents)b::text[]) AS t(x) "
            "ON CONFLICT (hash) DO NOTHING"
        )
        self.delete_identifiers = free_identifiers(schemas)
        self.delete_entity = q("DELETE FROM {ca} WHERE customer_entity_id = %(id)s")
        self.delete_aliases = q("DELETE FROM {al} WHERE old_id = %(id)s OR new_id = %(id)s")
        self.delete_pairs = q(
            "DELETE FROM {pairs} WHERE a = ANY(%(idents)b::text[]) OR b = ANY(%(idents)b::text[])"
        )
        self.delete_cooccurrence = q("DELETE FROM {co} WHERE identifier = ANY(%(idents)b::text[])")
        self.delete_quarantined_events = q("DELETE FROM {qe} WHERE event_id = ANY(%(ids)b::text[])")
        self.delete_stitching_errors = q("DELETE FROM {err} WHERE event_id = ANY(%(ids)b::text[])")
        self.delete_attribute_errors = q("DELETE FROM {aerr} WHERE customer_entity_id = %(id)s")
        # A dead letter's key is the event id (the producers' convention, docs/kafka.md).
        self.delete_dead_letters = q(
            "DELETE FROM {dead} WHERE message_key IN "
            "(SELECT convert_to(t.id, 'UTF8') FROM unnest(%(ids)b::text[]) AS t(id))"
        )
        self.outbox_delete = q(
            "INSERT INTO {outbox} (entity_id, op, version, traceparent) "
            "VALUES (%(id)s, 'delete', nextval({seq}), %(trace)s::text)"
        )

    # -- per batch -----------------------------------------------------------------------------

    def erased_among(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> set[str]:
        """Those of ``event_ids`` that were erased (one statement for the whole batch)."""
        return self.erased_among_later(conn, event_ids)()

    def erased_among_later(
        self, conn: psycopg.Connection[Any], event_ids: list[str]
    ) -> Callable[[], set[str]]:
        """``erased_among``, its statement sent now and its answer read by the function
        returned: in a pipeline, the next statement goes out with it (one round trip)."""
        if not event_ids:
            return set
        cursor = conn.execute(self.erased_events, {"ids": TextArray(event_ids)})
        return lambda: {str(r[0]) for r in cursor.fetchall()}

    def suppressed_among(
        self, conn: psycopg.Connection[Any], identifiers: list[str]
    ) -> frozenset[str]:
        """Those of ``identifiers`` an ``erase --suppress`` keeps from linking."""
        if not identifiers:
            return frozenset()
        rows = conn.execute(self.erased_identifiers, {"idents": TextArray(identifiers)})
        return frozenset(str(r[0]) for r in rows)

    def drop(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> int:
        """Delete rows of erased events that came back (a re-insert, a changefeed row)."""
        if not event_ids:
            return 0
        return conn.execute(self.drop_events, {"ids": TextArray(event_ids)}).rowcount

    # -- the erase -----------------------------------------------------------------------------

    def resolve(
        self, conn: psycopg.Connection[Any], entity: str | None, identifier: str | None
    ) -> str:
        """The live entity id named by ``entity`` (or an old id of it) or owning
        ``identifier``."""
        if identifier is not None:
            row = conn.execute(self.owner_of, {"ident": identifier}).fetchone()
            if row is None:
                raise UnknownSubject(f"no entity holds the identifier {identifier!r}")
            return str(row[0])
        assert entity is not None
        row = conn.execute(self.alias_target, {"id": entity}).fetchone()
        return str(row[0]) if row else entity

    def erase(
        self,
        conn: psycopg.Connection[Any],
        entity_id: str,
        reason: str | None,
        suppress: bool,
    ) -> Erasure:
        """Erase one live entity and everything that names it, in the caller's transaction;
        write the tombstones and the audit row."""
        row = conn.execute(self.live, {"id": entity_id}).fetchone()
        if row is None:
            raise UnknownSubject(f"no entity {entity_id!r} (`stream-cps explain` finds one)")
        idents = TextArray(sorted(row[1] or ()))
        opened = conn.execute(
            self.audit_open, {"reason": reason, "suppress": suppress, "id": entity_id}
        ).fetchone()
        if opened is None:
            raise UnknownSubject("cdp_ps.erasure_salt is empty: run `stream-cps init`")
        erasure = int(opened[0])
        deleted = conn.execute(self.delete_events.of(conn), {"idents": idents})
        erased_ids = sorted(str(r[0]) for r in deleted)
        ids = TextArray(erased_ids)
        counts = dict.fromkeys(KINDS, 0)
        counts["events"] = len(erased_ids)
        conn.execute(self.tombstone_events, {"ids": ids, "erasure": erasure})
        by_entity = {"id": entity_id}
        counts["identifiers"] = conn.execute(
            self.delete_identifiers, {"ids": TextArray([entity_id])}
        ).rowcount
        counts["entities"] = conn.execute(self.delete_entity, by_entity).rowcount
        counts["aliases"] = conn.execute(self.delete_aliases, by_entity).rowcount
        counts["identifier_pairs"] = conn.execute(self.delete_pairs, {"idents": idents}).rowcount
        counts["cooccurrence"] = conn.execute(self.delete_cooccurrence, {"idents": idents}).rowcount
        counts["quarantined_events"] = conn.execute(
            self.delete_quarantined_events, {"ids": ids}
        ).rowcount
        counts["stitching_errors"] = conn.execute(
            self.delete_stitching_errors, {"ids": ids}
        ).rowcount
        counts["attribute_errors"] = conn.execute(self.delete_attribute_errors, by_entity).rowcount
        counts["dead_letters"] = conn.execute(self.delete_dead_letters, {"ids": ids}).rowcount
        if self.outbox:
            conn.execute(self.outbox_delete, {"id": entity_id, "trace": telemetry.traceparent()})
            counts["outbox_deletes"] = 1
        if suppress:
            counts["suppressed_identifiers"] = conn.execute(
                self.tombstone_identifiers, {"idents": idents, "erasure": erasure}
            ).rowcount
        conn.execute(self.audit_close, {"counts": Jsonb(counts), "erasure": erasure})
        waiting = conn.execute(self.count_unstitched).fetchone()
        return Erasure(erasure, entity_id, counts, suppress, int(waiting[0]) if waiting else 0)
