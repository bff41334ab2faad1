"""Stitching rules: load, validate and evaluate ``value_expression`` in PostgreSQL, set-based.

All rules that match a batch's events are evaluated by one query: each rule is one arm of a
``UNION ALL`` inside a ``LATERAL`` subquery over the event row, so an expression sees the event's
columns (id, source_id, type, version, event_time, payload) unqualified, as in the guide, and a
set-returning expression yields several values. Rule matching values go in as parameters; the
expressions themselves are admin-written SQL and are embedded as such.

A rule that does not even plan (syntax error, unknown column, ``:`` in its attribute id) is
reported by name at load time and left out. A rule that fails on some event at run time is
isolated: the batch is re-evaluated without the failing (rule, event) pairs, which are recorded.
A rule that has failed on ``stitching.rule_max_failures`` events is disabled, with one error,
until its row changes: a rule that fails on every event must not write an error per event.

The expressions are admin-written SQL: checked by ``db/sqllex`` at load, and always evaluated in
the rules sandbox (``db/sandbox``: read-only, ``stitching.rule_timeout_ms``, as a role that can
read the events table and nothing else), so a rule cannot reset a sequence or hold stitching
for as long as it likes. A rule that alone cannot evaluate a batch within the timeout is
disabled at once.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import PyFormat

from stream_cps.config import Schemas
from stream_cps.db import roles, sandbox, sqllex
from stream_cps.db.arrays import TextArray
from stream_cps.db.timestamps import fetch_all
from stream_cps.errors import DefinitionError
from stream_cps.stitching.normalize import SEPARATOR, Blocklist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One row of stitching_attributes_config joined to the event type it applies to."""

    attribute_id: str
    event_id: str
    expression: str
    source_id: str | None
    type: str | None
    version: str | None


@dataclass(frozen=True)
class RuleFailure:
    """A problem met stitching an event, for ``stitching_errors``; ``attribute_id`` names the
    rule, or is None when the event itself is the problem (an out-of-range event_time)."""

    attribute_id: str | None
    event_id: str | None
    message: str
    rule: Rule | None = None
    disable: bool = False  # the rule is disabled at once (it timed out on its own)


@dataclass
class RuleSet:
    rules: list[Rule]
    blocklist: Blocklist
    broken: list[DefinitionError] = field(default_factory=list)


# Where a sweep pass stands: (event_time as PostgreSQL prints it, event id) of the last event
# read. Text, not a datetime: it round-trips every timestamptz exactly, 'infinity' included.
Cursor = tuple[str, str]


@dataclass
class Extracted:
    """Per event: its time and raw (attribute id, value) pairs; plus isolated failures, and
    (for the sweep) the cursor after the last event in (event_time, id) order."""

    events: dict[str, tuple[datetime, list[tuple[str, str | None]]]]
    failures: list[RuleFailure]
    last: Cursor | None = None


