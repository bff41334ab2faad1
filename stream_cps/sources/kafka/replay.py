"""``stream-cps replay``: move a consumer group's offsets back so its messages are reprocessed.

Reprocessing is safe by construction: inserts are idempotent and stitching lands on the same
entities and ids whatever the order (the stitching determinism), so a replay only costs time.

Kafka refuses to move the committed offsets of a group that has live members, so the two cases
differ: an idle group's offsets are altered directly (AdminClient); a live group gets a request
row per partition in ``kafka_replay_requests``, and each member seeks the partitions it owns and
marks the request applied. Moving a live group's offsets requires ``--yes``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import psycopg
from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from psycopg import sql

from stream_cps.config import Schemas, Settings
from stream_cps.db.connect import connect
from stream_cps.errors import ConfigError, StreamCpsError
from stream_cps.kafka_client import ClientErrors, client_config

TIMEOUT = 30.0


@dataclass(frozen=True)
class Move:
    """One partition: where the group is, where it will restart, and the log's end."""

    topic: str
    partition: int
    committed: int | None
    target: int
    end: int

    @property
    def to_replay(self) -> int:
        return max(0, (self.committed if self.committed is not None else self.end) - self.target)


@dataclass(frozen=True)
class GroupState:
    state: str
    members: int


def parse_offsets(values: list[str]) -> dict[int, int]:
    """``P:O`` arguments -> partition -> offset."""
    found: dict[int, int] = {}
    for value in values:
        try:
            partition, offset = (int(part) for part in value.split(":", 1))
        except ValueError as exc:
            raise ConfigError(f"--from-offset: expected PARTITION:OFFSET, got {value!r}") from exc
        if partition < 0 or offset < 0:
            raise ConfigError(f"--from-offset: negative number in {value!r}")
        found[partition] = offset
    return found


def parse_time(value: str) -> datetime:
    """ISO 8601; a time without offset is taken as UTC."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"--from-time: not ISO 8601: {value!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class Replayer:
    """Plans and executes one replay for the configured group."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.kafka.group_id
        self.errors = ClientErrors("replay")
        common = client_config(settings.kafka, self.errors)
        self.admin = AdminClient(common)
        # A consumer that never subscribes: it reads watermarks, times and the group's
        # committed offsets without joining the group.
        self.reader = Consumer({**common, "group.id": self.group, "enable.auto.commit": False})

    def close(self) -> None:
        self.reader.close()

    def group_state(self) -> GroupState:
        future = self.admin.describe_consumer_groups([self.group], request_timeout=TIMEOUT)
        description = future[self.group].result()
        return GroupState(str(description.state).split(".")[-1], len(description.members))

    def partitions(self, topic: str) -> list[int]:
        meta = self.admin.list_topics(topic, timeout=TIMEOUT).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ConfigError(f"topic {topic!r} does not exist")
        return sorted(meta.partitions)

    def plan(
        self,
        topic: str,
        *,
        beginning: bool = False,
        offsets: dict[int, int] | None = None,
        since: datetime | None = None,
    ) -> list[Move]:
        """Where each affected partition of ``topic`` would restart."""
        partitions = self.partitions(topic)
        if offsets:
            unknown = set(offsets) - set(partitions)
            if unknown:
                raise ConfigError(f"topic {topic!r} has no partition {min(unknown)}")
            partitions = sorted(offsets)
        committed = {
            tp.partition: (tp.offset if tp.offset != OFFSET_INVALID else None)
            for tp in self.reader.committed(
                [TopicPartition(topic, p) for p in partitions], timeout=TIMEOUT
            )
        }
        marks = {
            p: self.reader.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
            for p in partitions
        }
        targets: dict[int, int] = {}
        if beginning:
            targets = {p: marks[p][0] for p in partitions}
        elif offsets:
            targets = {p: min(max(o, marks[p][0]), marks[p][1]) for p, o in offsets.items()}
        elif since is not None:
            stamp = int(since.timestamp() * 1000)
            found = self.reader.offsets_for_times(
                [TopicPartition(topic, p, stamp) for p in partitions], timeout=TIMEOUT
            )
            targets = {
                tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1]
                for tp in found
            }
        else:
            raise ConfigError("replay: give --from-beginning, --from-offset or --from-time")
        return [Move(topic, p, committed[p], targets[p], marks[p][1]) for p in partitions]

    def move_idle(self, moves: list[Move]) -> None:
        """Alter the committed offsets of a group with no live members."""
        request = ConsumerGroupTopicPartitions(
            self.group, [TopicPartition(m.topic, m.partition, m.target) for m in moves]
        )
        futures = self.admin.alter_consumer_group_offsets([request], request_timeout=TIMEOUT)
        for future in futures.values():
            try:
                result = future.result()
            except KafkaException as exc:
                raise StreamCpsError(
                    f"could not move the offsets of group {self.group!r} (did a member start "
                    f"meanwhile? then rerun with --yes): {exc}"
                ) from exc
            failed = [tp for tp in result.topic_partitions if tp.error is not None]
            if failed:
                raise StreamCpsError(f"could not move {failed[0]}: {failed[0].error}")

    def request_live(self, conn: psycopg.Connection[Any], moves: list[Move]) -> list[int]:
        """Ask the live members to seek; returns the request ids."""
        table = sql.Identifier(self.settings.schemas.ps, "kafka_replay_requests")
        ids = []
        with conn.transaction():
            for m in moves:
                row = conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (group_id, topic, kafka_partition, kafka_offset) "
                        "VALUES (%s, %s, %s, %s) RETURNING id"
                    ).format(table),
                    [self.group, m.topic, m.partition, m.target],
                ).fetchone()
                assert row is not None
                ids.append(int(row[0]))
        return ids

    def wait_applied(self, conn: psycopg.Connection[Any], ids: list[int], timeout: float) -> int:
        """How many of the requests the members applied within ``timeout`` seconds."""
        table = sql.Identifier(self.settings.schemas.ps, "kafka_replay_requests")
        deadline = time.monotonic() + timeout
        applied = 0
        while time.monotonic() < deadline:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} WHERE id = ANY(%s) AND applied IS NOT NULL"
                ).format(table),
                [ids],
            ).fetchone()
            applied = int(row[0]) if row else 0
            if applied == len(ids):
                break
            time.sleep(0.2)
        return applied


