"""The librdkafka configuration every Kafka client of the project starts from.

One place turns the ``kafka`` settings (brokers, security, ``kafka.properties``) into client
configuration, so the consumer, both producers and the replay's admin client and offset reader
connect the same way. Secret files are read here, when a client is made; secrets only ever go
into the dict handed to librdkafka, which does not log them.

librdkafka reports a refused login or an unverifiable certificate only to the error callback
(not as a message or an exception) and retries it for ever. ``ClientErrors`` is that callback:
a permanent error (``retry.kafka_error_is_permanent``) is kept and ``check`` turns it into one
``Fatal`` line; the connection failures librdkafka would also log are logged once, here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stream_cps import retry
from stream_cps.config import KafkaSettings
from stream_cps.errors import ConfigError, Fatal

log = logging.getLogger(__name__)


class _NotTheErrorCallbacks(logging.Filter):
    """Drops librdkafka's ``FAIL`` lines: the same failures reach ``ClientErrors``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.args, tuple) and record.args[:1] == ("FAIL",))


# librdkafka's own log lines (every client of ours logs here, never straight to stderr).
librdkafka_log = logging.getLogger("stream_cps.librdkafka")
librdkafka_log.addFilter(_NotTheErrorCallbacks())

_HINTS = {
    "_AUTHENTICATION": "check kafka.sasl_username, the password and kafka.sasl_mechanism",
    "SASL_AUTHENTICATION_FAILED": "check kafka.sasl_username and the password",
    "_SSL": "check kafka.ssl_ca_location and the broker address against its certificate",
}


class ClientErrors:
    """The error callback of one client: remembers the first permanent error."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.permanent: Any = None

    def __call__(self, error: Any) -> None:
        if retry.kafka_error_is_permanent(error):
            if self.permanent is None:
                self.permanent = error
        elif error.name() == "_ALL_BROKERS_DOWN":  # each broker's failure was logged already
            log.info("kafka %s: %s", self.client, error.str())
        else:
            log.warning("kafka %s: %s", self.client, error.str())

    def check(self) -> None:
        """Raise the permanent error, if there was one, as one line (exit code 2)."""
        error = self.permanent
        if error is None:
            return
        hint = _HINTS.get(error.name())
        raise Fatal(f"kafka: {self.client}: {error.str()}" + (f" ({hint})" if hint else ""))


def read_secret(key: str, value: str | None, file: str | None) -> str | None:
    """A secret given directly (config file or env var) or in a file (first line kept)."""
    if file is None:
        return value
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{key}_file: cannot read {file}: {exc.strerror}") from exc
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"{key}_file: {file} is empty")
    return lines[0]


def client_config(settings: KafkaSettings, errors: ClientErrors) -> dict[str, Any]:
    """The brokers, security settings and ``kafka.properties``, for any client."""
    typed = {
        "security.protocol": settings.security_protocol,
        "sasl.mechanism": settings.sasl_mechanism,
        "sasl.username": settings.sasl_username,
        "sasl.password": read_secret(
            "kafka.sasl_password", settings.sasl_password, settings.sasl_password_file
        ),
        "ssl.ca.location": settings.ssl_ca_location,
        "ssl.certificate.location": settings.ssl_certificate_location,
        "ssl.key.location": settings.ssl_key_location,
        "ssl.key.password": read_secret(
            "kafka.ssl_key_password", settings.ssl_key_password, settings.ssl_key_password_file
        ),
        "ssl.endpoint.identification.algorithm": settings.ssl_endpoint_identification,
    }
    return {
        **settings.properties,
        "bootstrap.servers": settings.bootstrap_servers,
        **{name: value for name, value in typed.items() if value is not None},
        "error_cb": errors,
        "logger": librdkafka_log,
    }
