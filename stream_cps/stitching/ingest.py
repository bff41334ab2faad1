"""Ingest: a batch of decoded messages in ONE database transaction: insert, dead-letter, stitch.

Shared by the Kafka loop and the changefeed webhook.

Customer events are inserted with ``ON CONFLICT (id) DO NOTHING`` (a redelivered id is not
duplicated; the first stored version wins; a redelivery whose content differs from it is a
conflict someone should see, so it is dead-lettered) and stitched in the same transaction, so
an event is never visible unstitched because of us, and a crash before the commit leaves no
trace. Changefeed rows are already in the table and are only stitched by id; the stitcher skips
rows that are stitched already, which makes duplicates and replays harmless. An event that
``stream-cps erase`` erased (its salted id hash is a tombstone) is dropped before the insert and
counted (``erased``): a replay or a redelivery cannot bring the person back.

The SQL here stays in the subset CockroachDB speaks: multi-row ``INSERT ... ON CONFLICT DO
NOTHING RETURNING``, savepoints, ``= ANY(array)``; no advisory locks, no PostgreSQL-only
functions. The transaction, its isolation and its retry on 40001/40P01 are ``Stitcher.within``'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from stream_cps import telemetry
from stream_cps.config import Schemas
from stream_cps.db.arrays import TextArray
from stream_cps.sources.messages import (
    ChangefeedRow,
    CustomerEvent,
    Envelope,
    Ignored,
    Resolved,
    reason_class,
    short_reason,
)
from stream_cps.stitching.stitcher import BatchResult, Prepared, Stitcher, StitchIn

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("id", "source_id", "type", "version", "event_time", "payload")
DEAD_COLUMNS = (
    "id",
    "source",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "message_key",
    "message_value",
    "message_time",
    "reason",
)


@dataclass(frozen=True)
class Ruled:
    """The rules evaluated over a batch's new events before its transaction (``rule_ahead``,
    on another connection while the batch before is written). ``prepared`` is None when a
    rule or a row failed: the batch then goes the stored-rows way, which isolates it."""

    prepared: Prepared | None
    # The insert's parameters for these events (``ids``, in this order), encoded on the
    # read-ahead thread: the batch's transaction reuses them when its new events are these
    # (nothing erased meanwhile) and, for ``idents``, the rules still stand
    ids: tuple[str, ...] = ()
    columns: dict[str, object] | None = None
    idents: TextArray | None = None


@dataclass
class ApplyStats:
    """What one committed batch did; the caller adds it to its progress."""

    messages: int = 0
    events_new: int = 0
    events_seen: int = 0  # redelivered ids with the same content: in the table or the batch
    changefeed_rows: int = 0
    echoes: int = 0  # changefeed rows that carry stitched already (our own writes)
    deletes: int = 0
    resolved: int = 0
    tombstones: int = 0  # Kafka tombstone messages (null value), not erasures
    erased: int = 0  # messages of erased events, dropped (docs/stitching.md, Erase)
    stored_before: int = 0  # new ids of the batch found stored already (redelivery, replay)
    unknown: int = 0
    dead_letters: list[Envelope] = field(default_factory=list)
    stitch: BatchResult = field(default_factory=BatchResult)
    last_resolved: str | None = None


class Applier:
    """Turns envelopes into one committed transaction; shared by the consumer and the webhook."""

    def __init__(self, schemas: Schemas, stitcher: Stitcher) -> None:
        self.schemas = schemas
        self.stitcher = stitcher
        # Insert in the pipeline of the batch's writes, betting that its events are new
        # (``_pipelined``); off after a batch that found stored ones, until one finds none.
        self.pipelined = True
        self._events = sql.Identifier(schemas.ce, "customer_events")
        self._dead = sql.Identifier(schemas.ps, "kafka_dead_letters")
        # One statement with one array per column: no per-row placeholders to parse, and
        # multi-argument unnest exists in CockroachDB too. Payloads travel as text[] and are
        # cast row by row (jsonb[] parameters are newer in CockroachDB). Binary parameters (%b)
        # skip the per-element quoting of text-format array literals. With ``marks`` (every
        # event's identifiers as an array literal) the rows are stored stitched.
        self._insert_statement = sql.SQL(
            "INSERT INTO {} ({}, stitched, identifiers) "
            "SELECT u.id, u.source_id, u.type, u.version, u.event_time, CAST(u.payload AS jsonb), "
            "CASE WHEN m.idents IS NOT NULL THEN clock_timestamp() END, m.idents::text[] "
            "FROM {} LEFT JOIN unnest(%(idents)b::text[]) WITH ORDINALITY AS m(idents, n) "
            "ON m.n = u.n ON CONFLICT (id) DO NOTHING RETURNING id"
        ).format(self._events, sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS)), _UNNEST)
        self._dead_letters = telemetry.counter(telemetry.METRIC_DEAD_LETTERS)
        self._erased = telemetry.counter(telemetry.METRIC_ERASED_DROPPED)

    def apply(
        self,
        conn: psycopg.Connection[Any],
        envelopes: Sequence[Envelope],
        ruled: Ruled | None = None,
    ) -> ApplyStats:
        """Commit the batch (retried on serialization conflicts); metrics counted after commit.
        ``ruled``: the rules' result for these envelopes, evaluated beforehand."""

        def attempt(pipelined: bool) -> ApplyStats:
            return self.stitcher.within(
                conn, lambda stitch_in: self._once(conn, envelopes, stitch_in, ruled, pipelined)
            )

        stats = None
        if self.pipelined:
            try:
                stats = attempt(True)
            except _StepByStep as exc:
                log.log(exc.level, "%s: applied again step by step", exc)
                self.pipelined = exc.keep_pipelining
        if stats is None:
            stats = attempt(False)
            self.pipelined = stats.stored_before == 0
        _log_outcomes(stats, envelopes)
        for dead in stats.dead_letters:
            self._dead_letters.add(1, {"reason": reason_class(dead.reason)})
        self._erased.add(stats.erased)
        return stats

    def rule_ahead(self, conn: psycopg.Connection[Any], envelopes: Sequence[Envelope]) -> Ruled:
        """Evaluate the rules over the new events of ``envelopes`` (the first of each id), on
        an autocommit connection of its own: the rules read only the batch and the rule
        tables, so this runs while the batch before is in the database, as the sweep reads
        ahead. Any superset of what ``apply`` then inserts will do (erased events, conflicts)."""
        first: dict[str, CustomerEvent] = {}
        for envelope in envelopes:
            if isinstance(envelope.decoded, CustomerEvent):
                first.setdefault(envelope.decoded.id, envelope.decoded)
        events = list(first.values())
        if not events:
            return Ruled(None)
        columns = _columns(events)
        prepared = self.stitcher.prepare_rows(conn, _ROWS, columns)
        if prepared is None:
            return Ruled(None)
        idents = _idents(events, _mark_texts(prepared))
        for column in [*columns.values(), idents]:
            if isinstance(column, TextArray):
                column.binary()  # encoded here, off the batch's thread
        return Ruled(prepared, tuple(first), columns, idents)

    def _once(
        self,
        conn: psycopg.Connection[Any],
        envelopes: Sequence[Envelope],
        stitch_in: StitchIn,
        ruled: Ruled | None,
        pipelined: bool,
    ) -> ApplyStats:
        stats = _classify(envelopes)
        events: dict[str, tuple[CustomerEvent, list[Envelope]]] = {}
        conflicts: list[Envelope] = []
        stitch_ids: dict[str, None] = {}
        received = 0
        for envelope in envelopes:
            decoded = envelope.decoded
            if isinstance(decoded, CustomerEvent):
                received += 1
                first = events.setdefault(decoded.id, (decoded, []))
                if _same_event(first[0], decoded):
                    first[1].append(envelope)
                else:
                    conflicts.append(envelope)
            elif isinstance(decoded, ChangefeedRow) and decoded.needs_stitch:
                stitch_ids[decoded.event_id] = None
        # Rules evaluated ahead stand only if the transaction sees the same rules (its first
        # statement, so its snapshot). They name the batch's identifiers: their entities are
        # locked next (``Stitcher.lock_first``), unless changefeed rows of the batch bring
        # identifiers known only later (one round of locks, in id order, as everywhere else).
        evaluated = ruled.prepared if ruled is not None else None
        if evaluated is not None and evaluated.ruleset is not self.stitcher.rulebook.refresh(conn):
            log.info("stitching rules changed since this batch's were evaluated: evaluating again")
            ruled = evaluated = None
        with conn.pipeline():  # the erasure check goes out with the lock: one round trip
            erased_among = self.stitcher.erasure.erased_among_later(conn, list(events))
            if evaluated is not None and events and not stitch_ids:
                evaluated = self.stitcher.lock_first(conn, evaluated)
        erased = erased_among()
        for event_id in erased:
            stats.erased += len(events.pop(event_id)[1])
        kept = [e for e in conflicts if _event_id(e) not in erased]  # no dead letter either
        stats.erased += len(conflicts) - len(kept)
        conflicts = kept
        received -= stats.erased
        new_events = [ev for ev, _ in events.values()]
        # Rules first, over the rows as they will be stored: the insert then writes them
        # already marked, and the stitcher does not write them a second time.
        ahead = None
        encoded = ruled if ruled is not None and ruled.ids == tuple(events) else None
        columns = encoded.columns if encoded and encoded.columns else _columns(new_events)
        idents = encoded.idents if encoded else None
        if new_events:
            ahead = (
                evaluated if ruled is not None else self.stitcher.prepare_rows(conn, _ROWS, columns)
            )
        if pipelined and ahead is not None and not stitch_ids:
            return self._pipelined(
                conn, stats, events, conflicts, received, ahead, columns, idents, stitch_in
            )
        inserted, failed = self._insert(conn, new_events, ahead, columns, idents)
        for event_id, reason in failed.items():
            stats.dead_letters.append(dataclasses.replace(events[event_id][1][0], reason=reason))
        present = [
            ev for eid, (ev, _) in events.items() if eid not in inserted and eid not in failed
        ]
        stats.stored_before = len(present)
        for event_id in self._differing(conn, present):
            conflicts += events[event_id][1]
        stats.events_new = len(inserted)
        stats.events_seen = received - len(inserted) - len(failed) - len(conflicts)
        self._record_dead(conn, stats, conflicts)
        ids = [eid for eid in events if eid not in failed]
        ids += [eid for eid in stitch_ids if eid not in events]
        stats.stitch = stitch_in(ids, ahead.inserted(inserted) if ahead else None)
        return stats

    def _pipelined(
        self,
        conn: psycopg.Connection[Any],
        stats: ApplyStats,
        events: dict[str, tuple[CustomerEvent, list[Envelope]]],
        conflicts: list[Envelope],
        received: int,
        ahead: Prepared,
        columns: dict[str, object],
        idents: TextArray | None,
        stitch_in: StitchIn,
    ) -> ApplyStats:
        """Insert the batch in the pipeline of its stitching writes: PostgreSQL inserts while
        Python groups (py-spy: the insert was the member's longest wait, with Python idle).

        The bet is that every event is new, as in all but a redelivery or a replay: the
        stitching is planned for all of them, and if the insert returns fewer rows, or the
        database refuses one, the whole transaction is rolled back (``_StepByStep``) and
        ``apply`` runs the batch again step by step (``_insert`` first)."""
        new_events = [ev for ev, _ in events.values()]
        expected = set(events)
        marks = {} if idents is not None else _mark_texts(ahead)
        sent: list[psycopg.Cursor[Any]] = []

        def send_first() -> None:
            sent.append(self._send_insert(conn, new_events, marks, columns, idents))

        self._record_dead(conn, stats, conflicts)
        prepared = dataclasses.replace(ahead.inserted(expected), send_first=send_first)
        try:
            stats.stitch = stitch_in(list(events), prepared)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # the database refused a row (or a write): the insert on its own isolates it
            raise _StepByStep(f"batch refused in one pipeline ({exc})", True) from exc
        inserted = _ids(sent[0]) if sent else set()
        if inserted != expected:
            raise _StepByStep("a batch holds events stored before (redelivered)", False)
        stats.events_new = len(inserted)
        stats.events_seen = received - len(inserted) - len(conflicts)
        return stats

    def _insert(
        self,
        conn: psycopg.Connection[Any],
        events: list[CustomerEvent],
        ahead: Prepared | None,
        columns: dict[str, object],
        idents: TextArray | None,
    ) -> tuple[set[str], dict[str, str]]:
        """Insert new events (the ids inserted; ``columns`` are theirs, and ``idents`` when
        encoded ahead), marked with their identifiers when ``ahead`` has them; rows the
        database refuses are isolated with savepoints."""
        if not events:
            return set(), {}
        marks = _mark_texts(ahead)
        try:
            with conn.transaction():
                return _ids(self._send_insert(conn, events, marks, columns, idents)), {}
        except (psycopg.DataError, psycopg.IntegrityError):
            pass
        inserted: set[str] = set()
        failed: dict[str, str] = {}
        for event in events:
            try:
                with conn.transaction():
                    inserted |= _ids(self._send_insert(conn, [event], marks))
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                failed[event.id] = f"database refused the event: {exc.diag.message_primary}"
        return inserted, failed

    def _send_insert(
        self,
        conn: psycopg.Connection[Any],
        events: list[CustomerEvent],
        marks: dict[str, str],
        columns: dict[str, object] | None = None,
        idents: TextArray | None = None,
    ) -> psycopg.Cursor[Any]:
        """The insert's cursor (in a pipeline its rows arrive when the pipeline syncs)."""
        params: dict[str, object] = {
            **(columns or _columns(events)),
            "idents": idents if idents is not None else _idents(events, marks),
        }
        return conn.execute(self._insert_statement, params)

    def _differing(self, conn: psycopg.Connection[Any], events: list[CustomerEvent]) -> list[str]:
        """Ids among ``events`` (not inserted: already stored) whose stored content differs.

        Compared as stored: timestamps as instants, payloads as jsonb (key order and spacing
        do not count), so a redelivery in the other encoding is still the same event."""
        if not events:
            return []
        statement = sql.SQL(
            "SELECT u.id FROM {} JOIN {} AS e ON e.id = u.id "
            "WHERE e.source_id IS DISTINCT FROM u.source_id OR e.type IS DISTINCT FROM u.type "
            "OR e.version IS DISTINCT FROM u.version OR e.event_time <> u.event_time "
            "OR e.payload <> CAST(u.payload AS jsonb)"
        ).format(_UNNEST, self._events)
        return [str(row[0]) for row in conn.execute(statement, _columns(events))]

    def _record_dead(
        self, conn: psycopg.Connection[Any], stats: ApplyStats, conflicts: list[Envelope]
    ) -> None:
        """The batch's dead letters, ``conflicts`` (ids stored with other content) added, in
        the table; ``stats.dead_letters`` holds them as recorded (reasons shortened)."""
        stats.dead_letters += [
            dataclasses.replace(e, reason=_conflict(e.decoded)) for e in conflicts
        ]
        dead = stats.dead_letters = [_shortened(e) for e in stats.dead_letters]
        if not dead:
            return
        statement = sql.SQL("INSERT INTO {} ({}) VALUES {} ON CONFLICT (id) DO NOTHING").format(
            self._dead,
            sql.SQL(", ").join(map(sql.Identifier, DEAD_COLUMNS)),
            _values(len(dead), ["%s"] * len(DEAD_COLUMNS)),
        )
        params: list[Any] = []
        for e in dead:
            params += [
                e.origin,
                e.source,
                e.topic,
                e.partition,
                e.offset,
                e.key,
                e.value,
                e.timestamp,
                e.reason or "unknown",
            ]
        conn.execute(statement, params)