class RuleBook:
    """Holds the current rule set; reloads it when the configuration tables change, and
    leaves out rules that failed too often (``max_failures``; 0 = never)."""

    def __init__(self, schemas: Schemas, max_failures: int = 0, timeout_ms: int = 5000) -> None:
        self.schemas = schemas
        self.max_failures = max_failures
        self.timeout_ms = timeout_ms
        self._fingerprint: tuple[object, ...] | None = None
        self.current = RuleSet([], Blocklist())
        # Counted per Rule, which holds its whole row: a changed row is a new rule, counted
        # from zero. The read-ahead threads (sweep, Kafka) report failures and reload too,
        # hence the lock; reentrant, as a reload holds it while it validates and prunes.
        self._failed: Counter[Rule] = Counter()
        self._disabled: set[Rule] = set()
        self._lock = threading.RLock()

    def note(self, failures: Sequence[RuleFailure]) -> list[RuleFailure]:
        """Count run-time failures per rule; returns one failure more per rule disabled now."""
        notices: list[RuleFailure] = []
        disabled = False
        with self._lock:
            for failure in failures:
                rule = failure.rule
                if rule is None or rule in self._disabled:
                    continue
                if failure.disable:
                    self._disabled.add(rule)
                    disabled = True
                    log.error("%s", failure.message)
                    continue
                if not self.max_failures:
                    continue
                self._failed[rule] += 1
                if self._failed[rule] < self.max_failures:
                    continue
                self._disabled.add(rule)
                message = (
                    f"stitching rule {rule.attribute_id}/{rule.event_id} disabled after "
                    f"{self._failed[rule]} failed events (stitching.rule_max_failures); "
                    "fix its value_expression: changing its row enables it again"
                )
                log.error("%s", message)
                notices.append(RuleFailure(rule.attribute_id, None, message, rule))
            if notices or disabled:
                self.current = RuleSet(
                    [r for r in self.current.rules if r not in self._disabled],
                    self.current.blocklist,
                    self.current.broken,
                )
        return notices

    def refresh(self, conn: psycopg.Connection[Any]) -> RuleSet:
        """Reload rules and blocklist if they changed (one round trip when they did not).

        The same object comes back while nothing changed (the Kafka path compares them: a
        batch whose rules were evaluated ahead with another set evaluates them again). The
        comparison and the reload hold the lock: two threads reloading at once would
        otherwise leave one's rule set under the other's fingerprint."""
        s = self.schemas
        with conn.pipeline():  # both reads in one round trip
            rules_read = conn.execute(
                sql.SQL(
                    "SELECT c.attribute_id, c.event_id, c.value_expression, e.source_id, "
                    "e.type, e.version FROM {cfg} c JOIN {events} e ON e.id = c.event_id "
                    "ORDER BY c.attribute_id, c.event_id"
                ).format(
                    cfg=sql.Identifier(s.ps, "stitching_attributes_config"),
                    events=sql.Identifier(s.cdp, "events"),
                )
            )
            blocked_read = conn.execute(
                sql.SQL("SELECT attribute_id, value FROM {} ORDER BY 1, 2").format(
                    sql.Identifier(s.ps, "identifier_blocklist")
                )
            )
        rows, blocked = rules_read.fetchall(), blocked_read.fetchall()
        fingerprint = (tuple(rows), tuple(blocked))
        with self._lock:
            if fingerprint == self._fingerprint:
                return self.current
            rules, broken = [], []
            loaded = {Rule(*row) for row in rows}
            self._disabled &= loaded
            self._failed = Counter({r: n for r, n in self._failed.items() if r in loaded})
            for row in rows:
                rule = Rule(*row)
                if rule in self._disabled:
                    continue
                problem = self._validate(conn, rule)
                if problem:
                    broken.append(
                        DefinitionError(
                            f"stitching rule {rule.attribute_id}/{rule.event_id}", problem
                        )
                    )
                    log.error(
                        "stitching rule %s/%s is broken and skipped: %s",
                        rule.attribute_id,
                        rule.event_id,
                        problem,
                    )
                else:
                    rules.append(rule)
            self.current = RuleSet(rules, Blocklist.from_rows(blocked), broken)
            self._fingerprint = fingerprint
            log.info("loaded %d stitching rules (%d broken)", len(rules), len(broken))
            return self.current

    def _validate(self, conn: psycopg.Connection[Any], rule: Rule) -> str | None:
        if SEPARATOR in rule.attribute_id:
            return f"attribute id must not contain {SEPARATOR!r}"
        if not (rule.expression or "").strip():
            return "value_expression is empty"
        problem = sqllex.problem(rule.expression)
        if problem:
            return problem
        query = sql.SQL("SELECT ({})::text FROM {} LIMIT %(rows)s").format(
            sql.SQL(rule.expression.replace("%", "%%")),
            sql.Identifier(self.schemas.ce, "customer_events"),
        )
        try:
            _evaluate(conn, self.timeout_ms, query, {"rows": 0})
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            return _message(exc)
        return None


def _evaluate(
    conn: psycopg.Connection[Any], timeout_ms: int, query: Any, params: dict[str, object]
) -> list[tuple[Any, ...]]:
    """Rows of a query holding rule expressions, run in the rules sandbox."""
    with sandbox.read_only(conn, timeout_ms, roles.RULES):
        return fetch_all(conn, query, params)


def _timed_out(exc: psycopg.Error) -> bool:
    """Our statement timeout, not an operator's cancel (which stops the batch)."""
    return isinstance(exc, psycopg.errors.QueryCanceled) and "timeout" in _message(exc)


def _raise_unless_isolable(conn: psycopg.Connection[Any], exc: psycopg.Error) -> None:
    """A rule's error or timeout is isolated; a lost connection or an operator's cancel is
    the batch's, and raised."""
    if conn.broken or conn.closed:
        raise exc
    if isinstance(exc, psycopg.errors.QueryCanceled) and not _timed_out(exc):
        raise exc


def extract(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rules: Sequence[Rule],
    event_ids: list[str],
    timeout_ms: int,
) -> Extracted:
    """Evaluate every rule against the unstitched events among ``event_ids``, in one query."""
    try:
        rows = _evaluate(conn, timeout_ms, *_by_ids(schemas, rules, event_ids))
        return _collect(rows, rules, [])
    except psycopg.Error as exc:
        _raise_unless_isolable(conn, exc)
        log.warning("rule evaluation failed for a batch of %d events; isolating", len(event_ids))
    return _isolate(conn, schemas, rules, event_ids, timeout_ms)


