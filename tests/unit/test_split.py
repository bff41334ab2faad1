"""Property tests of split decisions (docs/stitching.md, "Split"): cuts, detaches and undos
applied at random points of a randomly ordered, randomly batched stream, with the purge and
reset the SQL store does, end where the offline oracle (the live decisions applied from the
start) and a run that recorded them before any event say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cps.stitching import quarantine, split
from stream_cps.stitching.grouping import StitchEvent, entity_id_for
from tests import oracle
from tests.memory_state import MemoryEntities

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryStitch(MemoryEntities):
    """The stitching state in memory, decisions included: a cut purges the entity owning the
    identifier; a detach purges the event's entity; undoing a cut purges the entities sharing
    an event with it and resets those events (remembered where it was dropped); undoing a
    detach resets the event. A purge resets every stitched event of the entity."""

    def __init__(self) -> None:
        super().__init__()
        self.extracted: dict[str, StitchEvent] = {}  # stitched events, as the rules saw them
        self.stored: dict[str, tuple[str, ...]] = {}  # what customer_events.identifiers holds
        self.cut: set[str] = set()
        self.detached: set[str] = set()
        self.dropped: dict[str, set[str]] = {}  # cut identifier -> events it was dropped from

    # -- the batch ---------------------------------------------------------------------------

    def apply(self, batch: list[StitchEvent]) -> None:
        view = quarantine.without(batch, self.cut, self.detached)
        for ev in batch:
            for ident in set(ev.identifiers) & self.cut:
                self.dropped.setdefault(ident, set()).add(ev.id)
        self.group(view)
        for ev, seen in zip(batch, view, strict=True):
            self.extracted[ev.id] = ev
            self.stored[ev.id] = seen.identifiers

    def _purge(self, entity: str) -> None:
        gone = self.forget(entity)
        for eid in [e for e, idents in self.stored.items() if gone.intersection(idents)]:
            self._reset(eid)

    def _reset(self, eid: str) -> None:
        self.pending.append(self.extracted.pop(eid))
        del self.stored[eid]

    # -- the admin ---------------------------------------------------------------------------

    def cut_identifier(self, ident: str) -> None:
        self.cut.add(ident)
        if ident in self.owner:
            self._purge(self.owner[ident])

    def detach_event(self, eid: str) -> None:
        self.detached.add(eid)
        stored = self.stored.get(eid)
        if stored:
            self._purge(self.owner[stored[0]])

    def undo_cut(self, ident: str) -> None:
        self.cut.discard(ident)
        events = [e for e in sorted(self.dropped.pop(ident, ())) if e in self.stored]
        owners = {self.owner[i] for e in events for i in self.stored[e]}
        for entity in sorted(owners):
            self._purge(entity)
        for eid in events:
            if eid in self.stored:
                self._reset(eid)

    def undo_detach(self, eid: str) -> None:
        self.detached.discard(eid)
        if eid in self.stored:
            self._reset(eid)

    def mapping(self) -> dict[str, str | None]:
        assert not self.pending
        return {
            eid: self.owner[idents[0]] if idents else None for eid, idents in self.stored.items()
        }


events_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),  # minutes after T0: ties are likely
        st.lists(st.integers(0, 8), max_size=2),  # e-mail numbers
        st.lists(st.integers(0, 10), max_size=2),  # cookie numbers
    ),
    min_size=1,
    max_size=40,
)

# (when: index of the batch it precedes, what, which): what 0 cut, 1 detach, 2 undo one live
operations = st.lists(
    st.tuples(st.integers(0, 8), st.integers(0, 2), st.integers(0, 1000)), max_size=8
)


def _events(raw: list[tuple[int, list[int], list[int]]]) -> list[StitchEvent]:
    return [
        StitchEvent(
            f"ev{n:03d}",
            T0 + timedelta(minutes=minute),
            tuple(sorted({f"email:{e}" for e in emails} | {f"cookie:{c}" for c in cookies})),
        )
        for n, (minute, emails, cookies) in enumerate(raw)
    ]


def _decide(store: MemoryStitch, events: list[StitchEvent], what: int, which: int) -> None:
    idents = sorted({i for ev in events for i in ev.identifiers})
    if what == 0 and idents:
        ident = idents[which % len(idents)]
        if ident not in store.cut:
            store.cut_identifier(ident)
    elif what == 1:
        eid = events[which % len(events)].id
        if eid not in store.detached:
            store.detach_event(eid)
    else:
        live = [("cut", i) for i in sorted(store.cut)] + [
            ("detach", e) for e in sorted(store.detached)
        ]
        if live:
            kind, key = live[which % len(live)]
            (store.undo_cut if kind == "cut" else store.undo_detach)(key)


@settings(max_examples=400, deadline=None)
@given(raw=events_strategy, ops=operations, data=st.data())
def test_decisions_at_any_point_give_the_partition_of_applying_them_first(
    raw: list[tuple[int, list[int], list[int]]],
    ops: list[tuple[int, int, int]],
    data: st.DataObject,
) -> None:
    events = _events(raw)
    order = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=6)))
    size = data.draw(st.integers(1, 10))
    bounds = [0, *[c for c in cuts if c < len(order)], len(order)]
    batches = [list(order[a:b]) for a, b in pairwise(bounds) if b > a]
    store = MemoryStitch()
    for n, batch in enumerate([*batches, []]):
        for when, what, which in ops:
            if min(when, len(batches)) == n:
                _decide(store, events, what, which)
        store.sweep(size)
        if batch:
            store.apply(batch)
            store.sweep(size)
    store.sweep(size)

    rows = [(ev.id, ev.event_time, ev.identifiers) for ev in events]
    want = oracle.partition(rows, store.cut, store.detached)
    assert store.mapping() == want
    assert set(store.first) == {e for e in want.values() if e is not None}

    first = MemoryStitch()
    first.cut, first.detached = set(store.cut), set(store.detached)
    first.apply(sorted(events, key=lambda ev: ev.key))
    assert first.mapping() == want


def test_a_cut_splits_and_the_part_with_the_earliest_event_keeps_the_id() -> None:
    events = [
        StitchEvent("p0", T0, ("cookie:shared", "email:p")),
        StitchEvent("q0", T0 + timedelta(minutes=1), ("cookie:shared", "email:q")),
        StitchEvent("p1", T0 + timedelta(minutes=2), ("email:p",)),
    ]
    assert len(split.parts(events).parts) == 1
    found = split.parts(events, cut={"cookie:shared"})
    assert [(p.entity_id, p.events, p.identifiers) for p in found.parts] == [
        (entity_id_for("p0"), ("p0", "p1"), ("email:p",)),
        (entity_id_for("q0"), ("q0",), ("email:q",)),
    ]
    assert found.unlinked == []


def test_a_detached_event_links_nothing_and_is_left_unlinked() -> None:
    events = [
        StitchEvent("a0", T0, ("email:a",)),
        StitchEvent("agent", T0 + timedelta(minutes=1), ("cookie:agent", "email:a", "email:b")),
        StitchEvent("b0", T0 + timedelta(minutes=2), ("email:b",)),
    ]
    found = split.parts(events, detached={"agent"})
    assert [p.entity_id for p in found.parts] == [entity_id_for("a0"), entity_id_for("b0")]
    assert found.unlinked == ["agent"]
