"""The entity state the SQL store keeps, in memory, for the property tests of the hub
quarantine and of split decisions: who owns each identifier, each entity's first event and
identifiers, grouped and merged as ``StitchStore.write`` does."""

from __future__ import annotations

from stream_cps.stitching.grouping import EventKey, StitchEvent, plan


class MemoryEntities:
    """Owners, first events and identifiers per entity; ``apply`` (a batch) and the events'
    own bookkeeping are the subclass's."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.first: dict[str, EventKey] = {}
        self.idents: dict[str, set[str]] = {}  # entity -> identifiers (customer_attributes)
        self.pending: list[StitchEvent] = []  # reset by a purge: the sweep takes them again

    def apply(self, batch: list[StitchEvent]) -> None:
        raise NotImplementedError

    def group(self, view: list[StitchEvent]) -> None:
        """Plan ``view`` (the events as they link) against the state and write the plan."""
        idents = {i for ev in view for i in ev.identifiers}
        owner = {i: self.owner[i] for i in idents if i in self.owner}
        result = plan(view, owner, {e: self.first[e] for e in owner.values()})
        for comp in result.components:
            merged = set(comp.new_identifiers)
            for old in comp.absorbed:
                del self.first[old]
                for ident in self.idents.pop(old):
                    self.owner[ident] = comp.entity_id
                    merged.add(ident)
            for ident in comp.new_identifiers:
                self.owner[ident] = comp.entity_id
            self.first[comp.entity_id] = comp.first_key
            self.idents.setdefault(comp.entity_id, set()).update(merged)

    def forget(self, entity: str) -> set[str]:
        """Delete the entity and free its identifiers (the purge); returns them."""
        gone = self.idents.pop(entity)
        del self.first[entity]
        for ident in gone:
            del self.owner[ident]
        return gone

    def sweep(self, size: int) -> None:
        while self.pending:
            batch, self.pending = self.pending[:size], self.pending[size:]
            self.apply(batch)
