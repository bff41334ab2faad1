"""Outbox commands and what a batch of them means for the index. Pure: no I/O here.

Writers record *that* an entity changed (op and version); the document is built from the
entity's current row when the command is delivered, so a late command never writes old data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Protocol


@dataclass(frozen=True)
class Command:
    seq: int
    entity_id: str
    op: str  # 'upsert' | 'delete'
    version: int
    traceparent: str | None = None  # of the span that wrote it (the relay links to it)
    waited: float | None = None  # seconds since it was queued, when claimed


@dataclass(frozen=True)
class Entity:
    """The current row of a live entity, as the index document is built from it."""

    entity_id: str
    identifiers: list[str]
    attributes: dict[str, Any]
    calculated: datetime | None
    version: int


@dataclass(frozen=True)
class Action:
    """One versioned write: index ``document`` under ``entity_id``, or delete it (None)."""

    entity_id: str
    version: int
    document: Mapping[str, Any] | None

    @property
    def op(self) -> str:
        return "delete" if self.document is None else "index"


class Outcome(Enum):
    """What a sink did with one action, and so what happens to its outbox commands."""

    DELIVERED = "delivered"
    STALE = "stale"  # a newer version is already in the index: as good as delivered
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str | None = None


class Sink(Protocol):
    """Where the relay delivers actions: one result per action, in order.

    The guarantee every sink gives (``tests/contract/test_sinks.py`` holds the OpenSearch one
    and the in-memory one to it): a write carrying version v wins over every version below v
    and is as good as delivered (``STALE``) when the document already has a higher one; a
    delete leaves a tombstone with its version, which rejects older writes. So the sink
    converges to the newest state whatever order, repetition or batching the actions arrive
    in. A whole request that fails for a passing reason raises ``Transient``.
    """

    def write(self, actions: Sequence[Action]) -> list[Result]: ...


@dataclass(frozen=True)
class Planned:
    """The commands of one entity in a batch, reduced to the one that matters: the newest."""

    entity_id: str
    op: str
    version: int
    seqs: tuple[int, ...]


def collapse(commands: Sequence[Command]) -> list[Planned]:
    """Group commands (in seq order) by entity; the newest op wins, with the highest version.

    Taking the highest version also for a delete guards against commands whose transactions
    committed in a different order than they drew versions.
    """
    groups: dict[str, list[Command]] = {}
    for cmd in commands:
        groups.setdefault(cmd.entity_id, []).append(cmd)
    return [
        Planned(
            entity_id,
            cmds[-1].op,
            max(c.version for c in cmds),
            tuple(c.seq for c in cmds),
        )
        for entity_id, cmds in groups.items()
    ]


def document(entity: Entity) -> dict[str, Any]:
    """The index document of an entity (the index mapping lists the same fields)."""
    return {
        "customer_entity_id": entity.entity_id,
        "identifiers": entity.identifiers,
        "attributes": entity.attributes,
        "calculated": entity.calculated.isoformat() if entity.calculated else None,
    }


def plan_actions(
    planned: Sequence[Planned], entities: dict[str, Entity]
) -> list[tuple[Planned, Action | None]]:
    """The write for each planned entity; None for an upsert whose entity no longer exists
    (its delete is in the outbox too, so doing nothing is right)."""
    out: list[tuple[Planned, Action | None]] = []
    for p in planned:
        if p.op == "delete":
            out.append((p, Action(p.entity_id, p.version, None)))
            continue
        entity = entities.get(p.entity_id)
        if entity is None:
            out.append((p, None))
        else:
            # The row is at least as new as every command read: take the larger version.
            out.append((p, Action(p.entity_id, max(p.version, entity.version), document(entity))))
    return out
