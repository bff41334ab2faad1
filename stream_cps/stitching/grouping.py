"""Incremental grouping of events into customer entities (pure; no I/O).

Two events belong to one entity exactly when a chain of shared identifiers connects them. The
entity id is derived from the entity's earliest event by (event_time, event id), so the final
mapping and the ids do not depend on arrival order, batch boundaries or restarts: when an earlier
event joins, or entities merge, every touched entity whose id differs from the derived one is
absorbed into it (and remembered as an alias by the store).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

# Fixed namespace: entity ids must be the same on every machine and in every release.
ENTITY_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-4d2a-9b1e-5c0a7e2f9d41")

EventKey = tuple[datetime, str]


def entity_id_for(first_event_id: str) -> str:
    """The id of the entity whose earliest event is ``first_event_id``."""
    return str(uuid.uuid5(ENTITY_NAMESPACE, first_event_id))


@dataclass(frozen=True)
class StitchEvent:
    """An event to stitch: its id, time and normalised identifiers."""

    id: str
    event_time: datetime
    identifiers: tuple[str, ...]

    @property
    def key(self) -> EventKey:
        return (self.event_time, self.id)


@dataclass
class Component:
    """One entity after the batch: who it is now and what it absorbed."""

    entity_id: str
    first_key: EventKey
    events: list[StitchEvent] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)
    new_identifiers: set[str] = field(default_factory=set)

    @property
    def absorbed(self) -> list[str]:
        """Existing entities whose id is not the derived one: merged away or re-keyed."""
        return sorted(e for e in self.existing if e != self.entity_id)

    @property
    def absorb_reason(self) -> str:
        return "merge" if len(self.existing) > 1 else "rekey"

    @property
    def event_identifiers(self) -> set[str]:
        return {i for ev in self.events for i in ev.identifiers}


@dataclass
class BatchPlan:
    components: list[Component]
    unidentified: list[str]

    @property
    def merges(self) -> int:
        return sum(len(c.absorbed) for c in self.components if len(c.existing) > 1)

    @property
    def created(self) -> int:
        return sum(1 for c in self.components if not c.existing)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, node: str) -> str:
        parent = self.parent.setdefault(node, node)
        if parent == node:
            return node
        root = self.find(parent)
        self.parent[node] = root
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def plan(
    events: Iterable[StitchEvent],
    owner: Mapping[str, str],
    first_keys: Mapping[str, EventKey],
) -> BatchPlan:
    """Group a batch against the current state.

    ``owner`` maps each already-known identifier of the batch to its entity; ``first_keys``
    gives the earliest (event_time, event id) of each of those entities.
    """
    uf = _UnionFind()
    batch = [ev for ev in events]
    unidentified = [ev.id for ev in batch if not ev.identifiers]
    for ev in batch:
        if not ev.identifiers:
            continue
        node = "e\0" + ev.id
        uf.find(node)
        for ident in ev.identifiers:
            uf.union(node, "i\0" + ident)
            entity = owner.get(ident)
            if entity is not None:
                uf.union(node, "x\0" + entity)
    groups: dict[str, Component] = {}
    for ev in batch:
        if not ev.identifiers:
            continue
        root = uf.find("e\0" + ev.id)
        comp = groups.get(root)
        if comp is None:
            comp = groups[root] = Component(entity_id="", first_key=ev.key)
        comp.events.append(ev)
        for ident in ev.identifiers:
            entity = owner.get(ident)
            if entity is None:
                comp.new_identifiers.add(ident)
            else:
                comp.existing.add(entity)
    for comp in groups.values():
        keys = [ev.key for ev in comp.events] + [first_keys[e] for e in comp.existing]
        comp.first_key = min(keys)
        comp.entity_id = entity_id_for(comp.first_key[1])
    ordered = sorted(groups.values(), key=lambda c: c.entity_id)
    return BatchPlan(ordered, unidentified)
