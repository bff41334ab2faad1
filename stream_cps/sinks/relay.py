"""The outbox relay: delivers OpenSearch commands written by stitching and calculation.

One relay delivers at a time (a session advisory lock). A batch: read the oldest pending
commands, collapse them per entity, build upsert documents from the entity's CURRENT row, send
one bulk request, then record every command's outcome in one transaction. No transaction is
open while OpenSearch is asked, and the relay takes no row locks, so it never blocks
stitching. A crash before the outcomes commit leaves the commands pending; resending is
harmless because writes carry external versions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
from opensearchpy import OpenSearch
from opensearchpy.exceptions import TransportError

from stream_cps import retry, telemetry
from stream_cps.config import Settings
from stream_cps.db.connect import connect
from stream_cps.errors import Stopped, Transient
from stream_cps.logs import eta
from stream_cps.sinks.commands import (
    Action,
    Outcome,
    Planned,
    Result,
    Sink,
    collapse,
    plan_actions,
)
from stream_cps.sinks.opensearch import (
    BulkWriter,
    OpenSearchRejected,
    OpenSearchUnavailable,
    ensure_index,
    make_client,
    retryable,
)
from stream_cps.sinks.outbox import OutboxStore

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0  # seconds between deletes of old delivered outbox rows
PROGRESS_EVERY = 10.0  # seconds between progress lines while there is a backlog


class Publisher(Protocol):
    """Somewhere else the delivered actions go too (the optional Kafka topic)."""

    def publish(self, actions: Sequence[Action]) -> None: ...


_STATUS = {
    Outcome.DELIVERED: "delivered",
    Outcome.STALE: "delivered",
    Outcome.RETRY: "pending",
    Outcome.PARK: "parked",
}


class Relay:
    """Delivers outbox commands to a ``Sink``, OpenSearch by default (and optionally Kafka)."""

    def __init__(
        self,
        settings: Settings,
        client: OpenSearch | None = None,
        publisher: Publisher | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.settings = settings
        self.index = settings.opensearch.index
        self.batch_size = settings.opensearch.batch_size
        self.store = OutboxStore(settings.schemas)
        # Another sink (the in-memory one) needs no index; OpenSearch is the default.
        self.client = None if sink is not None else client or make_client(settings)
        self.writer: Sink = sink or BulkWriter(self.client or make_client(settings), self.index)
        self.publisher = publisher
        if publisher is None and settings.opensearch.kafka_topic:
            from stream_cps.sinks.kafka_commands import KafkaCommandPublisher

            self.publisher = KafkaCommandPublisher(settings)
        self._index_ready = self.client is None
        self._finished = 0
        self._last_progress = (time.monotonic(), 0)  # when the last line was, and the count
        self._lock_session: tuple[int, int] | None = None
        self._delivered = telemetry.counter(telemetry.METRIC_OUTBOX_DELIVERED)
        self._parked = telemetry.counter(telemetry.METRIC_OUTBOX_PARKED)
        self._retried = telemetry.counter(telemetry.METRIC_OUTBOX_RETRIED)
        self._latency = telemetry.histogram(telemetry.METRIC_DELIVERY_LATENCY)

    def ensure_index(self, conn: psycopg.Connection[Any] | None = None) -> None:
        """Create the template and index once per relay, before the first write, so the index
        is never auto-created without our mapping and gc_deletes. With a connection, the
        attribute field types come from ``attributes.data_type``."""
        if self._index_ready or self.client is None:
            return
        types = self.store.attribute_types(conn) if conn is not None else None
        try:
            ensure_index(self.settings, self.client, types)
        except Exception as exc:
            if retryable(exc):
                raise OpenSearchUnavailable(f"cannot prepare index {self.index}: {exc}") from exc
            if isinstance(exc, TransportError):
                raise OpenSearchRejected(f"cannot prepare index {self.index}: {exc}") from exc
            raise
        self._index_ready = True

    def run_once(self, conn: psycopg.Connection[Any]) -> int:
        """Deliver one batch; return how many commands were finished (delivered or parked).

        Pass an autocommit (or idle) connection: no transaction stays open while OpenSearch
        is asked. Returns 0 at once while another relay holds the relay lock. Raises
        ``OpenSearchUnavailable`` (recoverable, after the outcomes are committed) when some or
        all commands must wait for a retry, so the caller backs off.
        """
        self.ensure_index(conn)
        if not self._holds_lock(conn):
            return 0
        failure: OpenSearchUnavailable | None = None
        started = telemetry.now()
        with conn.transaction():
            commands = self.store.claim(conn, self.batch_size)
            if not commands:
                return 0  # an idle poll: no trace
            planned = collapse(commands)
            upserts = [p.entity_id for p in planned if p.op == "upsert"]
            entities = self.store.entities(conn, upserts)
        # Its own trace, linked to every batch (stitching, calculation) that wrote a command
        # in it: from an event to OpenSearch in two clicks.
        links = telemetry.links_to(c.traceparent for c in commands)
        with telemetry.root(telemetry.SPAN_OUTBOX_RELAY, started, links=links) as span:
            pairs = plan_actions(planned, entities)
            actions = [a for _, a in pairs if a is not None]
            try:
                results = iter(self.writer.write(actions))
                if self.publisher is not None:
                    self.publisher.publish(actions)
            except OpenSearchUnavailable as exc:
                failure = exc
                results = iter([Result(Outcome.RETRY, str(exc))] * len(actions))
            except Transient as exc:  # the Kafka side failed: OpenSearch will be re-sent
                failure = OpenSearchUnavailable(str(exc))
                results = iter([Result(Outcome.RETRY, str(exc))] * len(actions))
            with conn.transaction():
                finished, retried = self._record(conn, pairs, results)
            span.set_attribute("outbox.commands", len(commands))
            span.set_attribute("outbox.finished", finished)
        waits = [c.waited for c in commands if c.waited is not None]
        if finished and waits:  # the oldest command's wait, queued to delivered
            self._latency.record(max(waits) + (telemetry.now() - started) / 1e9)
        if failure is None and retried:
            failure = OpenSearchUnavailable(f"{retried} commands wait for a retry", finished)
        if failure is not None:
            failure.delivered = finished
            raise failure
        return finished

    def _holds_lock(self, conn: psycopg.Connection[Any]) -> bool:
        """Take the session-level relay lock once per connection (it is re-entrant, so
        asking again on the same session would only stack it)."""
        session = (id(conn), conn.info.backend_pid)
        if self._lock_session == session:
            return True
        with conn.transaction():
            if not self.store.try_lock(conn):
                return False
        self._lock_session = session
        return True

    def _record(
        self,
        conn: psycopg.Connection[Any],
        pairs: list[tuple[Planned, Action | None]],
        results: Any,
    ) -> tuple[int, int]:
        seqs: list[int] = []
        statuses: list[str] = []
        errors: list[str | None] = []
        counts = {"delivered": 0, "parked": 0, "pending": 0}
        for planned, action in pairs:
            result = Result(Outcome.DELIVERED) if action is None else next(results)
            status = _STATUS[result.outcome]
            error = None if result.outcome in (Outcome.DELIVERED, Outcome.STALE) else result.reason
            if status == "parked":
                log.warning(
                    "outbox: parked %s %s v%d: %s",
                    planned.op,
                    planned.entity_id,
                    planned.version,
                    result.reason,
                )
            for seq in planned.seqs:
                seqs.append(seq)
                statuses.append(status)
                errors.append(error)
                counts[status] += 1
        self.store.mark(conn, seqs, statuses, errors)
        self._delivered.add(counts["delivered"])
        self._parked.add(counts["parked"])
        self._retried.add(counts["pending"])
        return counts["delivered"] + counts["parked"], counts["pending"]

    def run_forever(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set, on a connection of its own.

        When OpenSearch or PostgreSQL is unavailable the relay backs off (``retry.RELAY``, up
        to ``opensearch.max_backoff``) and tries again; commands wait in the outbox. An
        ``OpenSearchRejected`` (a setup problem) propagates and stops the relay loudly.
        """
        poll = self.settings.opensearch.poll_interval
        keep = self.settings.opensearch.keep_delivered_hours * 3600
        conn: psycopg.Connection[Any] | None = None
        next_prune = 0.0

        def step() -> int:
            nonlocal conn, next_prune
            if conn is None or conn.closed:
                conn = connect(self.settings.dsn, role="relay", autocommit=True)
            try:
                if time.monotonic() >= next_prune:
                    self.store.prune(conn, keep)
                    next_prune = time.monotonic() + PRUNE_EVERY
                finished = self.run_once(conn)
                self._progress(conn, finished)
                return finished
            except psycopg.OperationalError:
                conn.close()
                conn = None
                raise

        policy = retry.RELAY.but(longest=self.settings.opensearch.max_backoff)
        try:
            while not stop.is_set():
                finished = policy.call(step, stop=stop)
                if finished < self.batch_size:
                    stop.wait(poll)
        except Stopped:
            pass
        finally:
            if conn is not None:
                conn.close()

    def _progress(self, conn: psycopg.Connection[Any], finished: int) -> None:
        """While delivering, every ``PROGRESS_EVERY`` s: done, rate, pending and an ETA (a
        reindex, or a backlog after OpenSearch was away). An idle relay logs nothing."""
        now = time.monotonic()
        self._finished += finished
        if not finished or now - self._last_progress[0] < PROGRESS_EVERY:
            return
        since, before = self._last_progress
        rate = (self._finished - before) / max(now - since, 1e-9)
        pending = self.store.pending(conn)
        log.info(
            "relay: %d commands finished (%.0f/s), %d pending%s",
            self._finished,
            rate,
            pending,
            f" (about {eta(pending / rate)} at this rate)" if pending and rate > 0 else "",
        )
        self._last_progress = (now, self._finished)


def prepare_index(settings: Settings, conn: psycopg.Connection[Any]) -> None:
    """What ``stream-cps init`` runs when ``opensearch.url`` is set: the index template and
    index, with attribute field types from ``attributes.data_type``."""
    types = OutboxStore(settings.schemas).attribute_types(conn)
    ensure_index(settings, attribute_types=types)
