"""The UI caches: customers per attribute, and the value distribution of each attribute.

Refreshed every ``cache_interval`` seconds, and at once when a row's ``modified`` is NULL (the
guide's "force cache update") or the caches are empty while entities exist. Each table is
rebuilt in one transaction, so the UI never sees it half-filled. Progress is logged with lines
that start with ``CACHE:``, as the guide tells users to watch for.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import sql

from stream_cps import telemetry
from stream_cps.config import Schemas

log = logging.getLogger(__name__)

# Most frequent values kept per attribute: a distribution of unique ids (one value per
# customer) is useless in the UI and would copy the whole table.
MAX_VALUES_PER_ATTRIBUTE = 1000

_PER_ATTRIBUTE = "cached_attributes_counts_customers_per_attribute"
_VALUES = "cached_attribute_values_counts"


class CacheRefresher:
    """Decides when the caches are due and rebuilds them."""

    def __init__(self, schemas: Schemas, interval: float) -> None:
        self._schemas = schemas
        self._interval = interval
        self._last_refresh: float | None = None  # monotonic, this process

    def due(self, conn: psycopg.Connection[Any]) -> str | None:
        """Why the caches must be refreshed now, or None."""
        with conn.transaction():
            row = self._state(conn)
        assert row is not None
        nulls, empty, age = row
        if nulls:
            return "modified set to NULL"
        if self._last_refresh is None:
            if empty:
                return "caches are empty"
            if age is None or float(age) >= self._interval:
                return "caches are old"
            return None
        if time.monotonic() - self._last_refresh >= self._interval:
            return "scheduled"
        return None

    def _state(self, conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
        attr = self._schemas.attr
        return conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT FROM {a} WHERE modified IS NULL) "
                "OR EXISTS (SELECT FROM {v} WHERE modified IS NULL), "
                "(SELECT NOT EXISTS (SELECT FROM {a}) AND EXISTS (SELECT FROM {ca})), "
                "extract(epoch FROM now() - (SELECT min(modified) FROM {a}))"
            ).format(
                a=sql.Identifier(attr, _PER_ATTRIBUTE),
                v=sql.Identifier(attr, _VALUES),
                ca=sql.Identifier(self._schemas.cdp, "customer_attributes"),
            )
        ).fetchone()

    def refresh_if_due(self, conn: psycopg.Connection[Any]) -> bool:
        reason = self.due(conn)
        if reason is None:
            return False
        self.refresh(conn, reason)
        return True

    def refresh(self, conn: psycopg.Connection[Any], reason: str = "requested") -> None:
        attr = self._schemas.attr
        ca = sql.Identifier(self._schemas.cdp, "customer_attributes")
        attributes = sql.Identifier(self._schemas.cdp, "attributes")
        started = time.monotonic()
        log.info("CACHE: refreshing UI caches (%s)", reason)
        with telemetry.tracer().start_as_current_span(telemetry.SPAN_ATTR_CACHE):
            with conn.transaction():
                table = sql.Identifier(attr, _PER_ATTRIBUTE)
                conn.execute(sql.SQL("DELETE FROM {}").format(table))
                cur = conn.execute(
                    sql.SQL(
                        "INSERT INTO {table} (attribute_id, count, modified) "
                        "SELECT a.id, coalesce(c.n, 0), now() FROM {attributes} AS a "
                        "LEFT JOIN (SELECT kv.key, count(*) AS n FROM {ca} AS ca, "
                        "jsonb_each(ca.attributes) AS kv WHERE ca.modified IS NOT NULL "
                        "GROUP BY kv.key) AS c ON c.key = a.id "
                        "WHERE a.definition IS NOT NULL"
                    ).format(table=table, attributes=attributes, ca=ca)
                )
                log.info(
                    "CACHE: customers per attribute: %d attributes in %.2f s",
                    cur.rowcount,
                    time.monotonic() - started,
                )
            values_started = time.monotonic()
            with conn.transaction():
                table = sql.Identifier(attr, _VALUES)
                conn.execute(sql.SQL("DELETE FROM {}").format(table))
                cur = conn.execute(
                    sql.SQL(
                        "INSERT INTO {table} (attribute_id, value, count, modified) "
                        "SELECT key, value, n, now() FROM ("
                        " SELECT key, value, n, row_number() OVER "
                        "  (PARTITION BY key ORDER BY n DESC, value) AS rank FROM ("
                        "  SELECT kv.key, item #>> '{{}}' AS value, count(DISTINCT "
                        "   ca.customer_entity_id) AS n FROM {ca} AS ca "
                        "  CROSS JOIN LATERAL jsonb_each(ca.attributes) AS kv "
                        "  CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN "
                        "   jsonb_typeof(kv.value) = 'array' THEN kv.value "
                        "   ELSE jsonb_build_array(kv.value) END) AS item "
                        "  JOIN {attributes} AS a ON a.id = kv.key AND a.definition IS NOT NULL "
                        "  WHERE ca.modified IS NOT NULL AND item <> 'null'::jsonb "
                        "  GROUP BY 1, 2) AS counted) AS ranked "
                        "WHERE rank <= %s"
                    ).format(table=table, attributes=attributes, ca=ca),
                    [MAX_VALUES_PER_ATTRIBUTE],
                )
                log.info(
                    "CACHE: attribute value counts: %d values in %.2f s",
                    cur.rowcount,
                    time.monotonic() - values_started,
                )
        self._last_refresh = time.monotonic()
        log.info("CACHE: done in %.2f s", time.monotonic() - started)
