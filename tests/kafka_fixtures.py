"""Kafka fixtures: one real KRaft broker per test session (infra/kafka), plus topic helpers.

A broker that cannot start FAILS the run with its reason; nothing is skipped.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

KAFKA_DIR = Path(__file__).resolve().parents[1] / "infra" / "kafka"
if str(KAFKA_DIR) not in sys.path:
    sys.path.insert(0, str(KAFKA_DIR))  # infra/kafka is a script dir, not a package

import kafka_service as ks  # noqa: E402


def lib_dir() -> Path:
    """One jar cache for all temp work dirs, so Maven runs at most once."""
    env = os.environ.get(ks.LIB_ENV)
    return Path(env) if env else KAFKA_DIR / ".lib"


def start_or_fail(workdir: Path) -> ks.KafkaBroker:
    try:
        return ks.start(workdir, lib_dir=lib_dir(), timeout=120)
    except Exception as exc:  # any failure to start must fail loudly, never skip
        pytest.fail(f"local Kafka broker could not start: {exc}", pytrace=False)


def create_topics(bootstrap: str, *names: str, partitions: int = 3) -> None:
    """Create topics and wait until the controller confirms each."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
    )
    for future in futures.values():
        future.result(timeout=30)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ks.KafkaBroker]:
    """A running broker shared by the session; fails (never skips) if it cannot start.

    When .ci/run already started one (STREAM_CPS_TEST_KAFKA_DIR), that one is used and left
    running for .ci/run to stop.
    """
    shared = os.environ.get("STREAM_CPS_TEST_KAFKA_DIR")
    if shared:
        try:
            bootstrap = ks.status(Path(shared))
        except Exception as exc:
            pytest.fail(f"Kafka from STREAM_CPS_TEST_KAFKA_DIR is not usable: {exc}", pytrace=False)
        pid = int((Path(shared) / "kafka.pid").read_text().split()[0])
        yield ks.KafkaBroker(bootstrap=bootstrap, pid=pid, workdir=Path(shared))
        return
    broker = start_or_fail(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_topic(kafka_broker: ks.KafkaBroker) -> str:
    """A fresh 3-partition topic for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    create_topics(kafka_broker.bootstrap, name)
    return name
