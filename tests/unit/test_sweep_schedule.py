"""When the replication loop looks for rows the stream did not carry (pure logic)."""

from __future__ import annotations

from stream_cps.service.replication import CHECK_SHARE, sweep_due


def test_a_cheap_check_runs_every_interval() -> None:
    assert not sweep_due(now=10.9, last=10.0, interval=1.0, check_cost=0.002)
    assert sweep_due(now=11.1, last=10.0, interval=1.0, check_cost=0.002)


def test_a_slow_check_backs_off_to_a_bounded_share_of_the_time() -> None:
    """200 ms a check (the dead entries of the unstitched index at 10M): every 4 s, not 1."""
    cost = 0.2
    assert not sweep_due(now=13.9, last=10.0, interval=1.0, check_cost=cost)
    assert sweep_due(now=14.1, last=10.0, interval=1.0, check_cost=cost)
    assert cost / (cost / CHECK_SHARE) <= CHECK_SHARE
