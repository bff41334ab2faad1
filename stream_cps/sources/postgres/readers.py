"""PostgreSQL logical replication source: a ``pgoutput`` slot, streamed or peeked.

Two readers share the slot handling. ``StreamReader`` (default) holds a replication connection
(``START_REPLICATION``; psycopg's libpq-level copy calls in COPY_BOTH mode) and reports the flush
position with standby status updates. ``PeekReader`` reads with ``pg_logical_slot_peek_binary_
changes`` and moves the slot with ``pg_replication_slot_advance``. Both acknowledge a position
only after the stitching transaction that covers it committed. docs/replication.md has the
measurements behind the default: a peek decodes again from the slot's restart_lsn on every call,
so after a burst its cost, and the latency, grow with the WAL not yet passed by restart_lsn.
"""

from __future__ import annotations

import logging
import select
import struct
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from stream_cps.config import Schemas, Settings
from stream_cps.errors import Transient
from stream_cps.sources.postgres.pgoutput import Commit, Decoder, RowChange, format_lsn, parse_lsn
from stream_cps.sources.postgres.slot import NEEDED_COLUMNS, SlotBatch, SlotSource, invalidated

log = logging.getLogger(__name__)


class PeekReader(SlotSource):
    """Reads the slot with SQL on the consumer's own connection."""

    _peek = (
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
        "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)"
    )

    def poll(self, conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
        head_row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        head = parse_lsn(head_row[0]) if head_row else None
        with self.recognise_invalidation():
            rows = conn.execute(self._peek, [self.slot, max_changes, self.publication]).fetchall()
        ids: dict[str, None] = {}
        ack: int | None = None
        for lsn, data in rows:
            message = self.decoder.decode(bytes(data))
            if isinstance(message, Commit):
                ack = parse_lsn(lsn)
            elif isinstance(message, RowChange) and self._is_unstitched(message):
                ids[str(message.values["id"])] = None
        if not rows:
            ack = head  # heartbeat: nothing of ours before ``head``, let the slot move on
            time.sleep(wait)
        return SlotBatch(list(ids), ack, len(rows), backlog=len(ids) >= max_changes)

    def ack(self, conn: psycopg.Connection[Any], lsn: int) -> None:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if row and row[0] and parse_lsn(row[0]) >= lsn:
            return
        with self.recognise_invalidation():
            conn.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [self.slot, format_lsn(lsn)]
            )


# Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), for status updates.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# A status update at least this often while the stream is not read (a fraction of the
# server's wal_sender_timeout, this at most when it is off or long).
KEEPALIVE_EVERY = 10.0


