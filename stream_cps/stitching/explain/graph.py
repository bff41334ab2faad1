"""The identity graph of one entity: identifiers and events as the two sides of a bipartite
graph, the shortest chain between two of its nodes, and a bounded summary for drawing (pure).

An entity is a connected component of events sharing identifiers, so "why are these one
person?" is answered by the shortest path between the two nodes: it alternates identifier,
event, identifier, ... and every event on it is one that linked its two neighbours.

Big entities (a hub identifier glues thousands of events) must still draw as something a
person can read, so ``summarise`` keeps a bounded number of nodes: the chain always, then the
identifiers seen on most events (per attribute) and the events touching most kept identifiers;
the rest of an attribute becomes one "+N more" node, the rest of the events one more node.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from stream_cps.stitching.normalize import SEPARATOR

IDENTIFIER, EVENT = "identifier", "event"


@dataclass(frozen=True, order=True)
class Node:
    """One node: ``kind`` is ``identifier`` (key ``attr:value``) or ``event`` (key its id)."""

    kind: str
    key: str


def attribute_of(identifier: str) -> str:
    """The stitching attribute id of an identifier (ids never contain the separator)."""
    return identifier.split(SEPARATOR, 1)[0]


@dataclass(frozen=True)
class EventInfo:
    """One event of the entity, as stitched: its identifiers are those it linked."""

    id: str
    source_id: str | None
    type: str | None
    event_time: datetime
    identifiers: tuple[str, ...]


@dataclass
class IdentityGraph:
    """Adjacency of the bipartite identifier-event graph of the events given."""

    events: dict[str, EventInfo] = field(default_factory=dict)
    events_of: dict[str, list[str]] = field(default_factory=dict)  # identifier -> event ids

    @classmethod
    def of(cls, events: Iterable[EventInfo]) -> IdentityGraph:
        graph = cls()
        for ev in sorted(events, key=lambda e: (e.event_time, e.id)):
            graph.events[ev.id] = ev
            for ident in ev.identifiers:
                graph.events_of.setdefault(ident, []).append(ev.id)
        return graph

    def has(self, node: Node) -> bool:
        return (node.key in self.events) if node.kind == EVENT else (node.key in self.events_of)

    def neighbours(self, node: Node) -> list[Node]:
        """Events of an identifier (earliest first), identifiers of an event (sorted)."""
        if node.kind == EVENT:
            return [Node(IDENTIFIER, i) for i in sorted(self.events[node.key].identifiers)]
        return [Node(EVENT, e) for e in self.events_of.get(node.key, ())]

    def identifiers_by_attribute(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for ident in sorted(self.events_of):
            grouped.setdefault(attribute_of(ident), []).append(ident)
        return grouped


def shortest_chain(graph: IdentityGraph, start: Node, goal: Node) -> list[Node] | None:
    """The shortest path from ``start`` to ``goal`` (both included), or None when they are not
    connected among the graph's events. Breadth-first, neighbours in a fixed order (events
    earliest first, identifiers sorted), so the same data always gives the same chain."""
    if not (graph.has(start) and graph.has(goal)):
        return None
    parent: dict[Node, Node | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            chain: list[Node] = []
            step: Node | None = node
            while step is not None:
                chain.append(step)
                step = parent[step]
            return chain[::-1]
        for nxt in graph.neighbours(node):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


@dataclass(frozen=True)
class Collapsed:
    """Nodes left out of a drawing, shown as one node: ``key`` is the attribute id for hidden
    identifiers, or None for hidden events."""

    key: str | None
    count: int


@dataclass
class Drawing:
    """What to draw: kept identifiers by attribute, kept events, collapsed nodes, edges.

    Edge ends are ``Node``s or ``Collapsed``; ``chain`` holds the highlighted path's nodes."""

    identifiers: dict[str, list[str]]
    events: list[EventInfo]
    collapsed: list[Collapsed]
    edges: list[tuple[Node | Collapsed, Node | Collapsed]]
    chain: list[Node]
    total_identifiers: int
    total_events: int

    @property
    def node_count(self) -> int:
        return sum(map(len, self.identifiers.values())) + len(self.events) + len(self.collapsed)


def summarise(
    graph: IdentityGraph,
    chain: Sequence[Node] = (),
    per_attribute: int = 12,
    max_events: int = 40,
) -> Drawing:
    """A drawing of at most ``per_attribute`` identifiers per attribute and ``max_events``
    events (plus the chain's nodes and one collapsed node per attribute and for events).

    Kept first: the chain; then identifiers by how many events carry them (the links that
    hold the entity together; leaf identifiers, seen on one event, go first into "+N more"),
    then events by how many kept identifiers they touch, earliest first on ties."""
    on_chain = set(chain)
    kept_idents: dict[str, list[str]] = {}
    hidden_idents: dict[str, set[str]] = {}
    for attribute, idents in graph.identifiers_by_attribute().items():
        must = [i for i in idents if Node(IDENTIFIER, i) in on_chain]
        rest = sorted(
            (i for i in idents if Node(IDENTIFIER, i) not in on_chain),
            key=lambda i: (-len(graph.events_of[i]), i),
        )
        room = max(per_attribute - len(must), 0)
        kept_idents[attribute] = sorted(must + rest[:room])
        if rest[room:]:
            hidden_idents[attribute] = set(rest[room:])
    kept = {i for idents in kept_idents.values() for i in idents}

    order = {eid: n for n, eid in enumerate(graph.events)}  # earliest first
    must_events = [e for e in graph.events if Node(EVENT, e) in on_chain]
    other = sorted(
        (e for e in graph.events if Node(EVENT, e) not in on_chain),
        key=lambda e: (-sum(i in kept for i in graph.events[e].identifiers), order[e]),
    )
    room = max(max_events - len(must_events), 0)
    shown = sorted(must_events + other[:room], key=order.__getitem__)
    hidden_events = other[room:]

    collapsed = {a: Collapsed(a, len(h)) for a, h in sorted(hidden_idents.items())}
    more_events = Collapsed(None, len(hidden_events)) if hidden_events else None
    edges: list[tuple[Node | Collapsed, Node | Collapsed]] = []
    for eid in shown:
        to_collapsed: set[str] = set()
        for ident in sorted(graph.events[eid].identifiers):
            if ident in kept:
                edges.append((Node(EVENT, eid), Node(IDENTIFIER, ident)))
            else:
                to_collapsed.add(attribute_of(ident))
        edges.extend((Node(EVENT, eid), collapsed[a]) for a in sorted(to_collapsed))
    if more_events is not None:
        reached: set[Node | Collapsed] = set()
        for eid in hidden_events:
            for ident in graph.events[eid].identifiers:
                reached.add(
                    Node(IDENTIFIER, ident) if ident in kept else collapsed[attribute_of(ident)]
                )
        edges.extend((more_events, end) for end in sorted(reached, key=_edge_order))
    return Drawing(
        identifiers=kept_idents,
        events=[graph.events[e] for e in shown],
        collapsed=[*collapsed.values(), *([more_events] if more_events else [])],
        edges=edges,
        chain=list(chain),
        total_identifiers=len(graph.events_of),
        total_events=len(graph.events),
    )


def _edge_order(end: Node | Collapsed) -> tuple[str, str]:
    return (end.kind, end.key) if isinstance(end, Node) else ("~", end.key or "")
