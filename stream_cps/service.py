"""The always-on process: lease -> slot -> stitch -> acknowledge, plus the background threads.

Commit order (docs/delivery.md): a batch's stitching transaction commits first; only then is the
slot advanced past the transactions that carried it. A crash between the two replays those
transactions, and the stitcher skips rows that are already stitched. Rows the slot never carried
(older than the slot, or restitched while the service was away) are found by the sweep over
``stitched IS NULL``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from stream_cps import background, telemetry
from stream_cps.backlog import Backlog
from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import Recoverable
from stream_cps.sources.replication import SlotLease, reader
from stream_cps.stitching.worker import BatchResult, Stitcher

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
RECONNECT_MIN, RECONNECT_MAX = 0.5, 30.0


@dataclass
class Progress:
    """Running totals, logged every few seconds and returned at the end."""

    events: int = 0
    created: int = 0
    merges: int = 0
    purged: int = 0
    rule_failures: int = 0
    lag_bytes: int = 0
    _last_log: float = field(default_factory=time.monotonic)
    _last_events: int = 0

    def add(self, result: BatchResult) -> None:
        self.events += result.events
        self.created += result.created
        self.merges += result.merges
        self.purged += len(result.purged)
        self.rule_failures += result.rule_failures

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < PROGRESS_EVERY:
            return
        rate = (self.events - self._last_events) / max(now - self._last_log, 1e-9)
        log.info(
            "stitched %d events (%.0f/s), %d entities created, %d merges, %d purged, "
            "slot lag %d bytes",
            self.events,
            rate,
            self.created,
            self.merges,
            self.purged,
            self.lag_bytes,
        )
        self._last_log, self._last_events = now, self.events


class StitchingService:
    """Runs until ``stop`` is set; one instance per process."""

    def __init__(
        self, settings: Settings, stop: threading.Event, with_background: bool = True
    ) -> None:
        self.settings = settings
        self.with_background = with_background
        self.stop = stop
        self.progress = Progress()
        self.stitcher = Stitcher(settings)
        self.source = reader(settings)
        self.lease = SlotLease(settings)
        self.backlog = Backlog()

    def run(self) -> Progress:
        telemetry.setup(self.settings.values)
        self._register_lag_gauge()
        s = self.settings
        log.info(
            "starting: slot %s (%s), publication %s, schemas %s, batches of %d",
            s.stitching.slot_name,
            s.stitching.replication,
            s.stitching.publication,
            s.schemas,
            s.stitching.batch_size,
        )
        threads: list[threading.Thread] = []
        backoff = RECONNECT_MIN
        try:
            while not self.stop.is_set():
                try:
                    with connect(self.settings.dsn, role="check", autocommit=True) as conn:
                        schema.check(conn, self.settings.schemas)  # SchemaError ends the run
                    if not self._acquire_lease():
                        break
                    # Only an active process calculates and relays: a standby would duplicate.
                    if self.with_background and not threads:
                        threads = background.start(self.settings, self.stop, self.backlog)
                    with (
                        connect(self.settings.dsn, role="stitching", autocommit=True) as conn,
                        connect(self.settings.dsn, role="read-ahead", autocommit=True) as reader,
                    ):
                        self.source.ensure(conn)
                        backoff = RECONNECT_MIN
                        self._loop(conn, reader)
                except (psycopg.OperationalError, Recoverable) as exc:
                    # An always-on consumer outlives restarts and failovers of its database.
                    log.warning("database unavailable (%s); retrying in %.1f s", exc, backoff)
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
                finally:
                    self.source.close()
                    self.lease.release()
        finally:
            self.stop.set()
            background.join(threads)
            self.progress.maybe_log(force=True)
        return self.progress

    def _acquire_lease(self) -> bool:
        waiting_logged = False
        while not self.stop.is_set():
            if self.lease.try_acquire():
                log.info("active: holding the lease for slot %s", self.source.slot)
                return True
            if not waiting_logged:
                log.info("standby: another process is active on slot %s; waiting", self.source.slot)
                waiting_logged = True
            self.stop.wait(self.settings.stitching.standby_poll)
        return False

    def _loop(self, conn: psycopg.Connection[Any], reader: psycopg.Connection[Any]) -> None:
        batch_size = self.settings.stitching.batch_size
        poll = self.settings.stitching.poll_interval
        sweep_every = self.settings.stitching.sweep_interval
        last_sweep = 0.0
        last_lease_check = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_lease_check > 1.0:
                if not self.lease.alive():
                    log.warning("lost the lease connection; stepping down to standby")
                    return
                last_lease_check = time.monotonic()
            with telemetry.tracer().start_as_current_span(telemetry.SPAN_SOURCE_POLL):
                batch = self.source.poll(conn, batch_size, poll)
            if not batch.event_ids:
                self.backlog.report(False)
            if len(batch.event_ids) >= batch_size:
                # A backlog: the sweep takes it (these rows included, they are committed and
                # unstitched) earliest first and reading ahead, instead of in insertion order;
                # replayed rows it already stitched cost one empty query, not a lookup each.
                self._sweep(conn, reader)
                last_sweep = time.monotonic()
            else:
                self._record(self.stitcher.stitch(conn, batch.event_ids))
            if self.stop.is_set():
                return  # not acknowledged: replayed and skipped on restart
            if batch.ack_lsn:
                with telemetry.tracer().start_as_current_span(telemetry.SPAN_SOURCE_ACK):
                    self.source.ack(conn, batch.ack_lsn)
            if time.monotonic() - last_sweep > sweep_every or self.stitcher.store.pending_purge(
                conn
            ):
                self._sweep(conn, reader)
                last_sweep = time.monotonic()
                self.progress.lag_bytes = self.source.lag_bytes(conn)
            self.progress.maybe_log()

    def _sweep(self, conn: psycopg.Connection[Any], reader: psycopg.Connection[Any]) -> None:
        """Stitch everything still unstitched, pass after pass (and run pending purges): a
        pass that stitched something is followed by another, for rows that arrived behind its
        cursor."""
        while not self.stop.is_set():
            stitched = 0
            for result in self.stitcher.sweep_pass(conn, reader, self.stop):
                self._record(result)
                stitched += result.events
            if stitched == 0:
                return

    def _record(self, result: BatchResult) -> None:
        # A full batch means more is waiting: calculation holds back (stream_cps/backlog.py).
        self.backlog.report(result.events >= self.settings.stitching.batch_size)
        self.progress.add(result)
        self.progress.maybe_log()  # also during long sweeps (a restitch of everything)

    def _register_lag_gauge(self) -> None:
        def observe(_options: Any) -> list[Any]:
            from opentelemetry.metrics import Observation

            return [Observation(self.progress.lag_bytes)]

        telemetry.meter().create_observable_gauge(telemetry.METRIC_SLOT_LAG, [observe], unit="By")
