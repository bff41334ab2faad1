"""A small run of the Kafka benchmark: both paths stitch everything, and it reports their CPU
by process and their top statements (bench/kafka.py is not run in CI otherwise)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kafka_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "kafka.py"),
            *("--events", "20000", "--batch-sizes", "1000", "--modes", "replication,cli"),
            "--statements",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    out = done.stdout
    assert done.returncode == 0, out[-2000:] + done.stderr[-3000:]
    assert "end to end [replication]" in out and "end to end [cli]" in out
    assert re.search(r"cli 1000 / replication: \d+\.\d\d", out)
    # each mode's CPU line names the stitching sessions and the cores kept busy
    cpu = re.findall(r"CPU s per 100k events over the last .*? of \d+ cores busy", out)
    assert len(cpu) == 2, out
    assert "stream-cps stitching" in cpu[0] and "service (python)" in cpu[0]
    assert "stream-cps kafka" in cpu[1] and "service (python)" in cpu[1]
    # --statements: each mode's own database, so only the Kafka mode shows its insert
    tops = out.split("top 15 statements")
    assert len(tops) == 3
    assert "COPY" in tops[1] and 'INSERT INTO "cdp_ce"."customer_events"' not in tops[1]
    assert 'INSERT INTO "cdp_ce"."customer_events"' in tops[2]
