from __future__ import annotations

from tests.test_attributes_helpers import World, ev, world  # noqa: F401


def test_smoke(world: World) -> None:
    world.attribute("cnt", {"type": "sum", "value": "payload->>'n'"}, "int")
    world.attribute("c", {"type": "custom", "query": "SELECT count(*) AS value FROM base"}, "int")
    e = world.entity([ev({"n": 1}, 1), ev({"n": "2"}, 2), ev({}, 3)])
    assert world.run() == 1
    assert world.attrs(e) == {"cnt": 3, "c": 3}
