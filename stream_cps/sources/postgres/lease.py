"""At most one active replication consumer per slot: a session advisory lock."""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from stream_cps.db.connect import connect


class SlotLease:
    """At most one active consumer per slot: a session advisory lock on its own connection.

    A standby keeps trying; when the active process dies its session ends, the lock is freed
    and the standby takes over on its next try.
    """

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        digest = hashlib.blake2b(f"stream-cps:{slot}".encode(), digest_size=8)
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
