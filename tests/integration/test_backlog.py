"""Calculation holds back while stitching works through a backlog, within a bound."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from stream_cps import config
from stream_cps.attributes.worker import CalculationWorker
from stream_cps.service.backlog import Backlog
from tests.integration.test_attributes_helpers import World, ev


def test_wait_returns_at_once_when_clear_and_when_cleared() -> None:
    backlog, stop = Backlog(), threading.Event()
    started = time.monotonic()
    backlog.wait_until_clear(stop, 30)
    assert time.monotonic() - started < 1
    backlog.report(True)
    threading.Timer(0.3, backlog.report, [False]).start()
    backlog.wait_until_clear(stop, 30)
    assert not backlog.busy
    assert time.monotonic() - started < 5


def test_wait_is_bounded_while_busy() -> None:
    backlog, stop = Backlog(), threading.Event()
    backlog.report(True)
    started = time.monotonic()
    backlog.wait_until_clear(stop, 0.3)
    assert 0.25 <= time.monotonic() - started < 5
    assert backlog.busy


def _calculated(db: psycopg.Connection[Any], entity_id: str) -> bool:
    row = db.execute(
        "SELECT calculated IS NOT NULL FROM customer_attributes WHERE customer_entity_id = %s",
        [entity_id],
    ).fetchone()
    return bool(row and row[0])


def test_calculation_waits_for_the_stitching_backlog(
    db: psycopg.Connection[Any], settings: config.Settings
) -> None:
    world = World(db, settings)
    world.attribute("s", {"type": "sum", "value": "payload->>'n'"}, "int")
    entity = world.entity([ev({"n": 4}, 1)])
    deferring = settings.replace(**{"attributes.max_defer": 60})
    backlog, stop = Backlog(), threading.Event()
    backlog.report(True)
    worker = CalculationWorker(deferring, backlog=backlog)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(2.0)
        assert not _calculated(db, entity), "calculated while stitching reported a backlog"
        backlog.report(False)
        deadline = time.monotonic() + 15
        while not _calculated(db, entity) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert world.attrs(entity) == {"s": 4}
    finally:
        stop.set()
        thread.join(10)
