"""The wheel (what the Docker image installs) carries every file the code reads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_migrations_sample_config_and_avro_schemas(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stream_cps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in (ROOT / "stream_cps" / "db" / "migrations").glob("*.sql"):
        assert f"stream_cps/db/migrations/{migration.name}" in names
    assert "stream_cps/sample/config.sql" in names
    for schema in (ROOT / "schemas").iterdir():
        assert any(n.endswith(f"data/share/stream-cps/schemas/{schema.name}") for n in names)
