"""Who may post to the webhook (docs/security.md): a client certificate signed by
``webhook.client_ca_file`` (checked in the TLS handshake, so an unknown client never gets to
send a request) and/or a secret header (CockroachDB's ``webhook_auth_header``), compared in
constant time so response timing does not reveal how much of a guess was right.

A server with neither refuses to start unless ``webhook.allow_unauthenticated`` says so: the
endpoint writes to the event store, and an open one is a choice someone should have made.
"""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from stream_cps.config import WebhookSettings
from stream_cps.errors import ConfigError


@dataclass(frozen=True)
class HeaderAuth:
    """The secret header check; ``secret=None`` lets every request through."""

    header: str
    secret: bytes | None = field(repr=False)

    def allows(self, headers: Message) -> bool:
        if self.secret is None:
            return True
        values = headers.get_all(self.header) or []
        if len(values) != 1:  # a repeated header is ambiguous: refuse it
            return False
        # http.server decodes header bytes as latin-1, so this gives back the bytes sent.
        sent = values[0].encode("latin-1", errors="replace")
        return hmac.compare_digest(sent, self.secret)


def header_auth(settings: WebhookSettings) -> HeaderAuth:
    """The configured secret (inline, from the environment, or from a file); raises
    ``ConfigError`` when the server would accept anyone without being told to."""
    secret = settings.auth_secret
    if secret is not None and settings.auth_secret_file:
        raise ConfigError("webhook.auth_secret and webhook.auth_secret_file: set only one")
    if settings.auth_secret_file:
        try:
            secret = Path(settings.auth_secret_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"webhook.auth_secret_file: cannot read: {exc}") from exc
        secret = secret.removesuffix("\n").removesuffix("\r")
    if secret is not None and not secret.strip():
        raise ConfigError("webhook.auth_secret: must not be empty")
    if secret is not None and not settings.auth_header.strip():
        raise ConfigError("webhook.auth_header: must name a header when a secret is set")
    if secret is None and not settings.client_ca_file and not settings.allow_unauthenticated:
        raise ConfigError(
            "webhook: no client authentication; set webhook.client_ca_file and/or "
            "webhook.auth_secret (or webhook.auth_secret_file), or explicitly "
            "webhook.allow_unauthenticated = true"
        )
    return HeaderAuth(settings.auth_header, None if secret is None else secret.encode())


def server_context(settings: WebhookSettings) -> ssl.SSLContext:
    """The server's TLS context; with ``client_ca_file`` a client without a certificate that
    CA signed fails the handshake."""
    cert, key = settings.cert_file, settings.key_file
    if not cert or not key:
        raise ConfigError(
            "webhook.cert_file and webhook.key_file: required (changefeed webhook sinks "
            "only speak HTTPS)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"webhook.cert_file/key_file: cannot load: {exc}") from exc
    if settings.client_ca_file:
        try:
            context.load_verify_locations(cafile=settings.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"webhook.client_ca_file: cannot load: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context
