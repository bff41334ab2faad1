"""Decoding of Kafka messages and webhook bodies (no broker): every kind, every rejection."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cps.errors import InvalidInput
from stream_cps.sources.changefeed.webhook import PLAIN_EVENT, envelopes_of
from stream_cps.sources.kafka import avro as kafka_avro
from stream_cps.sources.messages import (
    MAX_REASON,
    ChangefeedRow,
    CustomerEvent,
    Ignored,
    Resolved,
    decode,
    short_reason,
    webhook_entries,
)
from stream_cps_dev import encode
from stream_cps_dev.encode import avro_event, json_event

AVRO = kafka_avro.SchemaResolver(None)
SCHEMA = kafka_avro.load_schema(kafka_avro.SCHEMAS_DIR / kafka_avro.READER_FILE)
WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RECORD = {
    "id": "e1",
    "source_id": "web",
    "type": "page_view",
    "version": "1-0-0",
    "event_time": WHEN,
    "payload": '{"cookie_id": "c1"}',
}
JSON_EVENT = {**RECORD, "event_time": WHEN.isoformat(), "payload": {"cookie_id": "c1"}}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_avro_and_json_customer_events_decode_to_the_same_event() -> None:
    from_avro = decode(b"e1", encode.encode(RECORD, SCHEMA), "auto", AVRO)
    from_json = decode(b"e1", _json(JSON_EVENT), "auto", AVRO)
    assert isinstance(from_avro, CustomerEvent) and isinstance(from_json, CustomerEvent)
    assert json.loads(from_avro.payload) == json.loads(from_json.payload)
    assert from_avro == CustomerEvent(**{**from_json.__dict__, "payload": from_avro.payload})
    assert (from_avro.id, from_avro.event_time, json.loads(from_avro.payload)) == (
        "e1",
        WHEN,
        {"cookie_id": "c1"},
    )


def test_changefeed_wrapped_resolved_delete_and_echo() -> None:
    row = {"id": "e1", "payload": {"a": 1}, "stitched": None}
    assert decode(b'["e1"]', _json({"after": row, "updated": "17.0"}), "auto", AVRO) == (
        ChangefeedRow("e1", deleted=False, needs_stitch=True, updated="17.0")
    )
    echo = {**row, "stitched": "2026-01-01T00:00:00Z"}
    assert decode(b'["e1"]', _json({"after": echo}), "auto", AVRO) == ChangefeedRow(
        "e1", deleted=False, needs_stitch=False, updated=None
    )
    assert decode(b'["e9"]', _json({"after": None}), "auto", AVRO) == ChangefeedRow(
        "e9", deleted=True, needs_stitch=False, updated=None
    )
    assert decode(None, _json({"resolved": "1700.0000000000"}), "auto", AVRO) == Resolved(
        "1700.0000000000"
    )


def test_tombstones_and_unknown_kinds_are_ignored_not_rejected() -> None:
    assert decode(b"k", None, "auto", AVRO) == Ignored("tombstone", "null value")
    assert isinstance(decode(None, b'{"hello": 1}', "auto", AVRO), Ignored)
    assert isinstance(decode(None, b"[1, 2]", "auto", AVRO), Ignored)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"\x00\x00\x00\x00\x63abc", "unknown Avro schema id 99"),
        (b"\x00\x00\x00\x00\x01\xff\xff", "does not decode"),
        (_json({**JSON_EVENT, "event_time": "yesterday"}), "event_time"),
        (_json({**JSON_EVENT, "event_time": "2026-01-01T00:00:00"}), "no UTC offset"),
        (_json({**JSON_EVENT, "payload": [1]}), "payload: must be a JSON object"),
        (_json({**JSON_EVENT, "payload": {"x": "a\u0000b"}}), "\\u0000"),
        (_json({**JSON_EVENT, "source_id": "s" * 300}), "longer than 255"),
        (_json({**JSON_EVENT, "id": ""}), "id: required"),
        (b'{"id": "x", "event_time": NaN}', "not valid JSON"),
        (_json({"after": "text"}), "neither an object nor null"),
        (_json({"after": None}), "delete without a usable key"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (_json({k: v for k, v in JSON_EVENT.items() if k != "id"}), "id: required"),
        (_json({k: v for k, v in JSON_EVENT.items() if k != "event_time"}), "event_time"),
        (_json({"id": "x"}), "source_id: required"),
    ],
)
def test_malformed_messages_raise_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=None) as info:
        decode(None, value, "auto", AVRO)
    assert reason in str(info.value)


def test_a_backslash_u_text_is_not_a_nul() -> None:
    """The six characters \\u0000 in a payload are fine for jsonb (hypothesis found the
    check mistook their JSON text for a NUL escape)."""
    event = decode(None, _json({**JSON_EVENT, "payload": {"\\u0000": "a\\u0000"}}), "auto", AVRO)
    assert isinstance(event, CustomerEvent)
    assert json.loads(event.payload) == {"\\u0000": "a\\u0000"}


def test_declared_format_is_enforced() -> None:
    with pytest.raises(InvalidInput, match="message_format is json"):
        decode(None, encode.encode(RECORD, SCHEMA), "json", AVRO)
    with pytest.raises(InvalidInput, match="not Confluent-framed"):
        decode(None, _json(JSON_EVENT), "avro", AVRO)


def test_webhook_bodies() -> None:
    body = {"payload": [{"after": {"id": "e1"}, "key": ["e1"], "topic": "customer_events"}]}
    assert webhook_entries(_json({**body, "length": 1})) == body["payload"]
    assert webhook_entries(_json({"resolved": "5.0"})) == Resolved("5.0")
    with pytest.raises(InvalidInput, match="says length 2"):
        webhook_entries(_json({**body, "length": 2}))
    mixed = _json({"payload": [{"after": {"id": "e1"}}, 7, {"after": 3}], "length": 3})
    envelopes = envelopes_of(mixed)
    assert [e.reason is None for e in envelopes] == [True, False, False]
    assert len({e.origin for e in envelopes}) == 3


# A producer's newer schema: one more field, which the shipped reader schema does not know.
EVOLVED = json.loads((kafka_avro.SCHEMAS_DIR / kafka_avro.READER_FILE).read_text())
EVOLVED["fields"].append({"name": "campaign", "type": "string"})


@pytest.fixture
def registry() -> Iterator[str]:
    """A stand-in schema registry over real HTTP (only GET /schemas/ids/N): id 42 is the
    reader schema, id 43 an evolved writer schema (``EVOLVED``)."""
    schema_text = (kafka_avro.SCHEMAS_DIR / kafka_avro.READER_FILE).read_text()
    served = {"/schemas/ids/42": schema_text, "/schemas/ids/43": json.dumps(EVOLVED)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in served:
                data, status = json.dumps({"schema": served[self.path]}).encode(), 200
            else:
                data, status = b'{"error_code": 40403}', 404
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_schema_ids_resolve_through_a_registry_when_configured(registry: str) -> None:
    resolver = kafka_avro.SchemaResolver(kafka_avro.Registry.parse(registry))
    event = decode(None, encode.encode(RECORD, SCHEMA, schema_id=42), "avro", resolver)
    assert isinstance(event, CustomerEvent) and event.id == "e1"
    with pytest.raises(InvalidInput, match="registry answered 404"):
        decode(None, encode.encode(RECORD, SCHEMA, schema_id=1), "avro", resolver)


def test_a_writer_schema_other_than_the_reader_is_resolved_into_it(registry: str) -> None:
    """Resolution is skipped only between equal schemas (fastavro would compare them for
    every message); an evolved writer's record still comes out in the reader's shape."""
    resolver = kafka_avro.SchemaResolver(kafka_avro.Registry.parse(registry))
    evolved = fastavro.parse_schema(EVOLVED)
    record = resolver.decode(encode.encode({**RECORD, "campaign": "spring"}, evolved, 43))
    assert record["id"] == "e1" and "campaign" not in record
    assert resolver.resolution(43)[1] is not None
    assert resolver.decode(encode.encode(RECORD, SCHEMA, schema_id=42))["id"] == "e1"
    assert resolver.resolution(42)[1] is None


_text_st = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
_json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text_st,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text_st, inner, max_size=4),
    max_leaves=12,
)


@given(
    eid=_text_st.filter(str.strip),
    names=st.tuples(*[_text_st.filter(str.strip).filter(lambda s: len(s) <= 255)] * 3),
    micros=st.integers(0, 4_102_444_800_000_000),
    payload=st.dictionaries(_text_st, _json_st, max_size=6),
)
@settings(max_examples=150, deadline=None)
def test_any_valid_event_round_trips_through_both_encodings(
    eid: str, names: tuple[str, str, str], micros: int, payload: dict[str, Any]
) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    row = (eid, *names, when, json.dumps(payload))
    for value in (avro_event(row), json_event(row)):
        event = decode(eid.encode(), value, "auto", AVRO)
        assert isinstance(event, CustomerEvent)
        assert (event.id, event.source_id, event.type, event.version) == (eid, *names)
        assert event.event_time == when
        assert json.loads(event.payload) == payload


def test_short_reason_keeps_short_reasons_and_cuts_long_ones_with_an_ellipsis() -> None:
    assert short_reason("payload: must be a JSON object") == "payload: must be a JSON object"
    assert short_reason("x" * MAX_REASON) == "x" * MAX_REASON
    cut = short_reason("y" * (MAX_REASON + 1))
    assert len(cut) == MAX_REASON and cut == "y" * (MAX_REASON - 1) + "\u2026"


def test_enriched_bare_key_only_and_crdb_resolved_changefeed_shapes() -> None:
    after = {"id": "e1", "stitched": None}
    key = b'["e1"]'
    enriched = {"payload": {"after": after, "op": "c", "ts_ns": 1}, "schema": {"type": "struct"}}
    row = ChangefeedRow("e1", deleted=False, needs_stitch=True, updated=None)
    assert decode(key, _json(enriched), "auto", AVRO) == row
    assert decode(key, _json({"after": after, "op": "u", "ts_ns": 1}), "auto", AVRO) == row
    gone = {"payload": {"after": None, "before": after, "op": "d"}, "schema": {}}
    assert decode(key, _json(gone), "auto", AVRO) == ChangefeedRow("e1", True, False, None)
    bare = {**after, "__crdb__": {"updated": "5.0"}}
    assert decode(None, _json(bare), "auto", AVRO) == ChangefeedRow("e1", False, True, "5.0")
    crdb_resolved = _json({"__crdb__": {"resolved": "7.0"}})
    assert decode(None, crdb_resolved, "auto", AVRO) == Resolved("7.0")
    assert webhook_entries(crdb_resolved) == Resolved("7.0")
    with pytest.raises(InvalidInput, match="key_only changefeed message carries no row"):
        decode(key, None, "auto", AVRO)
    [entry] = envelopes_of(_json({"payload": [{"key": ["e1"], "topic": "t"}], "length": 1}))
    assert entry.reason is not None and entry.reason.startswith("key_only changefeed message")
    assert decode(b"e1", None, "auto", AVRO) == Ignored("tombstone", "null value")


def test_plain_events_in_a_webhook_body_are_dead_letters_unless_accepted() -> None:
    body = _json({"payload": [JSON_EVENT, {"after": {"id": "e1"}}], "length": 2})
    refused, row = envelopes_of(body)
    assert (refused.reason, refused.decoded) == (PLAIN_EVENT, None)
    assert row.reason is None
    accepted, _ = envelopes_of(body, accept_events=True)
    assert accepted.reason is None and accepted.decoded is not None
