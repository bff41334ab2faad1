"""What each command runs, built from settings: the only place that wires a process.

Telemetry is set up once here, per process; every loop gets the same ``stop`` event (set by
SIGTERM/SIGINT, or by a background thread that failed), and a failure of any part is raised
to the command line, which turns it into one line and a non-zero exit.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from stream_cps import retry, telemetry
from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import ConfigError
from stream_cps.observe import status as observe_status
from stream_cps.observe.health import Health
from stream_cps.observe.http import ObserveServer
from stream_cps.observe.status import Snapshot
from stream_cps.service import gc_tuning
from stream_cps.service.background import Background
from stream_cps.service.backlog import Backlog
from stream_cps.service.progress import Progress
from stream_cps.sources.changefeed.webhook import WebhookServer
from stream_cps.sources.messages import Envelope
from stream_cps.stitching import split
from stream_cps.stitching.erasure_store import Erasure, ErasureStore
from stream_cps.stitching.ingest import Applier, ApplyStats
from stream_cps.stitching.quarantine_store import Decision, Listed, QuarantineStore
from stream_cps.stitching.split_store import Recorded, SplitStore, Undone
from stream_cps.stitching.stitcher import Stitcher

log = logging.getLogger(__name__)


def run(settings: Settings, source: str, stop: threading.Event) -> Progress:
    """``stream-cps run``: stitching from ``source`` (postgres | kafka), plus calculation and
    the relay. On PostgreSQL these start once the lease is held (a standby would duplicate
    them); every Kafka member runs them (there is no lease on that path, so it can run on
    CockroachDB too; concurrent calculators may compute an entity twice, never wrongly)."""
    health = Health()
    server = _observe(settings, health, stop)
    backlog = Backlog()
    background = Background(settings, stop, backlog, health)
    try:
        if source == "kafka":
            from stream_cps.service.kafka import KafkaLoop

            kafka = KafkaLoop(settings, stop, backlog, health)
            gc_tuning.tune()
            background.start()
            progress = kafka.run()
        else:
            from stream_cps.service.replication import ReplicationLoop

            loop = ReplicationLoop(settings, stop, backlog, background.start, health)
            gc_tuning.tune()
            progress = loop.run()
    finally:
        stop.set()
        background.join()
        if server is not None:
            server.close()
    if background.failure is not None:
        raise background.failure
    return progress


def _observe(settings: Settings, health: Health, stop: threading.Event) -> ObserveServer | None:
    """Telemetry, plus (with ``http.address``) the probes, ``/metrics`` and the database
    sampler behind its gauges. The port is bound before any loop starts, so a taken port is
    one line and exit 2, not a half-started service."""
    if not settings.http.address:
        telemetry.setup(settings.telemetry)
        return None
    from stream_cps.observe.sampler import Sampler
    from stream_cps.sources.postgres.lease import SlotLease

    host, port = settings.http.host_port()
    registry = telemetry.enable_prometheus()
    telemetry.setup(settings.telemetry)
    try:
        server = ObserveServer(host, port, health, registry)
    except OSError as exc:
        raise ConfigError(f"http.address: cannot listen on {host}:{port}: {exc.strerror}") from exc

    def active(_options: Any) -> list[Any]:
        from opentelemetry.metrics import Observation

        return [Observation(1 if health.role in ("active", "member") else 0)]

    telemetry.gauge(telemetry.METRIC_ACTIVE, active)
    key = SlotLease(settings.dsn, settings.stitching.slot_name).key
    sampler = Sampler(settings, health, key)
    threading.Thread(target=sampler.run, args=(stop,), name="metrics", daemon=True).start()
    server.start()
    return server


def relay(settings: Settings, stop: threading.Event) -> None:
    """``stream-cps relay``: only the outbox relay, until ``stop`` is set."""
    from stream_cps.sinks.relay import Relay

    if not settings.opensearch.url:
        raise ConfigError("opensearch.url: required by `stream-cps relay`")
    telemetry.setup(settings.telemetry)
    Relay(settings).run_forever(stop)


def reindex(settings: Settings) -> int:
    """``stream-cps reindex``: queue an upsert of every calculated entity; the relay of a
    running service (or ``stream-cps relay``) delivers them. Returns how many were queued."""
    from stream_cps.sinks.outbox import OutboxStore

    with schema.checked(settings.dsn, settings.schemas, "reindex") as conn:
        return OutboxStore(settings.schemas).queue_all(conn)


def quarantine_list(settings: Settings, state: str | None) -> list[Listed]:
    """``stream-cps quarantine list``: the quarantined identifiers, oldest first."""
    with schema.checked(settings.dsn, settings.schemas, "quarantine") as conn:
        return QuarantineStore(settings.schemas).list(conn, state)


def quarantine_decide(
    settings: Settings, identifier: str, state: str, reason: str | None
) -> Decision:
    """``stream-cps quarantine release|block``: one transaction that sets the state and the
    purge signals of what must be restitched; a running service's sweep rebuilds them."""
    with schema.checked(settings.dsn, settings.schemas, "quarantine") as conn, conn.transaction():
        return QuarantineStore(settings.schemas).decide(conn, identifier, state, reason)


def split_decide(
    settings: Settings, entity_id: str, kind: str, target: str, reason: str, by: str | None
) -> Recorded:
    """``stream-cps split``: one READ COMMITTED transaction that stores the decision and the
    entity's purge signal (retried on a lost conflict); a running service's sweep rebuilds
    it with the decision applied."""
    with schema.checked(settings.dsn, settings.schemas, "split") as conn:
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        store = SplitStore(settings.schemas)

        def attempt() -> Recorded:
            with conn.transaction():
                return store.record(conn, entity_id, kind, target, reason, by)

        return retry.CONFLICT.call(attempt)


