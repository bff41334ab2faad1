"""Settings: the guide's JSON file as-is, plus our own sections, env vars and flags.

Precedence is flag > environment > file > default, decided per key. Every key is declared once
in ``FIELDS`` (name, type, default, help); ``docs/configuration.md`` documents the same table and
a test keeps the two in step. Invalid input fails fast with one message naming the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from psycopg.conninfo import make_conninfo

from stream_cps.errors import ConfigError

ENV_PREFIX = "STREAM_CPS_"
_T = TypeVar("_T")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


@dataclass(frozen=True)
class Field:
    """One setting: its type, default and a line of help for the docs."""

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    def parse(self, key: str, raw: Any) -> Any:
        try:
            value = _coerce(self.type, raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: expected {self.type.__name__}, got {raw!r}") from exc
        if self.choices and value is not None and value not in self.choices:
            raise ConfigError(f"{key}: must be one of {', '.join(self.choices)}, got {value!r}")
        return value


def _coerce(kind: type, raw: Any) -> Any:
    if raw is None:
        return None
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ValueError(raw)
    if kind is list:
        if isinstance(raw, list):
            return [str(v) for v in raw]
        return [part.strip() for part in str(raw).split(",") if part.strip()]
    if kind is dict:
        data = json.loads(raw) if isinstance(raw, str) else raw  # a JSON object in env vars
        if not isinstance(data, dict):
            raise TypeError(raw)
        return {str(k): _property(v) for k, v in data.items()}
    if kind in (int, float) and isinstance(raw, bool):
        raise TypeError(raw)
    return kind(raw)


def _property(value: Any) -> str:
    """A librdkafka property value as the string it wants (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list) or value is None:
        raise TypeError(value)
    return str(value)


