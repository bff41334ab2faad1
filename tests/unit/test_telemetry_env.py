"""The standard OTEL_* variables override our telemetry settings (docs/configuration.md)."""

from __future__ import annotations

import pytest

from stream_cps import config, telemetry


def test_traces_endpoint_is_exact_then_base_then_ours() -> None:
    ours = "http://collector:4318/"
    assert telemetry.otlp_endpoint(ours, "traces", {}) == "http://collector:4318/v1/traces"
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4318"}
    assert telemetry.otlp_endpoint(ours, "traces", base) == "https://otel.example:4318/v1/traces"
    assert telemetry.otlp_endpoint(ours, "metrics", base) == "https://otel.example:4318/v1/metrics"
    exact = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t.example/custom"}
    assert telemetry.otlp_endpoint(ours, "traces", exact) == "http://t.example/custom"
    assert telemetry.otlp_endpoint(ours, "metrics", exact) == "https://otel.example:4318/v1/metrics"


def test_traces_exporter_follows_otel_variables() -> None:
    assert telemetry.trace_exporter("none", {}) == "none"
    assert telemetry.trace_exporter("none", {"OTEL_TRACES_EXPORTER": "otlp"}) == "otlp"
    assert telemetry.trace_exporter("otlp", {"OTEL_TRACES_EXPORTER": "none"}) == "none"
    assert telemetry.trace_exporter("otlp", {"OTEL_TRACES_EXPORTER": "zipkin"}) == "otlp"
    assert telemetry.trace_exporter("otlp", {"OTEL_SDK_DISABLED": "true"}) == "none"


def test_service_name_and_resource_attributes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = config.load(flags={"dsn": "host=x"}, environ={}).telemetry
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert telemetry.resource(settings).attributes["service.name"] == "stream-cps"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod")
    attrs = telemetry.resource(settings).attributes
    assert attrs["service.name"] == "stream-cps"
    assert attrs["deployment.environment.name"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cps-eu")
    assert telemetry.resource(settings).attributes["service.name"] == "cps-eu"


def test_traceparent_round_trips_into_a_link() -> None:
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    [link] = telemetry.links_to([value, value, None, "garbage"])
    assert f"{link.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{link.context.span_id:016x}" == "b7ad6b7169203331"
    found = telemetry.link({"traceparent": value}, {"messaging.kafka.message.offset": 3})
    assert found is not None and found.context.trace_id == link.context.trace_id
    assert telemetry.link({}) is None
