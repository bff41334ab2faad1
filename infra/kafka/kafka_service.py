"""Run a real single-node Kafka 4.x broker (KRaft, broker+controller) without Docker.

The jars come from Maven Central via ``pom.xml`` next to this file, so the only
host requirements are Java 17+ and Maven. A broker counts as started only once
a produce+consume round trip through it succeeds, so callers never race a
half-initialised broker.

CLI::

    python infra/kafka/kafka_service.py start --dir DIR [--port N] [--timeout S] [--sasl-ssl]
    python infra/kafka/kafka_service.py status --dir DIR
    python infra/kafka/kafka_service.py stop --dir DIR

``--sasl-ssl`` adds a SASL_SSL listener (SCRAM-SHA-512, TLS with a CA made for DIR) beside the
PLAINTEXT one, and writes what a client needs to ``DIR/client.json`` (see :func:`client_settings`).

Environment: ``STREAM_CPS_KAFKA_LIB`` overrides the jar directory (default
``DIR/lib``) so many work dirs can share one resolved jar set.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._scram import (  # not re-exported for type checkers
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from confluent_kafka.cimpl import NewTopic

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG_CONFIG = HERE / "log4j2.xml"
LIB_ENV = "STREAM_CPS_KAFKA_LIB"
HEALTHCHECK_TOPIC = "__stream_cps_healthcheck"
HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
# No Log4j shutdown hook: the broker's own hook still logs while the JVM exits.
JVM_OPTS = [
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-Djava.awt.headless=true",
    "-Dlog4j2.shutdownHookEnabled=false",
]
_MARKER = ".resolved"  # holds the pom hash, so a pom edit triggers re-resolution

# librdkafka logs go here; the NullHandler keeps retries off the terminal
# while still letting pytest/log configs capture them.
_client_log = logging.getLogger("stream_cps.kafka_service.client")
_client_log.addHandler(logging.NullHandler())


class KafkaServiceError(RuntimeError):
    """The broker could not be prepared, started, reached or stopped."""


@dataclass
class KafkaBroker:
    """Handle to a broker started by :func:`start`."""

    bootstrap: str
    pid: int
    workdir: Path
    secure: SecureClient | None = None  # the SASL_SSL listener, with --sasl-ssl
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop this broker; safe to call more than once."""
        stop(self.workdir, timeout=timeout)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)  # reap, so no zombie or ResourceWarning


# --------------------------------------------------------------------------- paths


def _pid_file(workdir: Path) -> Path:
    return workdir / "kafka.pid"


def _bootstrap_file(workdir: Path) -> Path:
    return workdir / "bootstrap"


def _log_file(workdir: Path) -> Path:
    return workdir / "kafka.log"


def _props_file(workdir: Path) -> Path:
    return workdir / "server.properties"


def lib_dir_for(workdir: Path) -> Path:
    """Jar directory: ``$STREAM_CPS_KAFKA_LIB`` if set, else ``workdir/lib``."""
    env = os.environ.get(LIB_ENV)
    return Path(env).expanduser().resolve() if env else workdir / "lib"


# ---------------------------------------------------------------------------- jars


def _pom_hash() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _jars_ready(lib: Path) -> bool:
    marker = lib / _MARKER
    return marker.is_file() and marker.read_text().strip() == _pom_hash()


def ensure_jars(lib: Path) -> Path:
    """Resolve broker jars into *lib* with Maven unless already there for this pom.

    Resolution goes to a temp dir and is swapped in under a file lock, so
    parallel callers sharing *lib* never see a half-filled directory.
    """
    if _jars_ready(lib):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaServiceError(
            "Maven ('mvn') is not on PATH; it is needed to fetch the Kafka jars"
        )
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.with_name(f"{lib.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _jars_ready(lib):  # another process finished while we waited
            return lib
        tmp = Path(tempfile.mkdtemp(prefix=f"{lib.name}.tmp-", dir=lib.parent))
        try:
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}",
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
                tail = (res.stdout + res.stderr)[-3000:]
                raise KafkaServiceError(
                    f"mvn failed to resolve Kafka jars (exit {res.returncode}):\n{tail}"
                )
            (tmp / _MARKER).write_text(_pom_hash())
            if lib.exists():
                shutil.rmtree(lib)
            tmp.rename(lib)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


