"""What /healthz and /readyz say, from what the loops report; dead-letter label classes."""

from __future__ import annotations

import time

import pytest

from stream_cps.config import HttpSettings, load
from stream_cps.errors import ConfigError
from stream_cps.observe import health
from stream_cps.sources.messages import reason_class


def test_live_needs_recent_reports_and_running_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    h = health.Health()
    h.beat("stitching")
    alive = [True]
    h.watch("relay", lambda: alive[0])
    assert h.live() == (True, {"stitching": "ok", "relay": "ok"})
    alive[0] = False
    assert h.live()[0] is False and h.live()[1]["relay"] == "stopped"
    alive[0] = True
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + health.STALL_AFTER + 1)
    ok, parts = h.live()
    assert not ok and parts["stitching"].startswith("no report for")


def test_ready_needs_the_database_and_a_role() -> None:
    h = health.Health()
    assert h.ready() == (False, {"database": "no answer yet", "role": "starting"})
    h.database(True)
    assert not h.ready()[0]  # role still unknown
    h.role = "standby"
    assert h.ready() == (True, {"database": "ok", "role": "standby"})
    h.database_ok_at = time.monotonic() - 3 * h.database_every - 1
    h.database(False, "connection refused")
    assert h.ready() == (False, {"database": "connection refused", "role": "standby"})


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("not valid JSON: Expecting value: line 1 column 1 (char 0)", "not_valid_json"),
        ("customer event: field 'id' is missing", "customer_event"),
        ("unknown Avro schema id 42", "unknown_avro_schema"),
        (None, "other"),
        ("", "other"),
    ],
)
def test_dead_letter_reasons_become_few_labels(reason: str | None, label: str) -> None:
    assert reason_class(reason) == label


def test_http_address_is_host_and_port() -> None:
    assert HttpSettings("127.0.0.1:9464", 5.0).host_port() == ("127.0.0.1", 9464)
    assert load(environ={}).http.address is None  # off by default
    with pytest.raises(ConfigError, match="^http.address: expected host:port"):
        load(environ={"STREAM_CPS_HTTP_ADDRESS": "9464"})
