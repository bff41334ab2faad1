"""`run` with http.address: probes, and /metrics scraped by a real Prometheus (Debian package).

Prometheus and promtool must be installed (`.ci/run` installs them): a missing binary fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import event, insert, service_process, setup_rules, unstitched, wait_until


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install prometheus)", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _env(dsn: str) -> dict[str, str]:
    return {
        "STREAM_CPS_STITCHING_SLOT_NAME": "obs_" + dsn.rsplit("dbname=", 1)[1].split()[0],
        "STREAM_CPS_HTTP_ADDRESS": "127.0.0.1:0",
        "STREAM_CPS_HTTP_SAMPLE_INTERVAL": "1",
    }


def _address(log: Path) -> str:
    found: list[str] = []

    def listening() -> bool:
        found[:] = re.findall(r"http: /healthz /readyz /metrics on (\S+)", log.read_text())
        return bool(found)

    wait_until(listening, what=f"the http line in {log}")
    return f"http://{found[-1]}"


@pytest.fixture
def initialised(pg_dsn: str) -> str:
    env = {**os.environ, "STREAM_CPS_DSN": pg_dsn, **_env(pg_dsn)}
    subprocess.run(
        [sys.executable, "-m", "stream_cps", "init"], check=True, capture_output=True, env=env
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        setup_rules(conn)
    return pg_dsn


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A Prometheus with an empty scrape list; the test writes its target and reloads it."""
    binary = _binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs: []\n")
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _get(f"{url}/-/ready")[0] == 200 if _up(port) else False, what="prom")
        yield config, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    code, body = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert code == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def test_prometheus_scrapes_what_the_service_stitched(
    initialised: str, prometheus: tuple[Path, str], tmp_path: Path
) -> None:
    config, prom = prometheus
    log = tmp_path / "run.log"
    with psycopg.connect(initialised, autocommit=True) as conn:  # something to calculate
        conn.execute(
            "INSERT INTO public.attributes (id, name, data_type, definition) VALUES "
            "('n', 'n', 'int', '{\"type\": \"num_of_unique\", \"value\": \"payload->>''email''\"}')"
        )
    with service_process(initialised, log, **_env(initialised)):
        base = _address(log)
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, what="ready")
        assert json.loads(_get(f"{base}/readyz")[1])["role"] == "active"
        code, body = _get(f"{base}/healthz")
        assert code == 200 and json.loads(body)["stitching"] == "ok", body
        assert _get(f"{base}/nope")[0] == 404

        target = base.removeprefix("http://")
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stream-cps\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        urllib.request.urlopen(urllib.request.Request(f"{prom}/-/reload", method="POST")).close()
        with psycopg.connect(initialised, autocommit=True) as conn:
            insert(conn, [event(f"e{i}", i, email=f"p{i % 4}@x") for i in range(30)])
            wait_until(lambda: unstitched(conn) == 0, what="stitched")

        def stitched_in_prometheus() -> bool:
            rows = _query(prom, 'stream_cps_events_stitched_total{job="stream-cps"}')
            return bool(rows) and float(rows[0]["value"][1]) >= 30

        wait_until(stitched_in_prometheus, timeout=60, what="events stitched in Prometheus")
        for name in (
            "stream_cps_batch_duration_seconds_count",
            "stream_cps_events_latency_seconds_count",
            "stream_cps_attributes_latency_seconds_count",
            "stream_cps_events_waiting",
            "stream_cps_outbox_pending",
            "stream_cps_active",
        ):

            def scraped(metric: str = name) -> bool:
                return bool(_query(prom, metric))

            wait_until(scraped, what=f"{name} in Prometheus")
        assert float(_query(prom, "stream_cps_batch_duration_seconds_count")[0]["value"][1]) > 0
        assert float(_query(prom, "stream_cps_active")[0]["value"][1]) == 1

        code, text = _get(f"{base}/metrics")
        assert code == 200
        check = subprocess.run(
            [_binary("promtool"), "check", "metrics"], input=text, capture_output=True
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def _gc_collections(text: str) -> dict[str, float]:
    """``python_gc_collections_total`` per generation, from the text of /metrics."""
    found = re.findall(r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.M)
    return {generation: float(value) for generation, value in found}


def test_the_collector_stays_out_of_a_burst(initialised: str, tmp_path: Path) -> None:
    """With CPython's default thresholds a burst's working set woke the cyclic collector
    about 3,500 times per 200,000 events (service/gc_tuning.py); this burst of 20,000 woke it
    232 times. The young generation is now collected a handful of times at most, and the
    process's own series are served (ProcessCollector)."""
    log = tmp_path / "run.log"
    with service_process(initialised, log, **_env(initialised)):
        base = _address(log)
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, what="ready")
        before = _gc_collections(_get(f"{base}/metrics")[1].decode())
        assert set(before) == {"0", "1", "2"}, before
        with psycopg.connect(initialised, autocommit=True) as conn:
            rows = [event(f"g{i}", i, email=f"p{i % 500}@x") for i in range(20_000)]
            with conn.transaction():
                insert(conn, rows)
            wait_until(lambda: unstitched(conn) == 0, timeout=120, what="stitched")
        text = _get(f"{base}/metrics")[1].decode()
    after = _gc_collections(text)
    assert after["0"] - before["0"] <= 5, (before, after)
    assert re.search(r"^process_resident_memory_bytes \S+$", text, re.M)


def test_a_standby_is_ready_as_standby(initialised: str, tmp_path: Path) -> None:
    with service_process(initialised, tmp_path / "a.log", **_env(initialised)):
        first = _address(tmp_path / "a.log")
        wait_until(lambda: _get(f"{first}/readyz")[0] == 200, what="active ready")
        with service_process(initialised, tmp_path / "b.log", **_env(initialised)):
            second = _address(tmp_path / "b.log")
            wait_until(lambda: _get(f"{second}/readyz")[0] == 200, what="standby ready")
            assert json.loads(_get(f"{second}/readyz")[1])["role"] == "standby"
            assert _get(f"{second}/healthz")[0] == 200
            time.sleep(1.5)  # its metric too: a standby does not stitch
            _, text = _get(f"{second}/metrics")
            assert re.search(rb"^stream_cps_active\{[^}]*\} 0\.0$", text, re.M), text


def test_the_shipped_prometheus_config_and_alerts_are_valid() -> None:
    config = Path(__file__).parents[2] / "infra" / "prometheus" / "prometheus.yml"
    check = subprocess.run(
        [_binary("promtool"), "check", "config", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "8 rules found" in check.stdout + check.stderr