class StreamReader(SlotSource):
    """Streams the slot over a replication connection (walsender, COPY_BOTH)."""

    def __init__(self, dsn: str, schemas: Schemas, slot: str, publication: str) -> None:
        super().__init__(dsn, schemas, slot, publication)
        self.repl: psycopg.Connection[Any] | None = None
        self.open_txn: dict[str, None] = {}
        self.overflowed = False  # the open transaction has more unstitched rows than listed
        self.flushed = 0
        self.server_end = 0
        self.keepalive_every = KEEPALIVE_EVERY
        self._last_status = 0.0

    def _pgconn(self) -> pq.abc.PGconn:
        if self.repl is None or self.repl.closed:
            self._open()
        assert self.repl is not None
        return self.repl.pgconn

    def _open(self) -> None:
        dsn = make_conninfo(
            self.dsn, replication="database", application_name="stream-cps replication"
        )
        deadline = time.monotonic() + 15
        while True:
            repl = psycopg.connect(dsn, autocommit=True)
            pg = repl.pgconn
            self.keepalive_every = _keepalive_every(pg)
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
            lost = invalidated(self.slot, message)
            if lost is not None:
                raise lost
            # A dying predecessor's walsender can hold the slot for a moment after a takeover.
            if "is active for PID" not in message or time.monotonic() > deadline:
                raise Transient(f"START_REPLICATION on slot {self.slot} failed: {message}")
            time.sleep(0.2)
        self.repl = repl
        self.open_txn = {}
        self.overflowed = False
        self._last_status = time.monotonic()
        self.decoder = Decoder(NEEDED_COLUMNS)
        log.info("streaming slot %s", self.slot)

    def poll(self, conn: psycopg.Connection[Any], max_changes: int, wait: float) -> SlotBatch:
        pg = self._pgconn()
        deadline = time.monotonic() + wait
        ids: dict[str, None] = {}
        ack: int | None = None
        messages = 0
        backlog = False
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
                raise invalidated(self.slot, error) or Transient(
                    f"replication stream ended: {error or 'closed by server'}"
                )
            chunk = bytes(data)
            if chunk[:1] == b"w":
                messages += 1
                message = self.decoder.decode(chunk[25:])
                if isinstance(message, RowChange) and self._is_unstitched(message):
                    # A transaction's ids up to a batch's worth: the rest is the sweep's
                    # (``SlotBatch.backlog``), and memory stays bounded through a COPY of ten
                    # million events in one transaction.
                    if len(self.open_txn) < max_changes:
                        self.open_txn[str(message.values["id"])] = None
                    else:
                        self.overflowed = True
                elif isinstance(message, Commit):
                    ids.update(self.open_txn)
                    backlog = backlog or self.overflowed
                    self.open_txn = {}
                    self.overflowed = False
                    ack = message.end_lsn
            elif chunk[:1] == b"k":
                wal_end, _, reply = struct.unpack("!QqB", chunk[1:18])
                self.server_end = max(self.server_end, wal_end)
                if reply:
                    self._status(self.flushed)
        if ack is None and not ids and not self.open_txn and self.server_end > self.flushed:
            # Heartbeat: everything the server sent up to its keepalive position is processed.
            ack = self.server_end
        return SlotBatch(list(ids), ack, messages, backlog=backlog or len(ids) >= max_changes)

    def ack(self, conn: psycopg.Connection[Any], lsn: int) -> None:
        self.flushed = max(self.flushed, lsn)
        self._status(self.flushed)

    def keepalive(self) -> None:
        """A status update (the position already acknowledged) when none went out for a
        while. The walsender ends a connection that has not replied for
        ``wal_sender_timeout`` (60 s by default), and a sweep through a large backlog, or a
        batch waiting for the rows of the guide's restitch script, reads no stream for
        minutes: the session then started over, decoding again from the slot's restart
        point. A connection that is gone is closed here and reopened by the next poll."""
        if self.repl is None or self.repl.closed:
            return
        if time.monotonic() - self._last_status < self.keepalive_every:
            return
        try:
            self._status(self.flushed)
        except psycopg.OperationalError as exc:
            log.info("replication stream lost while not read (reopened by the next poll): %s", exc)
            self.close()

    def _status(self, lsn: int) -> None:
        now = int((datetime.now(UTC) - _PG_EPOCH).total_seconds() * 1_000_000)
        pg = self._pgconn()
        pg.put_copy_data(b"r" + struct.pack("!QQQqB", lsn, lsn, lsn, now, 0))
        pg.flush()
        self._last_status = time.monotonic()

    def close(self) -> None:
        if self.repl is not None and not self.repl.closed:
            self.repl.close()
        self.repl = None


def _keepalive_every(pg: pq.abc.PGconn) -> float:
    """A quarter of the walsender's own ``wal_sender_timeout`` (it may be set per role or
    connection), at most ``KEEPALIVE_EVERY``. Asked with the simple protocol, the only one a
    replication connection speaks."""
    result = pg.exec_(b"SELECT setting::int FROM pg_settings WHERE name = 'wal_sender_timeout'")
    value = result.get_value(0, 0) if result.status == pq.ExecStatus.TUPLES_OK else None
    timeout_ms = int(value) if value else 0
    if timeout_ms <= 0:
        return KEEPALIVE_EVERY
    return min(KEEPALIVE_EVERY, timeout_ms / 4000)


def reader(settings: Settings) -> SlotSource:
    """The configured slot reader (``stitching.replication``)."""
    s = settings.stitching
    kind = PeekReader if s.replication == "peek" else StreamReader
    return kind(settings.dsn, settings.schemas, s.slot_name, s.publication)
