"""The Kafka loop: poll a batch -> ONE database transaction -> dead letters -> store offsets.

Commit order (docs/kafka.md): decode and evaluate the rules (on a helper thread, while the
batch before is in the database) -> one transaction (insert events, record dead letters,
stitch) -> commit -> publish dead letters to the dead-letter topic -> store offsets past the
batch. Nothing is stored before the database commit, so redelivery is the only thing a crash
can cause, and it is harmless: inserts are ``ON CONFLICT DO NOTHING`` and the stitcher skips
stitched rows. Any number of processes may share the group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from opentelemetry import trace

from stream_cps import retry, telemetry
from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import Stopped, StreamCpsError
from stream_cps.observe.health import Health
from stream_cps.service.backlog import Backlog
from stream_cps.service.progress import Progress
from stream_cps.sources.kafka.consumer import Consumed, KafkaBatch, KafkaSource
from stream_cps.sources.kafka.deadletter import DeadLetterTopic
from stream_cps.sources.messages import Envelope
from stream_cps.stitching.ingest import Applier, ApplyStats, Ruled
from stream_cps.stitching.stitcher import Stitcher

log = logging.getLogger(__name__)

MAINTENANCE_EVERY = 1.0  # replay requests and purge signals while idle
PURGE_BUDGET = 2.0  # s of purging per idle round, in bounded transactions


class KafkaLoop:
    """Runs until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        backlog: Backlog | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.backlog = backlog
        self.member = f"stream-cps-{socket.gethostname()}-{os.getpid()}"
        self.progress = Progress()
        # messages behind (after the last batch): a gauge, and the progress line's ETA (a
        # replay's reprocessing, a backlog)
        self.lag: int | None = None
        self.progress.waiting = lambda: self.lag or 0
        telemetry.gauge(telemetry.METRIC_KAFKA_LAG, self._observe_lag)
        self.stitcher = Stitcher(settings)
        self.applier = Applier(settings.schemas, self.stitcher)
        self.source = KafkaSource(settings.kafka, settings.schemas, self.member)
        self.on_batch: Callable[[ApplyStats], None] | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._ahead: psycopg.Connection[Any] | None = None  # the read-ahead thread's
        self._ahead_failing = False  # said once until the read-ahead works again
        self.health = health or Health()

    def run(self) -> Progress:
        schema.check_database(self.settings.dsn, self.settings.schemas)
        kafka = self.settings.kafka
        dead_topic = DeadLetterTopic(kafka)
        try:
            self._conn = connect(self.settings.dsn, role="kafka", autocommit=True)
            self.source.open()
            self.health.role = "member"
            # Stopped while a batch waited for held rows: not committed, so redelivered.
            with contextlib.suppress(Stopped):
                self._loop(dead_topic)
        finally:
            try:
                self.source.close()
            finally:
                dead_topic.close()
                for conn in (self._conn, self._ahead):
                    if conn is not None:
                        conn.close()
                self.progress.replays_applied = self.source.replays_applied
                self.progress.maybe_log(force=True)
        return self.progress

    def _loop(self, dead_topic: DeadLetterTopic) -> None:
        """Consume batch N+1, decode it and evaluate its rules on a helper thread (and a
        connection of its own) while batch N is applied.

        Decoding (Avro or JSON, the envelope) was a fifth of the member's time, and the rules
        statement ran alone on the batch's connection too (docs/benchmarks.md). ``consume``
        stays on this thread, between transactions, so the rebalance callbacks and replay
        seeks still never meet a transaction in flight; what they take from the batch in hand
        is dropped from it (``KafkaSource.fresh``). The next consume does not wait while a
        batch is in hand: a quiet topic adds no latency.
        """
        last_maintenance = 0.0
        held: Future[tuple[KafkaBatch, Ruled | None]] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="kafka-read-ahead") as pool:
            while not self.stop.is_set():
                self.health.beat("stitching")
                consumed = self.source.consume(wait=held is None)
                ahead = pool.submit(self._read_ahead, consumed) if consumed.messages else None
                batch, ruled = held.result() if held is not None else (None, None)
                held = ahead
                if self.backlog is not None:
                    # A full poll means more is waiting: calculation holds back (backlog.py).
                    # The batch in hand counts too: a consume that did not wait returns only
                    # what the client had fetched, short in the middle of a backlog.
                    self.backlog.report(consumed.full or (batch is not None and batch.full))
                if batch is not None:
                    kept = self.source.fresh(batch)
                    if kept is not batch:
                        # The rules ran over the first copy of each id: it may be gone now.
                        batch, ruled = kept, None
                    if batch.envelopes:
                        self._process(batch, ruled, dead_topic)
                due = time.monotonic() - last_maintenance > MAINTENANCE_EVERY
                if self.source.replay_due or due:
                    self._maintenance(idle=held is None and batch is None)
                    last_maintenance = time.monotonic()
                self.progress.maybe_log()

    def _read_ahead(self, consumed: Consumed) -> tuple[KafkaBatch, Ruled | None]:
        """The helper thread's part: decode, then the rules over the new events. A database
        failure here only means the batch's own transaction evaluates them (and meets the
        failure under the retry policy)."""
        batch = self.source.decode(consumed)
        try:
            self._ahead = self._reopened(self._ahead, "kafka-read-ahead")
            ruled = self.applier.rule_ahead(self._ahead, batch.envelopes)
            self._ahead_failing = False
            return batch, ruled
        except (psycopg.Error, StreamCpsError) as exc:
            # Once per failure spell: each batch tries again, and the member carries on slower.
            level = logging.DEBUG if self._ahead_failing else logging.WARNING
            log.log(
                level, "kafka: rules not evaluated ahead (each batch's transaction will): %s", exc
            )
            self._ahead_failing = True
            return batch, None

    def _process(self, batch: KafkaBatch, ruled: Ruled | None, dead_topic: DeadLetterTopic) -> None:
        """One trace per batch (an empty poll has none): the consumer's process span, linked
        to each message's producer; receive, stitch and commit inside it."""
        started, polled = batch.polled
        where = _destination(batch)  # once: a walk over the batch's messages
        with telemetry.root(
            telemetry.SPAN_SOURCE_BATCH,
            started,
            kind=trace.SpanKind.CONSUMER,
            attributes=self._attributes(batch, where, "process"),
            links=_producer_links(batch.envelopes),
        ):
            telemetry.record(
                telemetry.SPAN_SOURCE_POLL,
                started,
                polled,
                kind=trace.SpanKind.CLIENT,
                attributes=self._attributes(batch, where, "receive"),
            )
            self._ingest(batch, ruled, dead_topic, where)

    def _observe_lag(self, _options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [] if self.lag is None else [Observation(self.lag)]

    def _ingest(
        self,
        batch: KafkaBatch,
        ruled: Ruled | None,
        dead_topic: DeadLetterTopic,
        where: dict[str, str],
    ) -> None:
        """The commit order of the module docstring, for one batch."""
        # Rows another transaction holds for long (the guide's restitch script) are waited
        # for, not counted against the batch's tries (retry.HELD).
        stats = retry.HELD.call(
            lambda: retry.KAFKA_BATCH.call(lambda: self._apply(batch.envelopes, ruled)),
            stop=self.stop,
        )
        retry.KAFKA_PRODUCE.call(lambda: dead_topic.publish(stats.dead_letters))
        with telemetry.tracer().start_as_current_span(
            telemetry.SPAN_SOURCE_COMMIT,
            kind=trace.SpanKind.CLIENT,
            attributes=self._attributes(batch, where, "settle", name="commit"),
        ):
            self.source.commit(batch)
        self.progress.add_ingest(stats)
        self.lag = self.source.lag()
        if self.on_batch:
            self.on_batch(stats)

    def _attributes(
        self, batch: KafkaBatch, where: dict[str, str], kind: str, name: str | None = None
    ) -> dict[str, Any]:
        """The OpenTelemetry messaging conventions' attributes of a batch's span (``where``:
        its ``_destination``)."""
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": kind,
            "messaging.operation.name": name or kind,
            "messaging.consumer.group.name": self.settings.kafka.group_id,
            "messaging.client.id": self.member,
            "messaging.batch.message_count": len(batch.envelopes),
            **where,
        }

    def _apply(self, envelopes: list[Envelope], ruled: Ruled | None) -> ApplyStats:
        """The batch's transaction; a lost connection is reopened by the next try."""
        return self.applier.apply(self._db(), envelopes, ruled)

    def _db(self) -> psycopg.Connection[Any]:
        self._conn = self._reopened(self._conn, "kafka")
        return self._conn

    def _reopened(self, conn: psycopg.Connection[Any] | None, role: str) -> psycopg.Connection[Any]:
        """``conn``, or a new connection when it is missing, closed or broken."""
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            conn.close()
        return connect(self.settings.dsn, role=role, autocommit=True)

    def _maintenance(self, idle: bool) -> None:
        """Replay requests, and purge signals while no messages arrive.

        Both are tried again on the next round when they fail transiently: a lost connection
        is reopened by the next batch, a conflict just waits a second.
        """
        try:
            conn = self._db()
            self.source.apply_replays(conn)
            # A purge takes a bounded share per batch (StitchStore.purge): while idle, shares
            # one after another for up to PURGE_BUDGET, then the consumer polls again.
            deadline = time.monotonic() + PURGE_BUDGET
            while idle and not self.stop.is_set() and self.stitcher.purge_pending(conn):
                with telemetry.root(telemetry.SPAN_STITCH_SWEEP, telemetry.now()):
                    self.stitcher.within(conn, lambda stitch_in: stitch_in([], None))
                if time.monotonic() > deadline:
                    break
        except Exception as exc:
            if not retry.is_transient(exc):
                raise
            log.warning("kafka: maintenance deferred: %s", exc)
            self.source.replay_due = True


def _destination(batch: KafkaBatch) -> dict[str, str]:
    """Destination and partition attributes, only when the whole batch shares them."""
    topics = {e.topic for e in batch.envelopes}
    partitions = {(e.topic, e.partition) for e in batch.envelopes}
    out: dict[str, str] = {}
    if len(topics) == 1:
        out["messaging.destination.name"] = next(iter(topics)) or ""
    if len(partitions) == 1:
        out["messaging.destination.partition.id"] = str(next(iter(partitions))[1])
    return out


def _producer_links(envelopes: list[Envelope]) -> list[trace.Link]:
    """A link per message that carried its producer's trace context (``traceparent``), with
    where the message was; the SDK keeps the first ``OTEL_SPAN_LINK_COUNT_LIMIT`` (128)."""
    links = []
    for e in envelopes:
        if e.trace:
            found = telemetry.link(
                dict(e.trace),
                {
                    "messaging.destination.name": e.topic or "",
                    "messaging.destination.partition.id": str(e.partition),
                    "messaging.kafka.message.offset": e.offset if e.offset is not None else -1,
                },
            )
            if found is not None:
                links.append(found)
    return links
