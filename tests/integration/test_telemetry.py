"""Spans per batch and per stage, so a dashboard shows where stitching time goes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stream_cps import config, telemetry
from stream_cps.stitching.stitcher import Stitcher
from tests.support import event, insert, setup_rules
from tests.webhook_support import changefeed_body, client_context, post, running, webhook_settings

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


def test_sweep_reading_ahead_keeps_every_extract_under_its_batch(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    """The sweep reads batch N+1 in a helper thread while N is written: that read's
    ``stitch.extract`` must still be a child of batch N+1's ``stitch.batch``, in the caller's
    trace (the thread gets the context explicitly)."""
    _provider()
    _exporter.clear()
    setup_rules(db)
    insert(db, [event(f"e{n}", n, email=f"p{n % 3}@a") for n in range(11)])
    small = settings.replace(**{"stitching.batch_size": 4})
    with (
        psycopg.connect(settings.dsn, autocommit=True) as reader,
        telemetry.root(telemetry.SPAN_STITCH_SWEEP, telemetry.now()) as root,
    ):
        results = list(Stitcher(small).sweep(db, reader))
    assert sum(r.events for r in results) == 11
    spans = _exporter.get_finished_spans()
    ids = {s.context.span_id: s for s in spans if s.context is not None}
    batches = [s for s in spans if s.name == telemetry.SPAN_STITCH_BATCH]
    extracts = [s for s in spans if s.name == telemetry.SPAN_STITCH_EXTRACT]
    assert len(batches) == len(results) >= 3
    assert len(extracts) == len(batches)
    trace_id = root.get_span_context().trace_id
    for batch in batches:
        assert batch.parent is not None
        assert batch.parent.span_id == root.get_span_context().span_id
    for extract in extracts:
        assert extract.parent is not None and extract.context is not None
        assert ids[extract.parent.span_id].name == telemetry.SPAN_STITCH_BATCH
        assert extract.context.trace_id == trace_id


def test_webhook_request_continues_the_callers_trace(
    db: psycopg.Connection[Any], settings: config.Settings, tmp_path: Path
) -> None:
    _provider()
    _exporter.clear()
    setup_rules(db)
    rows = [event("w1", 1, email="w@a"), event("w2", 2, email="w@a")]
    insert(db, rows)
    served = webhook_settings(settings, tmp_path, **{"webhook.allow_unauthenticated": True})
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with running(served) as server:
        status, answer = post(
            server, client_context(served), changefeed_body(rows), {"traceparent": caller}
        )
    assert status == 200 and answer["stitched"] == 2
    spans = _exporter.get_finished_spans()
    [request] = [s for s in spans if s.name == telemetry.SPAN_WEBHOOK_REQUEST]
    assert request.context is not None and request.parent is not None
    assert f"{request.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert f"{request.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert request.kind == trace.SpanKind.SERVER
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    [batch] = [s for s in spans if s.name == telemetry.SPAN_STITCH_BATCH]
    assert batch.parent is not None and batch.parent.span_id == request.context.span_id


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
