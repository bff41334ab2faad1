"""The collector settings ``stream-cps run`` applies (service/gc_tuning.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from stream_cps.service import gc_tuning


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.enable()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restored")
def test_a_batch_sized_working_set_does_not_wake_the_collector() -> None:
    older = gc.get_threshold()[1:]
    gc_tuning.tune()
    assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, *older)
    assert gc.get_freeze_count() > 0  # what the process was built with is out of view
    before = gc.get_count()[0]
    collections = gc.get_stats()[0]["collections"]
    # About what one 5,000-event batch holds alive: far more than the default 700.
    working_set = [(f"e{n}", [n], {"n": n}) for n in range(20_000)]
    assert gc.get_stats()[0]["collections"] == collections
    assert gc.get_count()[0] >= before + 20_000
    del working_set


@pytest.mark.usefixtures("restored")
def test_cycles_are_still_collected() -> None:
    gc_tuning.tune()
    collections = gc.get_stats()[0]["collections"]
    for _ in range(2 * gc_tuning.YOUNG_THRESHOLD):
        cycle: list[object] = []
        cycle.append(cycle)
    assert gc.get_stats()[0]["collections"] > collections