# -------------------------------------------------------------------------- config


def free_port() -> int:
    """Ask the OS for a currently unused loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    """True if nothing else holds *port* (bind test, as Kafka's SO_REUSEADDR bind would see it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cluster_id() -> str:
    """Random Kafka-style id: base64url of a UUID, not starting with '-' (CLI-safe)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def write_properties(
    workdir: Path, port: int, controller_port: int, secure_port: int | None = None
) -> Path:
    """Write a KRaft combined-mode config tuned for one node and fast test startup.

    With *secure_port*, a SASL_SSL listener (SCRAM-SHA-512 over TLS) is added beside the
    PLAINTEXT one, which stays for the broker itself and the health check.
    """
    listeners = f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}"
    advertised = f"PLAINTEXT://{HOST}:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if secure_port is not None:
        listeners += f",SASL_SSL://{HOST}:{secure_port}"
        advertised += f",SASL_SSL://{HOST}:{secure_port}"
        protocols += ",SASL_SSL:SASL_SSL"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "listener.security.protocol.map": protocols,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(workdir / "data"),
        "num.partitions": "3",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # 50 partitions (the default) makes the first consumer group slow to appear.
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "5",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Two cores: keep the thread count modest.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    if secure_port is not None:
        props.update(_sasl_ssl_properties(workdir))
    path = _props_file(workdir)
    body = "".join(f"{k}={v}\n" for k, v in props.items())
    path.write_text(
        "# Generated by infra/kafka/kafka_service.py; rewritten on every start.\n" + body
    )
    return path


# ------------------------------------------------------------------ SASL_SSL listener

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_USER = "stream-cps"
_CERT_DAYS = "30"


@dataclass(frozen=True)
class SecureClient:
    """What a client needs for the SASL_SSL listener (also in ``DIR/client.json``)."""

    bootstrap: str
    ca_location: Path
    username: str
    password_file: Path
    mechanism: str = SCRAM_MECHANISM

    def conf(self) -> dict[str, Any]:
        """librdkafka settings for this listener, the password read from its file."""
        return {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": self.mechanism,
            "sasl.username": self.username,
            "sasl.password": self.password_file.read_text().strip(),
            "ssl.ca.location": str(self.ca_location),
        }


def _tls_dir(workdir: Path) -> Path:
    return workdir / "tls"


def _client_file(workdir: Path) -> Path:
    return workdir / "client.json"


def _secret(path: Path) -> str:
    """A random secret kept in *path* (mode 0600), made on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(uuid.uuid4().hex + "\n")
    return path.read_text().strip()


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise KafkaServiceError("no 'openssl' on PATH; it makes the SASL_SSL listener's CA")
    res = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise KafkaServiceError(f"openssl {args[0]} failed: {(res.stdout + res.stderr)[-1500:]}")


def ensure_tls(workdir: Path) -> Path:
    """A CA (``ca.pem``) and a broker PKCS12 keystore signed by it, for 127.0.0.1 and
    localhost (so clients verify the host name); made once per work dir."""
    tls = _tls_dir(workdir)
    store = tls / "broker.p12"
    if store.is_file() and (tls / "ca.pem").is_file():
        return tls
    tls.mkdir(parents=True, exist_ok=True)
    store_pass = _secret(tls / "keystore.password")
    ca_key, ca, key, csr, cert = (tls / n for n in ("ca.key", "ca.pem", "b.key", "b.csr", "b.pem"))
    ext = tls / "broker.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
    )
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", _CERT_DAYS, "-subj", "/CN=stream-cps test CA")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=localhost")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", _CERT_DAYS, "-extfile", str(ext),
             "-out", str(cert))  # fmt: skip
    _openssl("pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-certfile", str(ca),
             "-name", "broker", "-out", str(store), "-passout", f"pass:{store_pass}")  # fmt: skip
    for scratch in (key, csr, ext):
        scratch.unlink(missing_ok=True)
    return tls


