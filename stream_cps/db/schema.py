"""Versioned, idempotent schema migrations.

Migrations are numbered SQL files in ``migrations/``; ``{ps}.stream_cps_schema`` records which
ran. ``migrate`` applies the missing ones and the compatibility views in one transaction, so a
failed upgrade leaves the old schema untouched; ``check`` lets the service refuse to run against a
schema it does not understand.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db import roles
from stream_cps.db.connect import connect
from stream_cps.errors import SchemaError

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_KEY = 0x5C75C7  # serialises concurrent `init` runs


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL template) of every migration shipped, in order."""
    found = []
    for entry in resources.files("stream_cps.db.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def render(template: str, schemas: Schemas) -> sql.Composed:
    """Fill the schema placeholders of a SQL template with quoted identifiers."""
    return sql.SQL(template).format(
        cdp=sql.Identifier(schemas.cdp),
        ce=sql.Identifier(schemas.ce),
        ps=sql.Identifier(schemas.ps),
        attr=sql.Identifier(schemas.attr),
    )


def current_version(conn: psycopg.Connection[Any], schemas: Schemas) -> int | None:
    """The applied schema version, or None when stream-cps never ran ``init`` here."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        [sql.Identifier(schemas.ps, "stream_cps_schema").as_string(conn)],
    ).fetchone()
    if not row or not row[0]:
        return None
    found = conn.execute(
        sql.SQL("SELECT max(version) FROM {}").format(
            sql.Identifier(schemas.ps, "stream_cps_schema")
        )
    ).fetchone()
    return int(found[0]) if found and found[0] is not None else None


def migrate(conn: psycopg.Connection[Any], schemas: Schemas) -> list[int]:
    """Create or upgrade every table and view; returns the versions applied now."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        version_table = sql.Identifier(schemas.ps, "stream_cps_schema")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schemas.ps)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, "
                "name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())"
            ).format(version_table)
        )
        current = current_version(conn, schemas) or 0
        if current > latest_version():
            raise SchemaError(
                f"schema version {current} in {schemas.ps!r} is newer than this stream-cps "
                f"understands ({latest_version()}); upgrade stream-cps instead"
            )
        for version, name, template in migrations():
            if version <= current:
                continue
            log.info("applying migration %s", name)
            conn.execute(render(template, schemas))
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(version_table),
                [version, name],
            )
            applied.append(version)
        _create_aliases(conn, schemas)
        roles.ensure(conn, schemas)
    return applied


@contextmanager
def checked(
    dsn: str, schemas: Schemas, role: str, **kwargs: Any
) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to a database whose schema this build understands (the
    sandbox roles included): every command but ``init`` starts here, so each refuses alike."""
    with connect(dsn, role=role, autocommit=True, **kwargs) as conn:
        check(conn, schemas)
        yield conn


def check_database(dsn: str, schemas: Schemas) -> None:
    """``check`` on a connection of its own (a loop's start, the webhook's)."""
    with checked(dsn, schemas, "check"):
        pass


def check(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    """Refuse to run unless the schema is exactly the version this build writes, and the
    role may use it and the sandbox roles."""
    try:
        _check(conn, schemas)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SchemaError(
            f"{exc.diag.message_primary}: run `stream-cps init --service-role "
            f"<this role>` as the schema owner (docs/security.md)"
        ) from exc


def _check(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    schema_row = conn.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = ANY(%s)",
        [[schemas.cdp, schemas.ce, schemas.ps, schemas.attr]],
    ).fetchone()
    version = current_version(conn, schemas)
    if version is None:
        missing = "" if schema_row and schema_row[0] == 4 else " (schemas missing)"
        raise SchemaError(
            f"no stream-cps schema in {schemas.ps!r}{missing}: run `stream-cps init` first"
        )
    if version < latest_version():
        raise SchemaError(
            f"schema version {version} is older than {latest_version()}: run `stream-cps init`"
        )
    if version > latest_version():
        raise SchemaError(
            f"schema version {version} is newer than this stream-cps understands "
            f"({latest_version()}); upgrade stream-cps"
        )
    roles.check(conn)


def _create_aliases(conn: psycopg.Connection[Any], schemas: Schemas) -> None:
    """Views that let the guide's scripts use unqualified and legacy names.

    A plain psql session resolves unqualified names in ``public``; the guide also addresses
    ``context`` as ``cdp_attr.context``. Simple one-table views are updatable, so the scripts'
    UPDATEs go straight through to the tables.
    """
    views = []
    if schemas.ce != "public":
        views.append(("public", "customer_events", schemas.ce))
    if schemas.cdp != "public":
        views.append(("public", "customer_attributes", schemas.cdp))
    if schemas.attr != schemas.cdp:
        views.append((schemas.attr, "context", schemas.cdp))
    for view_schema, name, table_schema in views:
        kind = conn.execute(
            "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            [view_schema, name],
        ).fetchone()
        if kind and kind[0] != "v":
            log.warning("%s.%s exists and is not a view; leaving it alone", view_schema, name)
            continue
        conn.execute(
            sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(view_schema, name), sql.Identifier(table_schema, name)
            )
        )
