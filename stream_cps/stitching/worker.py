"""One stitching batch: read (extract, normalise), then one transaction: lock, purge, group, write.

The order is what makes the guide's restitch scripts (``modified = NULL`` first, then
``stitched = NULL``) right with no wait between them: the events are read first, then the
entities they touch are locked (``FOR UPDATE``), then purge signals are applied. Any purge signal
committed before the events were reset is therefore seen by the purge, and one committed later
waits for the batch's commit and is applied by the next batch. The read happens inside the
transaction (``stitch``, the Kafka path) or earlier on another connection (the sweep reads its
next batch ahead); either way it precedes the lock.

The replication service is the only stitcher of its database (the lease), so it runs at READ
COMMITTED: concurrent attribute calculation then makes it wait on a row lock, never fail.
Sources with several concurrent stitchers (Kafka members) run the same batch at REPEATABLE READ
or SERIALIZABLE and retry serialization failures (``RETRYABLE``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from opentelemetry import metrics, trace
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from stream_cps import telemetry
from stream_cps.config import Settings
from stream_cps.stitching import grouping, rules
from stream_cps.stitching.normalize import identifiers_of
from stream_cps.stitching.store import EventMarks, StitchStore

log = logging.getLogger(__name__)

RETRYABLE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


def conflict_retrying(attempts: int = 10) -> Retrying:
    """The one retry policy for transactions that lost a conflict (40001, 40P01): short,
    jittered, growing waits, then the error surfaces."""
    return Retrying(
        retry=retry_if_exception_type(RETRYABLE),
        wait=wait_exponential_jitter(multiplier=0.02, max=2.0, jitter=0.05),
        stop=stop_after_attempt(attempts),
        reraise=True,
    )


@dataclass(frozen=True)
class Prepared:
    """A batch read and normalised, ready to be grouped against the state (``apply``)."""

    event_ids: list[str]
    events: list[grouping.StitchEvent]
    failures: list[rules.RuleFailure]
    marks: EventMarks


@dataclass
class BatchResult:
    events: int = 0
    created: int = 0
    merges: int = 0
    absorbed: int = 0
    purged: list[str] = field(default_factory=list)
    rule_failures: int = 0


class Stitcher:
    """Stitches batches of event ids against the database state.

    Takes autocommit connections: each batch opens its own READ COMMITTED transaction.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.schemas = settings.schemas
        self.store = StitchStore(self.schemas)
        self.rulebook = rules.RuleBook(self.schemas)
        self._sweep_after: grouping.EventKey | None = None
        meter = telemetry.meter()
        self._stitched = meter.create_counter(telemetry.METRIC_EVENTS_STITCHED)
        self._merged = meter.create_counter(telemetry.METRIC_ENTITIES_MERGED)
        self._created = meter.create_counter(telemetry.METRIC_ENTITIES_CREATED)
        self._purged = meter.create_counter(telemetry.METRIC_ENTITIES_PURGED)
        self._rule_errors = meter.create_counter(telemetry.METRIC_RULE_ERRORS)
        self._duration: metrics.Histogram = meter.create_histogram(
            telemetry.METRIC_BATCH_DURATION, unit="s"
        )

    def stitch(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> BatchResult:
        """Stitch those of ``event_ids`` that are still unstitched; retried on conflicts."""
        for attempt in conflict_retrying():
            with attempt:
                conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
                with conn.transaction():
                    result = self.stitch_in_transaction(conn, event_ids)
        self.count_metrics(result)
        return result

    def sweep(self, conn: psycopg.Connection[Any]) -> BatchResult:
        """Stitch the next batch of rows with ``stitched IS NULL``, whatever carried them.

        A pass walks the backlog in (event_time, id) order with a cursor, so rows already
        passed are not scanned again; a short batch ends the pass and the next call starts
        over (rows that arrived behind the cursor are found then). Returns 0 events once a
        fresh pass finds nothing.
        """
        prepared, self._sweep_after = self.read_next(conn, self._sweep_after)
        return self.stitch_prepared(conn, prepared)

    def sweep_pass(
        self,
        conn: psycopg.Connection[Any],
        reader: psycopg.Connection[Any],
        stop: threading.Event,
    ) -> Iterator[BatchResult]:
        """One whole pass over the backlog, reading ahead on a second connection.

        While batch N is grouped and written on ``conn``, a helper thread finds batch N+1 and
        evaluates its rules on ``reader`` (autocommit): the two cores work at once instead of
        taking turns. Batches of one pass are disjoint (the cursor), so reading ahead never
        sees rows that the batch in flight is stitching; the next pass starts only after the
        last batch committed. Reading before locking is the order every batch keeps anyway
        (module docstring), so purge signals are handled exactly as in ``stitch``.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="stitch-read-ahead") as pool:
            ahead = pool.submit(self.read_next, reader, None)
            while True:
                prepared, after = ahead.result()
                more = after is not None and not stop.is_set()
                if more:
                    ahead = pool.submit(self.read_next, reader, after)
                yield self.stitch_prepared(conn, prepared)
                if not more:
                    return

    def read_next(
        self, conn: psycopg.Connection[Any], after: grouping.EventKey | None
    ) -> tuple[Prepared, grouping.EventKey | None]:
        """The sweep's next batch after ``after``, read and normalised, and the cursor to
        continue from (None when this batch ends the pass).

        One query finds the events and evaluates the rules (``rules.extract_next``).
        """
        limit = self.settings.stitching.batch_size
        ruleset = self.rulebook.refresh(conn)
        with telemetry.tracer().start_as_current_span(telemetry.SPAN_STITCH_EXTRACT):
            extracted = rules.extract_next(conn, self.schemas, ruleset.rules, limit, after)
        keys = sorted((t, event_id) for event_id, (t, _) in extracted.events.items())
        prepared = self._normalise(list(extracted.events), extracted, ruleset)
        return prepared, (keys[-1] if len(keys) == limit else None)

    def stitch_prepared(self, conn: psycopg.Connection[Any], prepared: Prepared) -> BatchResult:
        """Group and write events read beforehand, in a transaction of its own."""
        for attempt in conflict_retrying():
            with attempt:
                conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
                with (
                    conn.transaction(),
                    telemetry.tracer().start_as_current_span(telemetry.SPAN_STITCH_BATCH) as span,
                ):
                    span.set_attribute("events.requested", len(prepared.event_ids))
                    result = self.apply(conn, prepared)
        self.count_metrics(result)
        return result

    def stitch_in_transaction(
        self, conn: psycopg.Connection[Any], event_ids: list[str]
    ) -> BatchResult:
        """The batch itself, inside the caller's transaction.

        Sources that must commit their own writes atomically with the stitching (the Kafka
        consumer inserts the events it stitches) call this within their transaction; they own
        the isolation level and the retry on serialization failures (``RETRYABLE``).
        """
        with telemetry.tracer().start_as_current_span(telemetry.SPAN_STITCH_BATCH) as span:
            span.set_attribute("events.requested", len(event_ids))
            return self.apply(conn, self.prepare(conn, event_ids))

    def prepare(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> Prepared:
        """Evaluate the rules for those of ``event_ids`` still unstitched, and normalise."""
        ruleset = self.rulebook.refresh(conn)
        extracted = rules.Extracted({}, [])
        if event_ids:
            with telemetry.tracer().start_as_current_span(telemetry.SPAN_STITCH_EXTRACT):
                extracted = rules.extract(conn, self.schemas, ruleset.rules, event_ids)
        return self._normalise(event_ids, extracted, ruleset)

    @staticmethod
    def _normalise(
        event_ids: list[str], extracted: rules.Extracted, ruleset: rules.RuleSet
    ) -> Prepared:
        events = [
            grouping.StitchEvent(
                event_id, event_time, tuple(identifiers_of(pairs, ruleset.blocklist))
            )
            for event_id, (event_time, pairs) in extracted.events.items()
        ]
        return Prepared(event_ids, events, extracted.failures, EventMarks.of(events))

    def apply(self, conn: psycopg.Connection[Any], prepared: Prepared) -> BatchResult:
        """Lock, purge, group and write, in the caller's transaction."""
        tracer = telemetry.tracer()
        result = BatchResult()
        events = prepared.events
        touched = sorted({i for ev in events for i in ev.identifiers})
        with tracer.start_as_current_span(telemetry.SPAN_STITCH_PURGE):
            owner, keys = self.store.lock_owners(conn, touched)
            result.purged = self.store.purge(conn)
        if events:
            # Pipeline mode: marking the events (the largest statement, independent of the
            # plan) runs in PostgreSQL while Python groups; the entity writes follow it.
            with conn.pipeline():
                self.store.mark(conn, prepared.marks, prepared.failures)
                with tracer.start_as_current_span(telemetry.SPAN_STITCH_GROUP):
                    gone = set(result.purged)
                    owner = {i: e for i, e in owner.items() if e not in gone}
                    plan = grouping.plan(events, owner, keys)
                with tracer.start_as_current_span(telemetry.SPAN_STITCH_WRITE):
                    written = self.store.write(conn, plan, len(events))
            result.events = written.events
            result.created = written.created
            result.merges = written.merged
            result.absorbed = written.absorbed
            result.rule_failures = len(prepared.failures)
        span = trace.get_current_span()
        span.set_attribute("events.stitched", result.events)
        span.set_attribute("entities.merged", result.merges)
        return result

    def count_metrics(self, result: BatchResult) -> None:
        """Add a committed batch to the metrics (call only after the commit)."""
        self._stitched.add(result.events)
        self._merged.add(result.merges)
        self._created.add(result.created)
        self._purged.add(len(result.purged))
        self._rule_errors.add(result.rule_failures)
