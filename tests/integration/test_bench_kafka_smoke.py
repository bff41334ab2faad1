"""A small run of the Kafka benchmark: both paths stitch everything, and it reports their CPU
by process and their top statements (bench/kafka.py is not run in CI otherwise)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The bench, interrupted (not killed) if it overruns: its ``finally`` then stops the
    broker and the server it started, which a kill would leave running on the CI machine."""
    with subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "kafka.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()  # it did not stop on the interrupt either
                out, _ = proc.communicate()
            raise AssertionError(f"bench/kafka.py overran {timeout} s: {out[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_kafka_benchmark_smoke_run() -> None:
    done = run_bench(
        *("--events", "20000", "--batch-sizes", "1000", "--modes", "replication,cli"),
        "--statements",
    )
    out = done.stdout
    assert done.returncode == 0, out[-2000:] + done.stderr[-3000:]
    assert "end to end [replication]" in out and "end to end [cli]" in out
    assert re.search(r"cli 1000 / replication: \d+\.\d\d", out)
    # Each mode's CPU line: the stitching sessions by name, and the cores kept busy.
    lines = re.findall(
        r"(CPU s per 100k events over the last .*; ([\d.]+) of (\d+) cores busy)", out
    )
    assert len(lines) == 2, out
    cpu = [line for line, _, _ in lines]
    assert re.search(r"stream-cps stitching \d", cpu[0]) and "service (python)" in cpu[0]
    assert re.search(r"bench \d", cpu[0])  # the replication window includes the bench's COPY
    assert re.search(r"stream-cps kafka \d", cpu[1]) and "service (python)" in cpu[1]
    for line, busy, cores in lines:
        assert 0.1 < float(busy) <= int(cores) + 0.25, line  # a whole total, not counted twice
    assert int(lines[0][2]) == len(os.sched_getaffinity(0))
    # --statements: each mode's own database, so only the Kafka mode shows its insert.
    tops = re.split(r"top \d+ statements", out)
    assert len(tops) == 3, out
    insert = 'INSERT INTO "cdp_ce"."customer_events"'
    assert "COPY" in tops[1] and insert not in tops[1]
    assert insert in tops[2]
