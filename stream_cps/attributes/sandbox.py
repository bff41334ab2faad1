"""Running admin-written SQL safely inside the worker's read-write transaction.

A savepoint made read-only with a statement timeout: the definition cannot write (PostgreSQL
refuses to switch a subtransaction back to read-write) and cannot run forever. Rolling the
savepoint back afterwards also undoes any setting the admin SQL changed with ``set_config``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

# SQLSTATE classes that mean "the SQL itself is wrong", whatever the data: syntax or access
# rule (42), read-only violation (25), feature not supported (0A).
DEFINITION_LEVEL = ("42", "25", "0A")
TIMEOUT = "57014"


@dataclass(frozen=True)
class SqlFailure:
    """Why a statement failed, as the database said it."""

    sqlstate: str
    message: str

    @property
    def definition_level(self) -> bool:
        return self.sqlstate[:2] in DEFINITION_LEVEL

    @property
    def timeout(self) -> bool:
        return self.sqlstate == TIMEOUT


@contextmanager
def read_only(conn: psycopg.Connection[Any], timeout_ms: int) -> Iterator[None]:
    """A savepoint that is read-only, time-limited, and always rolled back at the end."""
    with conn.transaction(force_rollback=True):
        conn.execute(
            "SELECT set_config('transaction_read_only', 'on', true), "
            "set_config('statement_timeout', %s, true)",
            [str(int(timeout_ms))],
        )
        yield


def fetch(
    conn: psycopg.Connection[Any], query: Any, params: Any = None
) -> list[tuple[Any, ...]] | SqlFailure:
    """Rows of ``query`` in its own savepoint, or the failure; a lost connection is raised."""
    try:
        with conn.transaction(force_rollback=True):
            return conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        if conn.broken or conn.closed or exc.sqlstate is None:
            raise
        return failure(exc)


def failure(exc: psycopg.Error) -> SqlFailure:
    diag = exc.diag
    message = diag.message_primary or str(exc)
    if diag.message_detail:
        message += f" ({diag.message_detail})"
    return SqlFailure(exc.sqlstate or "", message)
