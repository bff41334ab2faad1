from __future__ import annotations

from typing import Any

import psycopg
import pytest

from stream_cps import config
from tests.integration.test_attributes_helpers import World, ev


@pytest.fixture
def world(db: psycopg.Connection[Any], settings: config.Settings) -> World:
    return World(db, settings)


def test_smoke(world: World) -> None:
    world.attribute("cnt", {"type": "sum", "value": "payload->>'n'"}, "int")
    world.attribute("c", {"type": "custom", "query": "SELECT count(*) AS value FROM base"}, "int")
    e = world.entity([ev({"n": 1}, 1), ev({"n": "2"}, 2), ev({}, 3)])
    assert world.run() == 1
    assert world.attrs(e) == {"cnt": 3, "c": 3}