_UNNEST = sql.SQL(
    "unnest(CAST(%(id)b AS text[]), CAST(%(source_id)b AS text[]), CAST(%(type)b AS text[]), "
    "CAST(%(version)b AS text[]), CAST(%(event_time)b AS timestamptz[]), "
    "CAST(%(payload)b AS text[])) WITH ORDINALITY "
    "AS u (id, source_id, type, version, event_time, payload, n)"
)
# The batch as rows of the events table's shape, for the rules (``Stitcher.prepare_rows``).
_ROWS = sql.SQL(
    "SELECT u.id, u.source_id, u.type, u.version, u.event_time, "
    "CAST(u.payload AS jsonb) AS payload, now() AS created, NULL::timestamptz AS stitched, "
    "NULL::text[] AS identifiers FROM {}"
).format(_UNNEST)


def _columns(events: list[CustomerEvent]) -> dict[str, object]:
    """The events as one array per column, for ``_UNNEST`` (text columns through the fast
    binary ``TextArray``: psycopg's own list dumper costs a call per element)."""
    return {
        "id": TextArray([ev.id for ev in events]),
        "source_id": TextArray([ev.source_id for ev in events]),
        "type": TextArray([ev.type for ev in events]),
        "version": TextArray([ev.version for ev in events]),
        "event_time": [ev.event_time for ev in events],
        "payload": TextArray([ev.payload for ev in events]),
    }


