"""Spans per batch and per stage, so a dashboard shows where stitching time goes."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stream_cps import config, telemetry
from stream_cps.stitching.stitcher import Stitcher
from tests.support import event, insert, setup_rules

_exporter = InMemorySpanExporter()


def _provider() -> None:
    """Install an in-memory provider once per test process (OpenTelemetry allows one)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)


def test_batch_span_has_a_child_per_stage(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    _provider()
    _exporter.clear()
    setup_rules(db)
    insert(db, [event("a", 1, email="x@a"), event("b", 2, email="x@a")])
    Stitcher(settings).stitch(db, ["a", "b"])
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    batch = spans[telemetry.SPAN_STITCH_BATCH]
    for stage in (
        telemetry.SPAN_STITCH_PURGE,
        telemetry.SPAN_STITCH_EXTRACT,
        telemetry.SPAN_STITCH_GROUP,
        telemetry.SPAN_STITCH_WRITE,
    ):
        parent, context = spans[stage].parent, batch.context
        assert parent is not None and context is not None
        assert parent.span_id == context.span_id
    assert batch.attributes is not None
    assert batch.attributes["events.stitched"] == 2


def test_console_exporter_prints_spans_of_a_real_run(pg_dsn: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "stream_cps", "init", "--dsn", pg_dsn],
        check=True,
        capture_output=True,
    )
    code = (
        "import threading, stream_cps.config as c, stream_cps.telemetry as t;"
        "from stream_cps.stitching.stitcher import Stitcher;"
        "import psycopg;"
        f"s = c.load(flags={{'dsn': {pg_dsn!r}}}, "
        "environ={'STREAM_CPS_TELEMETRY_EXPORTER': 'console'});"
        "t.setup(s.telemetry);"
        "conn = psycopg.connect(s.dsn, autocommit=True);"
        "Stitcher(s).stitch(conn, []);"
        "from opentelemetry import trace; trace.get_tracer_provider().force_flush()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f'"name": "{telemetry.SPAN_STITCH_BATCH}"' in result.stdout
    assert f'"name": "{telemetry.SPAN_STITCH_PURGE}"' in result.stdout
