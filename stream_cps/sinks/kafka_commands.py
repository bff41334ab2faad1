"""Optional copy of delivered OpenSearch commands to a Kafka topic, Avro-encoded.

Commands are produced before the outbox batch commits and flushed synchronously, so the topic
gets every command at least once (a retried batch may repeat some; versions make repeats
harmless). Keyed by entity id, so one entity's commands stay in order on one partition.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from functools import cache
from typing import Any

import fastavro
from confluent_kafka import KafkaException, Producer

from stream_cps import retry
from stream_cps.avro_schemas import schemas_dir
from stream_cps.config import Settings
from stream_cps.errors import ConfigError, Transient
from stream_cps.kafka_client import ClientErrors, client_config
from stream_cps.sinks.commands import Action

SCHEMA_PATH = schemas_dir() / "opensearch_command.avsc"


@cache
def schema() -> Any:
    return fastavro.parse_schema(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def record(action: Action, index: str) -> dict[str, Any]:
    """The Avro record of one action (field names as in the schema file)."""
    doc = action.document
    return {
        "entity_id": action.entity_id,
        "op": "delete" if doc is None else "upsert",
        "version": action.version,
        "index": index,
        "identifiers": None if doc is None else list(doc["identifiers"]),
        "attributes_json": None if doc is None else json.dumps(doc["attributes"], sort_keys=True),
        "calculated": None if doc is None else doc.get("calculated"),
    }


def encode(action: Action, index: str) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema(), record(action, index))
    return buf.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    result = fastavro.schemaless_reader(io.BytesIO(data), schema(), None)
    assert isinstance(result, dict)
    return result


class KafkaCommandPublisher:
    """Produces each action to ``opensearch.kafka_topic``; raises ``Transient`` when the
    broker did not acknowledge all of them in time, so the batch stays pending."""

    def __init__(self, settings: Settings, flush_timeout: float = 10.0) -> None:
        servers = settings.kafka.bootstrap_servers
        if not servers:
            raise ConfigError("kafka.bootstrap_servers: required with opensearch.kafka_topic")
        self.topic = str(settings.opensearch.kafka_topic)
        self.index = settings.opensearch.index
        self.flush_timeout = flush_timeout
        self.errors = ClientErrors("command producer")
        self.producer = Producer(
            {
                **client_config(settings.kafka, self.errors),
                "enable.idempotence": True,
                "acks": "all",
            }
        )

    def publish(self, actions: Sequence[Action]) -> None:
        errors: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        try:
            for action in actions:
                self.producer.produce(
                    self.topic,
                    key=action.entity_id.encode(),
                    value=encode(action, self.index),
                    on_delivery=on_delivery,
                )
        except BufferError as exc:  # the local queue is full: it drains
            raise Transient(f"kafka produce failed: {exc}") from exc
        except KafkaException as exc:
            raise retry.delivery_error(f"topic {self.topic!r}", [exc.args[0]], 0) from exc
        left = self.producer.flush(self.flush_timeout)
        if left or errors:
            self.errors.check()  # the broker refused us: permanent, not a pending batch
            raise retry.delivery_error(f"topic {self.topic!r}", errors, left)