def _ids(cursor: psycopg.Cursor[Any]) -> set[str]:
    """The ids an insert returned."""
    return {str(row[0]) for row in cursor}


def _mark_texts(prepared: Prepared | None) -> dict[str, str]:
    """Each event's identifiers as array text, by id (none without rules evaluated)."""
    if prepared is None:
        return {}
    return dict(zip(prepared.marks.ids, prepared.marks.literals, strict=True))


def _idents(events: list[CustomerEvent], marks: dict[str, str]) -> TextArray:
    """The ``identifiers`` column of the insert: each event's mark, or none at all."""
    return TextArray([marks[ev.id] for ev in events] if marks else [])


def _same_event(first: CustomerEvent, other: CustomerEvent) -> bool:
    """Two decodings of the same id with equal content (the payload compared as JSON)."""
    if (first.source_id, first.type, first.version, first.event_time) != (
        other.source_id,
        other.type,
        other.version,
        other.event_time,
    ):
        return False
    return first.payload == other.payload or json.loads(first.payload) == json.loads(other.payload)


def _event_id(envelope: Envelope) -> str:
    assert isinstance(envelope.decoded, CustomerEvent)
    return envelope.decoded.id


def _conflict(decoded: object) -> str:
    assert isinstance(decoded, CustomerEvent)
    return f"event id {decoded.id} already stored with different content (the first version stays)"


