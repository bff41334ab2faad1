"""OpenSearch adapter: the entity index definition and versioned bulk delivery.

Every write carries the external version of the change that caused it (``external_gte``), so
the index converges to the newest state whatever order requests land in, and a replayed
request is harmless. Deletes are versioned too: their tombstones reject older writes for
``index.gc_deletes``. The bulk response is read item by item, because a 200 can hold failures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import ConnectionError as TransportConnectionError
from opensearchpy.exceptions import ConnectionTimeout, TransportError

from stream_cps import retry
from stream_cps.config import Settings
from stream_cps.errors import ConfigError, Fatal, Transient
from stream_cps.sinks.commands import Action, Outcome, Result

log = logging.getLogger(__name__)

VERSION_TYPE = "external_gte"


class OpenSearchUnavailable(Transient):
    """The cluster is down, overloaded (429) or failing (5xx): commands stay in the outbox."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class OpenSearchRejected(Fatal):
    """The cluster refused a whole request (e.g. 401, 403, 413): a setup problem, not data."""


def make_client(settings: Settings) -> OpenSearch:
    """A client that fails fast: retries are ours (``stream_cps.retry``), not the transport's."""
    url = settings.opensearch.url
    if not url:
        raise ConfigError("opensearch.url: required for the OpenSearch index and relay")
    return OpenSearch(
        hosts=[url],
        timeout=settings.opensearch.timeout,
        max_retries=0,
        retry_on_timeout=False,
    )


# attributes.data_type -> field mapping. Strings are keywords: CDP attributes are filtered and
# aggregated, not searched as prose.
FIELD_TYPES: dict[str, dict[str, Any]] = {
    "string": {"type": "keyword", "ignore_above": 2048},
    "int": {"type": "long"},
    "float": {"type": "double"},
    "bool": {"type": "boolean"},
    "date": {"type": "date"},
    "datetime": {"type": "date"},
}


def index_body(settings: Settings) -> dict[str, Any]:
    """Settings and mapping of the entity index.

    The top level is strict (a typo in our own document is a bug, not a new field). Attributes
    get explicit types from ``attributes.data_type`` (``ensure_index``); any other attribute
    maps dynamically without date detection, so a string attribute whose first value happens
    to look like a date cannot turn into a date field that rejects the next value.
    """
    return {
        "settings": {
            "index": {
                "gc_deletes": settings.opensearch.gc_deletes,
                "number_of_replicas": settings.opensearch.replicas,
            }
        },
        "mappings": {
            "dynamic": "strict",
            "date_detection": False,
            "dynamic_templates": [
                {
                    "attribute_strings": {
                        "path_match": "attributes.*",
                        "match_mapping_type": "string",
                        "mapping": FIELD_TYPES["string"],
                    }
                }
            ],
            "properties": {
                "customer_entity_id": {"type": "keyword"},
                "identifiers": {"type": "keyword"},
                "attributes": {"type": "object", "dynamic": True},
                "calculated": {"type": "date"},
            },
        },
    }


def template_name(index: str) -> str:
    return f"stream-cps-{index}"


def ensure_index(
    settings: Settings,
    client: OpenSearch | None = None,
    attribute_types: Mapping[str, str] | None = None,
) -> None:
    """Create (or bring up to date) the index template and the index; safe to run again.

    The template matches exactly the index name, so an index that someone deletes is
    recreated by the next write with our mapping and ``gc_deletes``, never a guessed one.
    ``attribute_types`` (attribute id -> data_type) adds explicit attribute field types.
    """
    client = client or make_client(settings)
    index = settings.opensearch.index
    body = index_body(settings)
    props = attribute_properties(attribute_types or {})
    if props:
        body["mappings"]["properties"]["attributes"]["properties"] = props
    client.indices.put_index_template(
        name=template_name(index),
        body={"index_patterns": [index], "priority": 100, "template": body},
    )
    if not client.indices.exists(index=index):
        client.indices.create(index=index, body=body)
        return
    # gc_deletes and replicas are dynamic: keep an existing index in step with settings.
    client.indices.put_settings(index=index, body=body["settings"])
    base = {k: v for k, v in body["mappings"].items() if k != "properties"}
    client.indices.put_mapping(index=index, body=base)
    for name, field in props.items():
        mapping = {"properties": {"attributes": {"properties": {name: field}}}}
        try:
            client.indices.put_mapping(index=index, body=mapping)
        except TransportError as exc:  # e.g. data_type changed: needs a reindex, not a crash
            log.warning("opensearch: attribute %s keeps its old mapping: %s", name, exc.error)


