"""Checks the local OpenSearch dev node on the behaviour the profile outbox relies on.

The node is real (infra/opensearch/opensearch_service.py); if it cannot start the tests
fail rather than skip, so a broken dev setup is never mistaken for a passing suite.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConflictError, NotFoundError

from infra.opensearch import opensearch_service as service
from tests.fixtures.opensearch import restart_opensearch


def _client(node: Any) -> OpenSearch:
    return OpenSearch(hosts=[node.url], timeout=30)


def _new_index(client: OpenSearch) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.indices.create(index=name, body={"mappings": {"properties": {"n": {"type": "long"}}}})
    return name


def test_node_is_healthy_opensearch_2_19(opensearch_node: Any) -> None:
    client = _client(opensearch_node)
    assert client.info()["version"]["number"].startswith("2.19.")
    assert client.cluster.health()["status"] in ("green", "yellow")
    assert service.running(opensearch_node.workdir) is not None


def test_external_gte_versions_reject_stale_writes(opensearch_node: Any) -> None:
    client = _client(opensearch_node)
    index = _new_index(client)

    created = client.index(
        index=index, id="p1", body={"n": 5}, version=5, version_type="external_gte"
    )
    assert created["result"] == "created"
    assert created["_version"] == 5
    # external_gte accepts the same version again (an idempotent replay) ...
    replayed = client.index(
        index=index, id="p1", body={"n": 5}, version=5, version_type="external_gte"
    )
    assert replayed["_version"] == 5
    # ... but refuses an older one.
    with pytest.raises(ConflictError) as stale:
        client.index(index=index, id="p1", body={"n": 3}, version=3, version_type="external_gte")
    assert stale.value.status_code == 409
    doc = client.get(index=index, id="p1")
    assert (doc["_version"], doc["_source"]) == (5, {"n": 5})

    # A versioned delete needs a version at least as new, and its tombstone then rejects
    # an older write that arrives late.
    with pytest.raises(ConflictError):
        client.delete(index=index, id="p1", version=4, version_type="external_gte")
    deleted = client.delete(index=index, id="p1", version=6, version_type="external_gte")
    assert deleted["result"] == "deleted"
    with pytest.raises(NotFoundError):
        client.get(index=index, id="p1")
    with pytest.raises(ConflictError):
        client.index(index=index, id="p1", body={"n": 4}, version=4, version_type="external_gte")


def test_data_survives_stop_and_restart_on_same_dir_and_port(opensearch_node: Any) -> None:
    client = _client(opensearch_node)
    index = _new_index(client)
    client.index(index=index, id="kept", body={"n": 7}, version=7, version_type="external_gte")
    workdir, url = opensearch_node.workdir, opensearch_node.url

    service.stop(workdir)
    service.stop(workdir)  # idempotent
    assert service.running(workdir) is None
    assert service.health(url) is None
    restarted = restart_opensearch(opensearch_node)
    assert restarted.url == url

    doc = client.get(index=index, id="kept")
    assert (doc["_version"], doc["_source"]) == (7, {"n": 7})
    client.indices.refresh(index=index)
    assert client.count(index=index)["count"] == 1
    with pytest.raises(ConflictError):
        client.index(index=index, id="kept", body={"n": 6}, version=6, version_type="external_gte")
