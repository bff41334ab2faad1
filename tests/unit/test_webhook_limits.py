"""The webhook's body-length rule (no server; the real one is in test_webhook_security)."""

from __future__ import annotations

from email.message import Message

import pytest

from stream_cps.sources.changefeed.limits import Refused, body_length


def _headers(*pairs: tuple[str, str]) -> Message:
    message = Message()
    for name, value in pairs:
        message[name] = value
    return message


def test_one_valid_length_up_to_the_limit() -> None:
    assert body_length(_headers(("Content-Length", " 10 ")), 10) == 10
    assert body_length(_headers(("Content-Length", "0")), 10) == 0


@pytest.mark.parametrize(
    ("pairs", "status"),
    [
        ((), 411),
        ((("Transfer-Encoding", "chunked"),), 411),
        ((("Content-Length", "-1"),), 400),
        ((("Content-Length", "1e3"),), 400),
        ((("Content-Length", "\u00b2"),), 400),  # a digit to str.isdigit, not to HTTP
        ((("Content-Length", "1"), ("Content-Length", "1")), 400),
        ((("Content-Length", "11"),), 413),
    ],
)
def test_everything_else_is_refused(pairs: tuple[tuple[str, str], ...], status: int) -> None:
    with pytest.raises(Refused) as info:
        body_length(_headers(*pairs), 10)
    assert info.value.status == status
