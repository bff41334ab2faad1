"""Log lines an operator or a shipper can read: JSON or text, one line per state change."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from stream_cps import config, logs, retry
from stream_cps.errors import Transient


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``logs.configure`` replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


def test_json_lines_carry_time_level_logger_message(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=out)
    logging.getLogger("stream_cps.x").info("stitched %d events", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("stream_cps.y").exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "INFO" and first["logger"] == "stream_cps.x"
    assert first["message"] == "stitched 3 events"
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_client_libraries_log_warnings_only(root_logging: None) -> None:
    logs.configure("INFO", "text", stream=io.StringIO())
    assert not logging.getLogger("opensearch").isEnabledFor(logging.INFO)
    assert logging.getLogger("opensearch").isEnabledFor(logging.WARNING)
    assert logging.getLogger("stream_cps").isEnabledFor(logging.INFO)


def test_log_format_is_a_setting() -> None:
    assert config.load(environ={}).log_format == "text"
    assert config.load(environ={"STREAM_CPS_LOG_FORMAT": "json"}).log_format == "json"


def test_version_flag_prints_the_installed_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_cps", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stream-cps ")
    assert result.stdout.split()[1][0].isdigit()


def test_help_lists_every_command_with_examples() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_cps", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for command in ("init", "run", "status", "explain", "replay", "quarantine", "reindex"):
        assert f"    {command} " in result.stdout or f"    {command}\n" in result.stdout, command
    examples = result.stdout.split("examples:", 1)[1]
    assert "stream-cps explain --why" in examples and "stream-cps status --json" in examples


def test_a_long_outage_logs_one_warning_and_one_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = iter(["down", "down", "down", "down", "refused", None])

    def flaky() -> str:
        reason = next(failures)
        if reason:
            raise Transient(reason)
        return "ok"

    policy = retry.RetryPolicy("database unavailable", first=0.01, longest=0.01, attempts=None)
    with caplog.at_level(logging.INFO, logger="stream_cps.retry"):
        assert policy.call(flaky, sleep=lambda _s: None) == "ok"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # "down" once, then "refused": the state changes
    assert warnings[0].startswith("database unavailable: down; retrying")
    assert warnings[1].startswith("database unavailable: refused; retrying")
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["database unavailable: recovered (try 6)"]
