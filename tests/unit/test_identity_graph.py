"""The pure side of `explain`: shortest chains (BFS), bounded drawings, held-back values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from stream_cps.stitching.explain.graph import (
    EVENT,
    IDENTIFIER,
    Collapsed,
    EventInfo,
    IdentityGraph,
    Node,
    shortest_chain,
    summarise,
)
from stream_cps.stitching.explain.report import held_back

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(eid: str, minute: int, *identifiers: str) -> EventInfo:
    return EventInfo(eid, "web", "page_view", T0 + timedelta(minutes=minute), identifiers)


def ident(key: str) -> Node:
    return Node(IDENTIFIER, key)


def event(key: str) -> Node:
    return Node(EVENT, key)


def test_chain_between_identifiers_names_the_linking_event() -> None:
    graph = IdentityGraph.of(
        [ev("a", 10, "email:x@a"), ev("b", 5, "cookie:c1"), ev("c", 20, "email:x@a", "cookie:c1")]
    )
    chain = shortest_chain(graph, ident("email:x@a"), ident("cookie:c1"))
    assert chain == [ident("email:x@a"), event("c"), ident("cookie:c1")]


def test_chain_is_the_shortest_of_several_paths() -> None:
    # long way: a-(i1)-b-(i2)-c-(i3)-d ; short way: a-(i1)-e-(i4)... e also carries i3
    graph = IdentityGraph.of(
        [
            ev("a", 1, "k:1", "k:start"),
            ev("b", 2, "k:1", "k:2"),
            ev("c", 3, "k:2", "k:3"),
            ev("d", 4, "k:3", "k:goal"),
            ev("e", 5, "k:start", "k:3"),
        ]
    )
    chain = shortest_chain(graph, ident("k:start"), ident("k:goal"))
    assert chain == [ident("k:start"), event("e"), ident("k:3"), event("d"), ident("k:goal")]


def test_chain_between_events_and_from_an_event_to_an_identifier() -> None:
    graph = IdentityGraph.of([ev("a", 1, "e:1"), ev("b", 2, "e:1", "p:2"), ev("c", 3, "p:2")])
    assert shortest_chain(graph, event("a"), event("c")) == [
        event("a"),
        ident("e:1"),
        event("b"),
        ident("p:2"),
        event("c"),
    ]
    assert shortest_chain(graph, event("a"), ident("e:1")) == [event("a"), ident("e:1")]
    assert shortest_chain(graph, event("a"), event("a")) == [event("a")]


def test_not_connected_or_unknown_gives_none() -> None:
    graph = IdentityGraph.of([ev("a", 1, "e:1"), ev("b", 2, "e:2")])
    assert shortest_chain(graph, ident("e:1"), ident("e:2")) is None
    assert shortest_chain(graph, ident("e:1"), ident("e:404")) is None


def test_same_data_same_chain_whatever_the_order() -> None:
    rows = [ev("b", 2, "k:s", "k:g"), ev("a", 1, "k:s", "k:g"), ev("c", 3, "k:s", "k:g")]
    for order in (rows, rows[::-1]):
        assert shortest_chain(IdentityGraph.of(order), ident("k:s"), ident("k:g")) == [
            ident("k:s"),
            event("a"),
            ident("k:g"),
        ]


def hub(identifiers: int) -> IdentityGraph:
    """One hub cookie on every event, each event with its own e-mail (leaf) identifier."""
    return IdentityGraph.of(
        ev(f"e{n:04d}", n, "cookie:hub", f"email:u{n}@a") for n in range(identifiers - 1)
    )


def test_small_entity_is_drawn_whole() -> None:
    graph = IdentityGraph.of([ev("a", 1, "email:x"), ev("b", 2, "email:x", "cookie:c")])
    drawing = summarise(graph)
    assert drawing.identifiers == {"cookie": ["cookie:c"], "email": ["email:x"]}
    assert [e.id for e in drawing.events] == ["a", "b"]
    assert drawing.collapsed == []
    assert len(drawing.edges) == 3


def test_big_entity_collapses_leaves_keeps_the_hub_and_the_chain() -> None:
    graph = hub(1000)
    chain = shortest_chain(graph, ident("email:u777@a"), ident("email:u3@a"))
    assert chain is not None and len(chain) == 5  # leaf - event - hub - event - leaf
    drawing = summarise(graph, chain, per_attribute=10, max_events=20)
    assert drawing.total_identifiers == 1000 and drawing.total_events == 999
    assert "cookie:hub" in drawing.identifiers["cookie"]
    assert {"email:u777@a", "email:u3@a"} <= set(drawing.identifiers["email"])
    assert len(drawing.identifiers["email"]) == 10
    assert {e.id for e in drawing.events} >= {"e0777", "e0003"}
    assert len(drawing.events) == 20
    assert Collapsed("email", 989) in drawing.collapsed
    assert Collapsed(None, 979) in drawing.collapsed
    assert drawing.node_count == 11 + 20 + 2
    drawn = {n for edge in drawing.edges for n in edge}
    assert set(chain) <= drawn
    # every edge joins two drawn nodes
    nodes: set[Node | Collapsed] = {
        Node(IDENTIFIER, i) for ids in drawing.identifiers.values() for i in ids
    }
    nodes |= {Node(EVENT, e.id) for e in drawing.events} | set(drawing.collapsed)
    assert drawn <= nodes


def test_identifiers_on_most_events_are_kept_before_leaves() -> None:
    events = [ev(f"e{n}", n, "email:shared", f"email:leaf{n}") for n in range(5)]
    events.append(ev("x", 9, "email:two", "email:leafx"))
    events.append(ev("y", 10, "email:two", "email:shared"))
    drawing = summarise(IdentityGraph.of(events), per_attribute=2)
    assert drawing.identifiers["email"] == ["email:shared", "email:two"]
    assert drawing.collapsed == [Collapsed("email", 6)]


def test_held_back_names_the_blocklist_entry_and_lists_missing_identifiers() -> None:
    raw: dict[str, list[tuple[str, str | None]]] = {
        "a": [("email", " X@a "), ("cookie", "Guest"), ("cookie", None)],
        "b": [("email", "X@a"), ("cookie", "000"), ("phone", "null"), ("cookie", "c9")],
    }
    stored = {"a": ["email:X@a"], "b": ["email:X@a"]}
    blocked, missing = held_back(raw, stored, [(None, "guest"), ("phone", "nope")])
    assert [(b.identifier, b.rule, b.events) for b in blocked] == [
        ("cookie:000", "built-in rule (only zeros and dashes)", ("b",)),
        ("cookie:Guest", "identifier_blocklist (attribute_id NULL, value 'guest')", ("a",)),
        ("phone:null", "built-in list", ("b",)),
    ]
    assert missing == {"cookie:c9": ["b"]}  # produced now, not on the event: quarantined?