def extract_rows(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rules: Sequence[Rule],
    source: sql.Composable,
    params: dict[str, object],
    timeout_ms: int,
) -> Extracted | None:
    """Evaluate every rule against rows not stored yet (``source`` selects them in the events
    table's shape: the Kafka path stores its events already stitched). None when a rule or a
    row fails: the caller then stores the rows first and ``extract`` isolates the failure."""
    try:
        rows = _evaluate(conn, timeout_ms, *_query(schemas, rules, source, params))
    except psycopg.Error as exc:
        _raise_unless_isolable(conn, exc)
        log.info("rules failed on a batch before its insert; stitching it after the insert")
        return None
    return _collect(rows, rules, [])


def extract_next(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rules: Sequence[Rule],
    limit: int,
    after: Cursor | None,
    timeout_ms: int,
) -> Extracted:
    """Evaluate every rule against the next ``limit`` unstitched events after ``after`` in
    (event_time, id) order, finding and reading them in the same query (the sweep's read).

    When the query fails, the events are named first and evaluated by id as in ``extract``,
    which isolates the failing (rule, event) pairs. A timeout here need not be a rule's: while
    a long transaction (the guide's restitch of everything) holds uncommitted unstitched rows,
    the scan walks their index entries, and the same rules by id run in time.
    """
    source = sql.SQL(
        "SELECT * FROM {events} WHERE stitched IS NULL {after} "
        "ORDER BY event_time, id LIMIT {limit}"
    ).format(
        events=sql.Identifier(schemas.ce, "customer_events"),
        after=sql.SQL("AND (event_time, id) > (%(after_time)s::timestamptz, %(after_id)s)")
        if after
        else sql.SQL(""),
        limit=sql.Placeholder("limit"),
    )
    params: dict[str, object] = {"limit": limit}
    if after:
        params["after_time"], params["after_id"] = after
    try:
        rows = _evaluate(conn, timeout_ms, *_query(schemas, rules, source, params, ordered=True))
        extracted = _collect(rows, rules, [])
        extracted.last = _cursor(rows)
        return extracted
    except psycopg.Error as exc:
        _raise_unless_isolable(conn, exc)
        if _timed_out(exc):
            log.warning(
                "reading the next %d unstitched events with the rules took longer than "
                "stitching.rule_timeout_ms (%d ms; a long transaction on customer_events slows "
                "the scan); evaluating them by id",
                limit,
                timeout_ms,
            )
        else:
            log.warning(
                "rule evaluation failed for the next %d unstitched events (%s); evaluating "
                "them by id",
                limit,
                _message(exc),
            )
    with conn.transaction():
        found = conn.execute(
            sql.SQL(
                "SELECT id, event_time::text FROM ({}) ev ORDER BY ev.event_time, ev.id"
            ).format(source),
            params,
        ).fetchall()
    extracted = extract(conn, schemas, rules, [str(r[0]) for r in found], timeout_ms)
    extracted.last = _cursor(found)
    return extracted


def _cursor(rows: Sequence[tuple[Any, ...]]) -> Cursor | None:
    """The cursor after the last of ``rows`` (in sweep order: id first, time text last)."""
    return (str(rows[-1][-1]), str(rows[-1][0])) if rows else None


def values_of(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rules: Sequence[Rule],
    event_ids: list[str],
    timeout_ms: int,
) -> Extracted:
    """The rules' raw values for ``event_ids`` whether stitched or not (``explain``: what a
    blocklist or the hub guard held back). A failing rule fails the call: nothing is isolated
    or recorded, the caller reports it."""
    rows = _evaluate(conn, timeout_ms, *_by_ids(schemas, rules, event_ids, unstitched=False))
    return _collect(rows, rules, [])


def _by_ids(
    schemas: Schemas, rules: Sequence[Rule], event_ids: list[str], unstitched: bool = True
) -> tuple[sql.Composed, dict[str, object]]:
    source = sql.SQL("SELECT * FROM {events} WHERE id = ANY({ids}){only}").format(
        events=sql.Identifier(schemas.ce, "customer_events"),
        ids=sql.Placeholder("ids", PyFormat.BINARY),
        only=sql.SQL(" AND stitched IS NULL" if unstitched else ""),
    )
    return _query(schemas, rules, source, {"ids": TextArray(event_ids)})


