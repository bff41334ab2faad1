"""``stream-cps status``: every number an operator checks first, from SQL in one place.

Each query is cheap on a large database: counts of waiting rows go through the partial indexes
that the pipeline uses itself (``stitched IS NULL``, entities due, pending outbox) and stop at
``CAP`` rows; the errors of the last day are counted in tables that stay small. Only
``max(stitched)`` has no index: it gets ``STATEMENT_TIMEOUT`` and is reported unknown past it
(a running service exports the same time as a metric). The same snapshot feeds the gauges of
``/metrics`` (``observe.sampler``), without the 24-hour counts and the last batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db.connect import APPLICATION_NAME
from stream_cps.db.server_settings import slow_settings
from stream_cps.sources.kafka.lag import PartitionLag

CAP = 100_000  # counts stop here: "at least" is enough to know the service is behind
STATEMENT_TIMEOUT = "5s"

# Health (the exit code of `status`): 0 ok, 1 degraded (the reasons listed), 2 unreachable.
EVENTS_STALE_AFTER = 60.0  # s an event may wait unstitched
OUTBOX_STALE_AFTER = 300.0  # s an OpenSearch command may wait undelivered
OK, DEGRADED, UNREACHABLE = 0, 1, 2


@dataclass(frozen=True)
class Session:
    pid: int
    client: str | None
    since: datetime | None


@dataclass(frozen=True)
class Slot:
    name: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    wal_status: str | None = None
    lag_bytes: int | None = None


@dataclass
class Snapshot:
    """What ``read`` found; ``None`` means not measured (see ``notes``)."""

    database: str
    role: str  # active (a process holds the lease) | none
    holder: Session | None
    standbys: list[Session]
    slot: Slot
    events_waiting: int
    events_waiting_oldest_age: float | None  # s since the oldest waiting event was inserted
    entities_due: int
    outbox_pending: int
    outbox_oldest_age: float | None
    outbox_parked: int | None = None
    last_stitched: datetime | None = None
    last_stitched_age: float | None = None
    dead_letters_24h: int | None = None
    rule_errors_24h: int | None = None
    attribute_errors_24h: int | None = None
    quarantined: int | None = None  # hub identifiers that link nothing (state quarantined)
    kafka: list[PartitionLag] | None = None
    # server settings that will make stitching slow as the data grows (warnings, not problems)
    settings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Why the service is degraded; empty when healthy."""
        out: list[str] = []
        if self.kafka is None and self.holder is None:
            out.append("no process holds the lease: no `stream-cps run` is active")
        if self.kafka is None and not self.slot.exists:
            out.append(f"replication slot {self.slot.name} does not exist (run `stream-cps init`)")
        if self.slot.wal_status == "lost":
            out.append(f"replication slot {self.slot.name} was invalidated (wal_status lost)")
        age = self.events_waiting_oldest_age
        if age is not None and age > EVENTS_STALE_AFTER:
            out.append(
                f"events wait unstitched for {age:.0f} s (more than {EVENTS_STALE_AFTER:.0f})"
            )
        age = self.outbox_oldest_age
        if age is not None and age > OUTBOX_STALE_AFTER:
            out.append(f"outbox commands wait for {age:.0f} s (more than {OUTBOX_STALE_AFTER:.0f})")
        if self.outbox_parked:
            out.append(f"{self.outbox_parked} outbox commands parked (cdp_attr.outbox.last_error)")
        return out

    @property
    def exit_code(self) -> int:
        return DEGRADED if self.problems else OK


def _one(conn: psycopg.Connection[Any], query: sql.Composable | str, *args: Any) -> Any:
    row = conn.execute(query, list(args)).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None


def _capped_count(conn: psycopg.Connection[Any], table: sql.Composable, where: str) -> int:
    query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} LIMIT %s) s").format(
        table, sql.SQL(where)
    )
    return int(_one(conn, query, CAP))


