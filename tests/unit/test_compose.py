"""infra/docker-compose.yml and its collector configuration stay loadable and consistent
(there is no Docker engine here to run them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).parents[2] / "infra"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / name).read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_jaeger_v2_behind_a_collector_with_healthchecks() -> None:
    services = load("docker-compose.yml")["services"]
    for name, service in services.items():
        image = service.get("image")
        if image:
            assert ":" in image and not image.endswith(":latest"), name  # pinned
        for needed, condition in (service.get("depends_on") or {}).items():
            assert needed in services, (name, needed)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], needed
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    assert "healthcheck" in services["jaeger"]
    env = services["stream-cps"]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert services["otel-collector"]["depends_on"]["jaeger"]["condition"] == "service_healthy"


def test_collector_pipelines_use_defined_components_and_reach_jaeger() -> None:
    collector = load("otel-collector.yaml")
    service = collector["service"]
    for extension in service.get("extensions", []):
        assert extension in collector["extensions"]
    for pipeline in service["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector[kind], component
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
