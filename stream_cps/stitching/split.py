"""Split (unmerge) by an admin's decision: the pure part (no I/O).

A decision is data the stitcher applies to every batch, as it applies quarantine states: a
**cut** identifier links nothing anywhere (it joins the batch's excluded identifiers, like a
blocked one), a **detached** event links nothing (its identifiers are excluded for that event
only). So the final entities are the connected components of the events with the live
decisions applied from the start, whatever the order in which events and decisions arrived;
``parts`` is that grouping over one entity's events, for ``stream-cps split --dry-run``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from stream_cps.stitching import grouping, quarantine
from stream_cps.stitching.grouping import StitchEvent

# cdp_ps.split_decisions.kind
CUT, DETACH = "cut", "detach"
KINDS = (CUT, DETACH)


@dataclass(frozen=True)
class Part:
    """One entity a split would leave, with the id the usual rule gives it."""

    entity_id: str
    first_event_id: str
    first_event_time: datetime
    events: tuple[str, ...]
    identifiers: tuple[str, ...]


@dataclass(frozen=True)
class Parts:
    """What grouping makes of an entity's events with the decisions applied."""

    parts: list[Part]  # earliest first: the first keeps the old id when it holds its first event
    unlinked: list[str]  # events left with no identifier (a detached one, one with only the cut)


def parts(
    events: Iterable[StitchEvent],
    cut: frozenset[str] | set[str] = frozenset(),
    detached: frozenset[str] | set[str] = frozenset(),
) -> Parts:
    """Group ``events`` (an entity's, as stored) afresh with ``cut`` identifiers and
    ``detached`` events linking nothing: the entities a restitch would build from them."""
    plan = grouping.plan(quarantine.without(events, cut, detached), {}, {})
    found = [
        Part(
            comp.entity_id,
            comp.first_key[1],
            comp.first_key[0],
            tuple(sorted(ev.id for ev in comp.events)),
            tuple(sorted(comp.event_identifiers)),
        )
        for comp in plan.components
    ]
    found.sort(key=lambda p: (p.first_event_time, p.first_event_id))
    return Parts(found, sorted(plan.unidentified))
