"""CPU differences between two readings keep their total whole when a process goes away."""

from __future__ import annotations

from stream_cps_dev.procstat import used_since


def test_a_role_gone_by_the_second_reading_counts_negative() -> None:
    """A session that closes between the readings moves its whole lifetime's CPU to the
    postmaster's "exited" figure: leaving the session out of the difference counted that CPU
    twice (the benchmarks' "cores busy" came out too high)."""
    before = {"session": 3.0, "exited server processes": 10.0, "service": 5.0}
    now = {"exited server processes": 13.5, "service": 6.0}  # the session used 0.5 more
    spent = used_since(before, now)
    assert spent == {"exited server processes": 3.5, "service": 1.0, "session": -3.0}
    assert sum(spent.values()) == 1.5  # the service's 1.0 and the session's last 0.5
    assert list(spent) == ["exited server processes", "service", "session"]  # largest first


def test_a_role_new_in_the_second_reading_counts_from_zero() -> None:
    assert used_since({"a": 1.0}, {"a": 1.5, "b": 2.0}) == {"b": 2.0, "a": 0.5}
