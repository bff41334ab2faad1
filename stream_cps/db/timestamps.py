"""Timestamps PostgreSQL stores but Python's ``datetime`` cannot hold, loaded without failing.

``customer_events.event_time`` accepts ``'infinity'``, ``'-infinity'``, years after 9999 and
years BC; psycopg's own loader raises ``DataError`` for each, and one such row used to stop
stitching for everyone. On our connections such a value loads as an ``OutOfRange`` datetime:
the latest (or earliest) instant Python has, so it still orders after (or before) every
ordinary time, with the value PostgreSQL printed kept in ``original`` for the error record.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.datetime import TimestamptzBinaryLoader, TimestamptzLoader


class OutOfRange(datetime):
    """A timestamp outside years 1-9999, clamped to the nearest end of that range."""

    original: str

    @classmethod
    def of(cls, original: str, later: bool) -> OutOfRange:
        end = datetime.max if later else datetime.min
        value = cls(
            end.year, end.month, end.day, end.hour, end.minute, end.second,
            end.microsecond, tzinfo=UTC,
        )  # fmt: skip
        value.original = original
        return value


def _later(text: str) -> bool:
    """Whether an out-of-range text value lies after year 9999 (else before year 1)."""
    return not (text.startswith("-") or text.endswith(" BC"))


class LenientTimestamptzLoader(TimestamptzLoader):
    def load(self, data: Any) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            text = bytes(data).decode(errors="replace")
            return OutOfRange.of(text, _later(text))


class LenientTimestamptzBinaryLoader(TimestamptzBinaryLoader):
    def load(self, data: Any) -> datetime:
        try:
            return super().load(data)
        except psycopg.DataError:
            (micros,) = struct.unpack("!q", bytes(data))  # since 2000-01-01, int64 ends = infinity
            return OutOfRange.of(f"{micros} microseconds after 2000-01-01", micros >= 0)


def register(conn: psycopg.Connection[Any]) -> None:
    """Use the lenient loaders for ``timestamptz`` on this connection."""
    conn.adapters.register_loader("timestamptz", LenientTimestamptzLoader)
    conn.adapters.register_loader("timestamptz", LenientTimestamptzBinaryLoader)
