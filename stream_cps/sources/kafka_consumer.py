"""``stream-cps run --source kafka``: an always-on member of a consumer group.

Commit order (docs/kafka.md): poll a batch -> decode -> ONE database transaction (insert events,
record dead letters, stitch) -> commit -> publish dead letters to the dead-letter topic ->
``store_offsets`` past the batch -> librdkafka commits stored offsets every second, and
synchronously when partitions are revoked or the consumer closes. Nothing is stored before the
database commit (``enable.auto.offset.store=false``), so a kill -9 anywhere redelivers at most
the work since the last offset commit, and redelivery is harmless: inserts are
``ON CONFLICT DO NOTHING`` and the stitcher skips stitched rows.

Batches are processed between polls on the polling thread, so rebalance callbacks (which run
inside ``consume``) always see finished work: on revocation the stored offsets are committed
first, then the partitions go. Assignment is cooperative-sticky: a member joining or leaving
moves only the partitions that must move.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from psycopg import sql
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from stream_cps import telemetry
from stream_cps.backlog import Backlog
from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import InvalidInput, Recoverable, StreamCpsError
from stream_cps.sources.kafka_apply import Applier, ApplyStats, Envelope, isolation_for
from stream_cps.sources.kafka_avro import SchemaResolver
from stream_cps.sources.kafka_deadletter import DeadLetterTopic
from stream_cps.sources.kafka_decode import Decoded, decode
from stream_cps.stitching.worker import Stitcher

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
MAINTENANCE_EVERY = 1.0  # replay requests and purge signals while idle


def consumer_config(settings: Settings, member: str) -> dict[str, Any]:
    """librdkafka settings that give the delivery guarantees in the module docstring."""
    return {
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "group.id": settings.kafka.group_id,
        "client.id": member,
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": int(settings.kafka.session_timeout * 1000),
        "heartbeat.interval.ms": max(500, int(settings.kafka.session_timeout * 1000 / 5)),
        "enable.partition.eof": False,
    }


@dataclass
class KafkaProgress:
    """Running totals, logged every few seconds and returned at the end."""

    messages: int = 0
    events_new: int = 0
    events_seen: int = 0
    changefeed_rows: int = 0
    deletes: int = 0
    resolved: int = 0
    ignored: int = 0
    dead_letters: int = 0
    stitched: int = 0
    merges: int = 0
    batches: int = 0
    replays_applied: int = 0
    last_resolved: str | None = None
    _last_log: float = field(default_factory=time.monotonic)
    _last_messages: int = 0

    def add(self, stats: ApplyStats) -> None:
        self.batches += 1
        self.messages += stats.messages
        self.events_new += stats.events_new
        self.events_seen += stats.events_seen
        self.changefeed_rows += stats.changefeed_rows
        self.deletes += stats.deletes
        self.resolved += stats.resolved
        self.ignored += stats.tombstones + stats.unknown
        self.dead_letters += len(stats.dead_letters)
        self.stitched += stats.stitch.events
        self.merges += stats.stitch.merges
        self.last_resolved = stats.last_resolved or self.last_resolved

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < PROGRESS_EVERY:
            return
        rate = (self.messages - self._last_messages) / max(now - self._last_log, 1e-9)
        log.info(
            "kafka: %d messages (%.0f/s), %d new events, %d redelivered, %d changefeed rows, "
            "%d deletes, %d resolved, %d ignored, %d dead letters; %d stitched, %d merges",
            self.messages,
            rate,
            self.events_new,
            self.events_seen,
            self.changefeed_rows,
            self.deletes,
            self.resolved,
            self.ignored,
            self.dead_letters,
            self.stitched,
            self.merges,
        )
        self._last_log, self._last_messages = now, self.messages


def to_envelope(msg: Message, message_format: str, avro: SchemaResolver) -> Envelope:
    """Decode one message; a decoding failure becomes the envelope's dead-letter reason."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    kind, stamp = msg.timestamp()
    when = datetime.fromtimestamp(stamp / 1000, UTC) if kind and stamp >= 0 else None
    key, value = msg.key(), msg.value()
    key = key if isinstance(key, bytes) else None
    value = value if isinstance(value, bytes) else None
    decoded: Decoded | None = None
    reason: str | None = None
    try:
        decoded = decode(key, value, message_format, avro)
    except InvalidInput as exc:
        reason = str(exc)
    return Envelope(
        origin=f"kafka:{topic}:{partition}:{offset}",
        source="kafka",
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        timestamp=when,
        decoded=decoded,
        reason=reason,
    )


