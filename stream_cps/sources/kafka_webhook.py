"""``stream-cps webhook``: an HTTPS endpoint for a CockroachDB changefeed ``webhook-https://`` sink.

The sink POSTs ``{"payload": [<wrapped message>, ...], "length": N}`` (each message carries its
``key`` and ``topic``) and a bare ``{"resolved": "..."}`` for resolved timestamps. Every request
is applied in one transaction (the same code as the Kafka path) and answered 200 only after the
commit, so the changefeed's at-least-once retries are what makes delivery reliable. A body or an
entry that cannot be decoded is recorded in the dead-letter table and still answered 200, so one
bad message does not stall the feed; a database failure is answered 503 and the sink retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import ssl
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

from stream_cps.config import Settings
from stream_cps.db import schema
from stream_cps.db.connect import connect
from stream_cps.errors import ConfigError, InvalidInput, Recoverable
from stream_cps.sources.kafka_apply import Applier, ApplyStats, Envelope
from stream_cps.sources.kafka_decode import Resolved, decode_object, webhook_entries
from stream_cps.stitching.worker import Stitcher

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0  # also the idle timeout of a connection


def envelopes_of(body: bytes) -> list[Envelope]:
    """One envelope per changefeed message in a request body (dead letters carry a reason)."""
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
            found.append(envelope(n, value, decoded=decode_object(entry, entry.get("key"))))
        except InvalidInput as exc:
            found.append(envelope(n, value, reason=str(exc)))
    return found


class WebhookServer:
    """A threading HTTPS server; database connections are pooled across requests."""

    def __init__(self, settings: Settings) -> None:
        cert, key = settings.webhook.cert_file, settings.webhook.key_file
        if not cert or not key:
            raise ConfigError(
                "webhook.cert_file and webhook.key_file: required (changefeed webhook sinks "
                "only speak HTTPS)"
            )
        self.settings = settings
        self.applier = Applier(settings.schemas, Stitcher(settings))
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"webhook.cert_file/key_file: cannot load: {exc}") from exc
        self.httpd = _TLSServer(
            (settings.webhook.host, settings.webhook.port), _handler(self), context
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""
        with connect(self.settings.dsn, role="check", autocommit=True) as conn:
            schema.check(conn, self.settings.schemas)
        thread = threading.Thread(target=self.httpd.serve_forever, name="webhook", daemon=True)
        thread.start()
        log.info("webhook: listening on https://%s:%d", *self.httpd.server_address[:2])
        try:
            stop.wait()
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(timeout=5)
            self.close_connections()

    def handle(self, body: bytes) -> ApplyStats:
        """Apply one request body; connections are reused across requests and threads."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = connect(self.settings.dsn, role="webhook", autocommit=True)
        try:
            stats = self.applier.apply(conn, envelopes_of(body))
        finally:
            if conn.closed or conn.broken:
                conn.close()
            else:
                self._idle.put(conn)
        return stats

    def close_connections(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


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
        finally:
            tls.close()


def _handler(server: WebhookServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
                return
            body = self.rfile.read(length)
            try:
                stats = server.handle(body)
            except (psycopg.Error, Recoverable) as exc:
                log.warning("webhook: database error, the sink will retry: %s", exc)
                self._reply(503, {"error": "database unavailable"})
                return
            self._reply(
                200,
                {
                    "messages": stats.messages,
                    "stitched": stats.stitch.events,
                    "dead_letters": len(stats.dead_letters),
                },
            )

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("webhook: " + format, *args)

    return Handler


def run_webhook(settings: Settings, stop: threading.Event) -> int:
    WebhookServer(settings).serve(stop)
    return 0
