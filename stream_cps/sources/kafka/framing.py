"""The Confluent wire format of an Avro message: magic byte 0, 4-byte big-endian schema id, body.

Pure: no I/O and no Avro library, so the decoder and the encoders share one definition.
"""

from __future__ import annotations

import struct

from stream_cps.errors import InvalidInput

MAGIC = 0
HEADER = struct.Struct(">bI")


def frame(schema_id: int, body: bytes) -> bytes:
    """``body`` (an Avro datum) behind the header naming its writer schema."""
    return HEADER.pack(MAGIC, schema_id) + body


def unframe(data: bytes) -> tuple[int, int]:
    """(schema id, offset of the body) of a framed message; ``InvalidInput`` if not framed."""
    if len(data) < HEADER.size or data[0] != MAGIC:
        raise InvalidInput("not Confluent-framed Avro (magic byte 0 + 4-byte schema id)")
    _, schema_id = HEADER.unpack_from(data)
    return int(schema_id), HEADER.size
