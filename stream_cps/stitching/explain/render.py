"""``explain`` output: text for a person, JSON for a script, DOT source, and SVG/PNG drawn by
Graphviz's ``dot`` (run as a program: no Python binding needed for one call).

Lists are capped (``limit`` events, ``limit`` identifiers per attribute) and always come with
complete counts; the picture is ``graph.summarise``'s bounded drawing, chain highlighted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from itertools import pairwise
from typing import Any

from stream_cps.errors import ConfigError, StreamCpsError
from stream_cps.stitching.explain.graph import (
    EVENT,
    Collapsed,
    EventInfo,
    IdentityGraph,
    Node,
    attribute_of,
    summarise,
)
from stream_cps.stitching.explain.report import Alias, Entity, Explanation, Why

TEXT_FORMATS = ("text", "json", "dot")
PICTURE_FORMATS = ("svg", "png")
DOT_TIMEOUT_S = 120
LABEL_MAX = 60


def render(explanation: Explanation, fmt: str, limit: int = 50) -> bytes:
    """The explanation in ``fmt`` (text | json | dot | svg | png)."""
    if fmt == "text":
        return as_text(explanation, limit).encode()
    if fmt == "json":
        return (
            json.dumps(as_json(explanation, limit), indent=2, ensure_ascii=False) + "\n"
        ).encode()
    source = as_dot(explanation)
    if fmt == "dot":
        return source.encode()
    if fmt in PICTURE_FORMATS:
        return draw(source, fmt)
    raise ConfigError(f"explain --format: unknown format {fmt!r}")


# -- JSON -------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _alias(alias: Alias) -> dict[str, Any]:
    return {
        "old_id": alias.old_id,
        "new_id": alias.new_id,
        "reason": alias.reason,
        "created": _time(alias.created),
    }


def _event(ev: EventInfo) -> dict[str, Any]:
    return {
        "id": ev.id,
        "source_id": ev.source_id,
        "type": ev.type,
        "event_time": _time(ev.event_time),
        "identifiers": list(ev.identifiers),
    }


def _by_attribute(identifiers: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for ident in sorted(identifiers):
        grouped.setdefault(attribute_of(ident), []).append(ident)
    return grouped


def _entity_json(entity: Entity, limit: int) -> dict[str, Any]:
    grouped = _by_attribute(entity.identifiers)
    events = list(entity.graph.events.values())
    return {
        "id": entity.id,
        "first_event": {"id": entity.first_event_id, "time": _time(entity.first_event_time)},
        "identifier_count": len(entity.identifiers),
        "identifiers_per_attribute": {a: len(v) for a, v in grouped.items()},
        "identifiers": {a: v[:limit] for a, v in grouped.items()},
        "event_count": entity.event_count,
        "events_per_type": entity.events_by_type,
        "events": [_event(ev) for ev in events[:limit]],
        "events_listed": min(limit, len(events)),
        "merged_in": [_alias(a) for a in entity.merged_in],
        "blocked": [
            {
                "identifier": b.identifier,
                "rule": b.rule,
                "event_count": b.event_count,
                "events": list(b.events),
            }
            for b in entity.blocked
        ],
        "quarantined": None
        if entity.quarantined is None
        else [
            {
                "identifier": q.identifier,
                "state": q.state,
                "reason": q.reason,
                "cooccurring": q.cooccurring,
                "limit_value": q.limit_value,
                "other_attribute_id": q.other_attribute_id,
                "created": _time(q.created),
                "decided": _time(q.decided),
                "on_entity": q.on_entity,
                "events": list(q.events),
            }
            for q in entity.quarantined
        ],
        "stitching_errors": [
            {
                "attribute_id": e.attribute_id,
                "event_id": e.event_id,
                "message": e.message,
                "created": _time(e.created),
            }
            for e in entity.errors
        ],
        "attributes": entity.attributes,
        "calculated": _time(entity.calculated),
        "modified": _time(entity.modified),
        "notes": entity.notes,
    }


def _node_json(node: Node | None, graph: IdentityGraph | None) -> dict[str, Any] | None:
    if node is None:
        return None
    out: dict[str, Any] = {"kind": node.kind, "key": node.key}
    if node.kind == EVENT and graph is not None and node.key in graph.events:
        out.update(_event(graph.events[node.key]))
        del out["id"]
    return out


def _why_json(why: Why, graph: IdentityGraph | None) -> dict[str, Any]:
    return {
        "a": _node_json(why.a, None),
        "b": _node_json(why.b, None),
        "a_entity": why.a_entity,
        "b_entity": why.b_entity,
        "connected": why.a_entity is not None and why.a_entity == why.b_entity,
        "chain": None if why.chain is None else [_node_json(n, graph) for n in why.chain],
        "linking_events": None
        if why.chain is None
        else [n.key for n in why.chain if n.kind == EVENT],
        "message": why.message,
    }


def as_json(explanation: Explanation, limit: int = 50) -> dict[str, Any]:
    entity = explanation.entity
    return {
        "asked": explanation.asked,
        "resolved_through": [_alias(a) for a in explanation.resolved_through],
        "entity": None if entity is None else _entity_json(entity, limit),
        "why": None
        if explanation.why is None
        else _why_json(explanation.why, entity.graph if entity else None),
    }


# -- text -------------------------------------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _event_line(ev: EventInfo) -> str:
    return f"{_time(ev.event_time)}  {ev.id}  {ev.source_id}/{ev.type}  {' '.join(ev.identifiers)}"


def as_text(explanation: Explanation, limit: int = 50) -> str:
    out: list[str] = []
    why, entity = explanation.why, explanation.entity
    if why is not None:
        out.append(f"why: {why.message}")
        if why.chain is not None and entity is not None:
            for node in why.chain:
                if node.kind == EVENT:
                    out.append(f"    event {_event_line(entity.graph.events[node.key])}")
                else:
                    out.append(f"  {node.key}")
        out.append("")
    for alias in explanation.resolved_through:
        out.append(f"{alias.old_id} -> {alias.new_id} ({alias.reason}, {_time(alias.created)})")
    if entity is None:
        return "\n".join(out) + "\n"
    grouped = _by_attribute(entity.identifiers)
    out.append(f"entity {entity.id}")
    out.append(f"first event: {entity.first_event_id} at {_time(entity.first_event_time)}")
    out.append(
        f"identifiers: {len(entity.identifiers)} "
        f"({_counts({a: len(v) for a, v in grouped.items()})})"
    )
    for attribute, idents in grouped.items():
        more = f" ... +{len(idents) - limit} more" if len(idents) > limit else ""
        out.append(f"  {attribute}: {' '.join(idents[:limit])}{more}")
    events = list(entity.graph.events.values())
    out.append(f"events: {entity.event_count} ({_counts(entity.events_by_type)})")
    out.append("  time  id  source/type  identifiers it carried (linked)")
    out.extend(f"  {_event_line(ev)}" for ev in events[:limit])
    if entity.event_count > min(limit, len(events)):
        out.append(f"  ... {entity.event_count - min(limit, len(events))} more events")
    out.append(f"merged into it (entity_aliases): {len(entity.merged_in) or 'none'}")
    out.extend(
        f"  {a.old_id} -> {a.new_id} ({a.reason}, {_time(a.created)})" for a in entity.merged_in
    )
    out.append(f"blocked values on its events: {len(entity.blocked) or 'none'}")
    for b in entity.blocked:
        out.append(
            f"  {b.identifier}: {b.rule}; {b.event_count} event(s), e.g. {' '.join(b.events)}"
        )
    if entity.quarantined is None:
        out.append("quarantined identifiers: (no quarantined_identifiers table)")
    else:
        out.append(f"quarantined identifiers touching it: {len(entity.quarantined) or 'none'}")
        for q in entity.quarantined:
            where = "on the entity" if q.on_entity else f"held back from {' '.join(q.events)}"
            out.append(
                f"  {q.identifier}: {q.state} ({q.reason or 'no reason'}; co-occurring "
                f"{q.cooccurring} > limit {q.limit_value}; {_time(q.created)}); {where}"
            )
    if entity.errors:
        out.append(f"stitching errors on its events (latest {len(entity.errors)}):")
        out.extend(
            f"  {e.event_id} {e.attribute_id}: {e.message} ({_time(e.created)})"
            for e in entity.errors
        )
    due = entity.calculated is None or (
        entity.modified is not None and entity.calculated < entity.modified
    )
    out.append(
        f"attributes: calculated {_time(entity.calculated) or 'never'}, modified "
        f"{_time(entity.modified)}{' (due for calculation)' if due else ''}"
    )
    out.extend(
        f"  {k}: {json.dumps(v, ensure_ascii=False)}" for k, v in sorted(entity.attributes.items())
    )
    out.extend(f"note: {n}" for n in entity.notes)
    return "\n".join(out) + "\n"


# -- DOT --------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """A DOT double-quoted string: a newline becomes a line break of the label, a backslash
    or quote stays literal, other control characters become spaces."""
    parts = (
        "".join(ch if ch.isprintable() else " " for ch in line)
        .replace("\\", "\\\\")
        .replace('"', '\\"')
        for line in text.split("\n")
    )
    return '"' + "\\n".join(parts) + '"'


def _short(text: str) -> str:
    return text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1] + "…"


def _id(end: Node | Collapsed) -> str:
    if isinstance(end, Collapsed):
        return _quote(f"more:{end.key}" if end.key is not None else "more-events")
    return _quote(("e:" if end.kind == EVENT else "i:") + end.key)


def as_dot(explanation: Explanation, per_attribute: int = 12, max_events: int = 40) -> str:
    """The identity graph: identifiers clustered by attribute, events as boxes, the --why
    chain in red; big entities summarised (``graph.summarise``)."""
    entity, why = explanation.entity, explanation.why
    lines = [
        "graph identity {",
        "  graph [rankdir=LR, fontname=Helvetica, fontsize=11, labelloc=t];",
        "  node [fontname=Helvetica, fontsize=9];",
        "  edge [color=gray40];",
    ]
    if entity is None:  # a --why whose ends are apart: both ends and the message
        lines.append(f"  label={_quote(why.message if why else explanation.asked)};")
        for node in (why.a, why.b) if why else ():
            if node is not None:
                lines.append(f"  {_id(node)} [label={_quote(_short(node.key))}, color=red];")
        return "\n".join([*lines, "}"]) + "\n"
    chain = why.chain if why and why.chain else []
    drawing = summarise(entity.graph, chain, per_attribute, max_events)
    on_chain = set(chain)
    title = (
        f"entity {entity.id}: {drawing.total_identifiers} identifiers, "
        f"{drawing.total_events} events"
    )
    if why is not None:
        title += f"\n{why.message}"
    lines.append(f"  label={_quote(title)};")
    collapsed = {c.key: c for c in drawing.collapsed}
    for n, (attribute, idents) in enumerate(sorted(drawing.identifiers.items())):
        total = sum(1 for i in entity.graph.events_of if attribute_of(i) == attribute)
        lines.append(f"  subgraph cluster_{n} {{")
        lines.append(f"    label={_quote(f'{attribute} ({total})')}; style=rounded; color=gray60;")
        for ident in idents:
            node = Node("identifier", ident)
            style = ", color=red, penwidth=2, fontcolor=red" if node in on_chain else ""
            lines.append(f"    {_id(node)} [label={_quote(_short(ident))}, shape=ellipse{style}];")
        if attribute in collapsed:
            more = collapsed[attribute]
            lines.append(
                f"    {_id(more)} [label={_quote(f'+{more.count} more {attribute}')}, "
                "shape=ellipse, style=dashed];"
            )
        lines.append("  }")
    for ev in drawing.events:
        node = Node(EVENT, ev.id)
        style = ", color=red, penwidth=2, fontcolor=red" if node in on_chain else ""
        label = f"{_short(ev.id)}\n{ev.source_id}/{ev.type}\n{_time(ev.event_time)}"
        lines.append(f"  {_id(node)} [label={_quote(label)}, shape=box{style}];")
    if None in collapsed:
        more = collapsed[None]
        lines.append(
            f"  {_id(more)} [label={_quote(f'+{more.count} more events')}, shape=box, "
            "style=dashed];"
        )
    chain_edges = {frozenset(pair) for pair in pairwise(chain)}
    for a, b in drawing.edges:
        style = " [color=red, penwidth=3]" if frozenset((a, b)) in chain_edges else ""
        lines.append(f"  {_id(a)} -- {_id(b)}{style};")
    return "\n".join([*lines, "}"]) + "\n"


def require_dot(fmt: str) -> str:
    """The path of Graphviz's ``dot``, or a one-line error saying how to get it."""
    dot = shutil.which("dot")
    if dot is None:
        raise ConfigError(
            f"explain --format {fmt}: needs Graphviz's `dot` on PATH "
            "(Debian: apt-get install graphviz); --format dot prints the source instead"
        )
    return dot


def draw(source: str, fmt: str) -> bytes:
    """SVG or PNG bytes of DOT ``source``, by Graphviz's ``dot``."""
    dot = require_dot(fmt)
    try:
        done = subprocess.run(
            [dot, f"-T{fmt}"],
            input=source.encode(),
            capture_output=True,
            timeout=DOT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StreamCpsError(f"explain: dot took longer than {DOT_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise StreamCpsError(f"explain: dot failed: {reason[-1] if reason else done.returncode}")
    return done.stdout
