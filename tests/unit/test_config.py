"""Configuration: the guide's file as-is, precedence flag > env > file > default, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_cps import config
from stream_cps.errors import ConfigError
from stream_cps.kafka_client import ClientErrors, client_config

GUIDE = {
    "postgresql": {"host": "cdp.example", "user": "postgres", "password": "", "dbname": "postgres"},
    "cdp_schema": "public",
    "ce_schema": "cdp_ce",
    "ps_schema": "cdp_ps",
    "attr_schema": "cdp_attr",
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_guide_file_is_accepted_as_is(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, GUIDE), environ={})
    assert "host=cdp.example" in settings.dsn
    assert "dbname=postgres" in settings.dsn
    assert settings.schemas == config.Schemas("public", "cdp_ce", "cdp_ps", "cdp_attr")


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, {**GUIDE, "ce_schema": "file_ce", "stitching": {"batch_size": 7}})
    env = {"STREAM_CPS_CE_SCHEMA": "env_ce", "STREAM_CPS_DSN": "host=envhost dbname=x"}
    settings = config.load(path, flags={"ce_schema": "flag_ce"}, environ=env)
    assert settings.schemas.ce == "flag_ce"
    assert settings.dsn == "host=envhost dbname=x"  # env beats the file's postgresql section
    assert settings.stitching.batch_size == 7  # file beats default
    assert settings.attributes.batch_size == config.FIELDS["attributes.batch_size"].default
    assert config.load(path, environ=env).schemas.ce == "env_ce"
    assert config.load(path, environ={}).schemas.ce == "file_ce"


def test_bad_json_names_the_file_and_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1, column"):
        config.load(write(tmp_path, '{"cdp_schema": '), environ={})


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^cdp_shema: unknown setting"):
        config.load(write(tmp_path, {"cdp_shema": "x"}), environ={})
    with pytest.raises(ConfigError, match="^stitching.bach_size: unknown setting"):
        config.load(write(tmp_path, {"stitching": {"bach_size": 1}}), environ={})
    with pytest.raises(ConfigError, match="^postgresql.hostname: unknown setting"):
        config.load(write(tmp_path, {"postgresql": {"hostname": "x"}}), environ={})


def test_invalid_values_are_named() -> None:
    with pytest.raises(ConfigError, match="^ce_schema: 'bad schema!' is not a valid schema name"):
        config.load(flags={"ce_schema": "bad schema!"}, environ={})
    with pytest.raises(ConfigError, match="^stitching.batch_size: expected int"):
        config.load(environ={"STREAM_CPS_STITCHING_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="^telemetry.exporter: must be one of"):
        config.load(environ={"STREAM_CPS_TELEMETRY_EXPORTER": "zipkin"})


@pytest.mark.parametrize("port", ["notaport", 0, 70000, True, 5432.5])
def test_a_bad_port_in_the_guide_file_is_named(tmp_path: Path, port: object) -> None:
    section = {**GUIDE["postgresql"], "port": port}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="^postgresql.port: expected a port number"):
        config.load(write(tmp_path, {**GUIDE, "postgresql": section}), environ={})
    good = {**GUIDE["postgresql"], "port": "6432"}  # type: ignore[dict-item]
    assert "port=6432" in config.load(write(tmp_path, {**GUIDE, "postgresql": good})).dsn


def test_missing_dsn_is_a_clear_error() -> None:
    settings = config.load(environ={})
    with pytest.raises(ConfigError, match="^dsn: no database given"):
        _ = settings.dsn


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "stream_cps", "init"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("stream-cps: dsn: no database given")
    bad = write(tmp_path, "{nope")
    result = subprocess.run(
        [sys.executable, "-m", "stream_cps", "init", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2
    assert "is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_docs_list_every_setting() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    for key in config.FIELDS:
        assert f"`{key}`" in docs, key
        assert f"`{config.env_var(key)}`" in docs, key


@pytest.mark.parametrize(
    "key", ["stitching.batch_size", "attributes.batch_size", "attributes.statement_timeout_ms"]
)
def test_sizes_and_timeouts_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
        config.load(environ={config.env_var(key): "0"})


def test_typed_sections_cover_every_field_with_its_resolved_value() -> None:
    """Code reads ``settings.<section>.<name>``: every key of FIELDS is one such attribute,
    holding the value the precedence rules resolved (lists arrive as tuples)."""
    env = {"STREAM_CPS_KAFKA_TOPICS": "a,b", "STREAM_CPS_STITCHING_BATCH_SIZE": "17"}
    settings = config.load(flags={"dsn": "host=x dbname=y"}, environ=env)
    for key in config.FIELDS:
        section, _, name = key.partition(".")
        if not name:
            continue
        value = getattr(getattr(settings, section), name)
        expected = settings.values[key]
        assert value == (tuple(expected) if isinstance(expected, list) else expected), key
    assert settings.kafka.topics == ("a", "b")
    assert settings.stitching.batch_size == 17
    assert "host=x" not in repr(settings)  # the DSN (it may hold a password) never prints


def test_the_webhook_secret_never_prints() -> None:
    settings = config.load(environ={"STREAM_CPS_WEBHOOK_AUTH_SECRET": "hunter2-secret"})
    assert settings.webhook.auth_secret == "hunter2-secret"
    assert "hunter2" not in repr(settings) and "hunter2" not in repr(settings.webhook)


@pytest.mark.parametrize("where", ["file", "env"])
def test_settings_never_show_kafka_secrets(where: str, tmp_path: Path) -> None:
    """Neither ``repr(Settings)`` nor the typed section print a password."""
    secret = "s3cr3t-a9e1"
    if where == "file":
        path = tmp_path / "c.json"
        path.write_text(
            json.dumps(
                {
                    "kafka": {
                        "sasl_password": secret,
                        "ssl_key_password": secret,
                        "properties": {"sasl.oauthbearer.client.secret": secret},
                    }
                }
            )
        )
        loaded = config.load(path, environ={})
    else:
        loaded = config.load(environ={"STREAM_CPS_KAFKA_SASL_PASSWORD": secret})
    assert loaded.kafka.sasl_password == secret
    assert secret not in repr(loaded) and secret not in repr(loaded.kafka)


def test_kafka_properties_and_secrets_are_checked(tmp_path: Path) -> None:
    props = config.load(environ={"STREAM_CPS_KAFKA_PROPERTIES": '{"ssl.cipher.suites": "X"}'})
    assert props.kafka.properties == {"ssl.cipher.suites": "X"}
    with pytest.raises(ConfigError, match="'sasl.password' cannot be set here"):
        config.load(environ={"STREAM_CPS_KAFKA_PROPERTIES": '{"sasl.password": "x"}'})
    with pytest.raises(ConfigError, match="'enable.auto.commit' cannot be set here"):
        config.load(environ={"STREAM_CPS_KAFKA_PROPERTIES": '{"enable.auto.commit": true}'})
    with pytest.raises(ConfigError, match="kafka.properties: expected dict"):
        config.load(environ={"STREAM_CPS_KAFKA_PROPERTIES": "[1]"})
    both = {"STREAM_CPS_KAFKA_SASL_PASSWORD": "a", "STREAM_CPS_KAFKA_SASL_PASSWORD_FILE": "f"}
    with pytest.raises(ConfigError, match="not both"):
        config.load(environ=both)


def test_every_kafka_client_gets_the_security_settings(tmp_path: Path) -> None:
    """One builder: typed settings, the password from its file, ``kafka.properties``."""
    secret = tmp_path / "pw"
    secret.write_text("from-the-file\n")
    settings = config.load(
        environ={
            "STREAM_CPS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "STREAM_CPS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "STREAM_CPS_KAFKA_SASL_USERNAME": "cps",
            "STREAM_CPS_KAFKA_SASL_PASSWORD_FILE": str(secret),
            "STREAM_CPS_KAFKA_SSL_ENDPOINT_IDENTIFICATION": "none",
            "STREAM_CPS_KAFKA_PROPERTIES": json.dumps(
                {"ssl.cipher.suites": "X", "socket.nagle.disable": True}
            ),
        }
    )
    conf = client_config(settings.kafka, ClientErrors("test"))
    assert {k: conf[k] for k in conf if k not in ("error_cb", "logger")} == {
        "bootstrap.servers": "localhost:9092",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "cps",
        "sasl.password": "from-the-file",
        "ssl.endpoint.identification.algorithm": "none",
        "ssl.cipher.suites": "X",
        "socket.nagle.disable": "true",
    }
    missing = settings.replace(**{"kafka.sasl_password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="kafka.sasl_password_file: cannot read"):
        client_config(missing.kafka, ClientErrors("test"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAM_CPS_STITCHING_QUARANTINE_LIMIT": "-1"}, "must not be negative"),
        ({"STREAM_CPS_STITCHING_QUARANTINE_LIMITS": '{"cookie": 5}'}, "ATTRIBUTE:OTHER"),
        ({"STREAM_CPS_STITCHING_QUARANTINE_LIMITS": '{"a:b:c": 5}'}, "ATTRIBUTE:OTHER"),
        ({"STREAM_CPS_STITCHING_QUARANTINE_LIMITS": '{"cookie:email": -5}'}, "0 or more"),
        ({"STREAM_CPS_STITCHING_QUARANTINE_LIMITS": '{"cookie:email": "x"}'}, "0 or more"),
    ],
)
def test_quarantine_limits_are_checked_when_loaded(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(environ=env)


def test_quarantine_limit_overrides_load_per_pair() -> None:
    env = {"STREAM_CPS_STITCHING_QUARANTINE_LIMITS": '{"cookie:email": 1000, "phone:email": 0}'}
    stitching = config.load(environ=env).stitching
    assert stitching.quarantine_limit == 100
    assert dict(stitching.quarantine_limits) == {"cookie:email": "1000", "phone:email": "0"}
