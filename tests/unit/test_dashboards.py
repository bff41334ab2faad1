"""Every metric the shipped dashboard and alerts query is one the service exports.

The exported names come from a real scrape of OpenTelemetry's Prometheus reader fed with the
instruments as ``telemetry.METRICS`` declares them (the kind, unit and help the service uses),
so a renamed metric or a changed unit breaks this test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from stream_cps import telemetry

INFRA = Path(__file__).parents[2] / "infra"
PROMQL_WORDS = {
    "sum", "max", "min", "rate", "increase", "histogram_quantile", "by", "le", "time",
    "vector", "absent", "or", "job", "reason", "instance", "__rate_interval", "m", "e9",
}  # fmt: skip


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("test")
    for name, (kind, unit, help_text) in telemetry.METRICS.items():
        if kind == "counter":
            meter.create_counter(name, unit=unit, description=help_text).add(1)
        elif kind == "histogram":
            meter.create_histogram(name, unit=unit, description=help_text).record(1.0)
        else:

            def one(_options: CallbackOptions) -> list[Observation]:
                return [Observation(1)]

            meter.create_observable_gauge(name, [one], unit=unit, description=help_text)
    text = generate_latest(registry).decode()
    provider.shutdown()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()}


def queried_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers and legend templates
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    return {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr) if w not in PROMQL_WORDS}


def dashboard_exprs() -> list[str]:
    dash = json.loads((INFRA / "grafana" / "stream-cps.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    text = (INFRA / "prometheus" / "alerts.yml").read_text()
    out: list[str] = []
    for block in re.split(r"\n\s+- alert: ", text)[1:]:
        expr = re.search(r"expr: (>\n(?:\s{10}.*\n)+|.*)", block)
        assert expr, block
        out.append(expr.group(1).lstrip(">"))
    return out


def test_every_panel_and_alert_queries_an_exported_metric() -> None:
    exported = exported_names() | {"up"}  # `up` is Prometheus' own
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        names = queried_names(expr)
        assert names, expr
        missing = names - exported
        assert not missing, f"{sorted(missing)} in {expr!r} not among {sorted(exported)}"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    queried = set().union(*(queried_names(e) for e in dashboard_exprs()))
    for needed in (
        "stream_cps_events_stitched_total",
        "stream_cps_slot_lag_bytes",
        "stream_cps_events_latency_seconds_bucket",
        "stream_cps_entities_merged_total",
        "stream_cps_rules_errors_total",
        "stream_cps_outbox_pending",
    ):
        assert needed in queried, needed
