"""Decoder for the built-in ``pgoutput`` logical replication protocol, version 1 (pure).

Only what the stitcher needs is decoded: relation descriptions, and the new tuple of inserts and
updates (deletes and truncates are recognised and skipped). Values arrive in text format; an
unchanged TOASTed value (``u``) is reported as ``UNCHANGED`` because updates do not resend it, and
the stitcher reads the row itself anyway.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

UNCHANGED: Final = object()


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class RowChange:
    """An inserted or updated row: its relation and the new values by column name."""

    kind: str  # "insert" | "update"
    relation: Relation
    values: dict[str, object]  # str, None, or UNCHANGED


@dataclass(frozen=True)
class Commit:
    end_lsn: int


class DecodeError(ValueError):
    """The message is not valid pgoutput v1."""


class Decoder:
    """Stateful: relation messages describe the oids that later row messages use."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> RowChange | Commit | Relation | None:
        if not data:
            raise DecodeError("empty message")
        tag = data[:1]
        reader = _Reader(data, 1)
        if tag == b"R":
            return self._relation(reader)
        if tag == b"I":
            oid = reader.int32()
            if reader.byte() != b"N":
                raise DecodeError("insert without new tuple")
            return RowChange("insert", self._rel(oid), self._tuple(reader, self._rel(oid)))
        if tag == b"U":
            oid = reader.int32()
            marker = reader.byte()
            if marker in (b"K", b"O"):
                self._tuple(reader, self._rel(oid))
                marker = reader.byte()
            if marker != b"N":
                raise DecodeError("update without new tuple")
            return RowChange("update", self._rel(oid), self._tuple(reader, self._rel(oid)))
        if tag == b"C":
            reader.byte()  # flags
            reader.int64()  # commit lsn
            return Commit(reader.int64())
        if tag in (b"B", b"D", b"T", b"Y", b"O", b"M"):
            return None
        raise DecodeError(f"unknown pgoutput message {tag!r}")

    def _rel(self, oid: int) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"row for unknown relation oid {oid}") from None

    def _relation(self, reader: _Reader) -> Relation:
        oid = reader.int32()
        namespace = reader.cstring()
        name = reader.cstring()
        reader.byte()  # replica identity setting
        columns = []
        for _ in range(reader.int16()):
            reader.byte()  # flags (part of key)
            columns.append(reader.cstring())
            reader.int32()  # type oid
            reader.int32()  # type modifier
        relation = Relation(oid, namespace, name, tuple(columns))
        self.relations[oid] = relation
        return relation

    def _tuple(self, reader: _Reader, relation: Relation) -> dict[str, object]:
        count = reader.int16()
        if count != len(relation.columns):
            raise DecodeError(
                f"{relation.name}: {count} columns, relation has {len(relation.columns)}"
            )
        values: dict[str, object] = {}
        for column in relation.columns:
            kind = reader.byte()
            if kind == b"n":
                values[column] = None
            elif kind == b"u":
                values[column] = UNCHANGED
            elif kind in (b"t", b"b"):
                size = reader.int32()
                raw = reader.take(size)
                values[column] = raw.decode("utf-8") if kind == b"t" else raw
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
        return values


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise DecodeError("message truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> bytes:
        return self.take(1)

    def int16(self) -> int:
        return int(struct.unpack("!h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack("!i", self.take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack("!q", self.take(8))[0])

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