def _sasl_ssl_properties(workdir: Path) -> dict[str, str]:
    tls = _tls_dir(workdir)
    store_pass = _secret(tls / "keystore.password")
    mech = SCRAM_MECHANISM.lower()
    return {
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
        f"listener.name.sasl_ssl.{mech}.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.sasl_ssl.ssl.keystore.type": "PKCS12",
        "listener.name.sasl_ssl.ssl.keystore.location": str(tls / "broker.p12"),
        "listener.name.sasl_ssl.ssl.keystore.password": store_pass,
        "listener.name.sasl_ssl.ssl.key.password": store_pass,
        "listener.name.sasl_ssl.ssl.client.auth": "none",
    }


def _add_scram_user(bootstrap: str, password: str, timeout: float) -> None:
    """Create or update the SCRAM user through the PLAINTEXT listener (idempotent)."""
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
    upsert = UserScramCredentialUpsertion(SCRAM_USER, info, password.encode())
    admin = AdminClient(_base_conf(bootstrap))
    for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout).values():
        future.result(timeout=timeout)


def client_settings(workdir: Path) -> SecureClient:
    """The SASL_SSL client settings a ``--sasl-ssl`` start wrote into *workdir*."""
    try:
        data = json.loads(_client_file(Path(workdir)).read_text())
    except (OSError, ValueError) as exc:
        raise KafkaServiceError(f"no SASL_SSL client settings in {workdir}: {exc}") from exc
    return SecureClient(
        bootstrap=data["bootstrap"],
        ca_location=Path(data["ca_location"]),
        username=data["username"],
        password_file=Path(data["password_file"]),
        mechanism=data["mechanism"],
    )


def _write_client_settings(workdir: Path, client: SecureClient) -> None:
    data = {
        "bootstrap": client.bootstrap,
        "security_protocol": "SASL_SSL",
        "mechanism": client.mechanism,
        "username": client.username,
        "password_file": str(client.password_file),
        "ca_location": str(client.ca_location),
    }
    _client_file(workdir).write_text(json.dumps(data, indent=2) + "\n")


def _secure_client(workdir: Path, port: int) -> SecureClient:
    password_file = workdir / "sasl_password"
    _secret(password_file)
    return SecureClient(
        bootstrap=f"{HOST}:{port}",
        ca_location=_tls_dir(workdir) / "ca.pem",
        username=SCRAM_USER,
        password_file=password_file,
    )


def _wait_secure(secure: SecureClient, plain: str, deadline: float) -> None:
    """Register the user, then wait for a round trip over the SASL_SSL listener."""
    left = max(1.0, deadline - time.monotonic())
    _add_scram_user(plain, secure.password_file.read_text().strip(), min(15.0, left))
    last = "no try yet"
    while time.monotonic() < deadline:
        try:  # the credential reaches the listener shortly after the upsert returns
            round_trip(secure.bootstrap, min(15.0, max(1.0, deadline - time.monotonic())),
                       secure.conf())  # fmt: skip
            return
        except KafkaServiceError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise KafkaServiceError(f"SASL_SSL listener not usable before timeout: {last}")


# ------------------------------------------------------------------------- process


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaServiceError("no 'java' found (set JAVA_HOME or put Java 17+ on PATH)")
    return java


def _java_cmd(lib: Path, main: str, *args: str) -> list[str]:
    return [
        _java(),
        *JVM_OPTS,
        f"-Dlog4j2.configurationFile={LOG_CONFIG}",
        "-cp",
        f"{lib}/*",
        main,
        *args,
    ]


