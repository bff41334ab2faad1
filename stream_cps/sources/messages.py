"""What a Kafka message (or a webhook entry) means: pure decoding (Avro bodies are decoded by
the ``AvroDecoder`` the caller passes in).

Four outcomes, decided by shape and never by topic name, so one topic may carry several kinds:

- ``CustomerEvent``: a collector's event, Avro (Confluent framing) or a JSON object with
  ``id``, ``source_id``, ``type``, ``version``, ``event_time`` (ISO 8601 with offset), ``payload``.
- ``ChangefeedRow``: a CockroachDB changefeed ``wrapped`` or ``enriched`` message (``after``,
  at the top or under ``payload`` next to ``schema``) or a ``bare`` one (columns plus
  ``__crdb__``); the row lives in the database already, so only its id matters. ``after: null``
  is a delete.
- ``Resolved``: a changefeed ``resolved`` timestamp (sent on every partition; ``bare`` puts it
  under ``__crdb__``).
- ``Ignored``: a tombstone (null value) or a well-formed message of a kind we do not know.

A ``key_only`` changefeed message (a JSON-array key, no value) carries no row and is a dead
letter saying so, never mistaken for a tombstone and dropped.

Anything that cannot be decoded, or is a customer event that violates the schema, raises
``InvalidInput`` with the reason; the caller dead-letters it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from stream_cps.errors import InvalidInput
from stream_cps.sources.kafka.framing import MAGIC

# A JSON escape of NUL: "\u0000" after an even number of backslashes (a "\\u0000" is the
# six characters \u0000, which jsonb stores fine).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

MAX_TEXT = 255  # source_id, type, version are varchar(255) in the guide's DDL
MAX_REASON = 500  # characters of a dead-letter reason (table and topic header)
EVENT_FIELDS = frozenset({"id", "source_id", "type", "version", "event_time", "payload"})
FORMATS = ("auto", "avro", "json")
KEY_ONLY = "key_only changefeed message carries no row; use envelope=wrapped/bare/enriched"
# All a key_only webhook entry has (the Kafka sink sends the key with no value at all).
KEY_ONLY_FIELDS = frozenset({"key", "topic", "updated", "mvcc_timestamp"})


@dataclass(frozen=True)
class CustomerEvent:
    id: str
    source_id: str
    type: str
    version: str
    event_time: datetime
    payload: str  # JSON object text, validated to be storable as jsonb


@dataclass(frozen=True)
class ChangefeedRow:
    event_id: str
    deleted: bool
    # False when the row already carries ``stitched``: our own write echoed back by the feed.
    needs_stitch: bool
    updated: str | None


@dataclass(frozen=True)
class Resolved:
    timestamp: str


@dataclass(frozen=True)
class Ignored:
    kind: str  # "tombstone" or "unknown"
    detail: str


Decoded = CustomerEvent | ChangefeedRow | Resolved | Ignored


class AvroDecoder(Protocol):
    """Turns a Confluent-framed Avro message into its record (``kafka.avro.SchemaResolver``)."""

    def decode(self, data: bytes) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Envelope:
    """One input message with its origin; ``decoded`` or the ``reason`` it is a dead letter."""

    origin: str  # the dead-letter id: kafka:<topic>:<partition>:<offset> or webhook:<digest>:<n>
    source: str  # "kafka" or "webhook"
    topic: str | None
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None
    timestamp: datetime | None
    decoded: Decoded | None = None
    reason: str | None = None
    # Trace-context headers the message carried (W3C ``traceparent``...): header -> text.
    trace: tuple[tuple[str, str], ...] = ()

    def where(self) -> str:
        if self.source == "kafka":
            return f"{self.topic}[{self.partition}]@{self.offset}"
        return self.origin


def decode(
    key: bytes | None, value: bytes | None, message_format: str, avro: AvroDecoder
) -> Decoded:
    """Decode one Kafka message; raises ``InvalidInput`` for a dead letter."""
    if value is None or value == b"":
        if _is_changefeed_key(key):
            raise InvalidInput(KEY_ONLY)
        return Ignored("tombstone", "null value")
    if value[0] == MAGIC:
        if message_format == "json":
            raise InvalidInput("Avro-framed message but kafka.message_format is json")
        return customer_event(avro.decode(value), from_avro=True)
    if message_format == "avro":
        raise InvalidInput("not Confluent-framed Avro (first byte is not 0)")
    obj = parse_json(value)
    if not isinstance(obj, dict):
        return Ignored("unknown", f"JSON {type(obj).__name__}, not an object")
    return decode_object(obj, key)


def decode_object(obj: dict[str, Any], key: bytes | list[Any] | None) -> Decoded:
    """A JSON object: changefeed message, customer event, or unknown."""
    if "after" in obj:
        return _changefeed_row(obj, key)
    if "resolved" in obj:
        return _resolved(obj["resolved"])
    if "__crdb__" in obj:
        return _bare(obj, key)
    enriched = obj.get("payload")
    if "schema" in obj and isinstance(enriched, dict) and ("after" in enriched or "op" in enriched):
        # envelope=enriched with the schema property: the message is {"payload", "schema"}.
        return decode_object({**enriched, "key": obj.get("key", key)}, key)
    if "key" in obj and set(obj) <= KEY_ONLY_FIELDS:
        raise InvalidInput(KEY_ONLY)  # a webhook entry of a key_only changefeed
    if EVENT_FIELDS.intersection(obj):
        # Looks like a customer event: one with a field missing is a dead letter naming it,
        # not an "unknown kind" that would be dropped.
        return customer_event(obj, from_avro=False)
    return Ignored("unknown", "JSON object with neither after, resolved nor event fields")


def _resolved(resolved: Any) -> Resolved:
    if not isinstance(resolved, str):
        raise InvalidInput("changefeed resolved timestamp is not a string")
    return Resolved(resolved)


def _bare(obj: dict[str, Any], key: bytes | list[Any] | None) -> Decoded:
    """envelope=bare: the row's columns at the top, the metadata under ``__crdb__``."""
    crdb = obj["__crdb__"]
    if not isinstance(crdb, dict):
        raise InvalidInput("changefeed __crdb__ is not an object")
    if "resolved" in crdb:
        return _resolved(crdb["resolved"])
    row = {k: v for k, v in obj.items() if k not in ("__crdb__", "key", "topic")}
    return _changefeed_row({"after": row, "updated": crdb.get("updated")}, obj.get("key", key))


