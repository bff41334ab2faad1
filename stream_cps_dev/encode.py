"""The producer side of the customer event formats, for collectors, examples, tests and benches.

Kept beside the decoder so that the two cannot drift apart: a row written by ``avro_event`` or
``json_event`` decodes to the same ``CustomerEvent``.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from functools import cache
from typing import Any

import fastavro

from stream_cps.sources.kafka.avro import READER_FILE, SCHEMAS_DIR, load_schema
from stream_cps.sources.kafka.framing import frame

EventRow = tuple[str, str, str, str, datetime, str]  # id, source_id, type, version, time, payload


def encode(record: dict[str, Any], schema: Any, schema_id: int = 1) -> bytes:
    """Frame ``record`` as collectors do: Confluent framing around the Avro datum."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return frame(schema_id, out.getvalue())


@cache
def _schema() -> Any:
    return load_schema(SCHEMAS_DIR / READER_FILE)


def avro_event(row: EventRow, schema_id: int = 1) -> bytes:
    """Confluent-framed Avro with the shipped schema (id 1 in ``schemas/ids.json``)."""
    eid, source, etype, version, when, payload = row
    record = {
        "id": eid,
        "source_id": source,
        "type": etype,
        "version": version,
        "event_time": when,
        "payload": payload,
    }
    return encode(record, _schema(), schema_id)


def _json_fields(row: EventRow) -> dict[str, Any]:
    """The event's fields as JSON carries them: ``event_time`` ISO 8601, ``payload`` an object."""
    eid, source, etype, version, when, payload = row
    return {
        "id": eid,
        "source_id": source,
        "type": etype,
        "version": version,
        "event_time": when.isoformat(),
        "payload": json.loads(payload),
    }


def json_event(row: EventRow) -> bytes:
    """The JSON form: the same fields, ``event_time`` ISO 8601, ``payload`` an object."""
    return json.dumps(_json_fields(row)).encode()


def changefeed_message(row: EventRow, n: int) -> dict[str, Any]:
    """A CockroachDB changefeed's wrapped JSON message for the row (the ``n``-th: its
    ``updated`` timestamp), as Kafka and webhook sinks send it; webhooks add key and topic."""
    after = {
        **_json_fields(row),
        "created": row[4].isoformat(),
        "stitched": None,
        "identifiers": None,
    }
    return {"after": after, "updated": f"{1700000000000000000 + n}.0000000000"}
