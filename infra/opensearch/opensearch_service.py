"""Start, stop and inspect a single-node OpenSearch 2.19 for local development and tests.

There is no Docker engine and no OpenSearch tarball here, only Maven Central, so the node is
the server jar plus the Netty4 plugin, run by our own launcher (``DevNode.java``) and built
with Maven on first use. Each node lives in a work dir (data, logs, pid, url), so stopping
and starting again on the same dir keeps the data.

CLI::

    python infra/opensearch/opensearch_service.py start --dir DIR [--port N] [--timeout S]
    python infra/opensearch/opensearch_service.py stop --dir DIR
    python infra/opensearch/opensearch_service.py status --dir DIR

Python API (e.g. for pytest fixtures): ``start(workdir, port=None, timeout=120)`` returns an
``OpenSearchNode``; ``stop(workdir)``; ``running(workdir)``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
TARGET = HERE / "target"
LAUNCHER_JAR = TARGET / "devnode.jar"
DEPENDENCY_DIR = TARGET / "dependency"
MAIN_CLASS = "io.streamcps.devnode.DevNode"
# Inputs of the Maven build: a change to any of them triggers a rebuild on the next start.
BUILD_INPUTS = (POM, HERE / "src")

HEAP = os.environ.get("STREAMCPS_OPENSEARCH_HEAP", "512m")
PID_FILE = "opensearch.pid"
URL_FILE = "url"
LOG_FILE = "opensearch.log"
SERVER_LOG = Path("logs") / "opensearch-server.log"
LOCK_FILE = "opensearch.lock"

# Mirrors the system options of OpenSearch's own launcher that matter outside its Bootstrap.
JVM_OPTIONS = (
    "-XX:+UseG1GC",
    "-Xss1m",
    "-XX:-OmitStackTraceInFastThrow",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
    "-Djna.nosys=true",
    "-Dio.netty.noUnsafe=true",
    "-Dio.netty.noKeySetOptimization=true",
    "-Dio.netty.recycler.maxCapacityPerThread=0",
    "-Dlog4j.shutdownHookEnabled=false",
    "-Dlog4j2.disable.jmx=true",
    "-Djava.locale.providers=SPI,CLDR",
)

# Never send loopback requests through an HTTP proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OpenSearchServiceError(RuntimeError):
    """The node could not be built, started or stopped; the message says why."""


@dataclass(frozen=True)
class OpenSearchNode:
    """A running dev node: where to reach it and how to stop it."""

    url: str
    pid: int
    workdir: Path

    def stop(self, timeout: float = 30.0) -> None:
        """Stop this node (see the module-level ``stop``)."""
        stop(self.workdir, timeout)


# --- build -------------------------------------------------------------------------------


def _newest_mtime(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)


def needs_build() -> bool:
    """True when the launcher jar or its dependencies are missing or older than the sources."""
    if not LAUNCHER_JAR.is_file() or not any(DEPENDENCY_DIR.glob("opensearch-*.jar")):
        return True
    built = LAUNCHER_JAR.stat().st_mtime
    return any(_newest_mtime(p) > built for p in BUILD_INPUTS)


def build(force: bool = False) -> None:
    """Build the launcher and copy the server jars with Maven, unless they are up to date."""
    TARGET.mkdir(exist_ok=True)
    with _locked(TARGET / ".build.lock"):  # concurrent starts must not build twice at once
        if not force and not needs_build():
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise OpenSearchServiceError("mvn not found on PATH: Maven is needed to build the node")
        # Old versions left in dependency/ would sit on the classpath next to the new ones.
        shutil.rmtree(DEPENDENCY_DIR, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(POM),
            "package",
            "dependency:copy-dependencies",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).strip().splitlines()
            raise OpenSearchServiceError(
                f"maven build failed ({done.returncode}):\n" + "\n".join(out[-40:])
            )
        LAUNCHER_JAR.touch()  # the jar plugin skips rewriting an unchanged jar


# --- processes and files -----------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_pid(workdir: Path) -> int | None:
    try:
        return int((workdir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it if it is our exited child, and treats zombies as dead."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    proc = Path(f"/proc/{pid}/stat")
    if Path("/proc/self").exists():
        try:
            state = proc.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ours(pid: int, workdir: Path) -> bool:
    """Guards against a stale pid file whose pid now belongs to another process."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not Path("/proc/self").exists():
        return True
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return MAIN_CLASS.encode() in args and str(workdir).encode() in args


