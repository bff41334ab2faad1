"""``stream-cps webhook``: an HTTPS endpoint for a CockroachDB changefeed ``webhook-https://`` sink.

The sink POSTs ``{"payload": [<wrapped message>, ...], "length": N}`` (each message carries its
``key`` and ``topic``) and a bare ``{"resolved": "..."}`` for resolved timestamps. Every request
is handed to the caller's handler (the service applies it in one transaction, the same code as
the Kafka path) and answered 200 only after that returned, so the changefeed's at-least-once
retries are what makes delivery reliable. A body or an entry that cannot be decoded becomes a
dead-letter envelope (recorded, and still answered 200), so one bad message does not stall the
feed; a transient failure (the database away) is answered 503 and the sink
retries.

Before any of that a request must pass the controls of docs/security.md, in this order: the
TLS handshake (a client certificate when ``client_ca_file`` is set), the secret header (401),
a free one of ``max_connections`` slots within ``max_wait`` (503), a valid ``Content-Length``
up to ``MAX_BODY`` (411/400/413); only changefeed rows are applied unless ``accept_events``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry import trace

from stream_cps import retry, telemetry
from stream_cps.config import WebhookSettings
from stream_cps.errors import InvalidInput
from stream_cps.sources.changefeed.auth import header_auth, server_context
from stream_cps.sources.changefeed.limits import Refused, body_length
from stream_cps.sources.messages import (
    CustomerEvent,
    Envelope,
    Resolved,
    decode_object,
    webhook_entries,
)

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0  # also the idle timeout of a connection
# Closing a socket with unread input resets the connection, and the reset can destroy our
# answer (a 401, a 413) before the client read it; so before closing, this much of what the
# client still sends is read and thrown away.
LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 2.0


PLAIN_EVENT = "a plain customer event, not a changefeed row (webhook.accept_events is off)"


def envelopes_of(body: bytes, accept_events: bool = False) -> list[Envelope]:
    """One envelope per changefeed message in a request body (dead letters carry a reason).

    A changefeed only reports rows that are in the table already; a plain customer event
    would be inserted, so one is a dead letter unless ``accept_events`` (docs/security.md).
    """
    digest = hashlib.sha256(body).hexdigest()[:32]
    now = datetime.now(UTC)

    def envelope(n: int, value: bytes, **kw: Any) -> Envelope:
        return Envelope(
            origin=f"webhook:{digest}:{n}",
            source="webhook",
            topic=None,
            partition=None,
            offset=None,
            key=None,
            value=value,
            timestamp=now,
            **kw,
        )

    try:
        entries = webhook_entries(body)
    except InvalidInput as exc:
        return [envelope(0, body, reason=str(exc))]
    if isinstance(entries, Resolved):
        return [envelope(0, body, decoded=entries)]
    found = []
    for n, entry in enumerate(entries):
        value = json.dumps(entry).encode()
        if not isinstance(entry, dict):
            found.append(envelope(n, value, reason="webhook entry is not a JSON object"))
            continue
        try:
            decoded = decode_object(entry, entry.get("key"))
        except InvalidInput as exc:
            found.append(envelope(n, value, reason=str(exc)))
            continue
        if isinstance(decoded, CustomerEvent) and not accept_events:
            found.append(envelope(n, value, reason=PLAIN_EVENT))
        else:
            found.append(envelope(n, value, decoded=decoded))
    return found


Handler = Callable[[list[Envelope]], dict[str, Any]]
"""Applies one request's envelopes and returns the JSON answer. A failure that passes
(``retry.is_transient``: the database away) is answered 503, so the sink retries."""


class WebhookServer:
    """A threading HTTPS server that turns each request body into envelopes for ``handle``."""

    def __init__(
        self,
        settings: WebhookSettings,
        handle: Handler,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        context = server_context(settings)
        self.auth = header_auth(settings)
        self.accept_events = settings.accept_events
        # At most max_connections requests are read and applied at once: it bounds the
        # bodies held in memory and the database sessions (one per request being applied).
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.max_wait = settings.max_wait
        self.handle = handle
        self.on_close = on_close  # e.g. close the handler's pooled connections
        self.httpd = _TLSServer((settings.host, settings.port), _handler(self), context)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""
        thread = threading.Thread(target=self.httpd.serve_forever, name="webhook", daemon=True)
        thread.start()
        log.info("webhook: listening on https://%s:%d", *self.httpd.server_address[:2])
        try:
            stop.wait()
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(timeout=5)
            if self.on_close is not None:
                self.on_close()


class _TLSServer(ThreadingHTTPServer):
    """TLS handshakes happen in the connection's own thread, so a slow or silent client cannot
    hold up ``accept`` for everyone else."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("webhook: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
            _linger(tls)
        finally:
            tls.close()


def _linger(tls: ssl.SSLSocket) -> None:
    """Discard the client's unread input, bounded in bytes and time (see LINGER_BYTES)."""
    deadline = time.monotonic() + LINGER_SECONDS
    left = LINGER_BYTES
    try:
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            tls.settimeout(remaining)
            chunk = tls.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
    except (OSError, ssl.SSLError):
        return


def _handler(server: WebhookServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            try:
                self._authenticated()
                if not server.slots.acquire(timeout=server.max_wait):
                    log.info(
                        "webhook: %s: no free slot of webhook.max_connections in %.1f s; "
                        "answered 503",
                        self.client_address[0],
                        server.max_wait,
                    )
                    raise Refused(503, "busy: too many requests at once; retry")
            except Refused as refused:
                self.close_connection = True  # what is left of the body is not read
                self._reply(refused.status, {"error": str(refused)}, retry=refused.status == 503)
                return
            try:
                self._apply()
            finally:
                server.slots.release()

        def _apply(self) -> None:
            try:
                body = self._body()
            except Refused as refused:
                self.close_connection = True
                self._reply(refused.status, {"error": str(refused)})
                return
            if body is None:
                return
            # The request's trace continues the caller's (a traceparent header), if any.
            carrier = {k.lower(): v for k, v in self.headers.items()}
            with telemetry.tracer().start_as_current_span(
                telemetry.SPAN_WEBHOOK_REQUEST,
                context=telemetry.remote_context(carrier),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": "POST", "url.path": self.path},
            ) as span:
                try:
                    answer = server.handle(envelopes_of(body, server.accept_events))
                except Exception as exc:
                    if retry.is_transient(exc):
                        log.warning("webhook: %s; answered 503, the sink will retry", exc)
                        status, answer = 503, {"error": "database unavailable"}
                    else:
                        log.exception("webhook: request failed")
                        status, answer = 500, {"error": "internal error"}
                else:
                    status = 200
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(trace.StatusCode.ERROR)
            self._reply(status, answer)

        def _authenticated(self) -> None:
            if not server.auth.allows(self.headers):
                log.warning(
                    "webhook: %s: missing or wrong %s header; answered 401",
                    self.client_address[0],
                    server.auth.header,
                )
                raise Refused(401, "unauthorized")

        def _body(self) -> bytes | None:
            """The body, never more than MAX_BODY bytes read; None when the client did not
            send all of it (nothing to answer)."""
            length = body_length(self.headers, MAX_BODY)
            try:
                body = self.rfile.read(length)
            except OSError as exc:
                body = b""
                log.info("webhook: %s: body not received: %s", self.client_address[0], exc)
            if len(body) < length:
                self.close_connection = True
                return None
            return body

        def _reply(self, status: int, body: dict[str, Any], retry: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            if retry:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("webhook: " + format, *args)

    return Handler
