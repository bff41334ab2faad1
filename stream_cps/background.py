"""The threads that run beside the stitching source in ``stream-cps run``.

Attribute calculation and the OpenSearch relay each use their own connection, so neither blocks
stitching; a thread that dies on an unexpected error stops the whole process (the ``stop`` event
is set), because a service that silently stopped calculating would look healthy and be wrong.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stream_cps.backlog import Backlog
from stream_cps.config import Settings

log = logging.getLogger(__name__)


def start(
    settings: Settings, stop: threading.Event, backlog: Backlog | None = None
) -> list[threading.Thread]:
    """Start attribute calculation (unless ``attributes.enabled`` is off), and the relay when
    ``opensearch.url`` is set. Calculation defers to ``backlog`` when one is given."""
    jobs: list[tuple[str, Callable[[threading.Event], None]]] = []
    if settings.attributes.enabled:
        from stream_cps.attributes.worker import CalculationWorker

        jobs.append(("attributes", CalculationWorker(settings, backlog=backlog).run_forever))
    if settings.opensearch.url:
        from stream_cps.sinks.relay import Relay

        jobs.append(("relay", Relay(settings).run_forever))
    threads = []
    for name, job in jobs:
        thread = threading.Thread(target=_guard, args=(name, job, stop), name=name, daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _guard(name: str, job: Callable[[threading.Event], None], stop: threading.Event) -> None:
    try:
        job(stop)
    except Exception:
        log.exception("%s thread failed; stopping the service", name)
        stop.set()


def join(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    for thread in threads:
        thread.join(timeout)
