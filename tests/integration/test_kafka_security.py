"""The Kafka clients against a secured broker: SASL_SSL (SCRAM-SHA-512) with the broker's own CA.

The broker (tests.fixtures.kafka ``kafka_secure_broker``) refuses unauthenticated clients on that
listener, so each test shows that the security settings reach the client it exercises.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message, Producer

from infra.kafka import kafka_service as ks
from stream_cps import config
from stream_cps.sources.kafka.replay import run_replay
from stream_cps_dev.encode import json_event
from stream_cps_dev.sample import generator
from tests.fixtures.kafka import create_topics
from tests.support import expected, observed, wait_until

WRONG_PASSWORD = "wrong-" + uuid.uuid4().hex


def secure_settings(
    broker: ks.KafkaBroker, settings: config.Settings, db: psycopg.Connection[Any]
) -> config.Settings:
    """Settings for a fresh topic, its dead-letter topic and group on the SASL_SSL listener."""
    secure = broker.secure
    assert secure is not None
    topic = f"sec-{uuid.uuid4().hex[:10]}"
    create_topics(broker.bootstrap, topic, topic + "-dlq")  # set-up over PLAINTEXT
    db.execute(generator.config_sql(settings.schemas))
    return settings.replace(
        **{
            "kafka.bootstrap_servers": secure.bootstrap,
            "kafka.security_protocol": "sasl_ssl",
            "kafka.sasl_mechanism": secure.mechanism,
            "kafka.sasl_username": secure.username,
            "kafka.sasl_password_file": str(secure.password_file),
            "kafka.ssl_ca_location": str(secure.ca_location),
            "kafka.topics": [topic],
            "kafka.group_id": f"g-{topic}",
            "kafka.dead_letter_topic": topic + "-dlq",
            "kafka.poll_timeout": 0.1,
            "kafka.session_timeout": 6.0,
            "kafka.batch_size": 100,
        }
    )


def env_of(settings: config.Settings, **overrides: str) -> dict[str, str]:
    """The process environment carrying *settings* (as ``STREAM_CPS_*`` variables)."""
    env = {**os.environ}
    for key, value in settings.values.items():
        if value is None:
            env.pop(config.env_var(key), None)
        elif isinstance(value, list):
            env[config.env_var(key)] = ",".join(value)
        elif isinstance(value, dict):
            env[config.env_var(key)] = json.dumps(value)
        else:
            env[config.env_var(key)] = str(value)
    return {**env, **overrides}


def copies_on(secure: ks.SecureClient, topic: str, n: int) -> list[Message]:
    """The first *n* messages of *topic*, read over SASL_SSL (waits up to 30 s)."""
    reader = Consumer(
        {**secure.conf(), "group.id": f"r-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
    )
    reader.subscribe([topic])
    found: list[Message] = []
    deadline = time.monotonic() + 30
    try:
        while len(found) < n and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None and msg.error() is None:
                found.append(msg)
    finally:
        reader.close()
    return found


def count(db: psycopg.Connection[Any], query: str) -> int:
    row = db.execute(query).fetchone()
    return int(row[0]) if row else -1


def test_run_source_kafka_over_sasl_ssl_stitches_and_dead_letters(
    kafka_secure_broker: ks.KafkaBroker,
    settings: config.Settings,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    secure = kafka_secure_broker.secure
    assert secure is not None
    settings = secure_settings(kafka_secure_broker, settings, db)
    rows = list(generator.events(seed=5, persons=10, per_person=4))[:40]
    producer = Producer(secure.conf())
    for row in rows:
        producer.produce(settings.kafka.topics[0], key=row[0].encode(), value=json_event(row))
    producer.produce(settings.kafka.topics[0], key=b"bad", value=b"{not json")
    assert producer.flush(30) == 0

    log = tmp_path / "service.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_cps", "run", "--source", "kafka"],
            env=env_of(settings),
            stdout=out,
            stderr=out,
        )
    try:
        stitched = "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
        wait_until(lambda: count(db, stitched) == len(rows), 60, "events stitched over SASL_SSL")
        dead = copies_on(secure, settings.kafka.dead_letter_topic, 1)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert [m.value() for m in dead] == [b"{not json"]
    assert count(db, "SELECT count(*) FROM cdp_ps.kafka_dead_letters") == 1
    assert observed(db) == expected(db)
    assert secure.password_file.read_text().strip() not in output


def test_a_wrong_password_exits_at_once_with_one_line_without_the_password(
    kafka_secure_broker: ks.KafkaBroker, settings: config.Settings, db: psycopg.Connection[Any]
) -> None:
    settings = secure_settings(kafka_secure_broker, settings, db)
    settings = settings.replace(**{"kafka.sasl_password_file": None})
    # Warnings and errors only: what an operator sees is that one line.
    env = env_of(
        settings, STREAM_CPS_KAFKA_SASL_PASSWORD=WRONG_PASSWORD, STREAM_CPS_LOG_LEVEL="WARNING"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stream_cps", "run", "--source", "kafka"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert time.monotonic() - started < 45, "retried instead of stopping"
    assert WRONG_PASSWORD not in output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith("stream-cps: kafka:") and "authentication" in lines[0].lower()


def test_replay_over_sasl_ssl_moves_an_idle_groups_offsets(
    kafka_secure_broker: ks.KafkaBroker, settings: config.Settings, db: psycopg.Connection[Any]
) -> None:
    """The replay's admin client and offset reader get the security settings too."""
    secure = kafka_secure_broker.secure
    assert secure is not None
    settings = secure_settings(kafka_secure_broker, settings, db)
    topic = settings.kafka.topics[0]
    producer = Producer(secure.conf())
    for n in range(6):
        producer.produce(topic, key=str(n).encode(), value=b"{}", partition=0)
    assert producer.flush(30) == 0
    out = io.StringIO()
    code = run_replay(
        settings, topic=topic, beginning=True, offsets=None, since=None, yes=True, out=out
    )
    assert code == 0 and "total: 6 message(s)" in out.getvalue(), out.getvalue()
    assert "offsets moved" in out.getvalue(), out.getvalue()
