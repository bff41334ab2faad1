"""One suite, two sinks: the OpenSearch sink (a real dev node) and the in-memory one.

Every case states part of the guarantee of ``stream_cps.sinks.commands.Sink``: the newest
version wins whatever order, repetition or batching actions arrive in; deletes leave tombstones
that reject older writes. The in-memory sink is only worth using in tests because this suite
holds it to the real one.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import pytest
from opensearchpy import NotFoundError, OpenSearch

from stream_cps import config
from stream_cps.sinks.commands import Action, Outcome, Result
from stream_cps.sinks.memory import MemorySink
from stream_cps.sinks.opensearch import BulkWriter, ensure_index


class Probe(Protocol):
    """A sink under test, and a way to read back what it holds."""

    def write(self, actions: Sequence[Action]) -> list[Result]: ...

    def get(self, entity_id: str) -> tuple[int, Mapping[str, Any]] | None: ...


class OpenSearchProbe:
    def __init__(self, settings: config.Settings) -> None:
        url = settings.opensearch.url
        assert url is not None
        self.client = OpenSearch(hosts=[url], timeout=30)
        self.index = settings.opensearch.index
        ensure_index(settings, self.client)
        self.writer = BulkWriter(self.client, self.index)

    def write(self, actions: Sequence[Action]) -> list[Result]:
        return self.writer.write(actions)

    def get(self, entity_id: str) -> tuple[int, Mapping[str, Any]] | None:
        try:
            found = self.client.get(index=self.index, id=entity_id, realtime=True)
        except NotFoundError:
            return None
        return int(found["_version"]), found["_source"]

    def close(self) -> None:
        self.client.indices.delete(index=self.index)


@pytest.fixture(params=["memory", "opensearch"])
def sink(request: pytest.FixtureRequest, settings: config.Settings) -> Iterator[Probe]:
    if request.param == "memory":
        yield MemorySink()
        return
    node = request.getfixturevalue("opensearch_node")
    probe = OpenSearchProbe(
        settings.replace(
            **{
                "opensearch.url": node.url,
                "opensearch.index": f"contract-{uuid.uuid4().hex[:10]}",
                "opensearch.replicas": 0,
            }
        )
    )
    yield probe
    probe.close()


def doc(entity_id: str, marker: str) -> dict[str, Any]:
    return {
        "customer_entity_id": entity_id,
        "identifiers": [f"email:{marker}@x"],
        "attributes": {"marker": marker},
        "calculated": None,
    }


def upsert(entity_id: str, version: int, marker: str) -> Action:
    return Action(entity_id, version, doc(entity_id, marker))


def delete(entity_id: str, version: int) -> Action:
    return Action(entity_id, version, None)


def outcomes(results: Sequence[Result]) -> list[Outcome]:
    return [r.outcome for r in results]


def test_a_new_document_is_delivered_with_its_version(sink: Probe) -> None:
    assert outcomes(sink.write([upsert("a", 5, "v5")])) == [Outcome.DELIVERED]
    assert sink.get("a") == (5, doc("a", "v5"))


def test_the_same_version_again_is_delivered_and_changes_nothing(sink: Probe) -> None:
    sink.write([upsert("a", 5, "v5")])
    assert outcomes(sink.write([upsert("a", 5, "v5")])) == [Outcome.DELIVERED]
    assert sink.get("a") == (5, doc("a", "v5"))


def test_an_older_version_is_stale_and_leaves_the_newer_document(sink: Probe) -> None:
    sink.write([upsert("a", 7, "v7")])
    (result,) = sink.write([upsert("a", 3, "v3")])
    assert result.outcome is Outcome.STALE and result.reason
    assert sink.get("a") == (7, doc("a", "v7"))


def test_a_newer_version_replaces_the_document(sink: Probe) -> None:
    sink.write([upsert("a", 3, "v3")])
    assert outcomes(sink.write([upsert("a", 8, "v8")])) == [Outcome.DELIVERED]
    assert sink.get("a") == (8, doc("a", "v8"))


def test_a_delete_leaves_a_tombstone_that_rejects_older_writes(sink: Probe) -> None:
    sink.write([upsert("a", 3, "v3")])
    assert outcomes(sink.write([delete("a", 4)])) == [Outcome.DELIVERED]
    assert sink.get("a") is None
    assert outcomes(sink.write([upsert("a", 2, "late")])) == [Outcome.STALE]
    assert sink.get("a") is None
    assert outcomes(sink.write([upsert("a", 9, "v9")])) == [Outcome.DELIVERED]
    assert sink.get("a") == (9, doc("a", "v9"))


def test_deleting_a_document_that_never_existed_is_delivered(sink: Probe) -> None:
    assert outcomes(sink.write([delete("ghost", 1)])) == [Outcome.DELIVERED]
    assert sink.get("ghost") is None


def test_an_older_delete_is_stale_and_the_document_stays(sink: Probe) -> None:
    sink.write([upsert("a", 6, "v6")])
    assert outcomes(sink.write([delete("a", 2)])) == [Outcome.STALE]
    assert sink.get("a") == (6, doc("a", "v6"))


def test_one_result_per_action_in_order_within_one_request(sink: Probe) -> None:
    batch = [upsert("a", 2, "a2"), upsert("b", 1, "b1"), upsert("a", 1, "a1"), delete("c", 1)]
    assert outcomes(sink.write(batch)) == [
        Outcome.DELIVERED,
        Outcome.DELIVERED,
        Outcome.STALE,
        Outcome.DELIVERED,
    ]
    assert sink.write([]) == []


def test_any_order_and_batching_converge_to_the_newest_state(sink: Probe) -> None:
    """The property the relay relies on: shuffled, repeated and split into batches, the
    actions of each entity end in the state of its highest version."""
    rng = random.Random(7)
    actions: list[Action] = []
    for n in range(12):
        entity = f"e{n}"
        for version in range(1, rng.randint(2, 6)):
            if rng.random() < 0.25:
                actions.append(delete(entity, version))
            else:
                actions.append(upsert(entity, version, f"{entity}v{version}"))
    newest = {a.entity_id: a for a in sorted(actions, key=lambda a: a.version)}
    shuffled = actions + rng.sample(actions, len(actions) // 2)
    rng.shuffle(shuffled)
    for start in range(0, len(shuffled), 7):
        results = sink.write(shuffled[start : start + 7])
        assert all(r.outcome in (Outcome.DELIVERED, Outcome.STALE) for r in results)
    for entity, action in newest.items():
        expected = None if action.document is None else (action.version, action.document)
        assert sink.get(entity) == expected, entity
