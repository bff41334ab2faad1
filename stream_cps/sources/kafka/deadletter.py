"""The dead-letter topic: a copy of each rejected message with its reason and origin.

Published after the batch's transaction committed (which also wrote the dead-letter table row)
and before its offsets are stored, so a crash in between republishes rather than loses: the topic
is at-least-once, keyed by the origin (``kafka:<topic>:<partition>:<offset>``) so a reader can
drop repeats; the table is exactly-once (its primary key is that origin).

A message may be larger than the dead-letter topic takes (its own topic allows more), and a
copy that can never be delivered would stall the partition for good. So a copy over the
producer's limit, or one the broker refuses as too large, goes as a reference: empty value,
``stream_cps.value_dropped`` = the original size, the origin pointing at the table row that
holds the whole message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from stream_cps import retry
from stream_cps.config import KafkaSettings
from stream_cps.kafka_client import ClientErrors, client_config
from stream_cps.sources.messages import Envelope

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 30.0
# librdkafka's default ``message.max.bytes``: produce() fails locally above it.
PRODUCER_MAX_BYTES = 1_000_000
# Room for what the size check does not count: the record batch header (61 bytes), the
# record's varint framing and the protocol request around it.
FRAMING_ALLOWANCE = 1024
# A reference keeps the original key up to this size (a reference must fit any topic).
REFERENCE_KEY_BYTES = 1024
# The broker's refusal and librdkafka's local check in produce() share this code.
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE})

Headers = list[tuple[str, str | bytes | None]]


@dataclass
class _Round:
    """One produce-and-flush of a list of copies."""

    too_large: list[Envelope] = field(default_factory=list)
    failures: list[KafkaError] = field(default_factory=list)


class DeadLetterTopic:
    """Produces dead letters and waits until the broker has them all."""

    def __init__(self, settings: KafkaSettings, extra: dict[str, Any] | None = None) -> None:
        self.topic = settings.dead_letter_topic
        self.errors = ClientErrors("dead-letter producer")
        conf: dict[str, Any] = {
            **client_config(settings, self.errors),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            **(extra or {}),
        }
        # A copy bigger than this goes as a reference without sending it first.
        self.max_bytes = int(conf.get("message.max.bytes", PRODUCER_MAX_BYTES)) - FRAMING_ALLOWANCE
        self._producer = Producer(conf)

    def publish(self, dead: Sequence[Envelope]) -> None:
        """Send every envelope and block until all are acknowledged; raise if any is not.

        Copies the broker refuses as too large are sent again as references."""
        if not dead:
            return
        first = self._round(dead, reference_only=False)
        failures = first.failures
        if first.too_large:
            second = self._round(first.too_large, reference_only=True)
            failures += second.failures + [_size_error()] * len(second.too_large)
        left = len(self._producer)
        if left or failures:
            self.errors.check()  # undelivered because the broker refused us: permanent
            raise retry.delivery_error(f"dead-letter topic {self.topic!r}", failures, left)

    def _round(self, dead: Sequence[Envelope], *, reference_only: bool) -> _Round:
        result = _Round()
        for envelope in dead:

            def delivered(err: KafkaError | None, _msg: Any, envelope: Envelope = envelope) -> None:
                if err is None:
                    return
                if err.code() in _TOO_LARGE:
                    result.too_large.append(envelope)
                else:
                    result.failures.append(err)

            value, headers = self._copy(envelope, reference_only)
            try:
                self._producer.produce(
                    self.topic,
                    key=envelope.origin.encode(),
                    value=value,
                    headers=headers,
                    on_delivery=delivered,
                )
            except KafkaException as exc:  # the local size check (framing counted differently)
                if not exc.args or exc.args[0].code() not in _TOO_LARGE:
                    raise
                result.too_large.append(envelope)
            self._producer.poll(0)
        self._producer.flush(FLUSH_TIMEOUT)
        return result

    def _copy(self, envelope: Envelope, reference_only: bool) -> tuple[bytes | None, Headers]:
        """The value and headers of the copy: the original value, or none (a reference)."""
        headers: Headers = [
            ("stream_cps.reason", (envelope.reason or "").encode()),
            ("stream_cps.origin", envelope.origin.encode()),
        ]
        if envelope.topic is not None:
            headers += [
                ("stream_cps.topic", envelope.topic.encode()),
                ("stream_cps.partition", str(envelope.partition).encode()),
                ("stream_cps.offset", str(envelope.offset).encode()),
            ]
        key = envelope.key or b""
        value = envelope.value
        size = len(envelope.origin) + len(key) + len(value or b"") + _size(headers)
        if not reference_only and size <= self.max_bytes:
            if envelope.key is not None:
                headers.append(("stream_cps.key", envelope.key))
            return value, headers
        log.warning(
            "dead letter %s: %d bytes is more than the dead-letter topic %r takes; published "
            "without its value (the dead-letter table has the whole message)",
            envelope.where(),
            size,
            self.topic,
        )
        headers.append(("stream_cps.value_dropped", str(len(value or b"")).encode()))
        if envelope.key is not None:
            if len(key) <= REFERENCE_KEY_BYTES:
                headers.append(("stream_cps.key", envelope.key))
            else:
                headers.append(("stream_cps.key_dropped", str(len(key)).encode()))
        return b"", headers

    def close(self) -> None:
        self._producer.flush(FLUSH_TIMEOUT)


def _size(headers: Headers) -> int:
    return sum(len(name) + len(value or b"") for name, value in headers)


def _size_error() -> KafkaError:
    return KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "even the reference copy is too large")
