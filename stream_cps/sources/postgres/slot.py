"""The slot and publication on customer_events, and what a slot reader hands out.

The slot is a wake-up call with ids, not the source of truth: the stitcher re-reads each row and
skips rows whose ``stitched`` is already set, so replays after a crash double nothing, and its
own writes (``stitched`` set) are recognised here and ignored. Positions are LSNs as integers
from the wire to the acknowledgement; they are formatted only where SQL needs ``pg_lsn`` text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.errors import SchemaError, Transient
from stream_cps.sources.postgres.pgoutput import Decoder, RowChange

log = logging.getLogger(__name__)

# All the stitcher takes from a change: the row is re-read anyway (TOAST, replays).
PUBLISHED_COLUMNS = ("id", "stitched")
NEEDED_COLUMNS = frozenset(PUBLISHED_COLUMNS)
# What a reader of an invalidated slot is told (SQLSTATE 55000): PostgreSQL 16/17 "can no
# longer get changes from replication slot" ("This slot has been invalidated because ..."),
# 18 "can no longer access replication slot" ("... has been invalidated due to ...").
_INVALIDATED = (
    "can no longer get changes from replication slot",
    "can no longer access replication slot",
    "has been invalidated",
)


class SlotInvalidated(Transient):
    """The server invalidated the slot while it was read; the next session's ``ensure``
    recreates it."""


def invalidated(slot: str, message: str) -> SlotInvalidated | None:
    """The error to raise when ``message`` says the slot was invalidated, else None."""
    if not any(marker in message for marker in _INVALIDATED):
        return None
    first = message.strip().splitlines()[0] if message.strip() else message
    return SlotInvalidated(f"replication slot {slot} was invalidated: {first}")


@dataclass(frozen=True)
class SlotBatch:
    """Unstitched event ids carried by whole transactions, and the LSN to acknowledge after
    they are stitched (None: nothing new to acknowledge).

    ``backlog``: at least a batch's worth, or a transaction too big to list every id of (a
    backfill COPYing ten million events at once): the sweep takes it, finding the rows by
    ``stitched IS NULL``, so ``event_ids`` need not hold them all."""

    event_ids: list[str]
    ack_lsn: int | None
    messages: int
    backlog: bool = False


class SlotSource:
    """The slot and publication on customer_events; readers add ``poll`` and ``ack``."""

    def __init__(self, dsn: str, schemas: Schemas, slot: str, publication: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.table = (schemas.ce, "customer_events")
        self.decoder = Decoder(NEEDED_COLUMNS)

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        """Create the publication and the slot if missing, or the slot again if the server
        invalidated it (autocommit connection)."""
        level = conn.execute("SHOW wal_level").fetchone()
        if not level or level[0] != "logical":
            raise SchemaError(
                f"wal_level is {level[0] if level else '?'}; logical replication needs "
                "wal_level=logical (postgresql.conf, then restart PostgreSQL)"
            )
        self._ensure_publication(conn)
        # invalidation_reason exists from PostgreSQL 17 on; to_jsonb reads it where it does.
        slot = conn.execute(
            "SELECT plugin, database, current_database(), wal_status, "
            "to_jsonb(s) ->> 'invalidation_reason' FROM pg_replication_slots s "
            "WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if not slot:
            self._create(conn)
            return
        plugin, database, here, wal_status, reason = slot
        if database != here:
            # Slot names are per server; the lease is per database, so both would "hold" it.
            raise SchemaError(
                f"stitching.slot_name: slot {self.slot} belongs to database {database!r}; "
                f"give {here!r} a slot of its own (e.g. stream_cps_{here.lower()})"
            )
        if plugin != "pgoutput":
            raise SchemaError(f"slot {self.slot} uses plugin {plugin}, expected pgoutput")
        if wal_status == "lost":
            self._recreate(conn, reason)

    def _ensure_publication(self, conn: psycopg.Connection[Any]) -> None:
        """Inserts only, and only the columns the reader decodes (``NEEDED_COLUMNS``).

        Every stitched row is an UPDATE of customer_events, and streaming those back (full rows,
        payload included) only to ignore them put the service's own WAL in front of new events
        (docs/replication.md). Rows reset to stitched = NULL are found by the sweep, at once
        when a purge signal is pending (the guide's scripts send one). The column list
        (PostgreSQL 15 on) keeps the walsender from turning every payload into text for a
        reader that steps over it."""
        pub = sql.Identifier(self.publication)
        table = sql.Identifier(*self.table)
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in PUBLISHED_COLUMNS)
        with_list = conn.info.server_version >= 150000
        published = sql.SQL("{} ({})").format(table, columns) if with_list else table
        publication = conn.execute(
            "SELECT pubinsert, pubupdate OR pubdelete OR pubtruncate, puballtables "
            "FROM pg_publication WHERE pubname = %s",
            [self.publication],
        ).fetchone()
        if not publication:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                    pub, published
                )
            )
            log.info("created publication %s (inserts)", self.publication)
            return
        if tuple(publication[:2]) != (True, False):
            conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert')").format(pub))
            log.info("publication %s now carries inserts only", self.publication)
        if with_list and not publication[2]:  # FOR ALL TABLES takes no column list
            self._narrow(conn, pub, table, published)

    def _narrow(
        self,
        conn: psycopg.Connection[Any],
        pub: sql.Identifier,
        table: sql.Identifier,
        published: sql.Composable,
    ) -> None:
        """Make the publication carry ``PUBLISHED_COLUMNS`` of the table, where it can: not
        through a schema (``FOR TABLES IN SCHEMA`` takes no list), and only as its owner (a
        publication a DBA made stays as it is, with a warning). The reader steps over any other
        column, so either way the service runs."""
        row = conn.execute(
            "SELECT pt.attnames, EXISTS (SELECT 1 FROM pg_publication_rel pr "
            "JOIN pg_publication p ON p.oid = pr.prpubid "
            "WHERE p.pubname = pt.pubname AND pr.prrelid = to_regclass(%s)) "
            "FROM pg_publication_tables pt "
            "WHERE pt.pubname = %s AND pt.schemaname = %s AND pt.tablename = %s",
            [table.as_string(conn), self.publication, *self.table],
        ).fetchone()
        if row is not None and (sorted(row[0] or ()) == sorted(PUBLISHED_COLUMNS) or not row[1]):
            return
        columns = ", ".join(PUBLISHED_COLUMNS)
        try:
            with conn.transaction():
                if row is not None:
                    conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(pub, table))
                conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, published))
        except psycopg.errors.InsufficientPrivilege:
            log.warning(
                "publication %s should carry only %s of %s.%s (faster streaming), and only its "
                "owner can change it: ALTER PUBLICATION %s SET TABLE %s.%s (%s)",
                self.publication,
                columns,
                *self.table,
                self.publication,
                *self.table,
                columns,
            )
            return
        log.info(
            "publication %s now carries only %s of %s.%s", self.publication, columns, *self.table
        )

    def _recreate(self, conn: psycopg.Connection[Any], reason: str | None) -> None:
        """Replace a slot the server invalidated: it can never stream again. Nothing is lost,
        because the slot only announces rows; the ones it missed are still ``stitched IS NULL``
        and the sweep stitches them. Only our own slot gets here (database, plugin checked)."""
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [self.slot])
        except psycopg.errors.ObjectInUse as exc:  # a walsender not yet gone: try again soon
            raise Transient(f"invalidated replication slot {self.slot} still in use") from exc
        self._create(conn)
        log.warning(
            "replication slot %s was invalidated by the server (%s; e.g. more WAL than "
            "max_slot_wal_keep_size behind while the service was away or slow): dropped and "
            "recreated it; the sweep stitches the events inserted meanwhile (stitched IS NULL)",
            self.slot,
            reason or "wal_status lost",
        )

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [self.slot])
        except psycopg.errors.ConfigurationLimitExceeded as exc:
            # 53400 passes as a resource shortage elsewhere, but no slot frees itself here:
            # retrying would wait for ever for an operator who is never told.
            limit = conn.execute("SHOW max_replication_slots").fetchone()
            raise SchemaError(
                f"cannot create replication slot {self.slot}: all replication slots are in use "
                f"(max_replication_slots = {limit[0] if limit else '?'}); drop one nobody reads "
                "(SELECT pg_drop_replication_slot('<name>')) or raise max_replication_slots "
                "(postgresql.conf, then restart PostgreSQL)"
            ) from exc
        log.info("created logical replication slot %s (pgoutput)", self.slot)

    @contextmanager
    def recognise_invalidation(self) -> Iterator[None]:
        """Turn the SQL functions' "slot invalidated" error into ``SlotInvalidated``."""
        try:
            yield
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            lost = invalidated(self.slot, str(exc))
            if lost is None:
                raise
            raise lost from exc

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

    def ack(self, conn: psycopg.Connection[Any], lsn: int) -> None:
        """Report ``lsn`` as done; only ever called after the work up to it committed."""
        raise NotImplementedError

    def keepalive(self) -> None:
        """Tell the server the reader is alive while the stitcher is busy elsewhere (a long
        sweep, waiting for rows a script holds); readers without a stream have nothing to do."""

    def close(self) -> None:
        """Release what the reader holds open."""