def pending_requests(
    conn: psycopg.Connection[Any], schemas: Schemas, group: str
) -> list[tuple[int, str, int, int]]:
    """Requests for a live group not applied yet: (id, topic, partition, offset), oldest first."""
    rows = conn.execute(
        sql.SQL(
            "SELECT id, topic, kafka_partition, kafka_offset FROM {} "
            "WHERE group_id = %s AND applied IS NULL ORDER BY id"
        ).format(sql.Identifier(schemas.ps, "kafka_replay_requests")),
        [group],
    ).fetchall()
    return [(int(i), str(t), int(p), int(o)) for i, t, p, o in rows]


def mark_applied(
    conn: psycopg.Connection[Any], schemas: Schemas, ids: list[int], member: str
) -> None:
    """Record that ``member`` seeked for these requests."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET applied = now(), applied_by = %s WHERE id = ANY(%s) AND applied IS NULL"
        ).format(sql.Identifier(schemas.ps, "kafka_replay_requests")),
        [member, ids],
    )


def run_replay(
    settings: Settings,
    *,
    topic: str | None,
    beginning: bool,
    offsets: list[str] | None,
    since: str | None,
    yes: bool,
    out: TextIO,
    wait: float = TIMEOUT,
) -> int:
    """The ``replay`` command: print the plan, then move (or explain why not). Exit code."""
    topics = [topic] if topic else list(settings.kafka.topics)
    if offsets and len(topics) != 1:
        raise ConfigError("--from-offset needs --topic when several kafka.topics are configured")
    wanted = parse_offsets(offsets) if offsets else None
    when = parse_time(since) if since else None
    try:
        return _replay(settings, topics, beginning, wanted, when, yes, out, wait)
    except KafkaException as exc:
        raise StreamCpsError(f"kafka: {exc.args[0] if exc.args else exc}") from exc


def _replay(
    settings: Settings,
    topics: list[str],
    beginning: bool,
    offsets: dict[int, int] | None,
    since: datetime | None,
    yes: bool,
    out: TextIO,
    wait: float,
) -> int:
    replayer = Replayer(settings)
    try:
        state = replayer.group_state()
        moves: list[Move] = []
        for name in topics:
            moves += replayer.plan(name, beginning=beginning, offsets=offsets, since=since)
        live = state.members > 0
        print(
            f"replay for consumer group {replayer.group!r} "
            f"({'live: ' + str(state.members) + ' member(s)' if live else 'no live members'}):",
            file=out,
        )
        for m in moves:
            now = "none" if m.committed is None else str(m.committed)
            print(
                f"  {m.topic}[{m.partition}]: committed {now} -> {m.target} "
                f"(end {m.end}; {m.to_replay} message(s) to replay)",
                file=out,
            )
        print(f"  total: {sum(m.to_replay for m in moves)} message(s)", file=out)
        if not live:
            replayer.move_idle(moves)
            print("offsets moved; the next member to start replays from there", file=out)
            return 0
        if not yes:
            print(
                "the group is live: rerun with --yes to have its members seek to these offsets",
                file=out,
            )
            return 1
        with connect(settings.dsn, role="replay", autocommit=True) as conn:
            ids = replayer.request_live(conn, moves)
            applied = replayer.wait_applied(conn, ids, wait)
        print(f"live members applied {applied} of {len(ids)} partition move(s)", file=out)
        if applied < len(ids):
            print(
                "the rest are applied by whichever member owns those partitions next",
                file=out,
            )
        return 0
    except KafkaException:
        replayer.errors.check()  # refused login or certificate: say so, not "timed out"
        raise
    finally:
        replayer.close()
