"""The gauges that need SQL: one bounded sample every ``http.sample_interval`` seconds.

Scrapes read the last sample, so a scraper polling every second (or ten of them) costs the
database nothing more; the queries are those of ``status.read_gauges`` (partial indexes,
capped counts). The sample also tells ``/readyz`` whether the database answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from opentelemetry.metrics import CallbackOptions, Observation

from stream_cps import telemetry
from stream_cps.config import Settings
from stream_cps.db.connect import connect
from stream_cps.observe.health import Health
from stream_cps.observe.status import Snapshot, read_gauges

log = logging.getLogger(__name__)


class Sampler:
    def __init__(self, settings: Settings, health: Health, lease_key: int) -> None:
        self.settings = settings
        self.health = health
        self.lease_key = lease_key
        self.every = settings.http.sample_interval
        health.database_every = self.every
        self.last: Snapshot | None = None
        self._register()

    def _register(self) -> None:
        def gauge(name: str, value: Callable[[Snapshot], float | None]) -> None:
            def observe(_options: CallbackOptions) -> Iterable[Observation]:
                snap = self.last
                number = value(snap) if snap is not None else None
                return [] if number is None else [Observation(number)]

            telemetry.gauge(name, observe)

        gauge(telemetry.METRIC_EVENTS_WAITING, lambda s: s.events_waiting)
        gauge(telemetry.METRIC_EVENTS_WAITING_AGE, lambda s: s.events_waiting_oldest_age or 0)
        gauge(telemetry.METRIC_ENTITIES_DUE, lambda s: s.entities_due)
        gauge(telemetry.METRIC_OUTBOX_PENDING, lambda s: s.outbox_pending)
        gauge(telemetry.METRIC_OUTBOX_OLDEST_AGE, lambda s: s.outbox_oldest_age or 0)

    def run(self, stop: threading.Event) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(
                            self.settings.dsn, role="metrics", autocommit=True, connect_timeout=5
                        )
                    self.last = read_gauges(
                        conn,
                        self.settings.schemas,
                        self.settings.stitching.slot_name,
                        self.lease_key,
                    )
                    self.health.database(True)
                except psycopg.Error as exc:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    if self.health.database_error != reason:
                        log.warning("metrics sample: %s", reason)
                    self.health.database(False, reason)
                    if conn is not None:
                        conn.close()
                        conn = None
                stop.wait(self.every)
        finally:
            if conn is not None:
                conn.close()
