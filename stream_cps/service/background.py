"""The threads that run beside stitching: attribute calculation and the outbox relay.

Each uses its own connection, so neither blocks stitching; a thread that dies on an error its
own retry policy does not cover stops the whole process (the ``stop`` event is set, and the
error is kept for the exit code), because a service that silently stopped calculating would
look healthy and be wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stream_cps.config import Settings
from stream_cps.observe.health import Health
from stream_cps.service.backlog import Backlog

log = logging.getLogger(__name__)


class Background:
    """Calculation (unless ``attributes.enabled`` is off) and the relay (when
    ``opensearch.url`` is set), as daemon threads; calculation defers to ``backlog``."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        backlog: Backlog,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.health = health
        self.stop = stop
        self.backlog = backlog
        self.threads: list[threading.Thread] = []
        self.failure: BaseException | None = None
        self._cancels: list[Callable[[], None]] = []

    def start(self) -> None:
        if self.threads:
            return
        jobs: list[tuple[str, Callable[[threading.Event], None]]] = []
        if self.settings.attributes.enabled:
            from stream_cps.attributes.worker import CalculationWorker

            worker = CalculationWorker(self.settings, backlog=self.backlog)
            jobs.append(("attributes", worker.run_forever))
            self._cancels.append(worker.cancel)
        if self.settings.opensearch.url:
            from stream_cps.sinks.relay import Relay

            jobs.append(("relay", Relay(self.settings).run_forever))
        for name, job in jobs:
            thread = threading.Thread(target=self._guard, args=(name, job), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
            if self.health is not None:
                self.health.watch(name, thread.is_alive)

    def _guard(self, name: str, job: Callable[[threading.Event], None]) -> None:
        try:
            job(self.stop)
        except Exception as exc:
            log.exception("%s thread failed; stopping the service", name)
            self.failure = exc
            self.stop.set()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the threads (``stop`` is set); a long calculation statement in flight is
        cancelled first, so no backend keeps running our query after we exit."""
        for cancel in self._cancels:
            try:
                cancel()
            except Exception as exc:  # the connection may be gone already
                log.debug("cancel on stop: %s", exc)
        for thread in self.threads:
            thread.join(timeout)