FIELDS: dict[str, Field] = {
    "dsn": Field(
        str, None, "PostgreSQL connection string; else built from the `postgresql` section"
    ),
    "cdp_schema": Field(
        str, "public", "schema of sources, events, attributes, customer_attributes"
    ),
    "ce_schema": Field(str, "cdp_ce", "schema of customer_events"),
    "ps_schema": Field(str, "cdp_ps", "schema of stitching_attributes_config and stitching state"),
    "attr_schema": Field(str, "cdp_attr", "schema of caches, context alias, outbox, errors"),
    "stitching.batch_size": Field(
        int, 2000, "events stitched per transaction (and purge signals applied, beyond its own)"
    ),
    "stitching.poll_interval": Field(float, 0.05, "seconds between slot polls when idle"),
    "stitching.sweep_interval": Field(
        float,
        1.0,
        "seconds between sweeps for rows with stitched IS NULL the slot did not carry (at "
        "least; longer while that check is slow, so it takes at most 5% of the stitching "
        "connection's time; purge signals are seen at once)",
    ),
    "stitching.slot_name": Field(str, "stream_cps", "logical replication slot (pgoutput)"),
    "stitching.publication": Field(str, "stream_cps_events", "publication on customer_events"),
    "stitching.replication": Field(
        str,
        "stream",
        "how the slot is read: a replication stream, or SQL peek + advance",
        choices=("stream", "peek"),
    ),
    "stitching.standby_poll": Field(float, 2.0, "seconds a standby waits between takeover tries"),
    "stitching.rule_timeout_ms": Field(
        int, 5000, "statement timeout for evaluating the stitching rules over one batch"
    ),
    "stitching.rule_max_failures": Field(
        int,
        100,
        "failed events after which a stitching rule is disabled until its row changes (0: never)",
    ),
    "stitching.quarantine_limit": Field(
        int,
        100,
        "an identifier co-occurring with more distinct identifiers of one other attribute is "
        "quarantined (0: never)",
    ),
    "stitching.quarantine_limits": Field(
        dict,
        {},
        "per-pair overrides of stitching.quarantine_limit, a JSON object "
        '{"ATTRIBUTE:OTHER_ATTRIBUTE": limit}',
    ),
    "attributes.enabled": Field(
        bool, True, "this process calculates attributes (turn off on all but one Kafka member)"
    ),
    "attributes.batch_size": Field(int, 500, "entities calculated per transaction"),
    "attributes.statement_timeout_ms": Field(
        int, 10000, "statement timeout for admin-written attribute SQL"
    ),
    "attributes.max_value_bytes": Field(
        int, 1048576, "largest value one attribute may store for one entity (bytes, as jsonb)"
    ),
    "attributes.worker_timeout_ms": Field(
        int, 300000, "statement timeout for the worker's own SQL (loading events, storing, caches)"
    ),
    "attributes.large_entity_identifiers": Field(
        int, 1000, "entities with more identifiers are calculated one at a time, after the rest"
    ),
    "attributes.poll_interval": Field(float, 0.5, "seconds between looks for due entities"),
    "attributes.max_defer": Field(
        float, 5.0, "longest wait of calculation while stitching works through a backlog"
    ),
    "attributes.context_max_age_hours": Field(
        float, 24.0, "context values older than this are refreshed before calculation"
    ),
    "attributes.cache_interval": Field(float, 300.0, "seconds between UI cache refreshes"),
    "kafka.bootstrap_servers": Field(str, "localhost:9092", "Kafka brokers, host:port[,...]"),
    "kafka.group_id": Field(str, "stream-cps", "consumer group every `run --source kafka` joins"),
    "kafka.topics": Field(list, ["customer_events"], "topics consumed (comma-separated)"),
    "kafka.dead_letter_topic": Field(
        str, "stream-cps-dead-letters", "where undecodable messages are copied"
    ),
    "kafka.security_protocol": Field(
        str,
        None,
        "how every Kafka client connects (librdkafka security.protocol; unset: plaintext)",
        choices=("plaintext", "ssl", "sasl_plaintext", "sasl_ssl"),
    ),
    "kafka.sasl_mechanism": Field(
        str,
        None,
        "SASL mechanism (sasl.mechanism)",
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"),
    ),
    "kafka.sasl_username": Field(str, None, "SASL user name (sasl.username)"),
    "kafka.sasl_password": Field(
        str, None, "SASL password (sasl.password); secret: prefer the env var or the _file"
    ),
    "kafka.sasl_password_file": Field(
        str, None, "file holding the SASL password (read at start, trailing newline dropped)"
    ),
    "kafka.ssl_ca_location": Field(
        str, None, "PEM file of the CA(s) that sign the brokers' certificates (ssl.ca.location)"
    ),
    "kafka.ssl_certificate_location": Field(
        str, None, "client certificate (PEM) for TLS client authentication"
    ),
    "kafka.ssl_key_location": Field(str, None, "client private key (PEM) for that certificate"),
    "kafka.ssl_key_password": Field(
        str, None, "password of the client private key; secret: prefer the env var or the _file"
    ),
    "kafka.ssl_key_password_file": Field(str, None, "file holding the client key's password"),
    "kafka.ssl_endpoint_identification": Field(
        str,
        None,
        "check the broker certificate's host name (ssl.endpoint.identification.algorithm; "
        "librdkafka's default: https)",
        choices=("https", "none"),
    ),
    "kafka.properties": Field(
        dict, {}, "more librdkafka properties for every Kafka client (a JSON object)"
    ),
    "kafka.schema_registry_url": Field(
        str,
        None,
        "Confluent schema registry (user:password@ in it is sent as basic auth); else Avro ids "
        "resolve from the shipped schemas/",
    ),
    "kafka.schema_registry_username": Field(str, None, "schema registry basic-auth user"),
    "kafka.schema_registry_password": Field(
        str, None, "schema registry basic-auth password; secret: prefer the env var or the _file"
    ),
    "kafka.schema_registry_password_file": Field(
        str, None, "file holding the schema registry password"
    ),
    "kafka.message_format": Field(
        str, "auto", "customer event encoding", choices=("auto", "avro", "json")
    ),
    "kafka.batch_size": Field(int, 2000, "messages applied per database transaction"),
    "kafka.poll_timeout": Field(float, 0.2, "seconds a poll waits for the first message"),
    "kafka.session_timeout": Field(
        float, 10.0, "seconds without heartbeat before a dead member's partitions move"
    ),
    "webhook.host": Field(
        str, "127.0.0.1", "address `stream-cps webhook` listens on (0.0.0.0: every interface)"
    ),
    "webhook.port": Field(int, 8443, "HTTPS port of `stream-cps webhook`"),
    "webhook.cert_file": Field(str, None, "PEM certificate (chain) of the webhook server"),
    "webhook.key_file": Field(str, None, "PEM private key of the webhook server"),
    "webhook.client_ca_file": Field(
        str, None, "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    ),
    "webhook.auth_header": Field(
        str, "Authorization", "request header that must carry webhook.auth_secret"
    ),
    "webhook.auth_secret": Field(
        str, None, "the whole value the auth header must have (better from the environment)"
    ),
    "webhook.auth_secret_file": Field(
        str, None, "file holding webhook.auth_secret (one trailing newline is dropped)"
    ),
    "webhook.allow_unauthenticated": Field(
        bool, False, "serve without client certificates or a secret header (trusted networks)"
    ),
    "webhook.accept_events": Field(
        bool, False, "also insert plain customer events posted to the webhook (else dead letters)"
    ),
    "webhook.max_connections": Field(
        int, 8, "requests applied at once, and the most database connections the webhook holds"
    ),
    "webhook.max_wait": Field(
        float, 5.0, "seconds a request waits for one of webhook.max_connections before a 503"
    ),
    "opensearch.url": Field(
        str, None, "OpenSearch URL (credentials may go in it); unset = no index, relay off"
    ),
    "opensearch.index": Field(str, "customer_entities", "index holding one document per entity"),
    "opensearch.batch_size": Field(int, 500, "outbox commands per bulk request"),
    "opensearch.poll_interval": Field(float, 0.2, "seconds between outbox polls when idle"),
    "opensearch.timeout": Field(float, 10.0, "seconds one bulk request may take"),
    "opensearch.max_backoff": Field(
        float, 30.0, "longest wait between retries while OpenSearch is unavailable"
    ),
    "opensearch.gc_deletes": Field(
        str, "1d", "how long delete tombstones reject older writes (index.gc_deletes)"
    ),
    "opensearch.replicas": Field(int, 1, "number_of_replicas of the index"),
    "opensearch.keep_delivered_hours": Field(
        float, 24.0, "delivered outbox rows older than this are deleted by the relay"
    ),
    "opensearch.outbox": Field(
        str,
        "auto",
        "write OpenSearch commands to the outbox: auto = only when opensearch.url is set",
        choices=("auto", "always", "off"),
    ),
    "opensearch.kafka_topic": Field(
        str, None, "also produce delivered commands to this Kafka topic (Avro)"
    ),
    "telemetry.exporter": Field(
        str, "none", "where spans and metrics go", choices=("none", "console", "otlp")
    ),
    "telemetry.otlp_endpoint": Field(str, "http://localhost:4318", "OTLP/HTTP collector URL"),
    "telemetry.service_name": Field(str, "stream-cps", "service.name resource attribute"),
    "http.address": Field(
        str,
        None,
        "host:port where `run` serves /healthz, /readyz and /metrics (port 0: any free one); "
        "unset = off",
    ),
    "http.sample_interval": Field(
        float, 5.0, "seconds between the database samples behind the waiting-work gauges"
    ),
    "log_level": Field(str, "INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    "log_format": Field(
        str,
        "text",
        "log lines as text, or JSON objects (time, level, logger, message)",
        choices=("text", "json"),
    ),
}

_SCHEMA_KEYS = ("cdp_schema", "ce_schema", "ps_schema", "attr_schema")
_PG_KEYS = {"host", "port", "user", "password", "dbname", "sslmode"}


@dataclass(frozen=True)
class Schemas:
    """The four configurable schema names (defaults are the guide's)."""

    cdp: str = "public"
    ce: str = "cdp_ce"
    ps: str = "cdp_ps"
    attr: str = "cdp_attr"


@dataclass(frozen=True)
class StitchingSettings:
    batch_size: int
    poll_interval: float
    sweep_interval: float
    slot_name: str
    publication: str
    replication: str
    standby_poll: float
    rule_timeout_ms: int
    rule_max_failures: int
    quarantine_limit: int
    quarantine_limits: Mapping[str, str]


@dataclass(frozen=True)
class AttributeSettings:
    enabled: bool
    batch_size: int
    statement_timeout_ms: int
    max_value_bytes: int
    worker_timeout_ms: int
    large_entity_identifiers: int
    poll_interval: float
    max_defer: float
    context_max_age_hours: float
    cache_interval: float


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    group_id: str
    topics: tuple[str, ...]
    dead_letter_topic: str
    security_protocol: str | None
    sasl_mechanism: str | None
    sasl_username: str | None
    sasl_password: str | None = field(repr=False)
    sasl_password_file: str | None
    ssl_ca_location: str | None
    ssl_certificate_location: str | None
    ssl_key_location: str | None
    ssl_key_password: str | None = field(repr=False)
    ssl_key_password_file: str | None
    ssl_endpoint_identification: str | None
    properties: Mapping[str, str] = field(repr=False)  # may hold secrets (OAuth client secret)
    schema_registry_url: str | None = field(repr=False)  # may carry credentials
    schema_registry_username: str | None
    schema_registry_password: str | None = field(repr=False)
    schema_registry_password_file: str | None
    message_format: str
    batch_size: int
    poll_timeout: float
    session_timeout: float


@dataclass(frozen=True)
class WebhookSettings:
    host: str
    port: int
    cert_file: str | None
    key_file: str | None
    client_ca_file: str | None
    auth_header: str
    auth_secret: str | None = field(repr=False)
    auth_secret_file: str | None
    allow_unauthenticated: bool
    accept_events: bool
    max_connections: int
    max_wait: float


@dataclass(frozen=True)
class OpenSearchSettings:
    url: str | None = field(repr=False)  # may carry credentials
    index: str
    batch_size: int
    poll_interval: float
    timeout: float
    max_backoff: float
    gc_deletes: str
    replicas: int
    keep_delivered_hours: float
    outbox: str
    kafka_topic: str | None

    @property
    def writes_outbox(self) -> bool:
        """Commands nobody will deliver are not written: without a relay the outbox only grows
        (``stream-cps reindex`` queues every entity once OpenSearch is configured)."""
        return self.outbox == "always" or (self.outbox == "auto" and self.url is not None)


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str
    otlp_endpoint: str
    service_name: str


@dataclass(frozen=True)
class HttpSettings:
    address: str | None
    sample_interval: float

    def host_port(self) -> tuple[str, int]:
        """``http.address`` split; ConfigError naming the key when it is not host:port."""
        host, sep, port = (self.address or "").rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"http.address: expected host:port, got {self.address!r}")
        return host.strip("[]"), int(port)


