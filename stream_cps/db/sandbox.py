"""Running admin-written SQL: one statement, extended protocol, read-only, timed out, as a role
that can read only what the fragment needs (``db/roles.py``).

Everything happens in a savepoint that is always rolled back, inside the caller's transaction:

- ``transaction_read_only`` on (PostgreSQL refuses to switch a subtransaction back to
  read-write), ``statement_timeout`` and ``lock_timeout``;
- ``role`` set to the sandbox role of the kind of SQL (attributes, context queries, stitching
  rules): no other customer's events, no catalogs with secrets, no files, no sequences;
- the statement always goes by the extended protocol (binary results make psycopg use it even
  without parameters), so a fragment that slipped a ``;`` past ``sqllex`` still cannot run a
  second statement;
- the rollback undoes every setting the SQL could change.
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
LOCK_TIMEOUT_MS = 2000


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
def read_only(conn: psycopg.Connection[Any], timeout_ms: int, role: str) -> Iterator[None]:
    """A savepoint that is read-only, time-limited, runs as ``role``, and is always rolled
    back at the end."""
    with conn.transaction(force_rollback=True):
        conn.execute(
            "SELECT set_config('transaction_read_only', 'on', true), "
            "set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true), "
            "set_config('role', %s, true)",
            [str(int(timeout_ms)), str(min(LOCK_TIMEOUT_MS, int(timeout_ms))), role],
        )
        yield


def fetch(
    conn: psycopg.Connection[Any], query: Any, params: dict[str, Any]
) -> list[tuple[Any, ...]] | SqlFailure:
    """Rows of ``query`` in its own savepoint, or the failure; a lost connection is raised.

    psycopg sends a text-result statement without placeholders by the simple protocol, which
    runs every statement in the text; binary results always take the extended one."""
    try:
        with conn.transaction(force_rollback=True):
            return conn.execute(query, params, binary=True).fetchall()
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
