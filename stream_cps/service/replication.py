"""The replication loop: lease -> slot -> stitch -> acknowledge.

Commit order (docs/delivery.md): a batch's stitching transaction commits first; only then is the
slot advanced past the transactions that carried it. A crash between the two replays those
transactions, and the stitcher skips rows that are already stitched. Rows the slot never carried
(older than the slot, or restitched while the service was away) are found by the sweep over
``stitched IS NULL``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from stream_cps import retry, telemetry
from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import Stopped
from stream_cps.observe.health import Health
from stream_cps.service.backlog import Backlog
from stream_cps.service.progress import WAITING_CAP, Progress
from stream_cps.sources.postgres.lease import SlotLease
from stream_cps.sources.postgres.readers import reader
from stream_cps.stitching.stitcher import BatchResult, Stitcher

log = logging.getLogger(__name__)

LEASE_CHECK_EVERY = 1.0


CHECK_SHARE = 0.05  # at most this share of the stitching connection's time on has_work


def sweep_due(now: float, last: float, interval: float, check_cost: float) -> bool:
    """Whether to look for rows the stream did not carry (``has_work``): every ``interval``
    seconds, or less often when that check is slow. It walks the partial index on unstitched
    rows, whose dead entries (every marked event leaves one until VACUUM) made it take 200 ms
    at 10M events; checked every second, that was a fifth of the connection's time. Purge
    signals are looked for on every round regardless (a cheap index of their own)."""
    return now - last > max(interval, check_cost / CHECK_SHARE)


class ReplicationLoop:
    """Runs until ``stop`` is set; one instance per process.

    ``on_active`` is called once, when this process first holds the lease: the wiring starts
    calculation and the relay then, because a standby running them would duplicate work.
    """

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        backlog: Backlog | None = None,
        on_active: Callable[[], None] | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.backlog = backlog or Backlog()
        self.on_active = on_active
        self.progress = Progress(lag_bytes=0)
        self.stitcher = Stitcher(settings)
        self.source = reader(settings)
        self.lease = SlotLease(settings.dsn, settings.stitching.slot_name)
        self._activated = False
        self.health = health or Health()

    def run(self) -> Progress:
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
        try:
            while not self.stop.is_set():
                # An always-on consumer outlives restarts and failovers of its database; a
                # session that ends normally (the lease lost) is simply started again.
                retry.DATABASE.call(self._session, stop=self.stop)
        except Stopped:
            pass
        finally:
            self.stop.set()
            self.progress.maybe_log(force=True)
        return self.progress

    def _session(self) -> None:
        self.health.role = "connecting"
        self.health.beat("stitching")
        try:
            schema.check_database(
                self.settings.dsn, self.settings.schemas
            )  # SchemaError ends the run
            if not self._acquire_lease():
                return
            if not self._activated:
                self._activated = True
                if self.on_active is not None:
                    self.on_active()
            with (
                connect(self.settings.dsn, role="stitching", autocommit=True) as conn,
                connect(self.settings.dsn, role="read-ahead", autocommit=True) as ahead,
            ):
                self.source.ensure(conn)
                store = self.stitcher.store
                self.progress.waiting = lambda: store.waiting(conn, WAITING_CAP)
                self._loop(conn, ahead)
        finally:
            self.progress.waiting = None
            self.source.close()
            self.lease.release()

    def _acquire_lease(self) -> bool:
        waiting_logged = False
        while not self.stop.is_set():
            self.health.beat("stitching")
            if self.lease.try_acquire():
                log.info("active: holding the lease for slot %s", self.source.slot)
                self.health.role = "active"
                return True
            self.health.role = "standby"
            if not waiting_logged:
                log.info("standby: another process is active on slot %s; waiting", self.source.slot)
                waiting_logged = True
            self.stop.wait(self.settings.stitching.standby_poll)
        return False

    def _loop(self, conn: psycopg.Connection[Any], ahead: psycopg.Connection[Any]) -> None:
        batch_size = self.settings.stitching.batch_size
        poll = self.settings.stitching.poll_interval
        sweep_every = self.settings.stitching.sweep_interval
        last_sweep = 0.0
        check_cost = 0.0  # seconds the last has_work took
        last_lease_check = time.monotonic()
        while not self.stop.is_set():
            self.health.beat("stitching")
            if time.monotonic() - last_lease_check > LEASE_CHECK_EVERY:
                if not self.lease.alive():
                    log.warning("lost the lease connection; stepping down to standby")
                    return
                last_lease_check = time.monotonic()
            started = telemetry.now()
            batch = self.source.poll(conn, batch_size, poll)
            if batch.event_ids:
                with telemetry.root(
                    telemetry.SPAN_SOURCE_BATCH,
                    started,
                    attributes={
                        "stream_cps.events": len(batch.event_ids),
                        "stream_cps.slot": self.source.slot,
                    },
                ):
                    telemetry.record(telemetry.SPAN_SOURCE_POLL, started, telemetry.now())
                    if batch.backlog:
                        # The sweep takes it (these rows included, they are committed and
                        # unstitched) earliest first and reading ahead, instead of in
                        # insertion order; replayed rows it already stitched cost one empty
                        # query, not a lookup each.
                        self._patiently(lambda: self._sweep(conn, ahead))
                        last_sweep = time.monotonic()
                    else:
                        self._patiently(functools.partial(self._stitch, conn, batch.event_ids))
                    if self.stop.is_set():
                        return  # not acknowledged: replayed and skipped on restart
                    if batch.ack_lsn is not None:
                        with telemetry.tracer().start_as_current_span(telemetry.SPAN_SOURCE_ACK):
                            self.source.ack(conn, batch.ack_lsn)
            else:
                # Nothing of ours (a heartbeat, other tables): no trace; pending purges are
                # the sweep's, just below.
                self.backlog.report(False)
                if self.stop.is_set():
                    return
                if batch.ack_lsn is not None:
                    self.source.ack(conn, batch.ack_lsn)
            due = sweep_due(time.monotonic(), last_sweep, sweep_every, check_cost)
            if due or self.stitcher.purge_pending(conn):
                checked = time.monotonic()
                work = self.stitcher.has_work(conn)
                check_cost = time.monotonic() - checked
                if work:
                    with telemetry.root(telemetry.SPAN_STITCH_SWEEP, telemetry.now()):
                        self._patiently(lambda: self._sweep(conn, ahead))
                last_sweep = time.monotonic()
                self.progress.lag_bytes = self.source.lag_bytes(conn)
            self.progress.maybe_log()

    def _stitch(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> None:
        self._record(self.stitcher.stitch(conn, event_ids))

    def _sweep(self, conn: psycopg.Connection[Any], ahead: psycopg.Connection[Any]) -> None:
        """Stitch everything still unstitched (and run pending purges)."""
        for result in self.stitcher.sweep(conn, ahead, self.stop):
            self._record(result)

    def _patiently(self, work: Callable[[], None]) -> None:
        """``work``, waiting in this session while another transaction holds its rows
        (``retry.HELD``: the guide's restitch script), the stream kept alive meanwhile."""
        retry.HELD.call(work, stop=self.stop, sleep=self._wait_alive)

    def _wait_alive(self, seconds: float) -> None:
        """A retry's wait that keeps the replication connection and the health beat alive."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self.stop.wait(min(left, 1.0))
            self.source.keepalive()
            self.health.beat("stitching")

    def _record(self, result: BatchResult) -> None:
        # A full batch means more is waiting: calculation holds back (service/backlog.py).
        self.backlog.report(result.events >= self.settings.stitching.batch_size)
        self.progress.add(result)
        self.health.beat("stitching")
        self.source.keepalive()  # a sweep reads no stream for as long as it runs
        self.progress.maybe_log()  # also during long sweeps (a restitch of everything)

    def _register_lag_gauge(self) -> None:
        def observe(_options: Any) -> list[Any]:
            from opentelemetry.metrics import Observation

            return [Observation(self.progress.lag_bytes or 0)]

        telemetry.gauge(telemetry.METRIC_SLOT_LAG, observe)
