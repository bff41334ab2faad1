"""The progress line of a long job says how much is left and about when it is done."""

from __future__ import annotations

import logging
import time

import pytest

from stream_cps.logs import eta
from stream_cps.service.progress import WAITING_CAP, Progress
from stream_cps.stitching.stitcher import BatchResult


def test_eta_format() -> None:
    assert [eta(s) for s in (9.4, 252, 11_100)] == ["9s", "4m12s", "3h05m"]


@pytest.mark.parametrize(("left", "shown"), [(50_000, "50,000 waiting"), (WAITING_CAP, "+")])
def test_the_line_has_what_is_left_and_an_eta(
    caplog: pytest.LogCaptureFixture, left: int, shown: str
) -> None:
    progress = Progress(waiting=lambda: left)
    progress._last_log = time.monotonic() - 10.0  # 10 s ago
    progress.add(BatchResult(events=10_000))
    with caplog.at_level(logging.INFO):
        progress.maybe_log()
    line = caplog.records[-1].getMessage()
    assert shown in line and "(about " in line and "at this rate)" in line


def test_nothing_waiting_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    progress = Progress(waiting=lambda: 0)
    progress.add(BatchResult(events=5))
    with caplog.at_level(logging.INFO):
        progress.maybe_log(force=True)
    assert "waiting" not in caplog.records[-1].getMessage()


def test_a_slow_count_is_taken_less_often_and_estimated_between(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count of what waits that takes 0.5 s (the partial index's dead entries at 10M) is
    taken at most every 25 s (2% of the time); the lines between give it less what was
    stitched since."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    counts: list[float] = []

    def waiting() -> int:
        counts.append(clock[0])
        clock[0] += 0.5  # the count's own cost
        return 400_000

    progress = Progress(waiting=waiting)
    progress._last_log = clock[0]
    shown = []
    for _ in range(6):  # a line every 10 s, 20,000 events stitched in each
        clock[0] += 10.0
        progress.add(BatchResult(events=20_000))
        with caplog.at_level(logging.INFO):
            progress.maybe_log()
        shown.append(caplog.records[-1].getMessage().split(", ")[4].split(" (")[0])
    assert len(counts) == 2 and counts[1] - counts[0] >= 25.0
    # counted at 10 s and 40.5 s (due 25 s after the first); estimated at 20.5 and 30.5
    assert shown == [f"{n},000 waiting" for n in (400, 380, 360, 400, 380, 360)]
