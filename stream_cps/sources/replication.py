"""PostgreSQL logical replication source: a ``pgoutput`` slot, streamed or peeked.

Two readers share the slot handling. ``StreamReader`` (default) holds a replication connection
(``START_REPLICATION``; psycopg's libpq-level copy calls in COPY_BOTH mode) and reports the flush
position with standby status updates. ``PeekReader`` reads with ``pg_logical_slot_peek_binary_
changes`` and moves the slot with ``pg_replication_slot_advance``. Both acknowledge a position
only after the stitching transaction that covers it committed. docs/replication.md has the
measurements behind the default: a peek decodes again from the slot's restart_lsn on every call,
so after a burst its cost, and the latency, grow with the WAL not yet passed by restart_lsn.

The slot is a wake-up call with ids, not the source of truth: the stitcher re-reads each row and
skips rows whose ``stitched`` is already set, so replays after a crash double nothing, and its
own writes (``stitched`` set) are recognised here and ignored.
"""

from __future__ import annotations

import hashlib
import logging
import select
import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from stream_cps.config import Settings
from stream_cps.db.connect import connect
from stream_cps.errors import Recoverable, SchemaError
from stream_cps.sources.pgoutput import Commit, Decoder, RowChange, format_lsn, parse_lsn

log = logging.getLogger(__name__)


# All the stitcher takes from a change: the row is re-read anyway (TOAST, replays).
NEEDED_COLUMNS = frozenset({"id", "stitched"})


@dataclass
class SlotBatch:
    """Unstitched event ids carried by whole transactions, and where to acknowledge to."""

    event_ids: list[str]
    ack_lsn: str | None
    messages: int


class SlotSource:
    """The slot and publication on customer_events; readers add ``poll`` and ``ack``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slot = settings.stitching.slot_name
        self.publication = settings.stitching.publication
        self.table = (settings.schemas.ce, "customer_events")
        self.decoder = Decoder(NEEDED_COLUMNS)

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        """Create the publication and the slot if missing (autocommit connection)."""
        level = conn.execute("SHOW wal_level").fetchone()
        if not level or level[0] != "logical":
            raise SchemaError(
                f"wal_level is {level[0] if level else '?'}; logical replication needs "
                "wal_level=logical (postgresql.conf, then restart PostgreSQL)"
            )
        # Inserts only: every stitched row is an UPDATE of customer_events, and streaming those
        # back (full rows, payload included) only to ignore them put the service's own WAL in
        # front of new events (docs/replication.md). Rows reset to stitched = NULL are found by
        # the sweep, at once when a purge signal is pending (the guide's scripts send one).
        publication = conn.execute(
            "SELECT pubinsert, pubupdate OR pubdelete OR pubtruncate FROM pg_publication "
            "WHERE pubname = %s",
            [self.publication],
        ).fetchone()
        if not publication:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                    sql.Identifier(self.publication), sql.Identifier(*self.table)
                )
            )
            log.info("created publication %s (inserts)", self.publication)
        elif publication != (True, False):
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert')").format(
                    sql.Identifier(self.publication)
                )
            )
            log.info("publication %s now carries inserts only", self.publication)
        slot = conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", [self.slot]
        ).fetchone()
        if not slot:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [self.slot])
            log.info("created logical replication slot %s (pgoutput)", self.slot)
        elif slot[0] != "pgoutput":
            raise SchemaError(f"slot {self.slot} uses plugin {slot[0]}, expected pgoutput")

    def _is_unstitched(self, change: RowChange) -> bool:
        rel = change.relation
        return (
            (rel.namespace, rel.name) == self.table
            and change.values.get("stitched") is None
            and isinstance(change.values.get("id"), str)
        )

    def lag_bytes(self, conn: psycopg.Connection[Any]) -> int:
        """WAL the slot holds back: how far the service is behind the database."""
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def poll(self, conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
        """Unstitched ids of whole committed transactions; blocks up to ``wait`` when idle."""
        raise NotImplementedError

    def ack(self, conn: psycopg.Connection[Any], lsn: str) -> None:
        """Report ``lsn`` as done; only ever called after the work up to it committed."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reader holds open."""


class PeekReader(SlotSource):
    """Reads the slot with SQL on the consumer's own connection."""

    _peek = (
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
        "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)"
    )

    def poll(self, conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
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
            time.sleep(wait)
        return SlotBatch(list(ids), ack, len(rows))

    def ack(self, conn: psycopg.Connection[Any], lsn: str) -> None:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if row and row[0] and parse_lsn(row[0]) >= parse_lsn(lsn):
            return
        conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [self.slot, lsn])


# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), for status updates.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class StreamReader(SlotSource):
    """Streams the slot over a replication connection (walsender, COPY_BOTH)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.repl: psycopg.Connection[Any] | None = None
        self.open_txn: dict[str, None] = {}
        self.flushed = 0
        self.server_end = 0

    def _pgconn(self) -> pq.abc.PGconn:
        if self.repl is None or self.repl.closed:
            self._open()
        assert self.repl is not None
        return self.repl.pgconn

    def _open(self) -> None:
        dsn = make_conninfo(
            self.settings.dsn, replication="database", application_name="stream-cps replication"
        )
        deadline = time.monotonic() + 15
        while True:
            repl = psycopg.connect(dsn, autocommit=True)
            pg = repl.pgconn
            # Names are validated lower-case identifiers (config); the walsender takes no params.
            pg.send_query(
                f"START_REPLICATION SLOT {self.slot} LOGICAL 0/0 "
                f"(proto_version '1', publication_names '{self.publication}')".encode()
            )
            result = pg.get_result()
            if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
                break
            message = (result.error_message if result else b"").decode(errors="replace").strip()
            repl.close()
            # A dying predecessor's walsender can hold the slot for a moment after a takeover.
            if "is active for PID" not in message or time.monotonic() > deadline:
                raise Recoverable(f"START_REPLICATION on slot {self.slot} failed: {message}")
            time.sleep(0.2)
        self.repl = repl
        self.open_txn = {}
        self.decoder = Decoder(NEEDED_COLUMNS)
        log.info("streaming slot %s", self.slot)

    def poll(self, conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
        pg = self._pgconn()
        deadline = time.monotonic() + wait
        ids: dict[str, None] = {}
        ack: str | None = None
        messages = 0
        while len(ids) < max_changes:
            size, data = pg.get_copy_data(1)
            if size == 0:
                remaining = deadline - time.monotonic()
                if ids or remaining <= 0:
                    break
                select.select([pg.socket], [], [], remaining)
                pg.consume_input()
                continue
            if size < 0:
                error = pg.error_message.decode(errors="replace").strip()
                self.close()
                raise Recoverable(f"replication stream ended: {error or 'closed by server'}")
            chunk = bytes(data)
            if chunk[:1] == b"w":
                messages += 1
                message = self.decoder.decode(chunk[25:])
                if isinstance(message, RowChange) and self._is_unstitched(message):
                    self.open_txn[str(message.values["id"])] = None
                elif isinstance(message, Commit):
                    ids.update(self.open_txn)
                    self.open_txn = {}
                    ack = format_lsn(message.end_lsn)
            elif chunk[:1] == b"k":
                wal_end, _, reply = struct.unpack("!QqB", chunk[1:18])
                self.server_end = max(self.server_end, wal_end)
                if reply:
                    self._status(self.flushed)
        if ack is None and not ids and not self.open_txn and self.server_end > self.flushed:
            # Heartbeat: everything the server sent up to its keepalive position is processed.
            ack = format_lsn(self.server_end)
        return SlotBatch(list(ids), ack, messages)

    def ack(self, conn: psycopg.Connection[Any], lsn: str) -> None:
        self.flushed = max(self.flushed, parse_lsn(lsn))
        self._status(self.flushed)

    def _status(self, lsn: int) -> None:
        now = int((datetime.now(UTC) - _PG_EPOCH).total_seconds() * 1_000_000)
        pg = self._pgconn()
        pg.put_copy_data(b"r" + struct.pack("!QQQqB", lsn, lsn, lsn, now, 0))
        pg.flush()

    def close(self) -> None:
        if self.repl is not None and not self.repl.closed:
            self.repl.close()
        self.repl = None


def reader(settings: Settings) -> SlotSource:
    """The configured slot reader (``stitching.replication``)."""
    if settings.stitching.replication == "peek":
        return PeekReader(settings)
    return StreamReader(settings)


class SlotLease:
    """At most one active consumer per slot: a session advisory lock on its own connection.

    A standby keeps trying; when the active process dies its session ends, the lock is freed
    and the standby takes over on its next try.
    """

    def __init__(self, settings: Settings) -> None:
        self.dsn = settings.dsn
        digest = hashlib.blake2b(
            f"stream-cps:{settings.stitching.slot_name}".encode(), digest_size=8
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
