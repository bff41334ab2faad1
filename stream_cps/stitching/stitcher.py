"""One stitching batch: read (extract, normalise), then one transaction: lock, purge, group, write.

The order is what makes the guide's restitch scripts (``modified = NULL`` first, then
``stitched = NULL``) right with no wait between them: the events are read first, then the
entities they touch are locked (``FOR UPDATE``), then purge signals are applied. Any purge signal
committed before the events were reset is therefore seen by the purge, and one committed later
waits for the batch's commit and is applied by the next batch. The read happens inside the
transaction (``stitch``, the Kafka path) or earlier on another connection (the sweep reads its
next batch ahead); either way it precedes the lock.

Three entry points, each owning its isolation, its retry on lost conflicts
(``retry.CONFLICT``) and its metrics (counted only after the commit):

- ``stitch(conn, ids)``: these events, in a transaction of its own, at READ COMMITTED. The
  replication service is the only stitcher of its database (the lease), so concurrent
  attribute calculation makes it wait on a row lock, never fail.
- ``sweep(conn, reader, stop)``: everything with ``stitched IS NULL``, batch after batch and
  pass after pass, reading the next batch ahead on ``reader``.
- ``within(conn, work)``: inside a transaction shared with the caller's own writes (the Kafka
  and webhook ingest inserts the events it stitches). Several such stitchers may run at once
  (Kafka members), so it runs at REPEATABLE READ (SERIALIZABLE on CockroachDB).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from opentelemetry import metrics, trace
from psycopg import sql

from stream_cps import retry, telemetry
from stream_cps.config import Settings
from stream_cps.db.connect import is_cockroach
from stream_cps.db.timestamps import OutOfRange
from stream_cps.stitching import grouping, quarantine, rules
from stream_cps.stitching.erasure_store import ErasureStore
from stream_cps.stitching.normalize import identifiers_of
from stream_cps.stitching.quarantine_store import QuarantineStore
from stream_cps.stitching.split_store import SplitStore
from stream_cps.stitching.store import EventMarks, Owners, StitchStore

log = logging.getLogger(__name__)


def isolation_for(conn: psycopg.Connection[Any]) -> psycopg.IsolationLevel:
    """REPEATABLE READ on PostgreSQL; CockroachDB runs SERIALIZABLE (its default) instead."""
    if is_cockroach(conn):
        return psycopg.IsolationLevel.SERIALIZABLE
    return psycopg.IsolationLevel.REPEATABLE_READ


@dataclass(frozen=True)
class Locked:
    """Entities locked before the rest of the transaction (``Stitcher.lock_first``): the
    owners of ``identifiers``, and those identifiers."""

    identifiers: frozenset[str]
    owners: Owners


@dataclass(frozen=True)
class Prepared:
    """A batch read and normalised, ready to be grouped against the state (``apply``).

    ``stored`` holds the events whose rows were inserted already marked, with these
    identifiers (the Kafka path: no second write of the row); ``marks`` covers the others.
    """

    event_ids: list[str]
    events: list[grouping.StitchEvent]
    failures: list[rules.RuleFailure]
    marks: EventMarks
    stored: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # when the rules ran for ``stored`` (ns), before the batch's span existed
    extracted: tuple[int, int] | None = None
    locked: Locked | None = None  # the batch's entities, locked first (``Stitcher.lock_first``)
    ruleset: rules.RuleSet | None = None  # what the rules were evaluated with
    # Statements that write the rows of ``stored`` themselves, sent first in the pipeline of
    # the batch's writes (the Kafka path's insert: it runs in PostgreSQL while Python groups)
    send_first: Callable[[], object] | None = None

    def inserted(self, ids: set[str]) -> Prepared:
        """Only the events in ``ids`` (the rows the insert wrote), as stored already."""
        events = [ev for ev in self.events if ev.id in ids]
        return Prepared(
            [i for i in self.event_ids if i in ids],
            events,
            [f for f in self.failures if f.event_id is None or f.event_id in ids],
            EventMarks.of([]),
            {ev.id: ev.identifiers for ev in events},
            self.extracted,
            self.locked,
            self.ruleset,
            self.send_first,
        )

    def joined(self, other: Prepared) -> Prepared:
        """These stored events and ``other``'s, which still need marking."""
        return Prepared(
            self.event_ids + other.event_ids,
            self.events + other.events,
            self.failures + other.failures,
            other.marks,
            {**self.stored, **other.stored},
            self.extracted or other.extracted,
            self.locked or other.locked,
            self.ruleset or other.ruleset,
            self.send_first or other.send_first,
        )