def _query(
    schemas: Schemas,
    rules: Sequence[Rule],
    source: sql.Composable,
    params: dict[str, object],
    ordered: bool = False,
) -> tuple[sql.Composed, dict[str, object]]:
    """Every rule as one arm of a LATERAL UNION ALL over the events ``source`` selects; rows
    in (event_time, id) order when ``ordered`` (the sweep's cursor is the last one)."""
    params = dict(params)
    parts = []
    for n, rule in enumerate(rules):
        params[f"s{n}"], params[f"t{n}"], params[f"v{n}"] = rule.source_id, rule.type, rule.version
        parts.append(
            sql.SQL(
                "SELECT {n}::int AS rule, ({expr})::text AS value WHERE ev.source_id = {s} "
                "AND ev.type = {t} AND ev.version = {v}"
            ).format(
                n=sql.Literal(n),
                # '%' is psycopg's placeholder mark; a LIKE pattern in a rule must survive it.
                expr=sql.SQL(rule.expression.replace("%", "%%")),
                s=sql.Placeholder(f"s{n}"),
                t=sql.Placeholder(f"t{n}"),
                v=sql.Placeholder(f"v{n}"),
            )
        )
    lateral = (
        sql.SQL(" UNION ALL ").join(parts)
        if parts
        else sql.SQL("SELECT NULL::int AS rule, NULL::text AS value WHERE false")
    )
    # The sweep also takes each row's time as PostgreSQL prints it, for its cursor.
    query = sql.SQL(
        "SELECT ev.id, ev.event_time, x.rule, x.value{cursor} FROM ({source}) ev "
        "LEFT JOIN LATERAL ({lateral}) x ON true{order}"
    ).format(
        source=source,
        lateral=lateral,
        cursor=sql.SQL(", ev.event_time::text") if ordered else sql.SQL(""),
        order=sql.SQL(" ORDER BY ev.event_time, ev.id") if ordered else sql.SQL(""),
    )
    return query, params


def _collect(
    rows: Sequence[tuple[Any, ...]], rules: Sequence[Rule], failures: list[RuleFailure]
) -> Extracted:
    events: dict[str, tuple[datetime, list[tuple[str, str | None]]]] = {}
    for event_id, event_time, rule_no, value, *_ in rows:
        entry = events.setdefault(str(event_id), (event_time, []))
        if rule_no is not None:
            entry[1].append((rules[rule_no].attribute_id, None if value is None else str(value)))
    return Extracted(events, failures)


def _isolate(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rules: Sequence[Rule],
    event_ids: list[str],
    timeout_ms: int,
) -> Extracted:
    """Slow path: find the failing (rule, event) pairs and evaluate the rest without them. A
    rule that times out on its own is not split further: it is disabled (one failure)."""
    failures: list[RuleFailure] = []
    good_rules: list[Rule] = []
    bad_rules: list[Rule] = []
    for rule in rules:
        try:
            _evaluate(conn, timeout_ms, *_by_ids(schemas, [rule], event_ids))
            good_rules.append(rule)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            if _timed_out(exc):
                failures.append(_too_slow(rule, len(event_ids), timeout_ms))
            else:
                bad_rules.append(rule)
    rows = _evaluate(conn, timeout_ms, *_by_ids(schemas, good_rules, event_ids))
    extracted = _collect(rows, good_rules, failures)
    for rule in bad_rules:
        for event_id, value in _split_until_clean(
            conn, schemas, rule, event_ids, failures, timeout_ms
        ):
            if event_id in extracted.events:
                extracted.events[event_id][1].append((rule.attribute_id, value))
    return extracted


def _too_slow(rule: Rule, events: int, timeout_ms: int) -> RuleFailure:
    message = (
        f"stitching rule {rule.attribute_id}/{rule.event_id} disabled: evaluating it over "
        f"{events} events took longer than stitching.rule_timeout_ms ({timeout_ms} ms); "
        "changing its row enables it again"
    )
    return RuleFailure(rule.attribute_id, None, message, rule, disable=True)


def _split_until_clean(
    conn: psycopg.Connection[Any],
    schemas: Schemas,
    rule: Rule,
    event_ids: list[str],
    failures: list[RuleFailure],
    timeout_ms: int,
) -> list[tuple[str, str | None]]:
    """Values of ``rule`` for the events it does not fail on, halving the failing sets: a rule
    that fails on k of n events costs about k * log2(n) queries, not n."""
    try:
        rows = _evaluate(conn, timeout_ms, *_by_ids(schemas, [rule], event_ids))
        return [(str(r[0]), r[3]) for r in rows if r[2] is not None]
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            raise
        if len(event_ids) == 1:
            failures.append(RuleFailure(rule.attribute_id, event_ids[0], _message(exc), rule))
            log.error(
                "stitching rule %s failed on event %s: %s",
                rule.attribute_id,
                event_ids[0],
                _message(exc),
            )
            return []
    middle = len(event_ids) // 2
    return [
        *_split_until_clean(conn, schemas, rule, event_ids[:middle], failures, timeout_ms),
        *_split_until_clean(conn, schemas, rule, event_ids[middle:], failures, timeout_ms),
    ]


def _message(exc: psycopg.Error) -> str:
    diag = exc.diag
    return (diag.message_primary or str(exc)).strip()