# Section name -> its typed settings; every field is one ``FIELDS`` key "<section>.<field>".
SECTIONS: dict[str, type] = {
    "stitching": StitchingSettings,
    "attributes": AttributeSettings,
    "kafka": KafkaSettings,
    "webhook": WebhookSettings,
    "opensearch": OpenSearchSettings,
    "telemetry": TelemetrySettings,
    "http": HttpSettings,
}


def _section_keys() -> set[str]:
    return {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)}


_TOP_LEVEL = {"dsn", "log_level", "log_format", *_SCHEMA_KEYS}
_MISMATCH = _section_keys() ^ (set(FIELDS) - _TOP_LEVEL)
if _MISMATCH:  # pragma: no cover - a programming error, caught when the module is imported
    raise AssertionError(f"config: FIELDS and the typed sections differ: {sorted(_MISMATCH)}")


def _build(cls: type[_T], name: str, values: Mapping[str, Any]) -> _T:
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = values[f"{name}.{f.name}"]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


@dataclass(frozen=True)
class Settings:
    """Resolved configuration as typed sections: ``settings.stitching.batch_size``.

    ``values`` keeps every ``FIELDS`` key as resolved (for ``replace`` and for handing the
    same settings to a child process); code reads the typed sections.
    """

    values: Mapping[str, Any] = field(repr=False)
    schemas: Schemas = field(init=False)
    stitching: StitchingSettings = field(init=False)
    attributes: AttributeSettings = field(init=False)
    kafka: KafkaSettings = field(init=False)
    webhook: WebhookSettings = field(init=False)
    opensearch: OpenSearchSettings = field(init=False)
    telemetry: TelemetrySettings = field(init=False)
    http: HttpSettings = field(init=False)
    log_level: str = field(init=False)
    log_format: str = field(init=False)

    def __post_init__(self) -> None:
        v = self.values
        put = object.__setattr__
        put(
            self,
            "schemas",
            Schemas(v["cdp_schema"], v["ce_schema"], v["ps_schema"], v["attr_schema"]),
        )
        put(self, "stitching", _build(StitchingSettings, "stitching", v))
        put(self, "attributes", _build(AttributeSettings, "attributes", v))
        put(self, "kafka", _build(KafkaSettings, "kafka", v))
        put(self, "webhook", _build(WebhookSettings, "webhook", v))
        put(self, "opensearch", _build(OpenSearchSettings, "opensearch", v))
        put(self, "telemetry", _build(TelemetrySettings, "telemetry", v))
        put(self, "http", _build(HttpSettings, "http", v))
        put(self, "log_level", str(v["log_level"]))
        put(self, "log_format", str(v["log_format"]))

    @property
    def dsn(self) -> str:
        dsn = self.values.get("dsn")
        if not dsn:
            raise ConfigError(
                "dsn: no database given; pass --dsn, set STREAM_CPS_DSN, or add a "
                "`postgresql` section to the --config file"
            )
        return str(dsn)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some keys changed (dotted keys via a dict: ``replace(**{"a.b": 1})``)."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown setting")
        return Settings({**self.values, **changes})


