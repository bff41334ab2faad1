"""OpenTelemetry set-up, and every span and metric name stream-cps emits.

Names live here once so that dashboards and code cannot drift apart. Exporting is chosen by
configuration: ``none`` (default; the API's no-op providers), ``console`` or ``otlp`` (HTTP).
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
METRIC_IDENTIFIERS_QUARANTINED = "stream_cps.identifiers.quarantined"
METRIC_BATCH_DURATION = "stream_cps.batch.duration"
METRIC_SLOT_LAG = "stream_cps.slot.lag_bytes"
METRIC_ENTITIES_CALCULATED = "stream_cps.entities.calculated"
METRIC_ATTRIBUTE_ERRORS = "stream_cps.attributes.errors"
METRIC_OUTBOX_DELIVERED = "stream_cps.outbox.delivered"
METRIC_OUTBOX_RETRIED = "stream_cps.outbox.retried"
METRIC_OUTBOX_PARKED = "stream_cps.outbox.parked"

TRACER_NAME = "stream_cps"

_configured = False


def setup(settings: TelemetrySettings) -> None:
    """Install tracer and meter providers once per process, as configured (the wiring layer,
    ``stream_cps.service.process``, is the only caller)."""
    global _configured
    exporter = settings.exporter
    if _configured or exporter == "none":
        return
    from opentelemetry.sdk.metrics import MeterProvider
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
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def meter() -> metrics.Meter:
    return metrics.get_meter(TRACER_NAME)
