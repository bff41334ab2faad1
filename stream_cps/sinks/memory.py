"""An in-memory ``Sink`` with OpenSearch's external versioning (``external_gte``). Pure.

For tests of the relay without a node, and the reference the contract suite holds the
OpenSearch sink to (``tests/contract/test_sinks.py``): both must give the same results for the
same actions. Tombstones are kept for ever (an index keeps them for ``index.gc_deletes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stream_cps.sinks.commands import Action, Outcome, Result


@dataclass(frozen=True)
class Stored:
    version: int
    document: Mapping[str, Any] | None  # None: a tombstone


class MemorySink:
    """Documents by entity id; ``write`` applies actions in order, like one bulk request."""

    def __init__(self) -> None:
        self.stored: dict[str, Stored] = {}

    def write(self, actions: Sequence[Action]) -> list[Result]:
        return [self._one(action) for action in actions]

    def _one(self, action: Action) -> Result:
        current = self.stored.get(action.entity_id)
        if current is not None and action.version < current.version:
            return Result(
                Outcome.STALE,
                f"409 version_conflict_engine_exception: current version [{current.version}] "
                f"is higher than the one provided [{action.version}]",
            )
        self.stored[action.entity_id] = Stored(action.version, action.document)
        return Result(Outcome.DELIVERED)

    def get(self, entity_id: str) -> tuple[int, Mapping[str, Any]] | None:
        """(version, document) of a live document; None when missing or deleted."""
        found = self.stored.get(entity_id)
        if found is None or found.document is None:
            return None
        return found.version, found.document
