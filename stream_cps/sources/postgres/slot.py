"""The slot and publication on customer_events, and what a slot reader hands out.

The slot is a wake-up call with ids, not the source of truth: the stitcher re-reads each row and
skips rows whose ``stitched`` is already set, so replays after a crash double nothing, and its
own writes (``stitched`` set) are recognised here and ignored. Positions are LSNs as integers
from the wire to the acknowledgement; they are formatted only where SQL needs ``pg_lsn`` text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.errors import SchemaError
from stream_cps.sources.postgres.pgoutput import Decoder, RowChange

log = logging.getLogger(__name__)

# All the stitcher takes from a change: the row is re-read anyway (TOAST, replays).
NEEDED_COLUMNS = frozenset({"id", "stitched"})


@dataclass(frozen=True)
class SlotBatch:
    """Unstitched event ids carried by whole transactions, and the LSN to acknowledge after
    they are stitched (None: nothing new to acknowledge)."""

    event_ids: list[str]
    ack_lsn: int | None
    messages: int


class SlotSource:
    """The slot and publication on customer_events; readers add ``poll`` and ``ack``."""

    def __init__(self, dsn: str, schemas: Schemas, slot: str, publication: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.table = (schemas.ce, "customer_events")
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
            "SELECT plugin, database, current_database() FROM pg_replication_slots "
            "WHERE slot_name = %s",
            [self.slot],
        ).fetchone()
        if not slot:
            self._create(conn)
            return
        plugin, database, here = slot
        if database != here:
            # Slot names are per server; the lease is per database, so both would "hold" it.
            raise SchemaError(
                f"stitching.slot_name: slot {self.slot} belongs to database {database!r}; "
                f"give {here!r} a slot of its own (e.g. stream_cps_{here.lower()})"
            )
        if plugin != "pgoutput":
            raise SchemaError(f"slot {self.slot} uses plugin {plugin}, expected pgoutput")

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

    def close(self) -> None:
        """Release what the reader holds open."""
