"""Property tests of the incremental grouping core against the offline oracle (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cps.stitching.grouping import StitchEvent, entity_id_for, plan
from tests import oracle

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryState:
    """Applies plans the way the SQL store does: absorb, claim, upsert survivors."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.first: dict[str, tuple[datetime, str]] = {}
        self.event_entity_idents: dict[str, tuple[str, ...]] = {}

    def apply(self, batch: list[StitchEvent]) -> None:
        idents = {i for ev in batch for i in ev.identifiers}
        owner = {i: self.owner[i] for i in idents if i in self.owner}
        keys = {e: self.first[e] for e in owner.values()}
        result = plan(batch, owner, keys)
        for comp in result.components:
            for old in comp.absorbed:
                del self.first[old]
                for ident, entity in list(self.owner.items()):
                    if entity == old:
                        self.owner[ident] = comp.entity_id
            for ident in comp.new_identifiers:
                self.owner[ident] = comp.entity_id
            self.first[comp.entity_id] = comp.first_key
        for ev in batch:
            self.event_entity_idents[ev.id] = ev.identifiers

    def mapping(self) -> dict[str, str | None]:
        return {
            eid: (self.owner[idents[0]] if idents else None)
            for eid, idents in self.event_entity_idents.items()
        }


events_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),  # minutes after T0: ties are likely
        st.lists(st.integers(min_value=0, max_value=25), max_size=3),  # identifier numbers
    ),
    min_size=1,
    max_size=40,
)


def _events(raw: list[tuple[int, list[int]]]) -> list[StitchEvent]:
    return [
        StitchEvent(f"ev{n:03d}", T0 + timedelta(minutes=m), tuple(sorted({f"a:{i}" for i in ids})))
        for n, (m, ids) in enumerate(raw)
    ]


@settings(max_examples=300, deadline=None)
@given(raw=events_strategy, data=st.data())
def test_incremental_matches_oracle_for_any_order_and_batching(
    raw: list[tuple[int, list[int]]], data: st.DataObject
) -> None:
    events = _events(raw)
    order = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=6)))
    state = MemoryState()
    start = 0
    for cut in [*cuts, len(order)]:
        if cut > start:
            state.apply(list(order[start:cut]))
            start = cut
    expected = oracle.partition((ev.id, ev.event_time, ev.identifiers) for ev in events)
    assert state.mapping() == expected
    assert set(state.first) == {e for e in expected.values() if e is not None}


def test_earlier_event_rekeys_and_merge_takes_earliest_id() -> None:
    late = StitchEvent("b", T0 + timedelta(hours=1), ("email:x",))
    early = StitchEvent("a", T0, ("email:x", "phone:1"))
    first = plan([late], {}, {})
    assert [c.entity_id for c in first.components] == [entity_id_for("b")]
    second = plan([early], {"email:x": entity_id_for("b")}, {entity_id_for("b"): late.key})
    comp = second.components[0]
    assert comp.entity_id == entity_id_for("a")
    assert comp.absorbed == [entity_id_for("b")]
    assert comp.absorb_reason == "rekey"
    assert comp.new_identifiers == {"phone:1"}


def test_event_time_tie_breaks_on_event_id() -> None:
    x = StitchEvent("x", T0, ("k:1",))
    y = StitchEvent("y", T0, ("k:1",))
    assert plan([y, x], {}, {}).components[0].entity_id == entity_id_for("x")


def test_events_without_identifiers_join_no_entity() -> None:
    result = plan([StitchEvent("lonely", T0, ())], {}, {})
    assert result.components == []
    assert result.unidentified == ["lonely"]


@given(st.text(max_size=80))
def test_entity_id_is_the_rfc4122_uuid5_of_the_first_event(event_id: str) -> None:
    import uuid

    from stream_cps.stitching.grouping import ENTITY_NAMESPACE

    expected = uuid.uuid5(ENTITY_NAMESPACE, event_id)
    assert entity_id_for(event_id) == str(expected)
    assert uuid.UUID(entity_id_for(event_id)).version == 5
