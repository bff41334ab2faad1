"""Timestamps PostgreSQL stores but Python's ``datetime`` cannot hold, loaded without failing.

``customer_events.event_time`` accepts ``'infinity'``, ``'-infinity'``, years after 9999 and
years BC; psycopg's own loader raises ``DataError`` for each, and one such row used to stop
stitching for everyone. ``fetch_all`` reads the rows of a query with psycopg's fast (C)
loaders and, only when a value cannot be loaded, reads them again with lenient loaders that
turn such a value into an ``OutOfRange`` datetime: the latest (or earliest) instant Python has,
so it still orders after (or before) every ordinary time, with the value PostgreSQL printed
kept in ``original`` for the error record. (Lenient loaders on every read cost a fifth of the
stitching rate, bench/stitch.py: psycopg's C loaders cannot be subclassed.)
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


def register(context: psycopg.Connection[Any] | psycopg.Cursor[Any]) -> None:
    """Use the lenient loaders for ``timestamptz`` on this connection or cursor."""
    context.adapters.register_loader("timestamptz", LenientTimestamptzLoader)
    context.adapters.register_loader("timestamptz", LenientTimestamptzBinaryLoader)


def fetch_all(
    conn: psycopg.Connection[Any], query: Any, params: Any = None
) -> list[tuple[Any, ...]]:
    """The rows of a ``query`` that may run twice (a SELECT, or a FOR UPDATE that locks the same
    rows again); read a second time, leniently, when one of
    its timestamps is outside what ``datetime`` holds (errors of the query itself surface from
    the first execution as usual)."""
    cur = conn.execute(query, params)
    try:
        return cur.fetchall()
    except psycopg.DataError:  # raised while loading a value, not by the server
        lenient = conn.cursor()
        register(lenient)
        return lenient.execute(query, params).fetchall()
