"""The stitcher's "working through a backlog" signal, read by attribute calculation."""

from __future__ import annotations

import threading
import time


class Backlog:
    """Stitching says when it is working through a backlog; calculation then waits (at most
    ``attributes.max_defer`` seconds a pass).

    An entity calculated in the middle of a burst is usually changed again by the next batch,
    so that calculation is wasted, and on a small machine it takes the cores the stitcher
    needs (bench/stitch.py: 11,300 events/s with calculation running through a burst, 13,400
    without). The bound keeps attributes from going stale under a load that never ends.
    """

    def __init__(self) -> None:
        self._busy = threading.Event()

    def report(self, busy: bool) -> None:
        if busy:
            self._busy.set()
        else:
            self._busy.clear()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    def wait_until_clear(self, stop: threading.Event, longest: float) -> None:
        deadline = time.monotonic() + longest
        while self._busy.is_set() and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            stop.wait(min(0.05, remaining))