def _kill_group(pid: int, sig: signal.Signals) -> None:
    # The launcher leads its own session, so its process group id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _previous_port(workdir: Path) -> int | None:
    """The HTTP port of the last run in ``workdir``, so a plain restart keeps its URL."""
    try:
        return int((workdir / URL_FILE).read_text().strip().rsplit(":", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def log_tail(workdir: Path, lines: int = 30) -> str:
    """The end of the launcher output and of the server log, for error messages."""
    parts = []
    for name in (Path(LOG_FILE), SERVER_LOG):
        tail = _tail(workdir / name, lines)
        if tail:
            parts.append(f"--- tail of {workdir / name} ---\n{tail}")
    return "\n".join(parts) or f"(no log in {workdir})"


# --- HTTP --------------------------------------------------------------------------------


def _request(url: str, method: str = "GET", body: object = None, timeout: float = 5.0) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with _HTTP.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def health(url: str, timeout: float = 2.0) -> str | None:
    """The cluster health status (green/yellow/red), or None when the node does not answer."""
    try:
        answer = _request(f"{url}/_cluster/health", timeout=timeout)
    except (OSError, ValueError, http.client.HTTPException):  # URLError, timeouts: OSError
        return None
    return answer.get("status") if isinstance(answer, dict) else None


# --- public API --------------------------------------------------------------------------


def running(workdir: Path) -> OpenSearchNode | None:
    """The node started in ``workdir`` if its process is still alive, else None."""
    workdir = workdir.resolve()
    pid = _read_pid(workdir)
    if pid is None or not _alive(pid) or not _is_ours(pid, workdir):
        return None
    try:
        url = (workdir / URL_FILE).read_text().strip()
    except OSError:
        return None
    return OpenSearchNode(url=url, pid=pid, workdir=workdir)


def start(workdir: Path, port: int | None = None, timeout: float = 120.0) -> OpenSearchNode:
    """Start a node in ``workdir`` (reusing one already running there) and wait until healthy.

    ``port`` is the HTTP port; without it the previous run's port is reused when free, so a
    restart keeps the URL, else a free one is picked. Raises OpenSearchServiceError, with the
    log tail, when the node does not answer green or yellow within ``timeout`` seconds (the
    Maven build, needed only once, is not counted).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with _locked(workdir / LOCK_FILE):
        current = running(workdir)
        if current is not None:
            if port is not None and not current.url.endswith(f":{port}"):
                raise OpenSearchServiceError(
                    f"a node already runs in {workdir} at {current.url}, not on port {port}"
                )
            return current
        build()
        if port is None:
            previous = _previous_port(workdir)
            port = previous if previous and not _port_in_use(previous) else _free_port()
        elif _port_in_use(port):
            raise OpenSearchServiceError(f"port {port} on 127.0.0.1 is already in use")
        return _launch(workdir, port, timeout)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise OpenSearchServiceError("java not found: set JAVA_HOME or put Java 17+ on PATH")
    return java


def _launch(workdir: Path, port: int, timeout: float) -> OpenSearchNode:
    url = f"http://127.0.0.1:{port}"
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(exist_ok=True)
    classpath = os.pathsep.join([str(LAUNCHER_JAR), str(DEPENDENCY_DIR / "*")])
    cmd = [
        _java(),
        f"-Xms{HEAP}",
        f"-Xmx{HEAP}",
        *JVM_OPTIONS,
        f"-Djava.io.tmpdir={tmpdir}",
        "-cp",
        classpath,
        MAIN_CLASS,
        str(workdir),
        str(port),
        str(_free_port()),
    ]
    with (workdir / LOG_FILE).open("ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting on {url}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _write_atomic(workdir / PID_FILE, f"{proc.pid}\n")
    _write_atomic(workdir / URL_FILE, f"{url}\n")

    deadline = time.monotonic() + timeout
    status: str | None = None
    while status not in ("green", "yellow"):
        code = proc.poll()
        if code is not None:
            _fail(workdir, proc.pid, f"the node exited with code {code} while starting")
        if time.monotonic() >= deadline:
            _fail(
                workdir,
                proc.pid,
                f"no green/yellow health at {url} within {timeout:g}s "
                f"(last status: {status or 'no answer'})",
            )
        time.sleep(0.25)
        status = health(url)
    try:
        # A single node can never host replicas: make new indices default to none so they
        # go green. Persistent, so it also holds after a restart.
        _request(
            f"{url}/_cluster/settings",
            "PUT",
            {"persistent": {"cluster.default_number_of_replicas": 0}},
        )
    except (OSError, ValueError, http.client.HTTPException) as exc:
        _fail(workdir, proc.pid, f"could not apply cluster settings: {exc}")
    return OpenSearchNode(url=url, pid=proc.pid, workdir=workdir)


def _fail(workdir: Path, pid: int, reason: str) -> NoReturn:
    """Kill what start launched and raise with the reason and the log tail."""
    _kill_group(pid, signal.SIGTERM)
    if not _wait_dead(pid, 10):
        _kill_group(pid, signal.SIGKILL)
        _wait_dead(pid, 10)
    (workdir / PID_FILE).unlink(missing_ok=True)
    raise OpenSearchServiceError(f"{reason}\n{log_tail(workdir)}")


def stop(workdir: Path, timeout: float = 30.0) -> None:
    """Stop the node in ``workdir``: SIGTERM, then SIGKILL after ``timeout``. Idempotent.

    The data and the url file stay, so ``start`` on the same dir resumes on the same port.
    """
    workdir = workdir.resolve()
    if not workdir.is_dir():
        return
    with _locked(workdir / LOCK_FILE):
        pid = _read_pid(workdir)
        if pid is not None and _alive(pid) and _is_ours(pid, workdir):
            _kill_group(pid, signal.SIGTERM)
            if not _wait_dead(pid, timeout):
                _kill_group(pid, signal.SIGKILL)
                if not _wait_dead(pid, 10):
                    raise OpenSearchServiceError(f"process {pid} survived SIGKILL")
        (workdir / PID_FILE).unlink(missing_ok=True)


# --- CLI ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (status: 0 running, 3 stopped)."""
    parser = argparse.ArgumentParser(description="Single-node OpenSearch for development.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--dir", type=Path, required=True, help="work dir (data, logs, pid)")
        if name == "start":
            cmd.add_argument("--port", type=int, help="HTTP port (default: previous or free)")
            cmd.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
        if name == "stop":
            cmd.add_argument("--timeout", type=float, default=30.0, help="seconds before KILL")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            node = start(args.dir, args.port, args.timeout)
            print(node.url)
        elif args.command == "stop":
            stop(args.dir, args.timeout)
        else:
            node_or_none = running(args.dir)
            if node_or_none is None:
                print("stopped")
                return 3
            state = health(node_or_none.url) or "not answering"
            print(f"running {node_or_none.url} pid {node_or_none.pid} health {state}")
    except OpenSearchServiceError as exc:
        print(f"opensearch {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
