"""Avro customer events in the Confluent wire format (``framing``), decoded with fastavro.

The writer schema of an id comes from the schema registry when one is configured, else from the
schemas shipped in ``schemas/`` (``ids.json`` maps id -> file), so a collector that writes with an
older or newer compatible schema is read through Avro schema resolution into the shipped reader
schema. Registry look-ups are cached per process; a registry that cannot be reached is a
recoverable error (the batch is retried), never a reason to dead-letter a message.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fastavro

from stream_cps import retry
from stream_cps.avro_schemas import schemas_dir
from stream_cps.errors import InvalidInput, Transient
from stream_cps.sources.kafka.framing import unframe

SCHEMAS_DIR = schemas_dir()
READER_FILE = "customer_event.avsc"


def load_schema(path: Path) -> Any:
    """A parsed Avro schema from an ``.avsc`` file."""
    return fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")))


def shipped_ids(schemas_dir: Path = SCHEMAS_DIR) -> dict[int, Path]:
    """Schema id -> ``.avsc`` file, as ``schemas/ids.json`` lists them."""
    index = json.loads((schemas_dir / "ids.json").read_text(encoding="utf-8"))
    return {int(k): schemas_dir / v for k, v in index.items()}


class SchemaResolver:
    """Finds the writer schema of a framed message; one instance per process (it caches)."""

    def __init__(self, registry_url: str | None, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.registry_url = registry_url.rstrip("/") if registry_url else None
        self.schemas_dir = schemas_dir
        self.reader = load_schema(schemas_dir / READER_FILE)
        self._cache: dict[int, Any] = {}
        self._lock = threading.Lock()

    def writer(self, schema_id: int) -> Any:
        with self._lock:
            found = self._cache.get(schema_id)
        if found is None:
            found = self._fetch(schema_id) if self.registry_url else self._shipped(schema_id)
            with self._lock:
                self._cache[schema_id] = found
        return found

    def _shipped(self, schema_id: int) -> Any:
        path = shipped_ids(self.schemas_dir).get(schema_id)
        if path is None:
            raise InvalidInput(f"unknown Avro schema id {schema_id} (not in schemas/ids.json)")
        return load_schema(path)

    def _fetch(self, schema_id: int) -> Any:
        url = f"{self.registry_url}/schemas/ids/{schema_id}"

        def look_up() -> Any:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise InvalidInput(
                        f"unknown Avro schema id {schema_id} (registry answered 404)"
                    ) from exc
                raise Transient(f"schema registry {url}: HTTP {exc.code}") from exc
            except (OSError, ValueError) as exc:
                raise Transient(f"schema registry {url}: {exc}") from exc

        body = retry.REGISTRY.call(look_up)
        try:
            return fastavro.parse_schema(json.loads(body["schema"]))
        except Exception as exc:
            raise InvalidInput(f"schema id {schema_id}: registry schema unusable: {exc}") from exc

    def decode(self, data: bytes) -> dict[str, Any]:
        """The record in a framed message, resolved into the shipped reader schema."""
        schema_id, offset = unframe(data)
        writer = self.writer(schema_id)
        body = io.BytesIO(data[offset:])
        try:
            record = fastavro.schemaless_reader(body, writer, self.reader)
        except Exception as exc:  # fastavro raises many types for corrupt input
            raise InvalidInput(
                f"Avro body does not decode with schema id {schema_id}: {exc}"
            ) from exc
        if body.tell() != len(data) - offset:
            raise InvalidInput(f"Avro body longer than schema id {schema_id} describes")
        if not isinstance(record, dict):
            raise InvalidInput("Avro record is not a record")
        return record
