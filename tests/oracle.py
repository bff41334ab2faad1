"""An offline oracle: connected components by a plain union-find over all events at once.

Deliberately independent of the incremental code: it sees every event together and derives each
entity id from the component's earliest event by (event_time, event id), as docs/stitching.md
specifies.

``quarantined`` is the hub rule done the slow, obvious way: every identifier's distinct partners
per other attribute over all events at once; ``partition(..., blocked=...)`` then treats those
identifiers as absent from the start. Split decisions (docs/stitching.md) are the same
thing: a cut identifier is one more ``blocked``, a ``detached`` event has no identifiers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime

from stream_cps.stitching.grouping import ENTITY_NAMESPACE


def quarantined(
    events: Iterable[tuple[str, datetime, Iterable[str]]], limit: Callable[[str, str], int]
) -> set[str]:
    """Identifiers that co-occur with more than ``limit(attribute, other)`` distinct identifiers
    of one other attribute (a limit of 0: never)."""
    partners: dict[tuple[str, str], set[str]] = {}
    for _, _, idents in events:
        ids = set(idents)
        for x in ids:
            for y in ids:
                ax, ay = x.split(":", 1)[0], y.split(":", 1)[0]
                if ax != ay:
                    partners.setdefault((x, ay), set()).add(y)
    return {
        x
        for (x, other), found in partners.items()
        if 0 < limit(x.split(":", 1)[0], other) < len(found)
    }


def partition(
    events: Iterable[tuple[str, datetime, Iterable[str]]],
    blocked: Iterable[str] = (),
    detached: Iterable[str] = (),
) -> dict[str, str | None]:
    """event id -> entity id (None for events with no identifier outside ``blocked``, and for
    ``detached`` events)."""
    parent: dict[str, str] = {}
    skip = set(blocked)
    alone = set(detached)

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rows = [
        (eid, when, [] if eid in alone else [i for i in idents if i not in skip])
        for eid, when, idents in events
    ]
    for eid, _, idents in rows:
        for ident in idents:
            a, b = find("e:" + eid), find("i:" + ident)
            if a != b:
                parent[a] = b
    first: dict[str, tuple[datetime, str]] = {}
    for eid, when, idents in rows:
        if idents:
            root = find("e:" + eid)
            first[root] = min(first.get(root, (when, eid)), (when, eid))
    return {
        eid: str(uuid.uuid5(ENTITY_NAMESPACE, first[find("e:" + eid)][1])) if idents else None
        for eid, _, idents in rows
    }


def entities(mapping: dict[str, str | None]) -> dict[str, set[str]]:
    """entity id -> its event ids."""
    found: dict[str, set[str]] = {}
    for eid, entity in mapping.items():
        if entity is not None:
            found.setdefault(entity, set()).add(eid)
    return found
