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
