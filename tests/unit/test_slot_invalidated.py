"""Recognising an invalidated slot in what each PostgreSQL version tells its reader."""

from __future__ import annotations

import pytest

from stream_cps import retry
from stream_cps.sources.postgres.slot import SlotInvalidated, invalidated


@pytest.mark.parametrize(
    "message",
    [
        # 16
        'can no longer get changes from replication slot "s"\nDETAIL:  This slot has been '
        "invalidated because it exceeded the maximum reserved size.",
        # 17
        'can no longer get changes from replication slot "s"\nDETAIL:  This replication slot '
        'has been invalidated due to "wal_removed".',
        # 18 (SQL functions and START_REPLICATION)
        'ERROR:  can no longer access replication slot "s"\nDETAIL:  This replication slot has '
        'been invalidated due to "wal_removed".',
    ],
)
def test_an_invalidated_slot_is_recognised_and_passes(message: str) -> None:
    lost = invalidated("s", message)
    assert isinstance(lost, SlotInvalidated) and retry.is_transient(lost)
    assert "\n" not in str(lost) and "replication slot s was invalidated" in str(lost)


@pytest.mark.parametrize(
    "message",
    ['replication slot "s" does not exist', "terminating connection due to administrator command"],
)
def test_other_errors_are_not_taken_for_invalidation(message: str) -> None:
    assert invalidated("s", message) is None
