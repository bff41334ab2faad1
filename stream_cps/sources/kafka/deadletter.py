"""The dead-letter topic: a copy of each rejected message with its reason and origin.

Published after the batch's transaction committed (which also wrote the dead-letter table row)
and before its offsets are stored, so a crash in between republishes rather than loses: the topic
is at-least-once, keyed by the origin (``kafka:<topic>:<partition>:<offset>``) so a reader can
drop repeats; the table is exactly-once (its primary key is that origin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from stream_cps import retry
from stream_cps.sources.messages import Envelope

FLUSH_TIMEOUT = 30.0


class DeadLetterTopic:
    """Produces dead letters and waits until the broker has them all."""

    def __init__(self, bootstrap: str, topic: str, extra: dict[str, Any] | None = None) -> None:
        self.topic = topic
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                **(extra or {}),
            }
        )
        self._failures: list[KafkaError] = []

    def publish(self, dead: Sequence[Envelope]) -> None:
        """Send every envelope and block until all are acknowledged; raise if any is not."""
        if not dead:
            return
        self._failures.clear()
        for envelope in dead:
            headers: list[tuple[str, str | bytes | None]] = [
                ("stream_cps.reason", (envelope.reason or "").encode()),
                ("stream_cps.origin", envelope.origin.encode()),
            ]
            if envelope.topic is not None:
                headers += [
                    ("stream_cps.topic", envelope.topic.encode()),
                    ("stream_cps.partition", str(envelope.partition).encode()),
                    ("stream_cps.offset", str(envelope.offset).encode()),
                ]
            if envelope.key is not None:
                headers.append(("stream_cps.key", envelope.key))
            self._producer.produce(
                self.topic,
                key=envelope.origin.encode(),
                value=envelope.value,
                headers=headers,
                on_delivery=self._delivered,
            )
            self._producer.poll(0)
        left = self._producer.flush(FLUSH_TIMEOUT)
        if left or self._failures:
            raise retry.delivery_error(f"dead-letter topic {self.topic!r}", self._failures, left)

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.append(err)

    def close(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT)