def split_undo(settings: Settings, decision: int, by: str | None) -> Undone:
    """``stream-cps split --undo``: mark it undone and set what it kept apart to be
    restitched, in one transaction; retried when it loses a deadlock against a batch (the
    batch holds the entities and waits for the decision's row, the undo the reverse)."""
    with schema.checked(settings.dsn, settings.schemas, "split") as conn:
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        store = SplitStore(settings.schemas)

        def attempt() -> Undone:
            with conn.transaction():
                return store.undo(conn, decision, by)

        return retry.CONFLICT.call(attempt)


def split_dry_run(
    settings: Settings, entity_id: str, kind: str, target: str
) -> tuple[str, split.Parts]:
    """``stream-cps split --dry-run``: the live entity and the parts the decision would leave
    (its events grouped afresh with the decision applied); read-only."""
    store = SplitStore(settings.schemas)
    with schema.checked(settings.dsn, settings.schemas, "split") as conn:
        conn.read_only = True
        with conn.transaction():
            entity = store.entity(conn, entity_id)
            store.check(conn, entity, kind, target)
            events = store.events_of(conn, entity)
    cut = {target} if kind == split.CUT else set()
    detached = {target} if kind == split.DETACH else set()
    return entity, split.parts(events, cut, detached)


def erase(
    settings: Settings,
    entity: str | None,
    identifier: str | None,
    reason: str | None,
    suppress: bool,
    yes: bool,
) -> Erasure:
    """``stream-cps erase``: one transaction that erases a person, writes the tombstones and
    the audit row, queues the OpenSearch delete and recounts the UI caches (so no value of
    theirs stays counted). Without ``yes`` the same transaction is rolled back: the counts
    are exactly what ``--yes`` would delete."""
    from stream_cps.attributes.cache import CacheRefresher

    with schema.checked(settings.dsn, settings.schemas, "erase") as conn:
        store = ErasureStore(settings.schemas, settings.opensearch.writes_outbox)
        with conn.transaction(force_rollback=not yes):
            done = store.erase(conn, store.resolve(conn, entity, identifier), reason, suppress)
            if yes:
                CacheRefresher(settings.schemas, settings.attributes.cache_interval).refresh(
                    conn, "erase"
                )
        return done


def explain(
    settings: Settings,
    entity_id: str | None,
    identifier: str | None,
    why: tuple[str, str] | None,
    fmt: str,
    limit: int,
) -> bytes:
    """``stream-cps explain``: one entity's identity, history and picture, or why two
    identifiers (or events) are one entity; read-only (docs/explain.md)."""
    from stream_cps.stitching.explain import queries, render

    ask = queries.Ask(entity_id, identifier, why)
    if fmt in render.PICTURE_FORMATS:
        render.require_dot(fmt)  # before reading a big entity for nothing
    with schema.checked(settings.dsn, settings.schemas, "explain") as conn:
        explanation = queries.load(conn, settings.schemas, ask, settings.stitching.rule_timeout_ms)
    return render.render(explanation, fmt, limit)


def status(settings: Settings, source: str) -> Snapshot:
    """``stream-cps status``: the snapshot of ``observe.status``; the Kafka group's lag too
    with ``source == "kafka"`` (a Kafka member holds no lease, so none is expected)."""
    from stream_cps.sources.postgres.lease import SlotLease

    slot = settings.stitching.slot_name
    key = SlotLease(settings.dsn, slot).key
    with schema.checked(settings.dsn, settings.schemas, "status", connect_timeout=5) as conn:
        snap = observe_status.read(conn, settings.schemas, slot, key)
    if source == "kafka":
        from stream_cps.sources.kafka.lag import group_lag

        snap.kafka = group_lag(settings.kafka)
    else:
        snap.notes.append("kafka: not queried (`status --source kafka` reads the group's lag)")
    return snap


def webhook_server(settings: Settings) -> WebhookServer:
    """The changefeed webhook, applying each request with the Kafka path's ingest. Its
    settings (TLS, client authentication) are checked before the database is."""
    ingest = WebhookIngest(settings)
    server = WebhookServer(settings.webhook, ingest, on_close=ingest.close)
    try:
        schema.check_database(settings.dsn, settings.schemas)
    except BaseException:
        server.httpd.server_close()
        raise
    return server


def webhook(settings: Settings, stop: threading.Event) -> None:
    """``stream-cps webhook``: serve until ``stop`` is set."""
    telemetry.setup(settings.telemetry)
    webhook_server(settings).serve(stop)


class WebhookIngest:
    """Applies a request's envelopes; database connections are pooled across requests.

    The server applies at most ``webhook.max_connections`` requests at once, so no more
    connections are open; the pool keeps at most that many idle ones and closes the rest, so a
    burst does not leave sessions behind."""

    def __init__(self, settings: Settings) -> None:
        self.dsn = settings.dsn
        self.applier = Applier(settings.schemas, Stitcher(settings))
        self.max_idle = settings.webhook.max_connections
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []

    def __call__(self, envelopes: list[Envelope]) -> dict[str, Any]:
        stats = self._apply(envelopes)
        return {
            "messages": stats.messages,
            "stitched": stats.stitch.events,
            "dead_letters": len(stats.dead_letters),
        }

    def _apply(self, envelopes: list[Envelope]) -> ApplyStats:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = connect(self.dsn, role="webhook", autocommit=True)
        try:
            return self.applier.apply(conn, envelopes)
        finally:
            self._put_back(conn)

    def _put_back(self, conn: psycopg.Connection[Any]) -> None:
        if not (conn.closed or conn.broken):
            with self._lock:
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