@dataclass
class BatchResult:
    events: int = 0
    created: int = 0
    merges: int = 0
    absorbed: int = 0
    purged: list[str] = field(default_factory=list)
    rule_failures: int = 0
    quarantined: list[str] = field(default_factory=list)
    erased: int = 0  # rows of erased events that came back, deleted instead of stitched
    oldest_wait: float | None = None  # s from the oldest event's insert to its stitching


R = TypeVar("R")
StitchIn = Callable[[list[str], "Prepared | None"], BatchResult]
"""Stitches ids inside the transaction ``Stitcher.within`` opened for its caller; the
``Prepared`` given holds those of them that were inserted already marked (``prepare_rows``)."""


def _marks(events: list[grouping.StitchEvent], stored: Mapping[str, tuple[str, ...]]) -> EventMarks:
    """Marks for ``events``, but for rows inserted already holding the same identifiers."""
    return EventMarks.of(ev for ev in events if stored.get(ev.id) != ev.identifiers)


def _out_of_range(event_id: str, when: OutOfRange) -> rules.RuleFailure:
    """An event stitched although its time is outside what Python holds, recorded as such."""
    message = (
        f"event_time {when.original!r} is outside years 1-9999: stitched, ordered as "
        f"{when.isoformat()} (it decides the entity id only among such events)"
    )
    log.warning("event %s: %s", event_id, message)
    return rules.RuleFailure(None, event_id, message)


