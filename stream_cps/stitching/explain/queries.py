"""All SQL of ``stream-cps explain``: resolve what was asked to a live entity, read its row,
its events (identifiers only, never payloads), aliases, blocklist, quarantine and errors.

Read-only and bounded: an entity's events are found through the GIN index on
``customer_events.identifiers`` (its identifiers have no other owner), at most
``Limits.graph_events`` of them are loaded, and the rules run again over at most
``Limits.raw_events`` of those, in the rules sandbox like the stitcher's own reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray
from stream_cps.db.timestamps import fetch_all
from stream_cps.stitching import rules
from stream_cps.stitching.explain.graph import (
    EVENT,
    IDENTIFIER,
    EventInfo,
    IdentityGraph,
    Node,
    shortest_chain,
)
from stream_cps.stitching.explain.report import (
    SAMPLE_EVENTS,
    Alias,
    Entity,
    Explanation,
    NotFound,
    Quarantined,
    StitchingError,
    Why,
    held_back,
)
from stream_cps.stitching.store import OnEventsHolding

MAX_ALIAS_HOPS = 100  # aliases are compressed to one hop; this only guards against a cycle


@dataclass(frozen=True)
class Ask:
    """What the operator asked: one of an entity id (live or old), an identifier, or two
    identifiers / event ids for ``--why``."""

    entity_id: str | None = None
    identifier: str | None = None
    why: tuple[str, str] | None = None

    def __str__(self) -> str:
        if self.why:
            return f"why {self.why[0]} {self.why[1]}"
        return self.identifier or self.entity_id or ""


@dataclass(frozen=True)
class Limits:
    graph_events: int = 100_000  # events loaded for the graph and the chain
    raw_events: int = 10_000  # events whose rules are evaluated again (blocked, quarantined)
    errors: int = 20  # stitching_errors rows shown


class ExplainQueries:
    """The statements, for one configured set of schemas."""

    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas
        self.quarantine_table = sql.Identifier(schemas.ps, "quarantined_identifiers")
        ids = {
            "ca": sql.Identifier(schemas.cdp, "customer_attributes"),
            "ce": sql.Identifier(schemas.ce, "customer_events"),
            "ie": sql.Identifier(schemas.ps, "identifier_entities"),
            "al": sql.Identifier(schemas.ps, "entity_aliases"),
            "bl": sql.Identifier(schemas.ps, "identifier_blocklist"),
            "err": sql.Identifier(schemas.ps, "stitching_errors"),
            "qi": self.quarantine_table,
        }

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(**ids)

        self.live = q("SELECT 1 FROM {ca} WHERE customer_entity_id = %(id)s")
        self.alias_of = q("SELECT old_id, new_id, reason, created FROM {al} WHERE old_id = %(id)s")
        self.owner = q("SELECT entity_id FROM {ie} WHERE identifier = %(ident)s")
        self.event = q("SELECT identifiers FROM {ce} WHERE id = %(id)s")
        self.entity = q(
            "SELECT identifiers, first_event_id, first_event_time, modified, calculated, "
            "attributes FROM {ca} WHERE customer_entity_id = %(id)s"
        )
        # The entity's events by one GIN probe per identifier (``events_holding``): with
        # ``identifiers && <the entity's array>`` a 5,000-identifier entity took 15 s.
        self.types = OnEventsHolding.build(
            schemas,
            "SELECT source_id, type, count(*) FROM {ce} WHERE {holding} GROUP BY 1, 2 "
            "ORDER BY 1, 2",
        )
        self.events = OnEventsHolding.build(
            schemas,
            "SELECT id, source_id, type, event_time, identifiers FROM {ce} WHERE {holding} "
            "ORDER BY event_time, id LIMIT %(limit)s",
        )
        self.merged_in = q(
            "SELECT old_id, new_id, reason, created FROM {al} WHERE new_id = %(id)s "
            "ORDER BY created, old_id"
        )
        self.blocklist = q("SELECT attribute_id, value FROM {bl} ORDER BY 1 NULLS FIRST, 2")
        self.errors = q(
            "SELECT attribute_id, event_id, message, created FROM {err} "
            "WHERE event_id = ANY(%(ids)b::text[]) ORDER BY created DESC, id DESC "
            "LIMIT %(limit)s"
        )
        self.quarantined = q(
            "SELECT identifier, state, reason, cooccurring, limit_value, other_attribute_id, "
            "created, decided FROM {qi} WHERE identifier = ANY(%(idents)b::text[]) "
            "ORDER BY identifier"
        )

    # -- what was asked -> a live entity ------------------------------------------------------

    def resolve(self, conn: psycopg.Connection[Any], entity_id: str) -> tuple[str, list[Alias]]:
        """The live entity an id names, following aliases (chains too), and the hops taken."""
        hops: list[Alias] = []
        current = entity_id
        for _ in range(MAX_ALIAS_HOPS):
            if conn.execute(self.live, {"id": current}).fetchone():
                return current, hops
            row = conn.execute(self.alias_of, {"id": current}).fetchone()
            if row is None:
                break
            hops.append(Alias(*row))
            current = row[1]
        raise NotFound(
            f"no entity {entity_id}"
            + (f" (its aliases lead to {current}, which is not live)" if hops else "")
        )

    def owner_of(self, conn: psycopg.Connection[Any], ident: str) -> str | None:
        row = conn.execute(self.owner, {"ident": ident}).fetchone()
        return str(row[0]) if row else None

    def locate(self, conn: psycopg.Connection[Any], token: str) -> tuple[Node | None, str | None]:
        """A ``--why`` end: a stitched identifier if one is named so, else an event id; with
        the entity holding it (None for an event without identifiers)."""
        owner = self.owner_of(conn, token)
        if owner is not None:
            return Node(IDENTIFIER, token), self.resolve(conn, owner)[0]
        row = conn.execute(self.event, {"id": token}).fetchone()
        if row is None:
            return None, None
        for ident in row[0] or ():
            owner = self.owner_of(conn, ident)
            if owner is not None:
                return Node(EVENT, token), self.resolve(conn, owner)[0]
        return Node(EVENT, token), None

    # -- the entity ---------------------------------------------------------------------------

    def entity_of(
        self, conn: psycopg.Connection[Any], entity_id: str, rule_timeout_ms: int, limits: Limits
    ) -> Entity:
        rows = fetch_all(conn, self.entity, {"id": entity_id})
        if not rows:
            raise NotFound(f"no entity {entity_id}")
        idents, first_id, first_time, modified, calculated, attributes = rows[0]
        idents = list(idents)
        # one encoding of the identifiers for both statements
        params = {"idents": TextArray(idents), "limit": limits.graph_events}
        by_type = {
            f"{src}/{typ}": int(n) for src, typ, n in conn.execute(self.types.of(conn), params)
        }
        events = [
            EventInfo(str(eid), src, typ, when, tuple(evi or ()))
            for eid, src, typ, when, evi in fetch_all(conn, self.events.of(conn), params)
        ]
        graph = IdentityGraph.of(events)
        entity = Entity(
            id=entity_id,
            identifiers=idents,
            first_event_id=first_id,
            first_event_time=first_time,
            modified=modified,
            calculated=calculated,
            attributes=dict(attributes or {}),
            event_count=sum(by_type.values()),
            events_by_type=by_type,
            graph=graph,
            merged_in=[Alias(*r) for r in conn.execute(self.merged_in, {"id": entity_id})],
        )
        if not entity.graph_complete:
            entity.notes.append(
                f"only the earliest {len(graph.events)} of {entity.event_count} events were "
                "loaded for the graph"
            )
        event_ids = list(graph.events)
        entity.errors = [
            StitchingError(*r)
            for r in conn.execute(
                self.errors, {"ids": TextArray(event_ids), "limit": limits.errors}
            )
        ]
        self._held_back(conn, entity, event_ids[: limits.raw_events], rule_timeout_ms)
        return entity

    def _held_back(
        self,
        conn: psycopg.Connection[Any],
        entity: Entity,
        event_ids: Sequence[str],
        timeout_ms: int,
    ) -> None:
        """Blocked and quarantined identifiers of the entity's events: the rules run again
        over ``event_ids`` and what they produce is compared with what was stored."""
        missing: dict[str, list[str]] = {}
        try:
            book = rules.RuleBook(self.schemas, timeout_ms=timeout_ms)
            ruleset = book.refresh(conn)
            raw = rules.values_of(conn, self.schemas, ruleset.rules, list(event_ids), timeout_ms)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            entity.notes.append(
                "the rules could not be evaluated again, so blocked and quarantined values "
                f"are not shown: {(exc.diag.message_primary or str(exc)).strip()}"
            )
        else:
            graph = entity.graph
            ordered = {e: raw.events[e][1] for e in event_ids if e in raw.events}
            stored = {e: graph.events[e].identifiers for e in ordered}
            blocklist = [(r[0], str(r[1])) for r in conn.execute(self.blocklist)]
            entity.blocked, missing = held_back(ordered, stored, blocklist)
            if len(event_ids) < len(graph.events):
                entity.notes.append(
                    f"blocked and quarantined values come from the earliest {len(event_ids)} "
                    "events only"
                )
        table = conn.execute(
            "SELECT to_regclass(%s)", [self.quarantine_table.as_string(conn)]
        ).fetchone()
        if not table or table[0] is None:
            return  # no hub guard in this database (yet)
        on_entity = set(entity.identifiers)
        wanted = sorted(on_entity | set(missing))
        entity.quarantined = [
            Quarantined(
                identifier=ident,
                state=state,
                reason=reason,
                cooccurring=cooccurring,
                limit_value=limit_value,
                other_attribute_id=other,
                created=created,
                decided=decided,
                on_entity=ident in on_entity,
                events=tuple(missing.get(ident, ())[:SAMPLE_EVENTS]),
            )
            for ident, state, reason, cooccurring, limit_value, other, created, decided in (
                conn.execute(self.quarantined, {"idents": TextArray(wanted)})
            )
        ]


def load(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    ask: Ask,
    rule_timeout_ms: int,
    limits: Limits | None = None,
) -> Explanation:
    """Everything ``explain`` reports for ``ask``."""
    limits = limits or Limits()
    q = ExplainQueries(schemas)
    if ask.why is None:
        if ask.identifier is not None:
            owner = q.owner_of(conn, ask.identifier)
            if owner is None:
                raise NotFound(f"identifier {ask.identifier} belongs to no entity")
            live, hops = q.resolve(conn, owner)
        else:
            live, hops = q.resolve(conn, ask.entity_id or "")
        return Explanation(str(ask), q.entity_of(conn, live, rule_timeout_ms, limits), hops)

    (a, a_entity), (b, b_entity) = (q.locate(conn, token) for token in ask.why)
    for token, node in zip(ask.why, (a, b), strict=True):
        if node is None:
            raise NotFound(f"{token} is neither a stitched identifier nor an event id")
    if a_entity is None or a_entity != b_entity:
        return Explanation(
            str(ask), None, why=Why(a, b, a_entity, b_entity, None, _apart(ask, a_entity, b_entity))
        )
    entity = q.entity_of(conn, a_entity, rule_timeout_ms, limits)
    assert a is not None and b is not None
    chain = shortest_chain(entity.graph, a, b)
    if chain is None:
        message = (
            f"both are in entity {a_entity}, but the chain runs through events beyond the "
            f"{len(entity.graph.events)} loaded"
        )
    else:
        linking = [n.key for n in chain if n.kind == EVENT]
        message = f"connected in entity {a_entity} through {len(linking)} event(s): " + (
            ", ".join(linking)
        )
    return Explanation(str(ask), entity, why=Why(a, b, a_entity, b_entity, chain, message))


def _apart(ask: Ask, a_entity: str | None, b_entity: str | None) -> str:
    a, b = ask.why or ("", "")

    def where(token: str, entity: str | None) -> str:
        return f"{token} is in entity {entity}" if entity else f"{token} is in no entity"

    return f"not connected: {where(a, a_entity)}, {where(b, b_entity)}"
