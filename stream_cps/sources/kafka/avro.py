"""Avro customer events in the Confluent wire format (``framing``), decoded with fastavro.

The writer schema of an id comes from the schema registry when one is configured, else from the
schemas shipped in ``schemas/`` (``ids.json`` maps id -> file), so a collector that writes with an
older or newer compatible schema is read through Avro schema resolution into the shipped reader
schema. Registry look-ups are cached per process; a registry that cannot be reached is a
recoverable error (the batch is retried), never a reason to dead-letter a message; one that
refuses our credentials (401/403) is fatal, since no retry fixes it.

Registry credentials (``kafka.schema_registry_username`` / ``_password`` / ``_password_file``,
or ``user:password@`` in the URL) go as HTTP basic auth. The URL in errors and logs is always
the one without them (``registry.where``), so no message shows a secret.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from stream_cps import retry
from stream_cps.avro_schemas import schemas_dir
from stream_cps.config import KafkaSettings
from stream_cps.errors import ConfigError, Fatal, InvalidInput, Transient
from stream_cps.kafka_client import read_secret
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


@dataclass(frozen=True)
class Registry:
    """A schema registry: its URL without credentials, and the basic-auth header if any."""

    where: str
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, username: str | None = None, password: str | None = None) -> Registry:
        """Credentials in the URL (``https://user:secret@host``) or given apart, not both."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:  # its message would quote the URL, credentials and all
            raise ConfigError(
                "kafka.schema_registry_url: not a valid URL (percent-encode a password with "
                "/, @, : or # in it)"
            ) from None
        name = parts.hostname or ""
        host = f"[{name}]" if ":" in name else name
        if port is not None:
            host = f"{host}:{port}"
        where = urllib.parse.urlunsplit(parts._replace(netloc=host)).rstrip("/")
        if parts.username is not None or parts.password is not None:
            if username is not None or password is not None:
                raise ConfigError(
                    f"kafka.schema_registry_url: {where}: credentials in the URL and in "
                    "kafka.schema_registry_username/_password; give them once"
                )
            username = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
        if username is None and password is None:
            return cls(where)
        token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
        return cls(where, f"Basic {token}")


class SchemaResolver:
    """Finds the writer schema of a framed message; one instance per process (it caches)."""

    def __init__(self, registry: Registry | None, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.registry = registry
        self.schemas_dir = schemas_dir
        self.reader = load_schema(schemas_dir / READER_FILE)
        self._cache: dict[int, tuple[Any, Any | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: KafkaSettings) -> SchemaResolver:
        """The registry of ``kafka.schema_registry_*``, or the shipped schemas without one."""
        if not settings.schema_registry_url:
            return cls(None)
        password = read_secret(
            "kafka.schema_registry_password",
            settings.schema_registry_password,
            settings.schema_registry_password_file,
        )
        registry = Registry.parse(
            settings.schema_registry_url, settings.schema_registry_username, password
        )
        return cls(registry)

    def resolution(self, schema_id: int) -> tuple[Any, Any | None]:
        """The writer schema of ``schema_id`` and the reader schema to resolve it into, or None
        when the two are equal: fastavro then skips resolution, which it would otherwise check
        on every message by comparing the two schemas (a fifth of its decoding time)."""
        with self._lock:
            found = self._cache.get(schema_id)
        if found is None:
            writer = self._fetch(schema_id) if self.registry else self._shipped(schema_id)
            found = (writer, None if writer == self.reader else self.reader)
            with self._lock:
                self._cache[schema_id] = found
        return found

    def _shipped(self, schema_id: int) -> Any:
        path = shipped_ids(self.schemas_dir).get(schema_id)
        if path is None:
            raise InvalidInput(f"unknown Avro schema id {schema_id} (not in schemas/ids.json)")
        return load_schema(path)

    def _fetch(self, schema_id: int) -> Any:
        assert self.registry is not None
        url = f"{self.registry.where}/schemas/ids/{schema_id}"  # no credentials in it
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.registry.authorization:
            request.add_unredirected_header("Authorization", self.registry.authorization)

        def look_up() -> Any:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise InvalidInput(
                        f"unknown Avro schema id {schema_id} (registry answered 404)"
                    ) from exc
                if exc.code in (401, 403):
                    raise Fatal(
                        f"schema registry {url}: HTTP {exc.code} (check "
                        "kafka.schema_registry_username and the password)"
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
        writer, reader = self.resolution(schema_id)
        body = io.BytesIO(data[offset:])
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except Exception as exc:  # fastavro raises many types for corrupt input
            raise InvalidInput(
                f"Avro body does not decode with schema id {schema_id}: {exc}"
            ) from exc
        if body.tell() != len(data) - offset:
            raise InvalidInput(f"Avro body longer than schema id {schema_id} describes")
        if not isinstance(record, dict):
            raise InvalidInput("Avro record is not a record")
        return record
