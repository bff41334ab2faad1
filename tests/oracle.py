"""An offline oracle: connected components by a plain union-find over all events at once.

Deliberately independent of the incremental code: it sees every event together and derives each
entity id from the component's earliest event by (event_time, event id), as docs/stitching.md
specifies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from stream_cps.stitching.grouping import ENTITY_NAMESPACE


def partition(
    events: Iterable[tuple[str, datetime, Iterable[str]]],
) -> dict[str, str | None]:
    """event id -> entity id (None for events with no identifier)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rows = [(eid, when, list(idents)) for eid, when, idents in events]
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
