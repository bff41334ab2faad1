"""Context values: queries over the whole customer base, stored for custom queries to read.

A context row is refreshed before a calculation pass when its ``modified`` is NULL (the guide's
``UPDATE cdp_attr.context SET modified = NULL``) or older than ``context_max_age_hours``. The
query runs read-only with the statement timeout, like any admin-written SQL; a failing one keeps
its old value, is reported as attribute ``context:<key>``, and is retried when it is due again.
``modified`` is a timestamp without time zone; the worker writes it in UTC.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from stream_cps import telemetry
from stream_cps.attributes.compiler import frag
from stream_cps.config import Schemas
from stream_cps.db import roles, sandbox, sqllex

log = logging.getLogger(__name__)


def refresh_due(
    conn: psycopg.Connection[Any], schemas: Schemas, max_age_hours: float, timeout_ms: int
) -> list[str]:
    """Refresh every due context value; returns the keys refreshed (including failed ones)."""
    table = sql.Identifier(schemas.cdp, "context")
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        due = conn.execute(
            sql.SQL(
                "SELECT key, query FROM {} WHERE query IS NOT NULL AND btrim(query) <> '' "
                "AND (modified IS NULL OR modified < localtimestamp - make_interval(secs => %s)) "
                "ORDER BY key"
            ).format(table),
            [max_age_hours * 3600.0],
        ).fetchall()
    if not due:
        return []
    with telemetry.tracer().start_as_current_span(telemetry.SPAN_ATTR_CONTEXT):
        for key, query in due:
            _refresh_one(conn, schemas, key, query, timeout_ms)
    return [key for key, _ in due]


def _refresh_one(
    conn: psycopg.Connection[Any], schemas: Schemas, key: str, query: str, timeout_ms: int
) -> None:
    text = query.strip().rstrip(";").strip()
    outcome: list[tuple[Any, ...]] | sandbox.SqlFailure
    problem = sqllex.problem(text)
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        if problem:
            outcome = sandbox.SqlFailure("42601", problem)
        else:
            with sandbox.read_only(conn, timeout_ms, roles.CONTEXT):
                outcome = sandbox.fetch(
                    conn,
                    sql.SQL("SELECT (q.value)::text FROM {} AS q LIMIT %(rows)s").format(
                        frag(text)
                    ),
                    {"rows": 2},
                )
        if not isinstance(outcome, sandbox.SqlFailure) and len(outcome) > 1:
            outcome = sandbox.SqlFailure("21000", "context query returned more than one row")
        table = sql.Identifier(schemas.cdp, "context")
        if isinstance(outcome, sandbox.SqlFailure):
            log.error("context %s: query failed: %s", key, outcome.message)
            conn.execute(
                sql.SQL("UPDATE {} SET modified = localtimestamp WHERE key = %s").format(table),
                [key],
            )
            conn.execute(
                sql.SQL("INSERT INTO {} (attribute_id, message) VALUES (%s, %s)").format(
                    sql.Identifier(schemas.attr, "attribute_errors")
                ),
                [f"context:{key}", outcome.message],
            )
            return
        value = outcome[0][0] if outcome else None
        conn.execute(
            sql.SQL("UPDATE {} SET value = %s, modified = localtimestamp WHERE key = %s").format(
                table
            ),
            [value, key],
        )
        log.info("context %s refreshed", key)
