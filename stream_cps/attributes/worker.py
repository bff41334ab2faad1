"""The calculation loop that ``stream-cps run`` starts in a thread.

A pass: reload definitions if they changed, refresh due context values, calculate up to
``max_batches`` batches of due entities (then of entities calculated before the last definition
change), then one large entity, refresh the UI caches if due. Each batch is its own
transaction, so stitching waits at most for one batch's row updates, never for a whole
recalculation.

Large entities (more than ``attributes.large_entity_identifiers`` identifiers: a hub that glued
thousands of logins) have a lane of their own, one per pass after the ordinary batches, so a
50,000-identifier entity cannot hold a batch of ordinary ones behind it. Every statement of the
worker's session is under ``attributes.worker_timeout_ms``; a large entity that cannot be
loaded within it is recorded in ``attribute_errors`` (attribute ``*``) and left with its old
attributes until it changes again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import psycopg
from opentelemetry import trace
from psycopg import sql

from stream_cps import retry, telemetry
from stream_cps.attributes import context
from stream_cps.attributes.cache import CacheRefresher
from stream_cps.attributes.calculate import BatchCalculator
from stream_cps.attributes.plan import Plan, PlanLoader
from stream_cps.config import Settings
from stream_cps.db.connect import connect
from stream_cps.errors import Stopped

log = logging.getLogger(__name__)


class Deferral(Protocol):
    """Stitching's "working through a backlog" signal (``service.backlog.Backlog``)."""

    def wait_until_clear(self, stop: threading.Event, longest: float) -> None: ...