def lease_key_parts(key: int) -> tuple[int, int]:
    """pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def read_gauges(
    conn: psycopg.Connection[Any], schemas: Schemas, slot_name: str, lease_key: int
) -> Snapshot:
    """The cheap part (indexed or bounded queries): enough for a metric sampled every few s."""
    ce = sql.Identifier(schemas.ce, "customer_events")
    cdp = sql.Identifier(schemas.cdp, "customer_attributes")
    outbox = sql.Identifier(schemas.attr, "outbox")
    classid, objid = lease_key_parts(lease_key)
    holder_row = conn.execute(
        "SELECT a.pid, a.client_addr::text, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid::bigint = %s AND l.objid::bigint = %s",
        [classid, objid],
    ).fetchone()
    holder = Session(*holder_row) if holder_row else None
    standbys = [
        Session(*row)
        for row in conn.execute(
            "SELECT pid, client_addr::text, backend_start FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s AND pid <> %s "
            "ORDER BY backend_start",
            [f"{APPLICATION_NAME} lease", holder.pid if holder else 0],
        )
    ]
    slot_row = conn.execute(
        "SELECT active, active_pid, wal_status, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        [slot_name],
    ).fetchone()
    slot = Slot(slot_name, True, *slot_row) if slot_row else Slot(slot_name, False)
    waiting = _capped_count(conn, ce, "stitched IS NULL")
    oldest_waiting = _one(
        conn,
        sql.SQL(
            "SELECT extract(epoch FROM now() - min(created))::float8 FROM "
            "(SELECT created FROM {} WHERE stitched IS NULL LIMIT %s) s"
        ).format(ce),
        CAP,
    )
    due = _capped_count(conn, cdp, "calculated IS NULL OR calculated < modified")
    pending = _capped_count(conn, outbox, "delivered IS NULL AND NOT parked")
    oldest_pending = _one(
        conn,
        sql.SQL(
            "SELECT extract(epoch FROM now() - created)::float8 FROM {} "
            "WHERE delivered IS NULL AND NOT parked ORDER BY seq LIMIT 1"
        ).format(outbox),
    )
    database = str(_one(conn, "SELECT current_database()"))
    return Snapshot(
        database=database,
        role="active" if holder else "none",
        holder=holder,
        standbys=standbys,
        slot=slot,
        events_waiting=waiting,
        events_waiting_oldest_age=oldest_waiting,
        entities_due=due,
        outbox_pending=pending,
        outbox_oldest_age=oldest_pending,
    )


def read(
    conn: psycopg.Connection[Any], schemas: Schemas, slot_name: str, lease_key: int
) -> Snapshot:
    """Everything ``stream-cps status`` shows, on an autocommit connection."""
    snap = read_gauges(conn, schemas, slot_name, lease_key)
    ps, attr = schemas.ps, schemas.attr
    day = "created > now() - interval '24 hours'"
    snap.outbox_parked = _capped_count(conn, sql.Identifier(attr, "outbox"), "parked")
    snap.dead_letters_24h = _capped_count(conn, sql.Identifier(ps, "kafka_dead_letters"), day)
    snap.rule_errors_24h = _capped_count(conn, sql.Identifier(ps, "stitching_errors"), day)
    snap.attribute_errors_24h = _capped_count(conn, sql.Identifier(attr, "attribute_errors"), day)
    snap.quarantined = _capped_count(
        conn, sql.Identifier(ps, "quarantined_identifiers"), "state = 'quarantined'"
    )
    snap.settings = slow_settings(conn, schemas)
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
            row = conn.execute(
                sql.SQL(
                    "SELECT max(stitched), extract(epoch FROM now() - max(stitched))::float8 "
                    "FROM {}"
                ).format(sql.Identifier(schemas.ce, "customer_events"))
            ).fetchone()
        if row:
            snap.last_stitched, snap.last_stitched_age = row
    except psycopg.errors.QueryCanceled:
        snap.notes.append(f"last batch: unknown (max(stitched) took over {STATEMENT_TIMEOUT})")
    return snap


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def _session(s: Session) -> str:
    since = s.since.isoformat(timespec="seconds") if s.since else "?"
    return f"pid {s.pid} ({s.client or 'local socket'}, since {since})"


def render(snap: Snapshot) -> str:
    """The one screen: a line per concern, then the verdict."""
    role = f"active: {_session(snap.holder)}" if snap.holder else "no active process"
    role += f"; {len(snap.standbys)} standby" + ("" if len(snap.standbys) == 1 else "s")
    role += "".join(f"\n{'':14}standby: {_session(s)}" for s in snap.standbys)
    slot = snap.slot
    if slot.exists:
        reading = f"read by pid {slot.active_pid}" if slot.active else "not being read"
        slot_line = (
            f"{slot.name}: {reading}, lag {slot.lag_bytes} bytes, wal_status {slot.wal_status}"
        )
    else:
        slot_line = f"{slot.name}: does not exist"
    at_least = "at least " if snap.events_waiting >= CAP else ""
    last = "never" if snap.last_stitched is None else f"{_age(snap.last_stitched_age)} ago"
    lines = [
        f"database      {snap.database}",
        f"role          {role}",
        f"slot          {slot_line}",
        f"events        {at_least}{snap.events_waiting} waiting (oldest "
        f"{_age(snap.events_waiting_oldest_age)}); last batch {last}",
        f"entities      {snap.entities_due} due for calculation",
        f"outbox        {snap.outbox_pending} pending (oldest {_age(snap.outbox_oldest_age)}), "
        f"{snap.outbox_parked} parked",
        f"last 24 h     {snap.dead_letters_24h} dead letters, {snap.rule_errors_24h} rule "
        f"errors, {snap.attribute_errors_24h} attribute errors",
        f"quarantine    {snap.quarantined} identifiers quarantined (`stream-cps quarantine list`)",
    ]
    if snap.kafka is not None:
        total = sum(p.lag for p in snap.kafka)
        lines.append(f"kafka         group lag {total} messages")
        lines += [
            f"{'':14}{p.topic}[{p.partition}]: lag {p.lag} (committed "
            f"{'none' if p.committed is None else p.committed}, end {p.end})"
            for p in snap.kafka
        ]
    lines += [f"settings      {warning}" for warning in snap.settings]
    lines += [f"note          {note}" for note in snap.notes]
    problems = snap.problems
    lines.append("health        " + ("ok" if not problems else "degraded"))
    lines += [f"{'':14}- {p}" for p in problems]
    return "\n".join(lines)


def to_json(snap: Snapshot) -> str:
    data = asdict(snap)
    if snap.kafka is not None:
        data["kafka"] = [{**asdict(p), "lag": p.lag} for p in snap.kafka]
    data["problems"] = snap.problems
    data["health"] = "ok" if not snap.problems else "degraded"
    data["exit_code"] = snap.exit_code
    return json.dumps(data, default=str, indent=2)