def _shortened(envelope: Envelope) -> Envelope:
    reason = short_reason(envelope.reason or "unknown")
    return envelope if reason == envelope.reason else dataclasses.replace(envelope, reason=reason)


class _StepByStep(Exception):
    """The pipelined try of a batch failed and was rolled back: ``apply`` runs it again
    step by step. ``keep_pipelining`` is False when the batch held events stored before:
    the batches after a redelivery likely do too."""

    def __init__(self, reason: str, keep_pipelining: bool) -> None:
        super().__init__(reason)
        self.keep_pipelining = keep_pipelining
        self.level = logging.DEBUG if keep_pipelining else logging.INFO


def _values(rows: int, placeholders: list[str]) -> sql.Composed:
    one = sql.SQL("(" + ", ".join(placeholders) + ")")
    return sql.SQL(", ").join([one] * rows)


def _classify(envelopes: Sequence[Envelope]) -> ApplyStats:
    stats = ApplyStats(messages=len(envelopes))
    for envelope in envelopes:
        decoded = envelope.decoded
        if envelope.reason is not None:
            stats.dead_letters.append(envelope)
        elif isinstance(decoded, ChangefeedRow):
            if decoded.deleted:
                stats.deletes += 1
            else:
                stats.changefeed_rows += 1
                stats.echoes += not decoded.needs_stitch
        elif isinstance(decoded, Resolved):
            stats.resolved += 1
            stats.last_resolved = decoded.timestamp
        elif isinstance(decoded, Ignored):
            if decoded.kind == "tombstone":
                stats.tombstones += 1
            else:
                stats.unknown += 1
    return stats


def _log_outcomes(stats: ApplyStats, envelopes: Sequence[Envelope]) -> None:
    """One line per message that is not applied, so an operator can find it."""
    for envelope in envelopes:
        decoded = envelope.decoded
        if isinstance(decoded, Ignored):
            log.info("ignored %s at %s: %s", decoded.kind, envelope.where(), decoded.detail)
        elif isinstance(decoded, ChangefeedRow) and decoded.deleted:
            log.info(
                "ignored changefeed delete of event %s at %s (events are immutable; restitch "
                "the entity if the delete was meant to remove it)",
                decoded.event_id,
                envelope.where(),
            )
    for envelope in stats.dead_letters:
        log.warning("dead letter %s: %s", envelope.where(), envelope.reason)
