"""The pgoutput decoder on hand-built protocol messages (pure)."""

from __future__ import annotations

import struct

import pytest

from stream_cps.sources.postgres.pgoutput import Commit, DecodeError, Decoder, Relation, RowChange


def _relation() -> bytes:
    columns = [b"id", b"payload", b"stitched"]
    body = struct.pack("!i", 16384) + b"cdp_ce\0customer_events\0" + b"d"
    body += struct.pack("!h", len(columns))
    for name in columns:
        body += b"\0" + name + b"\0" + struct.pack("!ii", 25, -1)
    return b"R" + body


def _insert(event_id: str, payload: str, stitched: str | None) -> bytes:
    def text(value: str) -> bytes:
        raw = value.encode()
        return b"t" + struct.pack("!i", len(raw)) + raw

    body = struct.pack("!i", 16384) + b"N" + struct.pack("!h", 3)
    body += text(event_id) + text(payload) + (b"n" if stitched is None else text(stitched))
    return b"I" + body


def test_full_decode_returns_every_column() -> None:
    decoder = Decoder()
    relation = decoder.decode(_relation())
    assert isinstance(relation, Relation)
    assert relation.columns == ("id", "payload", "stitched")
    change = decoder.decode(_insert("ev-1", '{"email": "é@x"}', None))
    assert isinstance(change, RowChange)
    assert change.values == {"id": "ev-1", "payload": '{"email": "é@x"}', "stitched": None}


def test_wanted_columns_skip_the_rest_without_decoding_it() -> None:
    decoder = Decoder(frozenset({"id", "stitched"}))
    decoder.decode(_relation())
    # Invalid UTF-8 in the payload: decoding it would raise, stepping over it does not.
    raw = _insert("ev-2", "x", "2026-01-01").replace(b"t\0\0\0\x01x", b"t\0\0\0\x01\xff")
    change = decoder.decode(raw)
    assert isinstance(change, RowChange)
    assert change.values == {"id": "ev-2", "stitched": "2026-01-01"}


def test_truncated_messages_and_commits() -> None:
    decoder = Decoder(frozenset({"id"}))
    decoder.decode(_relation())
    with pytest.raises(DecodeError, match="truncated"):
        decoder.decode(_insert("ev-3", "a long payload", None)[:-20])
    commit = decoder.decode(b"C\0" + struct.pack("!qqq", 10, 20, 0))
    assert commit == Commit(20)
