"""Connections: one place that sets the application name and session defaults."""

from __future__ import annotations

from typing import Any

import psycopg

from stream_cps.db import timestamps

APPLICATION_NAME = "stream-cps"


def connect(dsn: str, role: str = "main", **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection tagged ``stream-cps <role>`` in pg_stat_activity.

    The guide's runbooks find the service's sessions with ``application_name ILIKE '%cps%'``;
    the tag keeps that working.
    """
    conn = psycopg.connect(dsn, application_name=f"{APPLICATION_NAME} {role}", **kwargs)
    timestamps.register(conn)  # an event_time Python cannot hold must not stop the service
    return conn
