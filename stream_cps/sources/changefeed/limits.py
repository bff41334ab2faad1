"""What one webhook request may cost us (docs/security.md): the body's declared size, checked
before a byte of it is read."""

from __future__ import annotations

from email.message import Message


class Refused(Exception):
    """A request answered with ``status`` and not applied; its body was not read."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def body_length(headers: Message, limit: int) -> int:
    """The body's length from its one ``Content-Length``, at most ``limit``.

    Anything else is refused: without a valid length the only end of the body is the end of
    the stream, and reading to it let one request buffer (and store) any amount. Chunked
    bodies are refused too; changefeed sinks send a length.
    """
    if headers.get_all("Transfer-Encoding"):
        raise Refused(411, "Content-Length required (Transfer-Encoding is not accepted)")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise Refused(411, "Content-Length required")
    if len(values) > 1:
        raise Refused(400, "more than one Content-Length")
    text = values[0].strip()
    if not (text.isascii() and text.isdigit()):
        raise Refused(400, f"Content-Length is not a byte count: {text[:20]!r}")
    length = int(text)
    if length > limit:
        raise Refused(413, f"body over {limit} bytes")
    return length
