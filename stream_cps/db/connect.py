"""Connections: one place that sets the application name and session defaults."""

from __future__ import annotations

from typing import Any

import psycopg

APPLICATION_NAME = "stream-cps"


def connect(dsn: str, role: str = "main", **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection tagged ``stream-cps <role>`` in pg_stat_activity.

    The guide's runbooks find the service's sessions with ``application_name ILIKE '%cps%'``;
    the tag keeps that working.
    """
    return psycopg.connect(dsn, application_name=f"{APPLICATION_NAME} {role}", **kwargs)


def is_cockroach(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server is CockroachDB (it reports ``crdb_version``), for the few statements
    that differ (isolation, row addresses)."""
    return conn.info.parameter_status("crdb_version") is not None
