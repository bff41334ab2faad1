"""What ``/healthz`` and ``/readyz`` answer: the loops report, the endpoint only reads.

Live means every part of the process still runs: the stitching loop reported within
``STALL_AFTER`` seconds (it reports each round, batch, standby wait and reconnect try) and each
background thread is alive. Ready means the database answered the last sample and the role is
known (active or standby on PostgreSQL, a member on Kafka): a load balancer or an orchestrator
then knows this process is doing its part.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STALL_AFTER = 120.0  # longer than the longest reconnect backoff (30 s) plus a slow connect
ROLES = ("active", "standby", "member")


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}
        self._threads: dict[str, Callable[[], bool]] = {}
        self.role = "starting"
        self.database_ok_at: float | None = None
        self.database_error: str | None = None
        self.database_every = 5.0

    def beat(self, part: str) -> None:
        with self._lock:
            self._beats[part] = time.monotonic()

    def watch(self, part: str, alive: Callable[[], bool]) -> None:
        with self._lock:
            self._threads[part] = alive

    def database(self, ok: bool, error: str | None = None) -> None:
        if ok:
            self.database_ok_at = time.monotonic()
        self.database_error = error

    def live(self) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        with self._lock:
            parts = {
                name: "ok" if now - at < STALL_AFTER else f"no report for {now - at:.0f} s"
                for name, at in self._beats.items()
            }
            parts.update(
                {name: "ok" if alive() else "stopped" for name, alive in self._threads.items()}
            )
        return all(v == "ok" for v in parts.values()), parts

    def ready(self) -> tuple[bool, dict[str, str]]:
        fresh = self.database_ok_at is not None and (
            time.monotonic() - self.database_ok_at < 3 * self.database_every
        )
        db = "ok" if fresh else (self.database_error or "no answer yet")
        checks = {"database": db, "role": self.role}
        return fresh and self.role in ROLES, checks
