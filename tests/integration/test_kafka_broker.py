"""Integration tests for the local Kafka broker in infra/kafka (real JVM broker, no mocks).

They prove that the dev/test broker really carries keyed data in order and
really goes away on stop(), since every other Kafka test relies on both.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from infra.kafka import kafka_service as ks
from tests.fixtures.kafka import start_or_fail


def _accepts_connections(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _record(msg: Message) -> tuple[int, bytes, bytes]:
    partition, key, value = msg.partition(), msg.key(), msg.value()
    assert partition is not None and isinstance(key, bytes) and isinstance(value, bytes)
    return partition, key, value


def test_keyed_messages_round_trip_in_partition_order(kafka_broker: ks.KafkaBroker) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = f"test-roundtrip-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(
        timeout=30
    )

    sent = [(f"key-{i % 7}".encode(), f"payload-{i:03d}".encode()) for i in range(100)]
    delivered: list[Message] = []
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(err)
        else:
            delivered.append(msg)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not failures
    assert len(delivered) == 100

    # Expected per-partition sequence, in the order the producer sent them.
    expected: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for msg in delivered:
        partition, key, value = _record(msg)
        expected[partition].append((key, value))
    assert len(expected) > 1, "7 keys over 3 partitions should spread"

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while sum(map(len, received.values())) < 100 and time.monotonic() < deadline:
            polled = consumer.poll(1.0)
            if polled is None:
                continue
            assert polled.error() is None, polled.error()
            partition, key, value = _record(polled)
            received[partition].append((key, value))
    finally:
        consumer.close()

    # Exact payloads, each partition in the order it was produced, nothing extra.
    assert dict(received) == dict(expected)
    assert sorted(kv for part in received.values() for kv in part) == sorted(sent)
    owners: dict[bytes, set[int]] = defaultdict(set)
    for partition, part in received.items():
        assert [v for _, v in part] == sorted(v for _, v in part)  # send order == index order
        for key, _ in part:
            owners[key].add(partition)
    assert all(len(p) == 1 for p in owners.values()), "a key must map to a single partition"


def test_stop_really_stops_the_broker(tmp_path: Path) -> None:
    workdir = tmp_path / "kafka-stop"
    broker = start_or_fail(workdir)
    bootstrap, pid = broker.bootstrap, broker.pid
    assert _accepts_connections(bootstrap)
    assert (workdir / "bootstrap").read_text().strip() == bootstrap

    broker.stop()

    assert not _accepts_connections(bootstrap)
    assert not Path(f"/proc/{pid}").exists(), (
        "broker process still exists (or is an unreaped zombie)"
    )
    assert not (workdir / "kafka.pid").exists()
    ks.stop(workdir)  # idempotent
    with pytest.raises(ks.KafkaServiceError):
        ks.status(workdir)


def test_the_sasl_ssl_listener_needs_the_password_and_the_ca(
    kafka_secure_broker: ks.KafkaBroker,
) -> None:
    """The right settings round-trip over SASL_SSL; a wrong password or another CA is refused."""
    secure = kafka_secure_broker.secure
    assert secure is not None
    ks.round_trip(secure.bootstrap, 20, secure.conf())
    for wrong in (
        {"sasl.password": "not-the-password"},
        {"ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"},
    ):
        with pytest.raises(ks.KafkaServiceError):
            ks.round_trip(secure.bootstrap, 5, {**secure.conf(), **wrong})
