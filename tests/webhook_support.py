"""Helpers for the webhook tests: certificates made with the ``openssl`` CLI (the venv has no
``cryptography``), a server running in a thread, and raw HTTPS requests."""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from stream_cps import config
from stream_cps.service.process import webhook_server
from stream_cps.sources.changefeed.webhook import WebhookServer
from stream_cps_dev.encode import changefeed_message

SECRET = "Bearer s3cr3t-for-tests"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (its own CA for the client)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class ClientPKI:
    ca: Path
    cert: Path
    key: Path


def client_pki(tmp: Path, name: str) -> ClientPKI:
    """A CA and one client certificate it signed (what a changefeed's client_cert would be)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ca, ca_key = tmp / f"{name}-ca.pem", tmp / f"{name}-ca.key"
    cert, key, csr = tmp / f"{name}.pem", tmp / f"{name}.key", tmp / f"{name}.csr"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", f"/CN={name} CA", "-keyout", str(ca_key), "-out", str(ca),
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "1", "-out", str(cert),
    )  # fmt: skip
    return ClientPKI(ca, cert, key)


def webhook_settings(settings: config.Settings, tmp: Path, **changes: Any) -> config.Settings:
    """Settings for a test server on 127.0.0.1, an ephemeral port, a fresh certificate."""
    cert, key = self_signed(tmp)
    return settings.replace(
        **{
            "webhook.host": "127.0.0.1",
            "webhook.port": 0,
            "webhook.cert_file": str(cert),
            "webhook.key_file": str(key),
            **changes,
        }
    )


@contextmanager
def running(settings: config.Settings) -> Iterator[WebhookServer]:
    """The real server (``stream-cps webhook``'s wiring) serving in a thread."""
    server = webhook_server(settings)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=10)


def client_context(settings: config.Settings, pki: ClientPKI | None = None) -> ssl.SSLContext:
    """Trusts the test server's certificate; presents ``pki``'s client certificate if given."""
    context = ssl.create_default_context(cafile=settings.webhook.cert_file)
    if pki is not None:
        context.load_cert_chain(str(pki.cert), str(pki.key))
    return context


def post(
    server: WebhookServer,
    context: ssl.SSLContext,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST one body; the status and the JSON answer."""
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=60)
    try:
        conn.request("POST", "/changefeed", body=body, headers=headers or {})
        response = conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read() or b"{}")
        return response.status, answer
    finally:
        conn.close()


def changefeed_body(rows: list[tuple[str, str, str, str, datetime, str]], first: int = 0) -> bytes:
    """A webhook sink's request body: one wrapped changefeed message per row."""
    entries = [
        {**changefeed_message(row, n), "key": [row[0]], "topic": "customer_events"}
        for n, row in enumerate(rows, start=first)
    ]
    return json.dumps({"payload": entries, "length": len(entries)}).encode()


def raw_post(
    server: WebhookServer, context: ssl.SSLContext, head: str, body: bytes = b"", more: int = 0
) -> tuple[int | None, int]:
    """POST hand-made headers (``head``, without the request line) over TLS, then ``body`` and
    up to ``more`` further bytes while the server keeps reading. Returns the status (None if no
    answer came) and how many body bytes the server took before it closed the connection."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    request = f"POST /changefeed HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode()
    answer, sent = b"", 0
    try:
        tls.sendall(request + body)
        sent = len(body)
        chunk = b"x" * (1024 * 1024)
        while sent < len(body) + more:
            if select.select([tls], [], [], 0)[0] or tls.pending():
                break  # the server answered: stop sending
            tls.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server closed the connection
    try:
        tls.settimeout(5)
        while b"\r\n\r\n" not in answer:
            data = tls.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    finally:
        tls.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return None, sent
    return int(answer.split(b" ", 2)[1]), sent
