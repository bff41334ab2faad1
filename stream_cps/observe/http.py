"""``/healthz``, ``/readyz`` and ``/metrics`` of ``stream-cps run`` (``http.address``).

Plain ``http.server`` in a daemon thread: three read-only GETs need no framework. ``/metrics``
is the Prometheus text of the OpenTelemetry instruments (``telemetry.enable_prometheus``), so
every metric is defined once for OTLP and Prometheus alike, plus prometheus-client's standard
``process_*`` and ``python_gc_*`` series.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_cps.observe.health import Health

log = logging.getLogger(__name__)


class ObserveServer:
    def __init__(self, host: str, port: int, health: Health, registry: Any) -> None:
        self.health = health
        self.registry = registry
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("http: /healthz /readyz /metrics on %s", self.address)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    check = server.health.live if path == "/healthz" else server.health.ready
                    ok, parts = check()
                    body = json.dumps({"status": "ok" if ok else "failing", **parts})
                    self._send(200 if ok else 503, body.encode(), "application/json")
                else:
                    self._send(404, b"not found: /healthz, /readyz, /metrics\n", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        return Handler
