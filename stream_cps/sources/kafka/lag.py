"""How far the consumer group is behind, per partition: end offset minus committed offset."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

from stream_cps.config import KafkaSettings
from stream_cps.errors import Transient
from stream_cps.kafka_client import ClientErrors, client_config


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here (it starts at the earliest)
    end: int
    start: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed if self.committed is not None else self.start)


def group_lag(settings: KafkaSettings, timeout: float = 5.0) -> list[PartitionLag]:
    """Every partition of ``kafka.topics``, read by a consumer that never subscribes (so it
    does not join the group and moves nothing). Raises ``Transient`` when no broker answers."""
    errors = ClientErrors("status")
    reader = Consumer(
        {
            **client_config(settings, errors),
            "group.id": settings.group_id,
            "enable.auto.commit": False,
        }
    )
    try:
        out: list[PartitionLag] = []
        for topic in settings.topics:
            try:
                meta = reader.list_topics(topic, timeout=timeout).topics.get(topic)
            except Exception as exc:  # KafkaException: no broker within the timeout
                errors.check()
                raise Transient(
                    f"kafka: no broker answered at {settings.bootstrap_servers}"
                ) from exc
            if meta is None or meta.error is not None or not meta.partitions:
                continue
            parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
            committed = reader.committed(parts, timeout=timeout)
            for tp in committed:
                start, end = reader.get_watermark_offsets(
                    TopicPartition(topic, tp.partition), timeout=timeout
                )
                offset = tp.offset if tp.offset != OFFSET_INVALID and tp.offset >= 0 else None
                out.append(PartitionLag(topic, tp.partition, offset, end, start))
        errors.check()
        return out
    finally:
        reader.close()