class Stitcher:
    """Stitches batches of events against the database state (autocommit connections in)."""

    def __init__(self, settings: Settings) -> None:
        self.schemas = settings.schemas
        self.batch_size = settings.stitching.batch_size
        self.store = StitchStore(self.schemas, settings.opensearch.writes_outbox)
        self.quarantine = QuarantineStore(self.schemas)
        self.splits = SplitStore(self.schemas)
        self.erasure = ErasureStore(self.schemas, settings.opensearch.writes_outbox)
        self.limits = quarantine.Limits.parse(
            settings.stitching.quarantine_limit, settings.stitching.quarantine_limits
        )
        self.rulebook = rules.RuleBook(
            self.schemas, settings.stitching.rule_max_failures, settings.stitching.rule_timeout_ms
        )
        self._stitched = telemetry.counter(telemetry.METRIC_EVENTS_STITCHED)
        self._merged = telemetry.counter(telemetry.METRIC_ENTITIES_MERGED)
        self._created = telemetry.counter(telemetry.METRIC_ENTITIES_CREATED)
        self._purged = telemetry.counter(telemetry.METRIC_ENTITIES_PURGED)
        self._rule_errors = telemetry.counter(telemetry.METRIC_RULE_ERRORS)
        self._quarantined = telemetry.counter(telemetry.METRIC_IDENTIFIERS_QUARANTINED)
        self._erased = telemetry.counter(telemetry.METRIC_ERASED_DROPPED)
        self._duration = telemetry.histogram(telemetry.METRIC_BATCH_DURATION)
        self._latency = telemetry.histogram(telemetry.METRIC_EVENTS_LATENCY)
        self.last_batch: float | None = None
        # Where the next bounded purge share starts in entity-id order (``StitchStore.purge``);
        # in memory only: a restart starts again from the lowest id.
        self._purged_up_to = ""
        telemetry.gauge(telemetry.METRIC_LAST_BATCH, self._observe_last_batch)

    def _observe_last_batch(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [] if self.last_batch is None else [metrics.Observation(self.last_batch)]

    # -- the three entry points ---------------------------------------------------------------

    def stitch(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> BatchResult:
        """Stitch those of ``event_ids`` that are still unstitched (and apply pending purges),
        in a READ COMMITTED transaction of its own."""

        return self._own_transaction(conn, lambda: self._in_transaction(conn, event_ids))

    def sweep(
        self,
        conn: psycopg.Connection[Any],
        reader: psycopg.Connection[Any] | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[BatchResult]:
        """Stitch every row with ``stitched IS NULL``, whatever carried it; one result per
        committed batch.

        A pass walks the backlog in (event_time, id) order with a cursor, so rows already passed
        are not scanned again; a pass that stitched or purged something is followed by another,
        for rows that arrived behind its cursor or that a purge reset (a quarantine, an admin's
        ``modified = NULL``), until a pass finds nothing (or ``stop`` is set).

        With a ``reader`` connection, a helper thread finds batch N+1 and evaluates its rules
        while batch N is grouped and written on ``conn``: the two cores work at once instead of
        taking turns. Batches of one pass are disjoint (the cursor), so reading ahead never
        sees rows that the batch in flight is stitching; the next pass starts only after the
        last batch committed. Reading before locking is the order every batch keeps anyway
        (module docstring), so purge signals are handled exactly as in ``stitch``.
        """
        stop = stop or threading.Event()
        while not stop.is_set():
            stitched = 0
            for result in self._one_pass(conn, reader or conn, stop):
                stitched += result.events + len(result.purged)
                yield result
            if stitched == 0:
                return

    def within(self, conn: psycopg.Connection[Any], work: Callable[[StitchIn], R]) -> R:
        """Run ``work`` in one transaction that it shares with the stitching it asks for.

        ``work`` gets a function that stitches ids inside that transaction; the whole
        transaction is retried on a lost conflict (so ``work`` must be repeatable) and the
        metrics are counted after it committed.
        """

        def attempt() -> tuple[R, list[BatchResult]]:
            done: list[BatchResult] = []

            def stitch_in(event_ids: list[str], stored: Prepared | None) -> BatchResult:
                result = self._in_transaction(conn, event_ids, stored)
                done.append(result)
                return result

            conn.isolation_level = isolation_for(conn)
            with conn.transaction():
                return work(stitch_in), done

        started = time.monotonic()
        out, results = retry.CONFLICT.call(attempt)
        for result in results:
            self._count(result, time.monotonic() - started)
        return out

    def lock_first(self, conn: psycopg.Connection[Any], prepared: Prepared) -> Prepared:
        """Lock the entities of ``prepared``'s identifiers now, at the start of a ``within``
        transaction (the Kafka path, whose rules ran before it began; only the rule tables
        are read before, to check they are still the rules ``prepared`` was evaluated with).

        At REPEATABLE READ the first statement takes the snapshot, and locking a row that
        another transaction changed after it fails the whole transaction (40001): attribute
        calculation stores into the entities that stitching has just changed, so a lock taken
        after the insert lost that race often enough to cost a Kafka member an eighth of its
        time in retries (docs/benchmarks.md). Taken first, only a calculation holding the row
        at that very moment still conflicts. The batch reuses these owners when its
        identifiers are among them (``_apply``)."""
        touched = frozenset(i for ev in prepared.events for i in ev.identifiers)
        owners = self.store.lock_owners(conn, sorted(touched))
        return dataclasses.replace(prepared, locked=Locked(touched, owners))

    def purge_pending(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether a purge signal (``modified = NULL``) waits to be applied."""
        return self.store.pending_purge(conn)

    def has_work(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether a ``sweep`` would stitch or purge anything: an idle service skips it, so
        it neither queries nor traces an empty batch every ``stitching.sweep_interval``."""
        return self.store.pending_work(conn)

    # -- inside ----------------------------------------------------------------------------

    def _one_pass(
        self, conn: psycopg.Connection[Any], reader: psycopg.Connection[Any], stop: threading.Event
    ) -> Iterator[BatchResult]:
        # Each batch's span starts when its read does, as a child of the caller's span; the
        # read-ahead thread gets that span's context explicitly (a thread starts with none).
        if reader is conn:
            after: rules.Cursor | None = None
            while True:
                span = self._sweep_span()
                prepared, after = self._read_next(conn, after, span)
                yield self._commit_prepared(conn, prepared, span)
                if after is None or stop.is_set():
                    return
        with ThreadPoolExecutor(1, thread_name_prefix="stitch-read-ahead") as pool:
            span = self._sweep_span()
            ahead = pool.submit(self._read_next, reader, None, span)
            while True:
                prepared, after = ahead.result()
                more = after is not None and not stop.is_set()
                current = span
                if more:
                    span = self._sweep_span()
                    ahead = pool.submit(self._read_next, reader, after, span)
                yield self._commit_prepared(conn, prepared, current)
                if not more:
                    return

    def _sweep_span(self) -> trace.Span:
        """A sweep batch's ``stitch.batch`` span, started now and ended by its commit."""
        return telemetry.tracer().start_span(telemetry.SPAN_STITCH_BATCH)

    def _read_next(
        self, conn: psycopg.Connection[Any], after: rules.Cursor | None, span: trace.Span
    ) -> tuple[Prepared, rules.Cursor | None]:
        """The sweep's next batch after ``after``, read and normalised, and the cursor to
        continue from (None when this batch ends the pass). One query finds the events and
        evaluates the rules (``rules.extract_next``); its span is a child of ``span``."""
        limit = self.batch_size
        ruleset = self.rulebook.refresh(conn)
        with telemetry.tracer().start_as_current_span(
            telemetry.SPAN_STITCH_EXTRACT, context=telemetry.in_span(span)
        ):
            extracted = rules.extract_next(
                conn, self.schemas, ruleset.rules, limit, after, self.rulebook.timeout_ms
            )
        prepared = self._normalise(list(extracted.events), extracted, ruleset)
        return prepared, (extracted.last if len(extracted.events) == limit else None)

    def _commit_prepared(
        self, conn: psycopg.Connection[Any], prepared: Prepared, span: trace.Span
    ) -> BatchResult:
        """Group and write events read beforehand, in a transaction of its own, in the
        batch's span (its retries too); the span ends with the commit."""
        span.set_attribute("events.requested", len(prepared.event_ids))
        with trace.use_span(span, end_on_exit=True):
            return self._own_transaction(conn, lambda: self._apply(conn, prepared))

    def _own_transaction(
        self, conn: psycopg.Connection[Any], work: Callable[[], BatchResult]
    ) -> BatchResult:
        """``work`` in a READ COMMITTED transaction, retried on lost conflicts; counted after
        the commit."""

        def attempt() -> BatchResult:
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            with conn.transaction():
                return work()

        started = time.monotonic()
        result = retry.CONFLICT.call(attempt)
        self._count(result, time.monotonic() - started)
        return result

    def prepare_rows(
        self, conn: psycopg.Connection[Any], source: sql.Composable, params: dict[str, object]
    ) -> Prepared | None:
        """Evaluate the rules over rows not stored yet (``source`` selects them in the events
        table's shape), so that they can be inserted already marked; None when a rule or a
        row fails (they are then stored unmarked and stitched by id, which isolates it)."""
        ruleset = self.rulebook.refresh(conn)
        started = telemetry.now()
        extracted = rules.extract_rows(
            conn, self.schemas, ruleset.rules, source, params, self.rulebook.timeout_ms
        )
        if extracted is None:
            return None
        prepared = self._normalise(list(extracted.events), extracted, ruleset)
        # its span is the batch's extract stage, recorded once the batch's span exists
        return dataclasses.replace(prepared, extracted=(started, telemetry.now()))

    def _in_transaction(
        self, conn: psycopg.Connection[Any], event_ids: list[str], stored: Prepared | None = None
    ) -> BatchResult:
        def prepare() -> Prepared:
            if stored is None:
                return self._prepare(conn, event_ids)
            if stored.extracted:
                telemetry.record(telemetry.SPAN_STITCH_EXTRACT, *stored.extracted)
            rest = [i for i in event_ids if i not in stored.stored]
            return stored.joined(self._prepare(conn, rest))

        start = stored.extracted[0] if stored and stored.extracted else None
        return self._batch(conn, len(event_ids), prepare, start)

    def _batch(
        self,
        conn: psycopg.Connection[Any],
        requested: int,
        prepare: Callable[[], Prepared],
        start: int | None = None,
    ) -> BatchResult:
        """One ``stitch.batch`` span (from ``start`` when the rules ran before the insert):
        prepare (when not read ahead), then lock, purge, group, write, in the transaction
        that is open."""
        with telemetry.tracer().start_as_current_span(
            telemetry.SPAN_STITCH_BATCH, start_time=start
        ) as span:
            span.set_attribute("events.requested", requested)
            return self._apply(conn, prepare())

    def _prepare(self, conn: psycopg.Connection[Any], event_ids: list[str]) -> Prepared:
        """Evaluate the rules for those of ``event_ids`` still unstitched, and normalise. With
        no ids there is nothing to evaluate: the rule tables are not read again (the Kafka
        path read them at the start of its transaction)."""
        ruleset = self.rulebook.refresh(conn) if event_ids else self.rulebook.current
        extracted = rules.Extracted({}, [])
        if event_ids:
            with telemetry.tracer().start_as_current_span(telemetry.SPAN_STITCH_EXTRACT):
                extracted = rules.extract(
                    conn, self.schemas, ruleset.rules, event_ids, self.rulebook.timeout_ms
                )
        return self._normalise(event_ids, extracted, ruleset)

    def _normalise(
        self, event_ids: list[str], extracted: rules.Extracted, ruleset: rules.RuleSet
    ) -> Prepared:
        events = [
            grouping.StitchEvent(
                event_id, event_time, tuple(identifiers_of(pairs, ruleset.blocklist))
            )
            for event_id, (event_time, pairs) in extracted.events.items()
        ]
        failures = extracted.failures + [
            _out_of_range(ev.id, ev.event_time)
            for ev in events
            if isinstance(ev.event_time, OutOfRange)
        ]
        failures += self.rulebook.note(extracted.failures)
        return Prepared(event_ids, events, failures, EventMarks.of(events), ruleset=ruleset)

    def _apply(self, conn: psycopg.Connection[Any], prepared: Prepared) -> BatchResult:
        """Lock, quarantine, purge, group and write, in the caller's transaction.

        Quarantined and blocked identifiers, and those an admin's split cut, are dropped from
        what the events store, like a blocklisted value (so the guide's ``<@`` test still
        finds an entity's events), and remembered in ``quarantined_events`` for a release or
        an undo; an event a split detached stores none. An identifier that crosses its
        limit in this batch sets its (locked) entity up for the purge that follows, which
        resets that entity's events for the sweep.

        Rows of erased events (a re-insert, a changefeed re-emission) are deleted, not
        stitched, and identifiers an ``erase --suppress`` named link nothing: one tombstone
        query each for the whole batch (docs/stitching.md, Erase)."""
        tracer = telemetry.tracer()
        result = BatchResult()
        events = prepared.events
        marks = prepared.marks
        # Rows inserted by this transaction (``stored``) were checked before their insert.
        erased = self.erasure.erased_among(
            conn, [ev.id for ev in events if ev.id not in prepared.stored]
        )
        if erased:
            result.erased = self.erasure.drop(conn, sorted(erased))
            events = [ev for ev in events if ev.id not in erased]
            marks = _marks(events, prepared.stored)
            log.info("deleted %d re-inserted rows of erased events", result.erased)
        touched = sorted({i for ev in events for i in ev.identifiers})
        locked = prepared.locked
        with tracer.start_as_current_span(telemetry.SPAN_STITCH_PURGE):
            if locked is not None and locked.identifiers.issuperset(touched):
                owners = locked.owners  # an owner of an identifier dropped since stays locked
            else:
                if locked is not None:
                    # A second round of locks in id order, while the first is held, can wait
                    # in a cycle with another member's one round: give way at once instead of
                    # after deadlock_timeout (retried, retry.CONFLICT).
                    conn.execute(self.store.give_way)
                owners = self.store.lock_owners(conn, touched)
            # Reads that need nothing from each other go out together (one round trip each
            # group): every round trip of a batch's serial chain is paid for again waiting
            # for the GIL while another thread runs Python (docs/benchmarks.md).
            with conn.pipeline():
                conn.execute(self.store.give_way)  # no long waits on rows from here on
                live_of = self.splits.live_later(conn, touched, [ev.id for ev in events])
                # After the lock: an erase of the owner committed meanwhile is seen here.
                suppressed = self.erasure.suppressed_among(conn, touched)
            live = live_of()
            if suppressed:
                events = quarantine.without(events, suppressed)
                marks = _marks(events, prepared.stored)
            trips = self.quarantine.record(conn, events, self.limits)
            with conn.pipeline():  # after the record: its trips are excluded, and purged
                excluded_of = self.quarantine.excluded_later(conn, touched)
                result.purged = self.store.purge(
                    conn, owners.keys, self.batch_size, self._purged_up_to
                )
            excluded = excluded_of() | live.cut
            # Past the last share's highest id; a short share went round: from the lowest.
            full = len(result.purged) >= self.batch_size
            self._purged_up_to = max(result.purged) if full else ""
        for trip in trips:
            log.warning(
                "identifier %s quarantined: it co-occurs with %d distinct %s identifiers "
                "(limit %d); it links nothing until released (stream-cps quarantine)",
                trip.identifier,
                trip.count,
                trip.other,
                trip.limit,
            )
        result.quarantined = [t.identifier for t in trips]
        grouped = quarantine.without(events, excluded, live.detached)
        if excluded:
            self.quarantine.remember(conn, events, excluded)
        if excluded or live.detached:
            marks = _marks(grouped, prepared.stored)
        if prepared.send_first is not None and not events:
            prepared.send_first()  # e.g. every event of the batch was erased
        if events:
            # Pipeline mode: marking the events (the largest statement, independent of the
            # plan) or inserting them already marked runs in PostgreSQL while Python groups;
            # the entity writes follow it.
            with conn.pipeline():
                if prepared.send_first is not None:
                    prepared.send_first()
                marked = self.store.mark(conn, marks, prepared.failures)
                with tracer.start_as_current_span(telemetry.SPAN_STITCH_GROUP):
                    gone = set(result.purged)
                    owner = {i: e for i, e in owners.owner.items() if e not in gone}
                    plan = grouping.plan(grouped, owner, owners.keys)
                with tracer.start_as_current_span(telemetry.SPAN_STITCH_WRITE):
                    written = self.store.write(conn, plan, len(events), owners)
            result.events = written.events
            result.created = written.created
            result.merges = written.merged
            result.absorbed = written.absorbed
            result.rule_failures = len(prepared.failures)
            row = marked.fetchone() if marked is not None else None
            result.oldest_wait = row[0] if row else None
        span = trace.get_current_span()
        span.set_attribute("events.stitched", result.events)
        span.set_attribute("entities.merged", result.merges)
        return result

    def _count(self, result: BatchResult, seconds: float) -> None:
        """Add a committed batch to the metrics (only ever after its commit); ``seconds`` is
        the whole transaction's, retries included."""
        if result.events or result.purged:
            self._duration.record(seconds)
            self.last_batch = time.time()
        if result.oldest_wait is not None:
            self._latency.record(max(0.0, result.oldest_wait))
        self._stitched.add(result.events)
        self._merged.add(result.merges)
        self._created.add(result.created)
        self._purged.add(len(result.purged))
        self._rule_errors.add(result.rule_failures)
        self._quarantined.add(len(result.quarantined))
        self._erased.add(result.erased)
