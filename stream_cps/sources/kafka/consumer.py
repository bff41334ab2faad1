"""The Kafka source: one always-on member of a consumer group, handing out decoded batches.

A batch carries its position (the next offset per partition); the caller stores it with
``commit`` only after the database transaction that applied the batch committed
(``enable.auto.offset.store=false``); librdkafka then commits stored offsets every second, and
synchronously when partitions are revoked or the consumer closes. So a kill -9 anywhere
redelivers at most the work since the last offset commit (docs/kafka.md has the whole order).

Polling is split in two so that the loop can decode batch N+1 on a helper thread while batch N
is in the database: ``consume`` (the polling thread only; rebalance callbacks run inside it) and
``decode`` (pure, any thread). Offsets are stored only for applied batches, so on revocation the
stored offsets are committed first, then the partitions go; a batch consumed but not applied
yet loses the messages of partitions revoked, lost or sought since (``fresh``): the new owner,
or the seek, delivers them again. Assignment is cooperative-sticky: a member joining or leaving
moves only the partitions that must move.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_cps import telemetry
from stream_cps.config import KafkaSettings, Schemas
from stream_cps.errors import Fatal, InvalidInput
from stream_cps.kafka_client import ClientErrors, client_config
from stream_cps.sources.kafka import replay
from stream_cps.sources.kafka.avro import SchemaResolver
from stream_cps.sources.messages import Decoded, Envelope, decode

log = logging.getLogger(__name__)

Partition = tuple[str, int]


def consumer_config(settings: KafkaSettings, member: str, errors: ClientErrors) -> dict[str, Any]:
    """librdkafka settings that give the delivery guarantees in the module docstring (on top
    of the brokers and security settings every client gets)."""
    return {
        **client_config(settings, errors),
        "group.id": settings.group_id,
        "client.id": member,
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": int(settings.session_timeout * 1000),
        "heartbeat.interval.ms": max(500, int(settings.session_timeout * 1000 / 5)),
        "enable.partition.eof": False,
    }


@dataclass(frozen=True)
class KafkaBatch:
    """Decoded messages of one poll and the position after them.

    ``full`` says the poll returned as many messages as it asked for (more are waiting).
    """

    envelopes: list[Envelope]
    next_offsets: dict[Partition, int]
    full: bool
    polled: tuple[int, int] = (0, 0)  # when the consume started and ended (ns)
    seq: int = 0


@dataclass(frozen=True)
class Consumed:
    """Messages as ``consume`` returned them, not decoded yet."""

    messages: list[Message]
    full: bool
    polled: tuple[int, int]
    seq: int  # which consume of the member it was


def trace_headers(msg: Message, wanted: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """The message's trace-context headers (``wanted``: the propagators' fields), as text; the
    loop links its batch span to each producer's span with them."""
    headers = msg.headers() or []
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    found: list[tuple[str, str]] = []
    for name, value in pairs:
        if name.lower() in wanted and value is not None:
            text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
            found.append((name.lower(), text))
    return tuple(found)


def to_envelope(
    msg: Message, message_format: str, avro: SchemaResolver, wanted: frozenset[str] = frozenset()
) -> Envelope:
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
        trace=trace_headers(msg, wanted) if wanted else (),
    )


