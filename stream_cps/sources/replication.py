"""PostgreSQL logical replication source: a ``pgoutput`` slot read with peek + advance.

Why peek/advance rather than a streaming ``START_REPLICATION`` connection (docs/replication.md
has the measurements): the slot is read by ordinary SQL on the consumer's own connection, the
position is moved by ``pg_replication_slot_advance`` only after the stitching transaction has
committed, and nothing else (standby status updates, keepalives) has to be kept alive. Latency is
bounded by the poll interval, which is cheap because an idle peek decodes nothing.

The slot is a wake-up call with ids, not the source of truth: the stitcher re-reads each row and
skips rows whose ``stitched`` is already set, so replays after a crash double nothing, and its
own writes (``stitched`` set) are recognised here and ignored.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Settings
from stream_cps.db.connect import connect
from stream_cps.errors import SchemaError
from stream_cps.sources.pgoutput import Commit, Decoder, RowChange, format_lsn, parse_lsn

log = logging.getLogger(__name__)


@dataclass
class SlotBatch:
    """Unstitched event ids carried by whole transactions, and where to acknowledge to."""

    event_ids: list[str]
    ack_lsn: str | None
    messages: int


class SlotSource:
    """Reads the customer_events publication through a logical slot."""

    def __init__(self, settings: Settings) -> None:
        self.slot = settings["stitching.slot_name"]
        self.publication = settings["stitching.publication"]
        self.table = (settings.schemas.ce, "customer_events")
        self.decoder = Decoder()
        self._peek = (
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)"
        )

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        """Create the publication and the slot if missing (autocommit connection)."""
        level = conn.execute("SHOW wal_level").fetchone()
        if not level or level[0] != "logical":
            raise SchemaError(
                f"wal_level is {level[0] if level else '?'}; logical replication needs "
                "wal_level=logical (postgresql.conf, then restart PostgreSQL)"
            )
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", [self.publication]
        ).fetchone()
        if not exists:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(self.publication), sql.Identifier(*self.table)
                )
            )
            log.info("created publication %s", self.publication)
        slot = conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", [self.slot]
        ).fetchone()
        if not slot:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [self.slot])
            log.info("created logical replication slot %s (pgoutput)", self.slot)
        elif slot[0] != "pgoutput":
            raise SchemaError(f"slot {self.slot} uses plugin {slot[0]}, expected pgoutput")

    def poll(self, conn: psycopg.Connection[Any], max_changes: int) -> SlotBatch:
        """Peek whole transactions (at least ``max_changes`` messages if that many wait)."""
        head_row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        head = head_row[0] if head_row else None
        rows = conn.execute(self._peek, [self.slot, max_changes, self.publication]).fetchall()
        ids: dict[str, None] = {}
        ack: str | None = None
        for lsn, data in rows:
            message = self.decoder.decode(bytes(data))
            if isinstance(message, Commit):
                ack = lsn
            elif isinstance(message, RowChange) and self._is_unstitched(message):
                ids[str(message.values["id"])] = None
        if not rows:
            ack = head  # heartbeat: nothing of ours before ``head``, let the slot move on
        return SlotBatch(list(ids), ack, len(rows))

    def _is_unstitched(self, change: RowChange) -> bool:
        rel = change.relation
        return (
            (rel.namespace, rel.name) == self.table
            and change.values.get("stitched") is None
            and isinstance(change.values.get("id"), str)
        )

    def ack(self, conn: psycopg.Connection[Any], lsn: str) -> None:
        """Move the slot to ``lsn``; only ever called after the work up to it committed."""
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if row and row[0] and parse_lsn(row[0]) >= parse_lsn(lsn):
            return
        conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [self.slot, lsn])

    def lag_bytes(self, conn: psycopg.Connection[Any]) -> int:
        """WAL the slot holds back: how far the service is behind the database."""
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


class SlotLease:
    """At most one active consumer per slot: a session advisory lock on its own connection.

    A standby keeps trying; when the active process dies its session ends, the lock is freed
    and the standby takes over on its next try.
    """

    def __init__(self, settings: Settings) -> None:
        self.dsn = settings.dsn
        digest = hashlib.blake2b(
            f"stream-cps:{settings['stitching.slot_name']}".encode(), digest_size=8
        )
        self.key = int.from_bytes(digest.digest(), "big", signed=True)
        self.conn: psycopg.Connection[Any] | None = None

    def try_acquire(self) -> bool:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.dsn, role="lease", autocommit=True)
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", [self.key]).fetchone()
        return bool(row and row[0])

    def alive(self) -> bool:
        """Still holding the lease (the lock's session is up)."""
        if self.conn is None or self.conn.closed:
            return False
        try:
            self.conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def release(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = None


__all__ = ["SlotBatch", "SlotLease", "SlotSource", "format_lsn"]