def format_storage(workdir: Path, lib: Path) -> None:
    """Format log.dirs with a fresh cluster id; skipped if formatted, so data survives restarts."""
    if (workdir / "data" / "meta.properties").is_file():
        return
    cmd = _java_cmd(
        lib,
        "kafka.tools.StorageTool",
        "format",
        "--config",
        str(_props_file(workdir)),
        "--cluster-id",
        _cluster_id(),
    )
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise KafkaServiceError("StorageTool format did not finish within 120 s") from exc
    if res.returncode != 0:
        output = (res.stdout + res.stderr)[-3000:]
        raise KafkaServiceError(f"StorageTool format failed (exit {res.returncode}):\n{output}")


def _reap(pid: int) -> bool:
    """Reap *pid* if it is our exited child; True when it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _is_our_broker(pid: int, workdir: Path) -> bool:
    """True if *pid* is alive and is the kafka.Kafka process for *workdir* (guards PID reuse)."""
    if pid <= 0 or _reap(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"kafka.Kafka" in cmdline and str(_props_file(workdir)).encode() in cmdline


def _read_pid(workdir: Path) -> int | None:
    try:
        return int(_pid_file(workdir).read_text().strip())
    except (OSError, ValueError):
        return None


def _log_lines(workdir: Path, since: int = 0) -> list[str]:
    """kafka.log lines from byte offset *since* (the log is appended to across restarts)."""
    try:
        with open(_log_file(workdir), "rb") as fh:
            fh.seek(since)
            return fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def log_tail(workdir: Path, lines: int = 40, since: int = 0) -> str:
    """Last *lines* of the broker log, for error messages."""
    return "\n".join(_log_lines(workdir, since)[-lines:]) or "(kafka.log is empty)"


def _first_error(workdir: Path, since: int = 0) -> str | None:
    """First ERROR/exception headline in kafka.log: usually the real cause, above stack traces."""
    for line in _log_lines(workdir, since):
        if not line[:1].isspace() and (
            " ERROR " in line or "Exception" in line or "Error:" in line
        ):
            return line.strip()[:500]
    return None


def _launch(workdir: Path, lib: Path) -> subprocess.Popen[bytes]:
    log = open(_log_file(workdir), "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            _java_cmd(lib, "kafka.Kafka", str(_props_file(workdir))),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # own process group: survives the CLI, killable as a group
        )
    finally:
        log.close()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _terminate(pid: int, workdir: Path, timeout: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_broker(pid, workdir):
            return
        time.sleep(0.2)
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _is_our_broker(pid, workdir):
        time.sleep(0.1)


# ------------------------------------------------------------------------- clients


def _base_conf(bootstrap: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": _client_log,
        "socket.connection.setup.timeout.ms": 5000,
        **(extra or {}),
    }


def _ensure_topic(
    bootstrap: str, topic: str, timeout: float, extra: dict[str, Any] | None = None
) -> None:
    admin = AdminClient(_base_conf(bootstrap, extra))
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1)], request_timeout=timeout
    )
    try:
        futures[topic].result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def round_trip(bootstrap: str, timeout: float, extra: dict[str, Any] | None = None) -> None:
    """Produce one unique record and read it back by offset; raise if that fails in time.

    *extra* is more client configuration (the SASL_SSL listener's security settings).

    Reading by explicit offset (assign, no group subscription) tests the data
    path itself and does not wait on consumer-group rebalancing. Every failure
    surfaces as :class:`KafkaServiceError` so callers need one ``except``.
    """
    try:
        _round_trip(bootstrap, timeout, extra)
    except KafkaServiceError:
        raise
    except (KafkaException, TimeoutError, ValueError) as exc:
        raise KafkaServiceError(f"round trip via {bootstrap} failed: {exc}") from exc


def _round_trip(bootstrap: str, timeout: float, extra: dict[str, Any] | None) -> None:
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KafkaServiceError(f"round trip via {bootstrap} timed out after {timeout:.0f}s")
        return remaining

    _ensure_topic(bootstrap, HEALTHCHECK_TOPIC, left(), extra)
    token = uuid.uuid4().hex.encode()
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append(msg)

    producer = Producer(
        {
            **_base_conf(bootstrap, extra),
            "acks": "all",
            "message.timeout.ms": max(1000, int(left() * 1000)),
        }
    )
    producer.produce(HEALTHCHECK_TOPIC, value=token, on_delivery=on_delivery)
    producer.flush(left())
    if errors or not delivered:
        raise KafkaServiceError(
            f"produce via {bootstrap} failed: {errors[0] if errors else 'not delivered in time'}"
        )
    partition, offset = delivered[0].partition(), delivered[0].offset()
    if partition is None or offset is None:
        raise KafkaServiceError(f"produce via {bootstrap} returned no partition/offset")

    consumer = Consumer(
        {
            **_base_conf(bootstrap, extra),
            "group.id": f"stream-cps-healthcheck-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    try:
        consumer.assign([TopicPartition(HEALTHCHECK_TOPIC, partition, offset)])
        while True:
            msg = consumer.poll(min(1.0, left()))
            if msg is None:
                continue
            if msg.error() is not None:
                raise KafkaServiceError(f"consume via {bootstrap} failed: {msg.error()}")
            if msg.value() == token:
                return
    finally:
        consumer.close()


# ----------------------------------------------------------------------- lifecycle


def _wait_healthy(
    workdir: Path, proc: subprocess.Popen[bytes] | None, pid: int, port: int, deadline: float
) -> None:
    last_error = "broker port never opened"
    while time.monotonic() < deadline:
        exited = proc.poll() is not None if proc is not None else not _is_our_broker(pid, workdir)
        if exited:
            raise KafkaServiceError("broker process exited during startup")
        if _port_open(port):
            try:
                round_trip(f"{HOST}:{port}", min(15.0, max(1.0, deadline - time.monotonic())))
                return
            except KafkaServiceError as exc:
                last_error = str(exc)
        time.sleep(0.3)
    raise KafkaServiceError(f"broker not healthy before timeout: {last_error}")


def _running(workdir: Path) -> tuple[int, str] | None:
    pid = _read_pid(workdir)
    if pid is None or not _is_our_broker(pid, workdir):
        return None
    try:
        return pid, _bootstrap_file(workdir).read_text().strip()
    except OSError as exc:
        raise KafkaServiceError(
            f"broker pid {pid} runs for {workdir} but its bootstrap file is missing; stop it first"
        ) from exc


def _clear_state(workdir: Path) -> None:
    for path in (_pid_file(workdir), _bootstrap_file(workdir), _client_file(workdir)):
        path.unlink(missing_ok=True)


def start(
    workdir: Path,
    port: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    lib_dir: Path | None = None,
    sasl_ssl: bool = False,
) -> KafkaBroker:
    """Start (or reuse) the broker for *workdir* and return once a round trip works.

    With *sasl_ssl* the broker also has a SASL_SSL listener (``KafkaBroker.secure``), and
    a round trip through it must work too.

    *timeout* bounds the startup after the jars are resolved; the one-off Maven
    download is not counted, since its duration depends on the network.

    On failure everything this call launched is killed and a
    :class:`KafkaServiceError` carrying the tail of kafka.log is raised.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout

    running = _running(workdir)
    if running is not None:  # already up (maybe still starting): just wait for health
        pid, bootstrap = running
        _wait_healthy(workdir, None, pid, int(bootstrap.rsplit(":", 1)[1]), deadline)
        reused = client_settings(workdir) if sasl_ssl else None
        if reused is not None:
            _wait_secure(reused, bootstrap, deadline)
        return KafkaBroker(bootstrap=bootstrap, pid=pid, workdir=workdir, secure=reused)
    _clear_state(workdir)
    if port is not None and not _port_free(port):
        raise KafkaServiceError(f"port {port} on {HOST} is already in use by another process")

    lib = ensure_jars(lib_dir if lib_dir is not None else lib_dir_for(workdir))
    deadline = time.monotonic() + timeout  # a cold Maven download does not eat the startup budget
    # Auto-picked ports can be grabbed by someone else before Java binds them: retry once.
    attempts = 1 if port is not None else 2
    if sasl_ssl:
        ensure_tls(workdir)
    for attempt in range(1, attempts + 1):
        client_port = port if port is not None else free_port()
        controller_port = free_port()
        while controller_port == client_port:
            controller_port = free_port()
        secure: SecureClient | None = None
        if sasl_ssl:
            secure_port = free_port()
            while secure_port in (client_port, controller_port):
                secure_port = free_port()
            secure = _secure_client(workdir, secure_port)
            _write_client_settings(workdir, secure)
        write_properties(workdir, client_port, controller_port, secure_port if secure else None)
        format_storage(workdir, lib)
        log_start = _log_file(workdir).stat().st_size if _log_file(workdir).exists() else 0
        proc = _launch(workdir, lib)
        bootstrap = f"{HOST}:{client_port}"
        _pid_file(workdir).write_text(f"{proc.pid}\n")
        _bootstrap_file(workdir).write_text(f"{bootstrap}\n")
        try:
            _wait_healthy(workdir, proc, proc.pid, client_port, deadline)
            if secure is not None:
                _wait_secure(secure, bootstrap, deadline)
        except BaseException as exc:  # incl. Ctrl-C: never leave a half-started JVM behind
            _terminate(proc.pid, workdir, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            _clear_state(workdir)
            if not isinstance(exc, KafkaServiceError):
                raise
            tail = log_tail(workdir, since=log_start)
            if (
                attempt < attempts
                and "Address already in use" in tail
                and time.monotonic() < deadline
            ):
                continue
            cause = _first_error(workdir, since=log_start)
            hint = f"\nfirst error in log: {cause}" if cause else ""
            raise KafkaServiceError(
                f"{exc}{hint}\n--- tail of {_log_file(workdir)} ---\n{tail}"
            ) from exc
        return KafkaBroker(
            bootstrap=bootstrap, pid=proc.pid, workdir=workdir, secure=secure, _proc=proc
        )
    raise AssertionError("unreachable")


def stop(workdir: Path, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the broker for *workdir* (SIGTERM, then SIGKILL); no-op if not running."""
    workdir = Path(workdir).resolve()
    pid = _read_pid(workdir)
    if pid is not None and _is_our_broker(pid, workdir):
        _terminate(pid, workdir, timeout)
        if _is_our_broker(pid, workdir):
            raise KafkaServiceError(f"broker pid {pid} survived SIGKILL")
    _clear_state(workdir)


def status(workdir: Path, timeout: float = 15.0) -> str:
    """Return the bootstrap address if the broker runs and a round trip works, else raise."""
    running = _running(Path(workdir).resolve())
    if running is None:
        raise KafkaServiceError(f"no broker running for {workdir}")
    round_trip(running[1], timeout)
    return running[1]


# ----------------------------------------------------------------------------- CLI


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        description="Local single-node Kafka broker (KRaft, no Docker)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, required=True, help="work dir (config, data, logs, pid)")
        if name == "start":
            p.add_argument(
                "--port", type=int, default=None, help="client port (default: a free one)"
            )
            p.add_argument(
                "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for health"
            )
            p.add_argument(
                "--sasl-ssl",
                action="store_true",
                help="add a SASL_SSL listener (SCRAM-SHA-512); client settings in DIR/client.json",
            )
    args = parser.parse_args(argv)
    # Turn SIGTERM into an exception so an interrupted `start` still kills its JVM.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        if args.command == "start":
            broker = start(args.dir, port=args.port, timeout=args.timeout, sasl_ssl=args.sasl_ssl)
            print(broker.bootstrap)
            if broker.secure is not None:
                print(f"{broker.secure.bootstrap} (SASL_SSL: {_client_file(broker.workdir)})")
        elif args.command == "stop":
            stop(args.dir)
        else:
            print(status(args.dir))
    except KafkaServiceError as exc:
        print(f"kafka_service {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
