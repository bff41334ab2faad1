"""OpenSearch fixtures: one real dev node per test session (infra/opensearch).

A node that cannot start FAILS the run with its reason; nothing is skipped, so a broken dev
setup is never mistaken for a passing suite.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SERVICE_PATH = Path(__file__).resolve().parents[1] / "infra/opensearch/opensearch_service.py"


def _load_service() -> ModuleType:
    """infra/opensearch is not a package: load the service module from its path, once."""
    if "opensearch_service" in sys.modules:
        return sys.modules["opensearch_service"]
    spec = importlib.util.spec_from_file_location("opensearch_service", SERVICE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


service = _load_service()


@pytest.fixture(scope="session")
def opensearch_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One dev node for the session; stopped at the end. Tests may stop and restart it on the
    same work dir and port (``restart_opensearch``)."""
    workdir = tmp_path_factory.mktemp("opensearch")
    try:
        node = service.start(workdir)
    except service.OpenSearchServiceError as exc:
        pytest.fail(f"the OpenSearch dev node could not start: {exc}", pytrace=False)
    yield node
    service.stop(workdir)


def restart_opensearch(node: Any) -> Any:
    """Start a stopped session node again on its dir and port; fail the test if it cannot."""
    port = int(node.url.rsplit(":", 1)[1])
    try:
        return service.start(node.workdir, port=port)
    except service.OpenSearchServiceError as exc:
        pytest.fail(f"the OpenSearch dev node did not restart: {exc}", pytrace=False)
