"""OpenTelemetry set-up, and every span and metric name stream-cps emits.

Names live here once so that dashboards and code cannot drift apart. Exporting is chosen by
configuration: ``none`` (default; the API's no-op providers), ``console`` or ``otlp`` (HTTP);
``enable_prometheus`` adds a Prometheus scrape of the same metrics (``http.address``).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics, trace

from stream_cps.config import TelemetrySettings

# Spans: one per batch, one per stage inside it.
SPAN_STITCH_BATCH = "stitch.batch"
SPAN_STITCH_EXTRACT = "stitch.extract"
SPAN_STITCH_GROUP = "stitch.group"
SPAN_STITCH_WRITE = "stitch.write"
SPAN_STITCH_PURGE = "stitch.purge"
SPAN_SOURCE_POLL = "source.poll"
SPAN_SOURCE_ACK = "source.ack"
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
METRIC_BATCH_DURATION = "stream_cps.batch.duration"
METRIC_SLOT_LAG = "stream_cps.slot.lag_bytes"
METRIC_ENTITIES_CALCULATED = "stream_cps.entities.calculated"
METRIC_ATTRIBUTE_ERRORS = "stream_cps.attributes.errors"
METRIC_OUTBOX_DELIVERED = "stream_cps.outbox.delivered"
METRIC_OUTBOX_RETRIED = "stream_cps.outbox.retried"
METRIC_OUTBOX_PARKED = "stream_cps.outbox.parked"
# Per committed batch: the oldest event's wait from insert (created) to stitched, in s.
METRIC_EVENTS_LATENCY = "stream_cps.events.latency"
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
    METRIC_BATCH_DURATION: ("histogram", "s", "one stitching transaction, retries included"),
    METRIC_SLOT_LAG: ("gauge", "By", "WAL the replication slot holds back"),
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
_metric_readers: list[Any] = []


def enable_prometheus() -> Any:
    """Also export every metric for a Prometheus scrape; returns the ``CollectorRegistry`` to
    serve. Call before ``setup`` (the meter provider is installed once, with its readers)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    _metric_readers.append(PrometheusMetricReader(registry=registry))
    return registry


def setup(settings: TelemetrySettings) -> None:
    """Install tracer and meter providers once per process, as configured (the wiring layer,
    ``stream_cps.service.process``, is the only caller)."""
    global _configured
    exporter = settings.exporter
    if _configured:
        return
    if exporter == "none":
        if _metric_readers:  # metrics for Prometheus only; spans stay the API's no-op
            _install_meters(settings, [])
            _configured = True
        return
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": settings.service_name})
    if exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter: Any = ConsoleSpanExporter()
        metric_exporter: Any = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        span_exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")
        metric_exporter = OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics")
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=10_000)
    _install_meters(settings, [reader])
    _configured = True


def _install_meters(settings: TelemetrySettings, readers: list[Any]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": settings.service_name})
    all_readers = [*readers, *_metric_readers]
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=all_readers))


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def meter() -> metrics.Meter:
    return metrics.get_meter(TRACER_NAME)