def attribute_properties(types: Mapping[str, str]) -> dict[str, Any]:
    """Field mappings of attributes whose data_type we know."""
    return {name: FIELD_TYPES[kind] for name, kind in sorted(types.items()) if kind in FIELD_TYPES}


class BulkWriter:
    """The OpenSearch ``Sink``: actions in one bulk request, every item's result classified."""

    def __init__(self, client: OpenSearch, index: str, attempts: int = 3) -> None:
        self.client = client
        self.index = index
        # Quick tries for a blip (refused connection, 429, 5xx). A timeout already used the
        # request's whole budget: the caller's backoff, which a stop can interrupt, takes over.
        self._blip = retry.BLIP.but(
            attempts=attempts,
            retry_on=lambda exc: retryable(exc) and not isinstance(exc, ConnectionTimeout),
        )

    def write(self, actions: Sequence[Action]) -> list[Result]:
        """One result per action, in order. Raises ``OpenSearchUnavailable`` when the whole
        request failed for a transient reason after a few quick tries."""
        if not actions:
            return []
        body = _bulk_body(self.index, actions)
        try:
            response = self._blip.call(lambda: self.client.bulk(body=body))
        except Exception as exc:
            if retryable(exc):
                raise OpenSearchUnavailable(f"bulk request failed: {_describe(exc)}") from exc
            if isinstance(exc, TransportError):
                raise OpenSearchRejected(f"bulk request refused: {_describe(exc)}") from exc
            raise
        items = response.get("items", [])
        if len(items) != len(actions):
            raise OpenSearchUnavailable(
                f"bulk response has {len(items)} items for {len(actions)} actions"
            )
        return [classify(action, item) for action, item in zip(actions, items, strict=True)]


def _bulk_body(index: str, actions: Sequence[Action]) -> list[Mapping[str, Any]]:
    lines: list[Mapping[str, Any]] = []
    for action in actions:
        meta = {
            "_index": index,
            "_id": action.entity_id,
            "version": action.version,
            "version_type": VERSION_TYPE,
        }
        lines.append({action.op: meta})
        if action.document is not None:
            lines.append(action.document)
    return lines


def classify(action: Action, item: Mapping[str, Any]) -> Result:
    """What one bulk item means for its outbox commands."""
    (detail,) = item.values()
    status = int(detail.get("status", 0))
    error = detail.get("error")
    if 200 <= status < 300:
        return Result(Outcome.DELIVERED)
    if status == 404 and action.document is None and not error:
        return Result(Outcome.DELIVERED)  # deleting a missing document: the tombstone is set
    reason = _error_text(status, error)
    if status == 409 and _error_type(error) == "version_conflict_engine_exception":
        return Result(Outcome.STALE, reason)
    if status == 429 or status >= 500 or status == 0:
        return Result(Outcome.RETRY, reason)
    if _error_type(error) == "cluster_block_exception":
        return Result(Outcome.RETRY, reason)  # write blocks (disk watermark, operator) lift
    return Result(Outcome.PARK, reason)


def _error_type(error: Any) -> str:
    return str(error.get("type", "")) if isinstance(error, Mapping) else ""


def _error_text(status: int, error: Any) -> str:
    if isinstance(error, Mapping):
        text = f"{status} {error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, Mapping):
            text += f" (caused by {cause.get('type', '')}: {cause.get('reason', '')})"
        return text
    return f"{status} {error or 'no error detail'}"


def retryable(exc: BaseException) -> bool:
    """True for transport failures that pass: connection errors, timeouts, 429 and 5xx (the
    edge where opensearch-py's errors become ``OpenSearchUnavailable`` or ``Rejected``)."""
    if isinstance(exc, TransportConnectionError):  # includes timeouts; status is "N/A"
        return True
    if isinstance(exc, TransportError):
        status = exc.status_code
        return isinstance(status, int) and (status == 429 or status >= 500)
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TransportError) and isinstance(exc.status_code, int):
        return f"{exc.status_code} {exc.error}"
    if isinstance(exc, TransportError):  # no response at all: the error is the message
        return f"{type(exc).__name__}: {exc.error}"
    return f"{type(exc).__name__}: {exc}"
