"""Hub quarantine: the pure rule (no I/O).

One junk value (a kiosk cookie, a shared test login) co-occurs with thousands of people's
identifiers and glues them into one entity; the blocklist only catches literal junk. So an
identifier is quarantined once it has co-occurred, in the same events, with more than a limit of
distinct identifiers of one other stitching attribute, and from then on links nothing.

The count is over the identifiers the rules extracted (after normalisation and the blocklist,
quarantined ones included) and of distinct pairs, so it only grows and its final value depends
only on the set of events: the final entities are the connected components with every
over-limit identifier removed from the start, whatever the order or batching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from stream_cps.stitching.grouping import StitchEvent
from stream_cps.stitching.normalize import SEPARATOR

# States of cdp_ps.quarantined_identifiers.state; only 'released' stitches again.
QUARANTINED, RELEASED, BLOCKED = "quarantined", "released", "blocked"
STATES = (QUARANTINED, RELEASED, BLOCKED)


def attribute_of(identifier: str) -> str:
    """The stitching attribute of an identifier (``attr:value``; attribute ids hold no ``:``)."""
    return identifier.partition(SEPARATOR)[0]


@dataclass(frozen=True)
class Limits:
    """How many distinct identifiers of another attribute one identifier may co-occur with.

    ``default`` holds for every (attribute, other attribute) pair without an override; 0 turns
    the rule off for that pair."""

    default: int = 100
    overrides: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def parse(cls, default: int, overrides: Mapping[str, str]) -> Limits:
        """From the settings: ``{"cookie:email": "1000"}`` (attribute ids hold no ``:``)."""
        pairs: dict[tuple[str, str], int] = {}
        for key, value in overrides.items():
            attribute, sep, other = key.partition(SEPARATOR)
            if not sep or not attribute or not other or SEPARATOR in other:
                raise ValueError(f"{key!r}: expected ATTRIBUTE:OTHER_ATTRIBUTE")
            limit = int(value)
            if limit < 0:
                raise ValueError(f"{key!r}: a limit must not be negative")
            pairs[(attribute, other)] = limit
        if default < 0:
            raise ValueError("the default limit must not be negative")
        return cls(default, pairs)

    def of(self, attribute: str, other: str) -> int:
        return self.overrides.get((attribute, other), self.default)

    @property
    def enabled(self) -> bool:
        return self.default > 0 or any(v > 0 for v in self.overrides.values())

    @property
    def lowest(self) -> int:
        """The smallest limit in force: counts at or below it can trip nothing."""
        return min(v for v in (self.default, *self.overrides.values()) if v > 0)

    def over(self, identifier: str, other: str, count: int) -> bool:
        limit = self.of(attribute_of(identifier), other)
        return 0 < limit < count


def pairs(events: Iterable[StitchEvent]) -> list[tuple[str, str]]:
    """The distinct co-occurring pairs of identifiers of different attributes, each once as
    (smaller, larger), sorted (concurrent writers insert them in one order: no deadlock)."""
    found: set[tuple[str, str]] = set()
    for ev in events:
        idents = ev.identifiers  # sorted, so a < b below
        if len(idents) < 2:
            continue
        attrs = [attribute_of(i) for i in idents]
        if len(set(attrs)) < 2:
            continue
        for n, a in enumerate(idents):
            for m in range(n + 1, len(idents)):
                if attrs[m] != attrs[n]:
                    found.add((a, idents[m]))
    return sorted(found)


def sides(new_pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """How many new distinct partners each (identifier, other attribute) gained."""
    gained: dict[tuple[str, str], int] = {}
    for a, b in new_pairs:
        for ident, partner in ((a, b), (b, a)):
            key = (ident, attribute_of(partner))
            gained[key] = gained.get(key, 0) + 1
    return gained


@dataclass(frozen=True)
class Trip:
    """An identifier that crossed its limit against ``other`` with ``count`` partners."""

    identifier: str
    other: str
    count: int
    limit: int

    @property
    def attribute(self) -> str:
        return attribute_of(self.identifier)

    @property
    def value(self) -> str:
        return self.identifier.partition(SEPARATOR)[2]


def trips(counts: Iterable[tuple[str, str, int]], limits: Limits) -> list[Trip]:
    """The (identifier, other attribute, count) rows over their limit: one trip per identifier
    (the pair with the highest count), sorted by identifier."""
    best: dict[str, Trip] = {}
    for ident, other, count in counts:
        if limits.over(ident, other, count):
            trip = Trip(ident, other, count, limits.of(attribute_of(ident), other))
            held = best.get(ident)
            if held is None or (trip.count, trip.other) > (held.count, held.other):
                best[ident] = trip
    return [best[i] for i in sorted(best)]


def without(
    events: Iterable[StitchEvent],
    excluded: frozenset[str] | set[str],
    detached: frozenset[str] | set[str] = frozenset(),
) -> list[StitchEvent]:
    """The events as grouping sees them: ``excluded`` identifiers (quarantined, blocked, cut by
    a split) link nothing, and ``detached`` events (a split) link nothing at all."""
    batch = list(events)
    if not excluded and not detached:
        return batch
    return [
        StitchEvent(ev.id, ev.event_time, ())
        if ev.id in detached
        else ev
        if excluded.isdisjoint(ev.identifiers)
        else StitchEvent(
            ev.id, ev.event_time, tuple(i for i in ev.identifiers if i not in excluded)
        )
        for ev in batch
    ]
