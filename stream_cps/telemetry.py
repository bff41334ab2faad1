"""OpenTelemetry set-up, every span and metric name stream-cps emits, and trace propagation.

Names live here once so that dashboards and code cannot drift apart. Exporting is chosen by
configuration: ``none`` (default; the API's no-op providers), ``console`` or ``otlp`` (HTTP).
The standard ``OTEL_*`` variables override our settings where both say the same thing
(docs/configuration.md): a platform that injects them describes the deployment.

One trace per unit of work: a loop opens a root span only once it knows there is work (a poll
that returned something), so an idle service exports nothing; the poll's own span is recorded
afterwards with its real start and end (``record``).
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
METRIC_BATCH_DURATION = "stream_cps.batch.duration"
METRIC_SLOT_LAG = "stream_cps.slot.lag_bytes"
METRIC_ENTITIES_CALCULATED = "stream_cps.entities.calculated"
METRIC_ATTRIBUTE_ERRORS = "stream_cps.attributes.errors"
METRIC_OUTBOX_DELIVERED = "stream_cps.outbox.delivered"
METRIC_OUTBOX_RETRIED = "stream_cps.outbox.retried"
METRIC_OUTBOX_PARKED = "stream_cps.outbox.parked"

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
    if spans_to == "none" and metrics_to == "none":
        return
    res = resource(settings)
    if spans_to != "none":
        _setup_tracing(settings, spans_to, res)
    if metrics_to != "none":
        _setup_metrics(settings, metrics_to, res)
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
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        metric_exporter: Any = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        url = otlp_endpoint(settings.otlp_endpoint, "metrics", os.environ)
        metric_exporter = OTLPMetricExporter(endpoint=url)
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=10_000)
    metrics.set_meter_provider(MeterProvider(resource=res, metric_readers=[reader]))


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