class KafkaStitchingService:
    """Runs until ``stop`` is set; any number of processes may share the group."""

    def __init__(
        self, settings: Settings, stop: threading.Event, backlog: Backlog | None = None
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.backlog = backlog
        self.member = f"stream-cps-{socket.gethostname()}-{os.getpid()}"
        self.progress = KafkaProgress()
        self.stitcher = Stitcher(settings)
        self.applier = Applier(settings.schemas, self.stitcher)
        self.avro = SchemaResolver(settings.kafka.schema_registry_url)
        self.on_batch: Callable[[ApplyStats], None] | None = None
        self._consumer: Consumer | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._check_replays = True

    def run(self) -> KafkaProgress:
        telemetry.setup(self.settings.values)
        with connect(self.settings.dsn, role="check", autocommit=True) as conn:
            schema.check(conn, self.settings.schemas)
        dead_topic = DeadLetterTopic(
            self.settings.kafka.bootstrap_servers, self.settings.kafka.dead_letter_topic
        )
        consumer = Consumer(consumer_config(self.settings, self.member), logger=log)
        self._consumer = consumer
        try:
            self._conn = connect(self.settings.dsn, role="kafka", autocommit=True)
            consumer.subscribe(
                list(self.settings.kafka.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            log.info(
                "kafka: member %s of group %s on %s",
                self.member,
                self.settings.kafka.group_id,
                ", ".join(self.settings.kafka.topics),
            )
            self._loop(consumer, dead_topic)
        finally:
            try:
                consumer.close()  # commits stored offsets and leaves the group (revocation)
            finally:
                dead_topic.close()
                if self._conn is not None:
                    self._conn.close()
                self.progress.maybe_log(force=True)
        return self.progress

    def _loop(self, consumer: Consumer, dead_topic: DeadLetterTopic) -> None:
        batch_size = self.settings.kafka.batch_size
        timeout = self.settings.kafka.poll_timeout
        message_format = self.settings.kafka.message_format
        last_maintenance = 0.0
        while not self.stop.is_set():
            with telemetry.tracer().start_as_current_span(telemetry.SPAN_SOURCE_POLL):
                polled = consumer.consume(num_messages=batch_size, timeout=timeout)
            if self.backlog is not None:
                # A full poll means more is waiting: calculation holds back (backlog.py).
                self.backlog.report(len(polled) >= batch_size)
            batch = [m for m in polled if self._usable(m)]
            if batch:
                envelopes = [to_envelope(m, message_format, self.avro) for m in batch]
                stats = self._apply(envelopes)
                dead_topic.publish(stats.dead_letters)
                self._store(consumer, batch)
                self.progress.add(stats)
                if self.on_batch:
                    self.on_batch(stats)
            if self._check_replays or time.monotonic() - last_maintenance > MAINTENANCE_EVERY:
                self._maintenance(consumer, idle=not batch)
                last_maintenance = time.monotonic()
            self.progress.maybe_log()

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.fatal():
            raise StreamCpsError(f"kafka: fatal consumer error: {err}")
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka: %s", err)
        return False

    def _apply(self, envelopes: list[Envelope]) -> ApplyStats:
        """The batch's transaction; a lost database connection is reopened and retried."""
        for attempt in Retrying(
            retry=retry_if_exception_type(Recoverable),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_attempt(8),
            reraise=True,
        ):
            with attempt:
                conn = self._db()
                try:
                    return self.applier.apply(conn, envelopes)
                except psycopg.OperationalError as exc:
                    if not conn.broken and not conn.closed:
                        raise
                    raise Recoverable(f"database connection lost: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = connect(self.settings.dsn, role="kafka", autocommit=True)
        return self._conn

    @staticmethod
    def _store(consumer: Consumer, batch: list[Message]) -> None:
        """Mark the batch done: next offset per partition (committed within a second)."""
        nxt: dict[tuple[str, int], int] = {}
        for msg in batch:
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            nxt[(topic, partition)] = max(nxt.get((topic, partition), 0), offset + 1)
        consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()])

    # -- rebalance callbacks: they run inside consume(), between batches -------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info("kafka: assigned %s", _names(partitions))
            self._check_replays = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            return
        log.info("kafka: revoked %s; committing finished work first", _names(partitions))
        _commit_stored(consumer)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning(
            "kafka: lost %s (session expired); their uncommitted work will be redelivered "
            "to the new owner, which is harmless",
            _names(partitions),
        )

    # -- replay requests and idle purge ------------------------------------------------------

    def _maintenance(self, consumer: Consumer, idle: bool) -> None:
        """Replay requests, and purge signals while no messages arrive.

        Both are retried on the next round when they fail transiently: a lost connection is
        reopened by the next batch, a serialization conflict just waits a second.
        """
        self._check_replays = False
        try:
            conn = self._db()
            self._apply_replays(consumer, conn)
            if idle and self.stitcher.store.pending_purge(conn):
                conn.isolation_level = isolation_for(conn)
                with conn.transaction():
                    result = self.stitcher.stitch_in_transaction(conn, [])
                self.stitcher.count_metrics(result)
        except psycopg.OperationalError as exc:
            log.warning("kafka: maintenance deferred: %s", exc)
            self._check_replays = True

    def _apply_replays(self, consumer: Consumer, conn: psycopg.Connection[Any]) -> None:
        """Seek the partitions this member owns to offsets ``stream-cps replay`` asked for."""
        table = sql.Identifier(self.settings.schemas.ps, "kafka_replay_requests")
        rows = conn.execute(
            sql.SQL(
                "SELECT id, topic, kafka_partition, kafka_offset FROM {} "
                "WHERE group_id = %s AND applied IS NULL ORDER BY id"
            ).format(table),
            [self.settings.kafka.group_id],
        ).fetchall()
        if not rows:
            return
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        latest: dict[tuple[str, int], tuple[int, list[int]]] = {}
        for request_id, topic, partition, offset in rows:
            if (topic, partition) in owned:
                ids = latest.get((topic, partition), (0, []))[1]
                latest[(topic, partition)] = (offset, [*ids, request_id])
        done: list[int] = []
        for (topic, partition), (offset, ids) in latest.items():
            target = TopicPartition(topic, partition, offset)
            try:
                consumer.seek(target)
                consumer.store_offsets(offsets=[target])
            except KafkaException as exc:  # not fetching yet right after assignment
                log.info("kafka: replay of %s[%d] deferred: %s", topic, partition, exc)
                self._check_replays = True
                continue
            log.info("kafka: replaying %s[%d] from offset %d", topic, partition, offset)
            done += ids
        if done:
            _commit_stored(consumer)
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET applied = now(), applied_by = %s "
                    "WHERE id = ANY(%s) AND applied IS NULL"
                ).format(table),
                [self.member, done],
            )
            self.progress.replays_applied += len(done)


def _commit_stored(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
            return  # nothing stored since the last commit
        log.warning("kafka: offset commit failed (work will be redelivered): %s", exc)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)