class CalculationWorker:
    """Calculates attributes of due entities; safe to call ``run_pass`` from tests."""

    def __init__(
        self, settings: Settings, max_batches: int = 20, backlog: Deferral | None = None
    ) -> None:
        self._settings = settings
        self._backlog = backlog
        self._schemas = settings.schemas
        self._batch_size = settings.attributes.batch_size
        self._timeout_ms = settings.attributes.statement_timeout_ms
        self._max_batches = max_batches
        self._large = settings.attributes.large_entity_identifiers
        # walk over entities calculated before the last definition change: (changed, last id)
        self._stale_walk: tuple[datetime | None, str | None] = (None, "")
        # large entities the stale walk met, for the large lane
        self._stale_large: list[tuple[str, datetime]] = []
        self._conn: psycopg.Connection[Any] | None = None
        self._plans = PlanLoader(self._schemas, self._timeout_ms)
        self._calculator = BatchCalculator(
            self._schemas,
            self._timeout_ms,
            settings.attributes.max_value_bytes,
            settings.opensearch.writes_outbox,
        )
        self._caches = CacheRefresher(self._schemas, settings.attributes.cache_interval)
        counter = telemetry.counter
        self._calculated = counter(telemetry.METRIC_ENTITIES_CALCULATED)
        self._errors = counter(telemetry.METRIC_ATTRIBUTE_ERRORS)
        self._latency = telemetry.histogram(telemetry.METRIC_CALCULATION_LATENCY)

    def run_pass(self, conn: psycopg.Connection[Any]) -> int:
        """One pass over the work that is due now; returns the number of entities stored."""
        plan = self._plans.load(conn)
        context.refresh_due(
            conn,
            self._schemas,
            self._settings.attributes.context_max_age_hours,
            self._timeout_ms,
        )
        total = 0
        for _ in range(self._max_batches):
            picked, stored = self._one_batch(conn, plan)
            total += stored
            if picked < self._batch_size:
                break
        total += self._one_large(conn, plan)
        self._caches.refresh_if_due(conn)
        return total

    def cancel(self) -> None:
        """Cancel the statement in flight (on stop): no backend keeps running our query."""
        self._calculator.stopping = True
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.cancel_safe(timeout=2.0)

    def run_forever(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set; reconnects with backoff (``retry.DATABASE``)
        when the database goes away."""
        try:
            while not stop.is_set():
                retry.DATABASE.call(lambda: self._session(stop), stop=stop)
        except Stopped:
            return

    def _session(self, stop: threading.Event) -> None:
        with connect(self._settings.dsn, role="attributes", autocommit=True) as conn:
            # A query whose client went away (kill -9) is ended by the server within 2 s.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false), "
                "set_config('client_connection_check_interval', '2000', false)",
                [str(self._settings.attributes.worker_timeout_ms)],
            )
            self._conn = conn
            try:
                self._serve(conn, stop)
            finally:
                self._conn = None

    def _serve(self, conn: psycopg.Connection[Any], stop: threading.Event) -> None:
        poll = self._settings.attributes.poll_interval
        max_defer = self._settings.attributes.max_defer
        while not stop.is_set():
            if self._backlog is not None:
                self._backlog.wait_until_clear(stop, max_defer)
            started = time.monotonic()
            try:
                done = self.run_pass(conn)
            except psycopg.Error as exc:  # e.g. a context or cache refresh cancelled
                _settle(conn)
                if stop.is_set():
                    return  # cancelled on stop
                if not _retry_later(conn, exc):
                    raise
                log.warning("attribute pass interrupted (%s); will retry", exc)
                done = 0
            if done:
                elapsed = time.monotonic() - started
                log.info(
                    "calculated %d entities in %.2f s (%.0f/s)",
                    done,
                    elapsed,
                    done / elapsed if elapsed else 0.0,
                )
            else:
                stop.wait(poll)

    # -- batches -------------------------------------------------------------------------------

    def _one_batch(self, conn: psycopg.Connection[Any], plan: Plan) -> tuple[int, int]:
        """(entities picked, entities stored); a conflict with the stitcher retries later."""
        return self._calculate(conn, plan, lambda: self._pick(conn, plan), large=False)

    def _one_large(self, conn: psycopg.Connection[Any], plan: Plan) -> int:
        """The large lane: one large entity per pass; one that times out is recorded."""
        picked: list[tuple[str, datetime]] = []

        def pick() -> list[tuple[str, datetime]]:
            picked[:] = self._pick_large(conn)
            return picked

        try:
            return self._calculate(conn, plan, pick, large=True)[1]
        except psycopg.errors.QueryCanceled as exc:
            if conn.broken or conn.closed or not picked:
                raise
            if self._calculator.stopping:  # our own cancel on stop, not the entity's size
                raise Stopped() from exc
            self._give_up(conn, picked[0], exc)
            return 0

    def _calculate(
        self,
        conn: psycopg.Connection[Any],
        plan: Plan,
        pick: Callable[[], list[tuple[str, datetime]]],
        large: bool,
    ) -> tuple[int, int]:
        # The span starts once entities were picked (an idle pass traces nothing), backdated
        # to the pass's start, and ends after the commit.
        started = telemetry.now()
        span: trace.Span | None = None
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('TimeZone', 'UTC', true), "
                    "set_config('DateStyle', 'ISO, YMD', true), "
                    "set_config('statement_timeout', %s, true)",
                    [str(self._settings.attributes.worker_timeout_ms)],
                )
                entities = pick()
                if not entities:
                    return 0, 0
                span = telemetry.start_root(
                    telemetry.SPAN_ATTR_BATCH,
                    started,
                    attributes={"entities.picked": len(entities)},
                )
                with trace.use_span(span):
                    outcome = self._calculator.run(conn, plan, entities, large=large)
        except psycopg.Error as exc:
            _settle(conn)
            if self._calculator.stopping:
                raise Stopped() from exc
            if large and isinstance(exc, psycopg.errors.QueryCanceled):
                raise
            if not _retry_later(conn, exc):
                raise
            log.warning("attribute batch interrupted (%s); will retry", exc)
            return 0, 0
        finally:
            if span is not None:
                span.end()
        self._calculated.add(outcome.stored)
        if outcome.stored:  # the oldest entity's wait, from its stitching change to stored
            oldest = min(modified for _, modified in entities)
            self._latency.record(max(time.time() - oldest.timestamp(), 0.0))
        if outcome.failures:
            self._errors.add(len(outcome.failures))
        return outcome.picked, outcome.stored

    def _give_up(
        self, conn: psycopg.Connection[Any], entity: tuple[str, datetime], exc: psycopg.Error
    ) -> None:
        """A large entity that cannot be calculated within the timeout: recorded, its old
        attributes kept, and not tried again until it changes (or is recalculated)."""
        entity_id, modified = entity
        message = (
            f"entity too large to calculate within attributes.worker_timeout_ms "
            f"({self._settings.attributes.worker_timeout_ms} ms): {exc.diag.message_primary}; "
            "previous attributes kept"
        )
        log.error("entity %s: %s", entity_id, message)
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET calculated = greatest(now(), modified) "
                    "WHERE customer_entity_id = %s AND modified = %s"
                ).format(sql.Identifier(self._schemas.cdp, "customer_attributes")),
                [entity_id, modified],
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (attribute_id, customer_entity_id, message) "
                    "VALUES ('*', %s, %s)"
                ).format(sql.Identifier(self._schemas.attr, "attribute_errors")),
                [entity_id, message],
            )
        self._errors.add(1)

    def _pick_large(self, conn: psycopg.Connection[Any]) -> list[tuple[str, datetime]]:
        """The oldest due large entity, else one the stale walk set aside."""
        row = conn.execute(
            sql.SQL(
                "SELECT customer_entity_id, modified FROM {} WHERE modified IS NOT NULL "
                "AND (calculated IS NULL OR calculated < modified) "
                "AND cardinality(identifiers) > %s ORDER BY modified LIMIT 1"
            ).format(sql.Identifier(self._schemas.cdp, "customer_attributes")),
            [self._large],
        ).fetchone()
        if row:
            return [(str(row[0]), row[1])]
        return [self._stale_large.pop()] if self._stale_large else []

    def _pick(self, conn: psycopg.Connection[Any], plan: Plan) -> list[tuple[str, datetime]]:
        """Due entities first (oldest change first), then those older than the definitions;
        large entities go to their own lane."""
        ca = sql.Identifier(self._schemas.cdp, "customer_attributes")
        rows = conn.execute(
            sql.SQL(
                "SELECT customer_entity_id, modified FROM {} WHERE modified IS NOT NULL "
                "AND (calculated IS NULL OR calculated < modified) "
                "AND cardinality(identifiers) <= %s ORDER BY modified LIMIT %s"
            ).format(ca),
            [self._large, self._batch_size],
        ).fetchall()
        if rows or plan.changed is None:
            return [(str(r[0]), r[1]) for r in rows]
        changed, after = self._stale_walk
        if changed != plan.changed:
            changed, after = plan.changed, ""
        if after is None:  # this walk is complete
            return []
        rows = conn.execute(
            sql.SQL(
                "SELECT customer_entity_id, modified, cardinality(identifiers) > %s FROM {} "
                "WHERE customer_entity_id > %s AND modified IS NOT NULL AND calculated < %s "
                "ORDER BY customer_entity_id LIMIT %s"
            ).format(ca),
            [self._large, after, changed, self._batch_size],
        ).fetchall()
        self._stale_walk = (changed, str(rows[-1][0]) if rows else None)
        self._stale_large += [(str(r[0]), r[1]) for r in rows if r[2]]
        return [(str(r[0]), r[1]) for r in rows if not r[2]]


def _settle(conn: psycopg.Connection[Any]) -> None:
    """Roll back what a cancelled or failed statement left open: a cancel can arrive while the
    COMMIT itself runs, and the next batch's BEGIN would then fail ("current transaction is
    aborted") instead of the batch being tried again."""
    if not (conn.broken or conn.closed) and (
        conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    ):
        conn.rollback()


def _retry_later(conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """A transient failure on a connection that is still up (a conflict with the stitcher,
    a cancelled statement): the batch or pass is tried again by the next pass. A lost
    connection is left to the reconnecting policy of ``run_forever``."""
    return retry.is_transient(exc) and not (conn.broken or conn.closed)
