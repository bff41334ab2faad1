"""Property tests of the hub quarantine core: incremental counting, quarantine and restitch
(applied the way the SQL store does) end where the offline oracle, which blocks every
identifier over its limit from the start, says, for any order and batching."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cps.stitching import quarantine
from stream_cps.stitching.grouping import StitchEvent
from tests import oracle
from tests.memory_state import MemoryEntities

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryStore(MemoryEntities):
    """The stitching state in memory: distinct pairs and counts, the quarantine list, owners,
    entities; a newly quarantined identifier purges its entity and resets its events."""

    def __init__(self, limits: quarantine.Limits) -> None:
        super().__init__()
        self.limits = limits
        self.pairs: set[tuple[str, str]] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.quarantined: set[str] = set()
        self.stitched: dict[str, StitchEvent] = {}  # event id -> event as extracted

    def apply(self, batch: list[StitchEvent]) -> None:
        new = [p for p in quarantine.pairs(batch) if p not in self.pairs]
        self.pairs.update(new)
        grown = []
        for key, gained in quarantine.sides(new).items():
            self.counts[key] = self.counts.get(key, 0) + gained
            grown.append((*key, self.counts[key]))
        fresh = [t.identifier for t in quarantine.trips(grown, self.limits)]
        fresh = [i for i in fresh if i not in self.quarantined]
        self.quarantined.update(fresh)
        for entity in sorted({self.owner[i] for i in fresh if i in self.owner}):
            self._purge(entity)
        view = quarantine.without(batch, self.quarantined)
        self.group(view)
        for ev in batch:
            self.stitched[ev.id] = ev

    def _purge(self, entity: str) -> None:
        gone = self.forget(entity)
        for eid, ev in list(self.stitched.items()):
            if gone.intersection(ev.identifiers):
                del self.stitched[eid]
                self.pending.append(ev)

    def mapping(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for eid, ev in self.stitched.items():
            linked = [i for i in ev.identifiers if i not in self.quarantined]
            out[eid] = self.owner[linked[0]] if linked else None
        return out


# People: a few cookies and an e-mail each; hubs: cookies shared by many people's events.
events_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),  # minutes after T0: ties are likely
        st.lists(st.integers(0, 12), max_size=2),  # e-mail numbers
        st.lists(st.integers(0, 15), max_size=2),  # cookie numbers
        st.booleans(),  # also carries the hub cookie
    ),
    min_size=1,
    max_size=50,
)


def _events(raw: list[tuple[int, list[int], list[int], bool]]) -> list[StitchEvent]:
    out = []
    for n, (minute, emails, cookies, hub) in enumerate(raw):
        idents = {f"email:{e}" for e in emails} | {f"cookie:{c}" for c in cookies}
        if hub:
            idents.add("cookie:hub")
        out.append(StitchEvent(f"ev{n:03d}", T0 + timedelta(minutes=minute), tuple(sorted(idents))))
    return out


limits_strategy = st.builds(
    lambda default, cookie_email: quarantine.Limits(
        default, {} if cookie_email is None else {("cookie", "email"): cookie_email}
    ),
    st.integers(0, 4),
    st.none() | st.integers(0, 6),
)


@settings(max_examples=400, deadline=None)
@given(raw=events_strategy, limits=limits_strategy, data=st.data())
def test_final_entities_equal_the_oracle_with_hubs_blocked_from_the_start(
    raw: list[tuple[int, list[int], list[int], bool]],
    limits: quarantine.Limits,
    data: st.DataObject,
) -> None:
    events = _events(raw)
    order = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=6)))
    size = data.draw(st.integers(1, 10))
    store = MemoryStore(limits)
    start = 0
    for cut in [*cuts, len(order)]:
        if cut > start:
            store.apply(list(order[start:cut]))
            store.sweep(size)
            start = cut
    rows = [(ev.id, ev.event_time, ev.identifiers) for ev in events]
    blocked = oracle.quarantined(rows, limits.of)
    assert store.quarantined == blocked
    expected = oracle.partition(rows, blocked)
    assert store.mapping() == expected
    assert set(store.first) == {e for e in expected.values() if e is not None}


def test_a_person_with_thirty_cookies_and_one_email_is_not_a_hub() -> None:
    events = [StitchEvent(f"e{n}", T0, ("email:me", f"cookie:{n}")) for n in range(30)]
    store = MemoryStore(quarantine.Limits())
    store.apply(events)
    assert store.quarantined == set()
    assert len(set(store.mapping().values())) == 1


def test_a_kiosk_cookie_over_the_limit_splits_its_people() -> None:
    events = [StitchEvent(f"e{n:03d}", T0, ("cookie:kiosk", f"email:{n}")) for n in range(101)]
    store = MemoryStore(quarantine.Limits())
    store.apply(events[:60])
    assert len(store.idents) == 1
    store.apply(events[60:])
    store.sweep(1000)
    assert store.quarantined == {"cookie:kiosk"}
    assert len(store.idents) == 101


def test_trips_report_the_pair_that_crossed_with_its_limit() -> None:
    limits = quarantine.Limits(100, {("cookie", "email"): 2})
    found = quarantine.trips(
        [("cookie:k", "email", 3), ("cookie:k", "phone", 2), ("email:x", "cookie", 3)], limits
    )
    assert found == [quarantine.Trip("cookie:k", "email", 3, 2)]
    assert (found[0].attribute, found[0].value) == ("cookie", "k")


def test_pairs_are_distinct_cross_attribute_and_ordered() -> None:
    evs = [
        StitchEvent("a", T0, ("cookie:1", "cookie:2", "email:x")),
        StitchEvent("b", T0, ("cookie:1", "email:x")),
    ]
    assert quarantine.pairs(evs) == [("cookie:1", "email:x"), ("cookie:2", "email:x")]
    assert quarantine.sides(quarantine.pairs(evs)) == {
        ("cookie:1", "email"): 1,
        ("cookie:2", "email"): 1,
        ("email:x", "cookie"): 2,
    }


@pytest.mark.parametrize("key", ["cookie", "cookie:", ":email", "a:b:c"])
def test_limit_overrides_name_two_attributes(key: str) -> None:
    with pytest.raises(ValueError, match="ATTRIBUTE:OTHER_ATTRIBUTE"):
        quarantine.Limits.parse(100, {key: "5"})


def test_zero_turns_a_pair_off() -> None:
    limits = quarantine.Limits.parse(0, {"cookie:email": "0"})
    assert not limits.enabled
    assert not limits.over("cookie:k", "email", 10**6)
    on = quarantine.Limits.parse(0, {"cookie:email": "5"})
    assert on.enabled and on.lowest == 5 and on.over("cookie:k", "email", 6)
    assert not on.over("email:x", "cookie", 10**6)
