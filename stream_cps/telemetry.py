"""OpenTelemetry set-up, every span and metric name stream-cps emits, and trace propagation.

Names live here once so that dashboards and code cannot drift apart. Exporting is chosen by
configuration: ``none`` (default; the API's no-op providers), ``console`` or ``otlp`` (HTTP).
The standard ``OTEL_*`` variables override our settings where both say the same thing
(docs/configuration.md): a platform that injects them describes the deployment.

One trace per unit of work: a loop opens a root span only once it knows there is work (a poll
that returned something), so an idle service exports nothing; the poll's own span is recorded
afterwards with its real start and end (``record``).
``enable_prometheus`` adds a Prometheus scrape of the same metrics (``http.address``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stream_cps.config import TelemetrySettings

# Spans: one root per batch (``source.batch``: poll -> stitch -> ack/commit, or
# ``stitch.sweep`` for a sweep with work), one per stage inside it.
SPAN_STITCH_BATCH = "stitch.batch"
SPAN_STITCH_EXTRACT = "stitch.extract"
SPAN_STITCH_GROUP = "stitch.group"
SPAN_STITCH_WRITE = "stitch.write"
SPAN_STITCH_PURGE = "stitch.purge"
SPAN_SOURCE_POLL = "source.poll"
SPAN_SOURCE_ACK = "source.ack"
SPAN_SOURCE_BATCH = "source.batch"
SPAN_SOURCE_COMMIT = "source.commit"
SPAN_STITCH_SWEEP = "stitch.sweep"
SPAN_WEBHOOK_REQUEST = "webhook.request"
SPAN_ATTR_BATCH = "attributes.batch"
SPAN_ATTR_CONTEXT = "attributes.context"
SPAN_ATTR_CACHE = "attributes.cache"
SPAN_OUTBOX_RELAY = "outbox.relay"

# Metrics.
METRIC_EVENTS_STITCHED = "stream_cps.events.stitched"
METRIC_ENTITIES_MERGED = "stream_cps.entities.merged"
METRIC_ENTITIES_CREATED = "stream_cps.entities.created"
METRIC_ENTITIES_PURGED = "stream_cps.entities.purged"
METRIC_RULE_ERRORS = "stream_cps.rules.errors"
METRIC_IDENTIFIERS_QUARANTINED = "stream_cps.identifiers.quarantined"
METRIC_ERASED_DROPPED = "stream_cps.events.erased_dropped"
METRIC_BATCH_DURATION = "stream_cps.batch.duration"
METRIC_KAFKA_LAG = "stream_cps.kafka.lag"
METRIC_SLOT_LAG = "stream_cps.slot.lag_bytes"
METRIC_ENTITIES_CALCULATED = "stream_cps.entities.calculated"
METRIC_ATTRIBUTE_ERRORS = "stream_cps.attributes.errors"
METRIC_OUTBOX_DELIVERED = "stream_cps.outbox.delivered"
METRIC_OUTBOX_RETRIED = "stream_cps.outbox.retried"
METRIC_OUTBOX_PARKED = "stream_cps.outbox.parked"
# Per committed batch: the oldest event's wait from insert (created) to stitched, in s.
METRIC_EVENTS_LATENCY = "stream_cps.events.latency"
METRIC_CALCULATION_LATENCY = "stream_cps.attributes.latency"
METRIC_DELIVERY_LATENCY = "stream_cps.outbox.latency"
METRIC_LAST_BATCH = "stream_cps.batch.last_time"  # unix time of the last committed batch
METRIC_DEAD_LETTERS = "stream_cps.dead_letters"  # attribute reason: its first words
# Sampled from the database every http.sample_interval s (observe/sampler.py).
METRIC_EVENTS_WAITING = "stream_cps.events.waiting"
METRIC_EVENTS_WAITING_AGE = "stream_cps.events.waiting_oldest_age"
METRIC_ENTITIES_DUE = "stream_cps.entities.due"
METRIC_OUTBOX_PENDING = "stream_cps.outbox.pending"
METRIC_OUTBOX_OLDEST_AGE = "stream_cps.outbox.oldest_age"
METRIC_ACTIVE = "stream_cps.active"  # 1 while this process holds the lease (or consumes Kafka)

# Each metric's kind, unit and help line: the Prometheus HELP text, and what the dashboards
# and tests/unit/test_dashboards.py check the panels against.
METRICS: dict[str, tuple[str, str, str]] = {
    METRIC_EVENTS_STITCHED: ("counter", "", "events stitched (committed batches)"),
    METRIC_ENTITIES_MERGED: ("counter", "", "entities merged into another"),
    METRIC_ENTITIES_CREATED: ("counter", "", "entities created"),
    METRIC_ENTITIES_PURGED: ("counter", "", "entities purged by a restitch signal"),
    METRIC_RULE_ERRORS: ("counter", "", "stitching rule failures (cdp_ps.stitching_errors)"),
    METRIC_IDENTIFIERS_QUARANTINED: ("counter", "", "identifiers quarantined as hubs"),
    METRIC_ERASED_DROPPED: ("counter", "", "erased events that came back and were dropped"),
    METRIC_BATCH_DURATION: ("histogram", "s", "one stitching transaction, retries included"),
    METRIC_SLOT_LAG: ("gauge", "By", "WAL the replication slot holds back"),
    METRIC_KAFKA_LAG: ("gauge", "", "messages behind on this Kafka member's partitions"),
    METRIC_ENTITIES_CALCULATED: ("counter", "", "entities whose attributes were calculated"),
    METRIC_ATTRIBUTE_ERRORS: ("counter", "", "attribute definitions that failed on an entity"),
    METRIC_OUTBOX_DELIVERED: ("counter", "", "outbox commands delivered to OpenSearch"),
    METRIC_OUTBOX_RETRIED: ("counter", "", "outbox commands left pending for a retry"),
    METRIC_OUTBOX_PARKED: ("counter", "", "outbox commands parked (can never succeed)"),
    METRIC_EVENTS_LATENCY: (
        "histogram",
        "s",
        "per batch, the oldest event's wait from insert (created) to stitched",
    ),
    METRIC_CALCULATION_LATENCY: (
        "histogram",
        "s",
        "per calculation batch, the oldest entity's wait from its stitching change to stored",
    ),
    METRIC_DELIVERY_LATENCY: (
        "histogram",
        "s",
        "per relay batch, the oldest command's wait from the outbox to delivered",
    ),
    METRIC_LAST_BATCH: ("gauge", "s", "unix time of the last committed stitching batch"),
    METRIC_DEAD_LETTERS: ("counter", "", "dead letters, by the first words of their reason"),
    METRIC_EVENTS_WAITING: ("gauge", "", "events with stitched IS NULL (capped at 100000)"),
    METRIC_EVENTS_WAITING_AGE: ("gauge", "s", "age of the oldest event waiting to be stitched"),
    METRIC_ENTITIES_DUE: ("gauge", "", "entities due for calculation (capped at 100000)"),
    METRIC_OUTBOX_PENDING: ("gauge", "", "outbox commands waiting for delivery (capped)"),
    METRIC_OUTBOX_OLDEST_AGE: ("gauge", "s", "age of the oldest pending outbox command"),
    METRIC_ACTIVE: ("gauge", "", "1 while this process stitches (lease held, or Kafka member)"),
}


def describe(name: str) -> str:
    """The help line of a metric (``METRICS``)."""
    return METRICS[name][2]


def counter(name: str) -> metrics.Counter:
    """A counter with its ``METRICS`` unit and help line."""
    return meter().create_counter(name, unit=METRICS[name][1], description=describe(name))


def histogram(name: str) -> metrics.Histogram:
    """A histogram with its unit, help line and, for seconds, ``SECONDS_BUCKETS``."""
    unit = METRICS[name][1]
    return meter().create_histogram(
        name,
        unit=unit,
        description=describe(name),
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS if unit == "s" else None,
    )


def gauge(name: str, callback: metrics.CallbackT) -> metrics.ObservableGauge:
    """An observable gauge (read at collection: a scrape or an export) with its unit and help."""
    return meter().create_observable_gauge(
        name, [callback], unit=METRICS[name][1], description=describe(name)
    )


# Seconds from milliseconds to minutes: the default buckets are for milliseconds.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

TRACER_NAME = "stream_cps"

_configured = False
_W3C = TraceContextTextMapPropagator()
_SDK_EXPORTERS = ("none", "console", "otlp")


def trace_exporter(configured: str, environ: Mapping[str, str]) -> str:
    """Where spans go: ``OTEL_SDK_DISABLED=true`` turns them off, ``OTEL_TRACES_EXPORTER``
    (none | console | otlp) overrides ``telemetry.exporter``."""
    if _disabled(environ):
        return "none"
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return chosen if chosen in _SDK_EXPORTERS else configured


def otlp_endpoint(configured: str, signal: str, environ: Mapping[str, str]) -> str:
    """The OTLP/HTTP URL for ``signal`` (traces | metrics), as the specification orders them:
    ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`` as is, else ``OTEL_EXPORTER_OTLP_ENDPOINT`` plus
    ``/v1/<signal>``, else ``telemetry.otlp_endpoint`` plus ``/v1/<signal>``."""
    exact = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip()
    if exact:
        return exact
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or configured
    return f"{base.rstrip('/')}/v1/{signal}"


def resource(settings: TelemetrySettings) -> Any:
    """``service.name`` from ``telemetry.service_name`` unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` name it; every ``OTEL_RESOURCE_ATTRIBUTES`` pair is added."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    ours = Resource.create({"service.name": settings.service_name})
    return ours.merge(OTELResourceDetector().detect())


_metric_readers: list[Any] = []


def enable_prometheus() -> Any:
    """Also export every metric for a Prometheus scrape; returns the ``CollectorRegistry`` to
    serve. Call before ``setup`` (the meter provider is installed once, with its readers).

    The registry also carries prometheus-client's standard process and garbage-collector
    series (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
    ``python_gc_collections_total``...): what a dashboard expects of any Python service, and
    how one sees the collector settings of ``service/gc_tuning.py`` at work."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

    registry = CollectorRegistry()
    _metric_readers.append(PrometheusMetricReader(registry=registry))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def setup(settings: TelemetrySettings) -> None:
    """Install tracer and meter providers once per process, as configured (the wiring layer,
    ``stream_cps.service.process``, is the only caller).

    The sampler (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), the batch processor
    (``OTEL_BSP_*``), span limits (``OTEL_SPAN_LINK_COUNT_LIMIT``...) and exporter headers,
    timeout and compression (``OTEL_EXPORTER_OTLP_*``) are the SDK's own and read from the
    environment by it."""
    global _configured
    if _configured:
        return
    environ = os.environ
    spans_to = trace_exporter(settings.exporter, environ)
    metrics_to = "none" if _disabled(environ) else settings.exporter
    if spans_to == "none" and metrics_to == "none" and not _metric_readers:
        return
    res = resource(settings)
    if spans_to != "none":
        _setup_tracing(settings, spans_to, res)
    if metrics_to != "none":
        _setup_metrics(settings, metrics_to, res)
    else:  # metrics for Prometheus only
        _install_meters(res, [])
    _configured = True


def _disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _setup_tracing(settings: TelemetrySettings, exporter: str, res: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter: Any = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = otlp_endpoint(settings.otlp_endpoint, "traces", os.environ)
        span_exporter = OTLPSpanExporter(endpoint=url)
    tracer_provider = TracerProvider(resource=res)  # sampler: OTEL_TRACES_SAMPLER
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)


def _setup_metrics(settings: TelemetrySettings, exporter: str, res: Any) -> None:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        metric_exporter: Any = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        url = otlp_endpoint(settings.otlp_endpoint, "metrics", os.environ)
        metric_exporter = OTLPMetricExporter(endpoint=url)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=10_000)
    _install_meters(res, [reader])


def _install_meters(res: Any, readers: list[Any]) -> None:
    """One meter provider with the push ``readers`` and any Prometheus reader."""
    from opentelemetry.sdk.metrics import MeterProvider

    all_readers = [*readers, *_metric_readers]
    metrics.set_meter_provider(MeterProvider(resource=res, metric_readers=all_readers))


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def meter() -> metrics.Meter:
    return metrics.get_meter(TRACER_NAME)


# -- spans of a unit of work ---------------------------------------------------------------


def now() -> int:
    """A span timestamp (ns since the epoch), taken before work whose span may not exist."""
    return time.time_ns()


def start_root(
    name: str,
    start: int,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Iterable[trace.Link] = (),
) -> trace.Span:
    """A new trace for one unit of work that began at ``start``, whatever context is current
    (a batch never continues another batch's trace); the caller ends it."""
    return tracer().start_span(
        name,
        context=otel_context.Context(),
        kind=kind,
        attributes=dict(attributes or {}),
        links=list(links),
        start_time=start,
    )


@contextmanager
def root(
    name: str,
    start: int,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Iterable[trace.Link] = (),
) -> Iterator[trace.Span]:
    """``start_root`` as the current span for the block."""
    span = start_root(name, start, kind, attributes, links)
    with trace.use_span(span, end_on_exit=True):
        yield span


def record(
    name: str,
    start: int,
    end: int,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished child of the current span, for work done before the parent existed (the
    poll, which only afterwards turns out to be the start of a batch)."""
    span = tracer().start_span(name, kind=kind, attributes=dict(attributes or {}), start_time=start)
    span.end(end_time=end)


def in_span(span: trace.Span) -> otel_context.Context:
    """The context to hand to another thread, whose spans become children of ``span``."""
    return trace.set_span_in_context(span)


# -- propagation -----------------------------------------------------------------------------


def carrier_fields() -> frozenset[str]:
    """Header names the configured propagators read (``OTEL_PROPAGATORS``; by default W3C
    ``traceparent``, ``tracestate`` and ``baggage``), lower case."""
    return frozenset(f.lower() for f in propagate.get_global_textmap().fields)


def remote_context(carrier: Mapping[str, str]) -> otel_context.Context:
    """The producer's or caller's context from message or request headers."""
    return propagate.extract(dict(carrier))


def link(
    carrier: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> trace.Link | None:
    """A link to the span that ``carrier`` (message headers) names; None without a valid one."""
    ctx = trace.get_current_span(remote_context(carrier)).get_span_context()
    return trace.Link(ctx, dict(attributes or {})) if ctx.is_valid else None


def traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, stored with outbox rows so the relay can
    link back to the batch that wrote them; None when nothing is traced."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def links_to(traceparents: Iterable[str | None]) -> list[trace.Link]:
    """One link per distinct stored ``traceparent`` (invalid and missing ones skipped)."""
    out: list[trace.Link] = []
    for value in dict.fromkeys(t for t in traceparents if t):
        ctx = trace.get_current_span(_W3C.extract({"traceparent": value})).get_span_context()
        if ctx.is_valid:
            out.append(trace.Link(ctx))
    return out