def load(
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings; flag > env > file > default for each key."""
    env = os.environ if environ is None else environ
    file_values = _read_file(Path(config_file)) if config_file else {}
    values: dict[str, Any] = {}
    for key, spec in FIELDS.items():
        raw: Any = spec.default
        if key in file_values:
            raw = file_values[key]
        env_name = env_var(key)
        if env.get(env_name) not in (None, ""):
            raw = env[env_name]
        if flags and flags.get(key) is not None:
            raw = flags[key]
        values[key] = spec.parse(key, raw)
    for key in _SCHEMA_KEYS:
        if not _IDENT.match(values[key]):
            raise ConfigError(f"{key}: {values[key]!r} is not a valid schema name")
    for key in ("stitching.slot_name", "stitching.publication"):
        if not re.match(r"^[a-z0-9_]{1,63}$", values[key]):
            raise ConfigError(f"{key}: use lower-case letters, digits and _ only")
    at_least_one = (
        "stitching.batch_size",
        "attributes.batch_size",
        "attributes.statement_timeout_ms",  # 0 would switch the timeout off silently
        "attributes.max_value_bytes",
        "stitching.rule_timeout_ms",
        "attributes.worker_timeout_ms",
        "attributes.large_entity_identifiers",
        "kafka.batch_size",
        "webhook.max_connections",
        "opensearch.batch_size",
    )
    for key in at_least_one:
        if values[key] < 1:
            raise ConfigError(f"{key}: must be at least 1")
    _check_quarantine(values)
    if values["http.address"] is not None:
        Settings(values).http.host_port()
    if values["http.sample_interval"] <= 0:
        raise ConfigError("http.sample_interval: must be positive")
    if values["webhook.max_wait"] < 0:
        raise ConfigError("webhook.max_wait: must not be negative")
    _check_kafka_security(values)
    return Settings(values)


def _check_quarantine(values: Mapping[str, Any]) -> None:
    """Limits are counts (0: off); an override names two stitching attributes, which hold no
    ``:`` (docs/stitching.md), as ``ATTRIBUTE:OTHER_ATTRIBUTE``."""
    if values["stitching.quarantine_limit"] < 0:
        raise ConfigError("stitching.quarantine_limit: must not be negative")
    for key, limit in values["stitching.quarantine_limits"].items():
        attribute, sep, other = key.partition(":")
        if not (sep and attribute and other) or ":" in other:
            raise ConfigError(
                f"stitching.quarantine_limits: {key!r} is not ATTRIBUTE:OTHER_ATTRIBUTE"
            )
        if not re.fullmatch(r"\d+", limit):
            raise ConfigError(
                f"stitching.quarantine_limits: {key}: expected a limit of 0 or more, got {limit!r}"
            )


# librdkafka properties stream-cps sets itself: the typed settings, or what the delivery
# guarantees depend on (docs/kafka.md). ``kafka.properties`` may not override them.
_OWN_PROPERTIES = {
    "bootstrap.servers": "kafka.bootstrap_servers",
    "security.protocol": "kafka.security_protocol",
    "sasl.mechanism": "kafka.sasl_mechanism",
    "sasl.mechanisms": "kafka.sasl_mechanism",
    "sasl.username": "kafka.sasl_username",
    "sasl.password": "kafka.sasl_password",
    "ssl.ca.location": "kafka.ssl_ca_location",
    "ssl.certificate.location": "kafka.ssl_certificate_location",
    "ssl.key.location": "kafka.ssl_key_location",
    "ssl.key.password": "kafka.ssl_key_password",
    "ssl.endpoint.identification.algorithm": "kafka.ssl_endpoint_identification",
    "group.id": "kafka.group_id",
    "session.timeout.ms": "kafka.session_timeout",
    "heartbeat.interval.ms": "kafka.session_timeout",
    **dict.fromkeys(
        (
            "client.id",
            "enable.auto.offset.store",
            "enable.auto.commit",
            "auto.commit.interval.ms",
            "auto.offset.reset",
            "partition.assignment.strategy",
            "enable.partition.eof",
            "acks",
            "enable.idempotence",
            "error_cb",
            "logger",
        ),
        "",
    ),
}


def _check_kafka_security(values: Mapping[str, Any]) -> None:
    """Each secret comes from one place, and ``kafka.properties`` overrides nothing of ours."""
    for secret in ("sasl_password", "ssl_key_password", "schema_registry_password"):
        if values[f"kafka.{secret}"] is not None and values[f"kafka.{secret}_file"] is not None:
            raise ConfigError(f"kafka.{secret}: set it or kafka.{secret}_file, not both")
    for name in values["kafka.properties"]:
        if name in _OWN_PROPERTIES:
            instead = _OWN_PROPERTIES[name]
            hint = f"use {instead}" if instead else "stream-cps sets it itself"
            raise ConfigError(f"kafka.properties: {name!r} cannot be set here ({hint})")


def env_var(key: str) -> str:
    """Env var of a key: stitching.batch_size -> STREAM_CPS_STITCHING_BATCH_SIZE."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config: {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a JSON object")
    return _flatten(data)


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "postgresql":
            flat["dsn"] = _dsn_from_section(value)
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                name = f"{key}.{sub}"
                if name not in FIELDS:
                    raise ConfigError(f"{name}: unknown setting")
                flat[name] = subvalue
        elif key in FIELDS:
            flat[key] = value
        else:
            raise ConfigError(f"{key}: unknown setting")
    return flat


def _dsn_from_section(section: Any) -> str:
    if not isinstance(section, dict):
        raise ConfigError("postgresql: must be an object with host, user, password, dbname")
    unknown = set(section) - _PG_KEYS
    if unknown:
        raise ConfigError(f"postgresql.{sorted(unknown)[0]}: unknown setting")
    for required in ("host", "dbname"):
        if not section.get(required):
            raise ConfigError(f"postgresql.{required}: required")
    port = section.get("port")
    if port not in (None, ""):
        try:
            valid = 0 < int(port) < 65536 and not isinstance(port, bool | float)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"postgresql.port: expected a port number, got {port!r}")
    parts = {k: str(v) for k, v in section.items() if v not in (None, "")}
    return make_conninfo(**parts)
