"""What ``stream-cps explain`` reports about one entity, and which of its events' raw values
were held back by the blocklist (pure: the reads are in ``queries``, output in ``render``).

Identifiers that never reached an event (blocked, or quarantined by the hub guard) leave no
trace in ``customer_events.identifiers``; the only way to show them is to evaluate the rules
again over the entity's events and compare what comes out with what was stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stream_cps.errors import StreamCpsError
from stream_cps.stitching.explain.graph import IdentityGraph, Node
from stream_cps.stitching.normalize import (
    DEFAULT_BLOCKLIST,
    Blocklist,
    folded,
    identifier,
    normalize,
)


class NotFound(StreamCpsError):
    """The entity, alias, identifier or event asked about does not exist."""


@dataclass(frozen=True)
class Alias:
    """One row of ``entity_aliases``: ``old_id`` was merged or re-keyed into ``new_id``."""

    old_id: str
    new_id: str
    reason: str
    created: datetime


@dataclass(frozen=True)
class Blocked:
    """An identifier an event's rules produced but the blocklist dropped."""

    identifier: str
    rule: str  # "built-in" or the identifier_blocklist row that matched
    events: tuple[str, ...]  # at most a few, earliest first
    event_count: int


@dataclass(frozen=True)
class Quarantined:
    """A row of ``quarantined_identifiers`` touching the entity (the hub guard)."""

    identifier: str
    state: str
    reason: str | None
    cooccurring: int | None
    limit_value: int | None
    other_attribute_id: str | None
    created: datetime | None
    decided: datetime | None
    on_entity: bool  # still one of the entity's identifiers (quarantined after stitching)
    events: tuple[str, ...]  # events whose rules produce it now (at most a few)


@dataclass(frozen=True)
class StitchingError:
    attribute_id: str | None
    event_id: str | None
    message: str
    created: datetime


@dataclass
class Entity:
    """One live entity as the tables hold it, with its (possibly capped) event graph."""

    id: str
    identifiers: list[str]
    first_event_id: str
    first_event_time: datetime
    modified: datetime | None
    calculated: datetime | None
    attributes: dict[str, Any]
    event_count: int
    events_by_type: dict[str, int]
    graph: IdentityGraph
    merged_in: list[Alias]  # aliases pointing at this entity (what it absorbed)
    blocked: list[Blocked] = field(default_factory=list)
    quarantined: list[Quarantined] | None = None  # None: no quarantined_identifiers table
    errors: list[StitchingError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def graph_complete(self) -> bool:
        return len(self.graph.events) == self.event_count


@dataclass(frozen=True)
class Why:
    """The answer to "why are these one person?" for two identifiers or event ids."""

    a: Node | None
    b: Node | None
    a_entity: str | None
    b_entity: str | None
    chain: list[Node] | None
    message: str


@dataclass
class Explanation:
    asked: str
    entity: Entity | None  # None: a --why whose two ends are not in one entity
    resolved_through: list[Alias] = field(default_factory=list)  # hops from an old id
    why: Why | None = None


RawValues = Mapping[str, Sequence[tuple[str, str | None]]]  # event id -> (attribute, raw value)
SAMPLE_EVENTS = 5


def held_back(
    raw: RawValues,
    stored: Mapping[str, Iterable[str]],
    blocklist_rows: Sequence[tuple[str | None, str]],
) -> tuple[list[Blocked], dict[str, list[str]]]:
    """Compare the rules' values now with the identifiers stored on each event.

    Returns the blocked identifiers (with the blocklist row that blocks them) and every other
    identifier the rules produce that an event does not carry (quarantined, or produced by a
    rule changed since), each with its events in the order of ``raw``."""
    blocklist = Blocklist.from_rows(blocklist_rows)
    blocked: dict[str, tuple[str, list[str]]] = {}
    missing: dict[str, list[str]] = {}
    for event_id, pairs in raw.items():
        have = set(stored.get(event_id, ()))
        for attribute_id, value in pairs:
            norm = normalize(value)
            if norm is None:
                continue
            ident = identifier(attribute_id, norm)
            if blocklist.blocks(attribute_id, norm):
                entry = blocked.setdefault(ident, (_rule(attribute_id, norm, blocklist_rows), []))
                _add(entry[1], event_id)
            elif ident not in have:
                _add(missing.setdefault(ident, []), event_id)
    return [
        Blocked(ident, rule, tuple(evs[:SAMPLE_EVENTS]), len(evs))
        for ident, (rule, evs) in sorted(blocked.items())
    ], dict(sorted(missing.items()))


def _add(events: list[str], event_id: str) -> None:
    if not events or events[-1] != event_id:
        events.append(event_id)


def _rule(attribute_id: str, value: str, rows: Sequence[tuple[str | None, str]]) -> str:
    """Which blocklist entry blocks ``value``: a table row if one does, else the built-in list."""
    key = folded(value)
    for row_attribute, row_value in rows:
        if row_attribute in (None, attribute_id) and folded(normalize(row_value) or "") == key:
            scope = "NULL" if row_attribute is None else repr(row_attribute)
            return f"identifier_blocklist (attribute_id {scope}, value {row_value!r})"
    if key in DEFAULT_BLOCKLIST:
        return "built-in list"
    return "built-in rule (only zeros and dashes)"
