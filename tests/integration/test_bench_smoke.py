"""CI's smoke run of the scale benchmark: it runs end to end and its partition is right."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "check: partition equals the offline oracle" in done.stdout
    assert "ratio 1.00" in done.stdout and "history:" in done.stdout
    assert "events into a fresh database" in done.stdout  # the baseline of the same minutes
    assert "to an empty database's burst right after" in done.stdout
    assert "restitch all:" in done.stdout and "entities unchanged" in done.stdout
