"""Schema registry basic auth, against a real HTTP server speaking the registry protocol.

The server answers ``GET /schemas/ids/<id>`` only with the right ``Authorization`` header (401
otherwise), like a registry behind basic auth. Credentials come from the settings or from the
URL; no error or log line may show the password.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from stream_cps import config
from stream_cps.errors import ConfigError, Fatal, Transient
from stream_cps.sources.kafka import avro as kafka_avro
from stream_cps_dev import encode

USER, SECRET = "reg-user", "reg-s3cret/x"
QUOTED = SECRET.replace("/", "%2F")  # as it goes in a URL
SCHEMA = kafka_avro.load_schema(kafka_avro.SCHEMAS_DIR / kafka_avro.READER_FILE)
RECORD = {
    "id": "e1",
    "source_id": "web",
    "type": "page_view",
    "version": "1-0-0",
    "event_time": 1772366400000000,
    "payload": "{}",
}


@pytest.fixture
def registry() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a registry that wants ``USER``/``SECRET``."""
    schema_text = (kafka_avro.SCHEMAS_DIR / kafka_avro.READER_FILE).read_text()
    wanted = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != wanted:
                data, status = b'{"error_code": 401, "message": "Unauthorized"}', 401
            elif self.path == "/schemas/ids/42":
                data, status = json.dumps({"schema": schema_text}).encode(), 200
            else:
                data, status = b'{"error_code": 40403}', 404
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
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


def resolver(**env: str) -> kafka_avro.SchemaResolver:
    names = {config.env_var(f"kafka.{k}"): v for k, v in env.items()}
    return kafka_avro.SchemaResolver.from_settings(config.load(environ=names).kafka)


def framed() -> bytes:
    return encode.encode(RECORD, SCHEMA, schema_id=42)


def test_credentials_in_the_url_are_sent_as_basic_auth(registry: str) -> None:
    found = resolver(schema_registry_url=registry.replace("//", f"//{USER}:{QUOTED}@"))
    assert found.decode(framed())["id"] == "e1"
    assert found.registry is not None and found.registry.where == registry
    assert SECRET not in repr(found.registry) and QUOTED not in repr(found.registry)


def test_credentials_as_settings_and_from_a_file(registry: str, tmp_path: Path) -> None:
    found = resolver(
        schema_registry_url=registry,
        schema_registry_username=USER,
        schema_registry_password=SECRET,
    )
    assert found.decode(framed())["id"] == "e1"
    secret = tmp_path / "registry-password"
    secret.write_text(SECRET + "\n")
    found = resolver(
        schema_registry_url=registry,
        schema_registry_username=USER,
        schema_registry_password_file=str(secret),
    )
    assert found.decode(framed())["id"] == "e1"


def test_a_wrong_password_is_fatal_at_once_and_never_printed(
    registry: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wr0ng-pass"
    found = resolver(schema_registry_url=registry.replace("//", f"//{USER}:{wrong}@"))
    with caplog.at_level(logging.DEBUG), pytest.raises(Fatal) as failure:
        found.decode(framed())
    assert "HTTP 401" in str(failure.value) and registry in str(failure.value)
    assert wrong not in str(failure.value) and wrong not in caplog.text
    assert "retrying" not in caplog.text  # no retry fixes a refused password


def test_an_unreachable_registry_never_shows_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = resolver(schema_registry_url=f"http://{USER}:{QUOTED}@127.0.0.1:{port}")
    with caplog.at_level(logging.DEBUG), pytest.raises(Transient) as failure:
        found.decode(framed())
    assert f"http://127.0.0.1:{port}/schemas/ids/42" in str(failure.value)
    for secret in (SECRET, QUOTED):
        assert secret not in str(failure.value) and secret not in caplog.text
    assert "retrying" in caplog.text  # reachable later: retried, then given up


def test_credentials_in_the_url_and_as_settings_are_refused(registry: str) -> None:
    with pytest.raises(ConfigError, match="give them once") as failure:
        resolver(
            schema_registry_url=registry.replace("//", f"//{USER}:{QUOTED}@"),
            schema_registry_username=USER,
        )
    assert QUOTED not in str(failure.value)


def test_a_url_that_does_not_parse_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError, match="not a valid URL") as failure:
        resolver(schema_registry_url=f"http://{USER}:{SECRET}@registry.example")  # unquoted /
    assert "s3cret" not in str(failure.value)
    assert failure.value.__cause__ is None and failure.value.__suppress_context__


def test_settings_never_show_registry_secrets() -> None:
    loaded = config.load(
        environ={
            "STREAM_CPS_KAFKA_SCHEMA_REGISTRY_URL": f"https://{USER}:{SECRET}@registry.example",
            "STREAM_CPS_KAFKA_SCHEMA_REGISTRY_PASSWORD": SECRET + "2",
        }
    )
    assert SECRET not in repr(loaded.kafka) and SECRET not in repr(loaded)