def short_reason(text: str) -> str:
    """A dead-letter reason fit for a table row, a Kafka header and a log line: one quoting a
    whole value (a schema, a huge field) is cut to ``MAX_REASON`` characters with an ellipsis."""
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "\u2026"


def reason_class(reason: str | None) -> str:
    """A dead-letter reason's first words, as a metric label of few values: ``not valid
    JSON: Expecting value ...`` -> ``not_valid_json``. Values quoted in reasons never reach a
    label (the words stop at the first colon, quote or digit, at most three are kept)."""
    head = re.split(r"[:'\"0-9({\[]", reason or "", maxsplit=1)[0]
    words = re.findall(r"[a-z_]+", head.lower())[:3]
    return "_".join(words) or "other"


def parse_json(data: bytes | str) -> Any:
    try:
        return _JSON.decode(data if isinstance(data, str) else data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise InvalidInput(f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("not valid JSON: nested too deeply") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message: ``json.loads`` with an option builds a new one per call
# (a twentieth of a Kafka member's decoding time).
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def customer_event(record: dict[str, Any], *, from_avro: bool) -> CustomerEvent:
    """Validate a decoded record against the customer event schema."""
    event_id = _text(record, "id", limit=None)
    fields = [_text(record, name, limit=MAX_TEXT) for name in ("source_id", "type", "version")]
    when = record.get("event_time")
    if from_avro:
        if not isinstance(when, datetime):
            raise InvalidInput("event_time: not a timestamp")
        event_time = when if when.tzinfo else when.replace(tzinfo=UTC)
    else:
        event_time = _iso_time(when)
    payload = record.get("payload")
    text: str | None = None
    if from_avro:
        if not isinstance(payload, str):
            raise InvalidInput("payload: not a string")
        text, payload = payload, parse_json(payload)
    if not isinstance(payload, dict):
        raise InvalidInput("payload: must be a JSON object")
    if text is None:
        # Re-serialised from the parsed object; Avro's text is kept as sent (it parsed).
        text = json.dumps(payload, separators=(",", ":"))  # ASCII: lone surrogates stay escaped
    # The regex only where the escape's text occurs at all (most payloads: a substring scan).
    if "\x00" in text or ("\\u0000" in text and _NUL_ESCAPE.search(text)):
        raise InvalidInput("payload: contains \\u0000, which jsonb cannot store")
    return CustomerEvent(event_id, fields[0], fields[1], fields[2], event_time, text)


def _text(record: dict[str, Any], name: str, limit: int | None) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name}: required non-empty string")
    if limit is not None and len(value) > limit:
        raise InvalidInput(f"{name}: longer than {limit} characters")
    if "\x00" in value:
        raise InvalidInput(f"{name}: contains a NUL character")
    return value


def _iso_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidInput("event_time: required ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"event_time: not ISO 8601: {value!r}") from exc
    if parsed.tzinfo is None:
        raise InvalidInput(f"event_time: no UTC offset in {value!r}")
    return parsed


def _changefeed_row(obj: dict[str, Any], key: bytes | list[Any] | None) -> ChangefeedRow:
    after = obj["after"]
    updated = obj.get("updated")
    updated_text = updated if isinstance(updated, str) else None
    key_id = _key_id(obj.get("key", key))
    if after is None:
        if key_id is None:
            raise InvalidInput("changefeed delete without a usable key")
        return ChangefeedRow(key_id, deleted=True, needs_stitch=False, updated=updated_text)
    if not isinstance(after, dict):
        raise InvalidInput("changefeed after is neither an object nor null")
    row_id = after.get("id", key_id)
    if not isinstance(row_id, str) or not row_id:
        raise InvalidInput("changefeed row without a string id (after.id or key[0])")
    return ChangefeedRow(
        row_id, deleted=False, needs_stitch=after.get("stitched") is None, updated=updated_text
    )


def _is_changefeed_key(key: bytes | None) -> bool:
    """A changefeed's key: the primary key as a non-empty JSON array."""
    if not key or key[:1] != b"[":
        return False
    try:
        parsed = json.loads(key.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(parsed, list) and bool(parsed)


def _key_id(key: bytes | list[Any] | None) -> str | None:
    """The event id from a changefeed key: a JSON array of the primary key, ``["<id>"]``."""
    if isinstance(key, bytes):
        try:
            key = json.loads(key.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
    if isinstance(key, list) and len(key) == 1 and isinstance(key[0], str) and key[0]:
        return key[0]
    return None


def webhook_entries(body: bytes) -> list[Any] | Resolved:
    """The messages in a changefeed webhook request: ``{"payload": [...], "length": N}``.

    A webhook sink posts ``resolved`` messages as a bare ``{"resolved": "..."}`` body
    (``{"__crdb__": {"resolved": "..."}}`` with envelope=bare).
    """
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise InvalidInput("webhook body is not a JSON object")
    if "payload" not in obj and ("resolved" in obj or "__crdb__" in obj):
        resolved = decode_object(obj, None)
        if not isinstance(resolved, Resolved):
            raise InvalidInput("webhook body without payload is not a resolved message")
        return resolved
    payload, length = obj.get("payload"), obj.get("length")
    if not isinstance(payload, list) or not isinstance(length, int) or isinstance(length, bool):
        raise InvalidInput('webhook body is not {"payload": [...], "length": N}')
    if length != len(payload):
        raise InvalidInput(f"webhook body says length {length} but carries {len(payload)}")
    return payload
