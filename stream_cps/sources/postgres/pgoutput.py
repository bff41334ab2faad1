"""Decoder for the built-in ``pgoutput`` logical replication protocol, version 1 (pure).

Only what the stitcher needs is decoded: relation descriptions, and the new tuple of inserts and
updates (deletes and truncates are recognised and skipped). Values arrive in text format; an
unchanged TOASTed value (``u``) is reported as ``UNCHANGED`` because updates do not resend it, and
the stitcher reads the row itself anyway. A decoder can be told which columns it needs: the
others (the payload above all) are stepped over without being copied or decoded, which was most
of the service's decoding time in a burst.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from stream_cps.errors import Fatal

UNCHANGED: Final = object()
_INT16, _INT32, _INT64 = struct.Struct("!h"), struct.Struct("!i"), struct.Struct("!q")


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


class DecodeError(Fatal):
    """The message is not valid pgoutput v1."""


class Decoder:
    """Stateful: relation messages describe the oids that later row messages use."""

    def __init__(self, wanted: frozenset[str] | None = None) -> None:
        """``wanted``: the columns to put in ``RowChange.values`` (default: all of them)."""
        self.relations: dict[int, Relation] = {}
        self.wanted = wanted

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
        wanted = self.wanted
        for column in relation.columns:
            kind = reader.byte()
            if kind == b"n":
                value: object = None
            elif kind == b"u":
                value = UNCHANGED
            elif kind in (b"t", b"b"):
                size = reader.int32()
                if wanted is not None and column not in wanted:
                    reader.skip(size)
                    continue
                raw = reader.take(size)
                value = raw.decode("utf-8") if kind == b"t" else raw
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r}")
            if wanted is None or column in wanted:
                values[column] = value
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

    def skip(self, size: int) -> None:
        if self.pos + size > len(self.data):
            raise DecodeError("message truncated")
        self.pos += size

    def byte(self) -> bytes:
        return self.take(1)

    def _unpack(self, fmt: struct.Struct) -> int:
        if self.pos + fmt.size > len(self.data):
            raise DecodeError("message truncated")
        value = fmt.unpack_from(self.data, self.pos)[0]
        self.pos += fmt.size
        return int(value)

    def int16(self) -> int:
        return self._unpack(_INT16)

    def int32(self) -> int:
        return self._unpack(_INT32)

    def int64(self) -> int:
        return self._unpack(_INT64)

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