class KafkaSource:
    """The consumer, its rebalance callbacks, offset storing and replay seeks."""

    def __init__(self, settings: KafkaSettings, schemas: Schemas, member: str) -> None:
        self.settings = settings
        self.schemas = schemas
        self.member = member
        self.avro = SchemaResolver.from_settings(settings)
        self.errors = ClientErrors("consumer")
        self.replays_applied = 0
        self.replay_due = True  # after an assignment: look for replay requests at once
        self._consumer: Consumer | None = None
        self._consumes = 0
        # partition -> the consumes done when it was last revoked, lost or sought: batches
        # consumed up to then must not apply its messages (``fresh``)
        self._stale: dict[Partition, int] = {}

    def open(self) -> None:
        consumer = Consumer(consumer_config(self.settings, self.member, self.errors))
        self._consumer = consumer
        consumer.subscribe(
            list(self.settings.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "kafka: member %s of group %s on %s",
            self.member,
            self.settings.group_id,
            ", ".join(self.settings.topics),
        )

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource.open() first")
        return self._consumer

    def owns_partitions(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def lag(self) -> int | None:
        """Messages behind on this member's partitions: high watermark minus position, from
        what the fetches already brought (no broker round trip); None before ``open``."""
        consumer = self._consumer
        if consumer is None:
            return None
        total = 0
        for tp in consumer.position(consumer.assignment()):
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue  # nothing fetched from it yet
            position = tp.offset if tp.offset >= 0 else max(low, 0)  # none consumed yet
            total += max(high - position, 0)
        return total

    def consume(self, wait: bool = True) -> Consumed:
        """Up to ``kafka.batch_size`` messages, waiting at most ``kafka.poll_timeout`` (or not
        at all: what the client has fetched already). The polling thread only."""
        size = self.settings.batch_size
        started = telemetry.now()
        timeout = self.settings.poll_timeout if wait else 0
        polled = self.consumer.consume(num_messages=size, timeout=timeout)
        self._consumes += 1  # after: a rebalance inside this consume is older than its batch
        self.errors.check()  # a refused login or certificate: stop, do not retry for ever
        return Consumed(polled, len(polled) >= size, (started, telemetry.now()), self._consumes)

    def decode(self, consumed: Consumed) -> KafkaBatch:
        """The messages as envelopes, and the position after them. Touches no client state,
        so it may run on another thread than ``consume``."""
        usable = [m for m in consumed.messages if self._usable(m)]
        nxt: dict[Partition, int] = {}
        for msg in usable:
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            nxt[(topic, partition)] = max(nxt.get((topic, partition), 0), offset + 1)
        fmt = self.settings.message_format
        wanted = telemetry.carrier_fields()
        envelopes = [to_envelope(m, fmt, self.avro, wanted) for m in usable]
        return KafkaBatch(envelopes, nxt, consumed.full, consumed.polled, consumed.seq)

    def fresh(self, batch: KafkaBatch) -> KafkaBatch:
        """``batch`` without the partitions revoked, lost or sought since it was consumed
        (by a rebalance in a later consume, or a replay's seek): the new owner, or the seek,
        delivers those messages again."""
        self._stale = {p: at for p, at in self._stale.items() if at >= batch.seq}
        stale = set(self._stale)
        if not stale.intersection(batch.next_offsets):
            return batch
        log.info(
            "kafka: %s revoked or sought while its batch waited: those messages are left to "
            "the new owner (or the seek)",
            ", ".join(f"{t}[{p}]" for t, p in sorted(stale.intersection(batch.next_offsets))),
        )
        return dataclasses.replace(
            batch,
            envelopes=[e for e in batch.envelopes if (e.topic, e.partition) not in stale],
            next_offsets={p: o for p, o in batch.next_offsets.items() if p not in stale},
        )

    def commit(self, batch: KafkaBatch) -> None:
        """Mark the batch done: next offset per partition (committed within a second)."""
        if batch.next_offsets:
            self.consumer.store_offsets(
                offsets=[TopicPartition(t, p, o) for (t, p), o in batch.next_offsets.items()]
            )

    def close(self) -> None:
        """Commit stored offsets and leave the group (a revocation for the others)."""
        if self._consumer is not None:
            self._consumer.close()

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.fatal():
            raise Fatal(f"kafka: fatal consumer error: {err}")
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka: %s", err)
        return False

    # -- rebalance callbacks: they run inside consume(), between batches -------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info("kafka: assigned %s", _names(partitions))
            self.replay_due = True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            return
        log.info("kafka: revoked %s; committing finished work first", _names(partitions))
        self._went_stale(partitions)
        _commit_stored(consumer)

    def _went_stale(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._stale[(tp.topic, tp.partition)] = self._consumes

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._went_stale(partitions)
        log.warning(
            "kafka: lost %s (session expired); their uncommitted work will be redelivered "
            "to the new owner, which is harmless",
            _names(partitions),
        )

    # -- replay requests ---------------------------------------------------------------------

    def apply_replays(self, conn: psycopg.Connection[Any]) -> None:
        """Seek the partitions this member owns to offsets ``stream-cps replay`` asked for."""
        self.replay_due = False
        rows = replay.pending_requests(conn, self.schemas, self.settings.group_id)
        if not rows:
            return
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        latest: dict[Partition, tuple[int, list[int]]] = {}
        for request_id, topic, partition, offset in rows:
            if (topic, partition) in owned:
                ids = latest.get((topic, partition), (0, []))[1]
                latest[(topic, partition)] = (offset, [*ids, request_id])
        done: list[int] = []
        for (topic, partition), (offset, ids) in latest.items():
            target = TopicPartition(topic, partition, offset)
            try:
                self.consumer.seek(target)
                self.consumer.store_offsets(offsets=[target])
            except KafkaException as exc:  # not fetching yet right after assignment
                log.info("kafka: replay of %s[%d] deferred: %s", topic, partition, exc)
                self.replay_due = True
                continue
            log.info("kafka: replaying %s[%d] from offset %d", topic, partition, offset)
            self._went_stale([target])
            done += ids
        if done:
            _commit_stored(self.consumer)
            replay.mark_applied(conn, self.schemas, done, self.member)
            self.replays_applied += len(done)


def _commit_stored(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
            return  # nothing stored since the last commit
        log.warning("kafka: offset commit failed (work will be redelivered): %s", exc)


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)
