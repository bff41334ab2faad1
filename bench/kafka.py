"""Kafka -> stitched throughput next to the raw consume rate of the same topic, same run.

    python bench/kafka.py [--events 50000] [--format avro|json] [--batch-sizes 500,2000]
                          [--modes replication,cli,inproc] [--rounds 3]
                          [--order shuffled|time] [--statements]

1. Produce the generated events to a fresh 3-partition topic (Avro with Confluent framing, or
   JSON), keyed by event id.
2. Raw consume: a plain consumer reads every message of the topic and does nothing else; the
   fastest this client can take the topic in on this machine.
3. End to end, each run with a fresh group and database, measured from the first event's insert
   to the last stitch (database clock: excludes process start and group join), reported as
   events/s and as a fraction of (2):
   - ``cli``: `stream-cps run --source kafka` as users run it, i.e. with attribute calculation
     running in the same process (it shares the GIL and the two cores); ``cli2`` runs two
     such processes in the group (the Kafka path scales out by members, replication cannot);
   - ``inproc``: the Kafka source alone (``KafkaLoop`` in a thread, no calculation);
   - ``replication``: the same events COPYed into ``customer_events`` while `stream-cps run`
     (the replication path, calculation included) is up: the baseline the Kafka path must
     at least match (``cli`` / ``replication`` is printed at the end).

``--order time`` produces and COPYs the events sorted by ``event_time``, as a live stream
arrives; by default they come in the generator's shuffled order, a history in random time
order. The replication path stitches a backlog in ``event_time`` order either way (its sweep
reads the table); a Kafka member applies the topic's order, and an entity founded by a later
event is re-keyed when an earlier one arrives.

After each mode it prints where the CPU went (CPU seconds per 100,000 events by process: the
service or each member, each of their database sessions by role, the bench's own sessions,
the broker, the bench's Python), and how many of the machine's cores that kept busy: a path
that leaves cores idle waits on itself. The window starts, for ``replication``, when the
bench starts its COPY (the path's work includes it) and, for a Kafka mode, at the first count
that sees stitched events (the member's start and group join are not its work); it ends at
the count that sees them all.

``--statements`` loads pg_stat_statements and prints, after each mode, the statements that
took most of its database's time (each mode runs in a database of its own).

``--rounds N`` runs the modes N times one after the other (the topic is produced once) and
prints each round's ratios and their median: a single round lasts seconds, and its ratio
moves by a tenth between runs on these machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run as a script from anywhere

from infra.kafka import kafka_service  # noqa: E402
from stream_cps import config  # noqa: E402
from stream_cps.config import Schemas  # noqa: E402
from stream_cps.db import schema  # noqa: E402
from stream_cps.service.kafka import KafkaLoop  # noqa: E402
from stream_cps_dev import embedded  # noqa: E402
from stream_cps_dev.encode import avro_event, json_event  # noqa: E402
from stream_cps_dev.procstat import processes_cpu, server_pid, used_since  # noqa: E402
from stream_cps_dev.sample import generator  # noqa: E402

SCHEMAS = Schemas()
POLL_EVERY = 0.5  # s between counts of the stitched events (``wait_stitched``)
POLL_FIRST = 0.1  # ... in the first seconds, so that even a short run's CPU has a window
# The bench's own sessions (its COPY, its counts), named so in the CPU figures.
BENCH_SESSION = "bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--format", choices=["avro", "json"], default="avro")
    parser.add_argument("--batch-sizes", default="500,2000", help="kafka.batch_size values")
    parser.add_argument(
        "--stitching-batch-sizes",
        default="",
        help="stitching.batch_size values for the replication runs (default: the service's)",
    )
    parser.add_argument(
        "--modes",
        default="replication,cli,inproc",
        help="replication, cli, cliN (N members) and/or inproc",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the modes this many times, alternated"
    )
    parser.add_argument(
        "--order",
        choices=["shuffled", "time"],
        default="shuffled",
        help="the events as generated (a history in random time order) or sorted by "
        "event_time (as a live stream arrives); both paths get the same order",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="print each mode's top statements (pg_stat_statements, per database)",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stream-cps-bench-kafka-"))
    preload = {"shared_preload_libraries": "pg_stat_statements"} if args.statements else {}
    server = embedded.start(workdir / "pg", settings=preload)
    lib = Path(os.environ.get(kafka_service.LIB_ENV) or ROOT / "infra" / "kafka" / ".lib")
    broker = kafka_service.start(workdir / "kafka", lib_dir=lib, timeout=120)
    try:
        rows = list(generator.events(seed=1, persons=args.events // 6, per_person=8))
        rows = rows[: args.events]
        if args.order == "time":
            rows.sort(key=lambda row: (row[4], row[0]))
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(topic, 3, 1), NewTopic(topic + "-dlq", 3, 1)])[topic].result(
            30
        )
        # Clients this process no longer needs go now: alive when the broker stops at the
        # end, they log a connection failure every second until the process exits.
        del admin
        encode = avro_event if args.format == "avro" else json_event
        started = time.monotonic()
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for row in rows:
            while True:
                try:
                    producer.produce(topic, key=row[0].encode(), value=encode(row))
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(60)
        del producer
        n = len(rows)
        print(f"produced {n} {args.format} events in {time.monotonic() - started:.1f} s")

        raw_s = raw_consume(broker.bootstrap, topic, n)
        print(f"raw consume: {n / raw_s:,.0f} messages/s ({raw_s:.2f} s)")
        rounds: list[dict[str, float]] = []
        for round_no in range(args.rounds):
            if args.rounds > 1:
                print(f"-- round {round_no + 1} of {args.rounds}", flush=True)
            rates: dict[str, float] = {}
            sizes = args.stitching_batch_sizes.split(",") if args.stitching_batch_sizes else [""]
            for mode in args.modes.split(","):
                if mode == "replication":
                    for size in sizes:
                        e2e_s, dsn = replication(server, broker, rows, workdir, size)
                        name = f"replication {size}".strip()
                        rates[name] = n / e2e_s
                        print(
                            f"end to end [{name}] (COPY + stream-cps run): {n / e2e_s:,.0f} "
                            f"events/s ({e2e_s:.2f} s first insert -> last stitch)",
                            flush=True,
                        )
                        if args.statements:
                            print_statements(dsn)
                    continue
                for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                    e2e_s, wall_s, dsn = end_to_end(
                        server, broker, topic, n, batch_size, workdir, mode
                    )
                    rates[f"{mode} {batch_size}"] = n / e2e_s
                    print(
                        f"end to end [{mode}] (kafka.batch_size={batch_size}): "
                        f"{n / e2e_s:,.0f} events/s ({e2e_s:.2f} s first insert -> last stitch; "
                        f"{wall_s:.1f} s incl. start), ratio to raw consume {raw_s / e2e_s:.4f}",
                        flush=True,
                    )
                    if args.statements:
                        print_statements(dsn)
            rounds.append(rates)
        report(rounds)
    finally:
        broker.stop()
        embedded.destroy(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(rounds: list[dict[str, float]]) -> None:
    """Each Kafka mode's rate as a ratio of the replication path's in the same round, and
    with several rounds their median: one round of a few seconds moves by a tenth between
    runs on these machines."""
    ratios: dict[str, list[float]] = {}
    for rates in rounds:
        baselines = {name: rate for name, rate in rates.items() if name.startswith("replication")}
        for name, rate in rates.items():
            for base, base_rate in baselines.items():
                if name not in baselines:
                    ratios.setdefault(f"{name} / {base}", []).append(rate / base_rate)
    for label, values in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        if len(values) == 1:
            print(f"{label}: {shown} (target >= 1)")
        else:
            print(f"{label}: median {statistics.median(values):.2f} of {shown} (target >= 1)")


def raw_consume(bootstrap: str, topic: str, n: int) -> float:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen, first = 0, None
    while seen < n:
        for msg in consumer.consume(500, 1.0):
            if msg.error() is None:
                seen += 1
                first = first or time.monotonic()
    elapsed = time.monotonic() - (first or time.monotonic())
    consumer.close()
    return elapsed


def fresh_database(server: embedded.EmbeddedPostgres) -> str:
    """A new database with the schema and the sample rules; its DSN."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname={name}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.migrate(conn, SCHEMAS)
        conn.execute(generator.config_sql(SCHEMAS))
    return dsn


def print_statements(dsn: str, top: int = 15) -> None:
    """The statements that took most of this database's time (``--statements``): where one
    mode's server time went, to compare the paths statement by statement."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        rows = conn.execute(
            "SELECT calls, total_exec_time, rows, "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 110) FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT ILIKE '%%pg_stat%%' ORDER BY total_exec_time DESC LIMIT %s",
            [top],
        ).fetchall()
    total = sum(float(r[1]) for r in rows)
    print(f"   top {len(rows)} statements, {total:,.0f} ms in all:")
    for calls, ms, nrows, query in rows:
        print(f"   {float(ms):8,.0f} ms {calls:6} calls {nrows:8} rows  {query}")


def replication(
    server: embedded.EmbeddedPostgres,
    broker: kafka_service.KafkaBroker,
    rows: list[Any],
    workdir: Path,
    batch_size: str = "",
) -> tuple[float, str]:
    """COPY the events while `stream-cps run` (replication) is up; seconds from the COPY's
    insert to the last stitch (database clock). ``batch_size``: stitching.batch_size, when
    not the default. Returns the seconds and the run's database."""
    dsn = fresh_database(server)
    env = {
        **os.environ,
        **({"STREAM_CPS_STITCHING_BATCH_SIZE": batch_size} if batch_size else {}),
        "STREAM_CPS_DSN": dsn,
        "STREAM_CPS_OPENSEARCH_OUTBOX": "always",  # as in the Kafka runs
        "STREAM_CPS_LOG_LEVEL": "WARNING",
    }
    with (
        psycopg.connect(dsn, autocommit=True, application_name=BENCH_SESSION) as conn,
        (workdir / "replication.log").open("wb") as log,
    ):
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_cps", "run"], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while not conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = 'stream_cps'"
            ).fetchone():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the replication service did not start")
                time.sleep(0.1)
            cpu = _cpu(conn, server, [process.pid], broker)
            copying = Mark.now(0, cpu)  # the COPY is the path's work too
            with conn.cursor() as cur:
                generator.copy_events(cur, sql.Identifier(SCHEMAS.ce, "customer_events"), rows)
            used = wait_stitched(conn, len(rows), lambda: process.poll() is None, cpu, copying)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        span = conn.execute(
            "SELECT extract(epoch FROM max(stitched) - min(created)) FROM cdp_ce.customer_events"
        ).fetchone()
        assert span is not None
        # The slot's name is the cluster's: the next replication run, in a database of its
        # own, creates it again.
        conn.execute("SELECT pg_drop_replication_slot('stream_cps')")
        print_cpu(used)
        return float(span[0]), dsn


def end_to_end(
    server: embedded.EmbeddedPostgres,
    broker: kafka_service.KafkaBroker,
    topic: str,
    n: int,
    batch_size: int,
    workdir: Path,
    mode: str,
) -> tuple[float, float, str]:
    dsn = fresh_database(server)
    name = dsn.rsplit("=", 1)[1]
    with psycopg.connect(dsn, autocommit=True, application_name=BENCH_SESSION) as conn:
        env = {
            "STREAM_CPS_DSN": dsn,
            "STREAM_CPS_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "STREAM_CPS_KAFKA_TOPICS": topic,
            "STREAM_CPS_KAFKA_GROUP_ID": f"bench-{name}",
            "STREAM_CPS_KAFKA_DEAD_LETTER_TOPIC": topic + "-dlq",
            "STREAM_CPS_KAFKA_BATCH_SIZE": str(batch_size),
            "STREAM_CPS_OPENSEARCH_OUTBOX": "always",  # merges' deletes are part of the cost
            "STREAM_CPS_LOG_LEVEL": "WARNING",
        }
        started = time.monotonic()
        if mode == "inproc":
            stop = threading.Event()
            service = KafkaLoop(config.load(environ=env), stop)
            thread = threading.Thread(target=service.run, daemon=True)
            thread.start()
            try:
                used = wait_stitched(conn, n, thread.is_alive, _cpu(conn, server, [], broker))
                wall = time.monotonic() - started
            finally:
                stop.set()
                thread.join(30)
        else:
            # ``cli`` is one `stream-cps run --source kafka`; ``cliN`` is N of them in the group
            members = int(mode[3:] or 1)
            with (workdir / f"{name}.log").open("wb") as log:
                processes = [
                    subprocess.Popen(
                        [sys.executable, "-m", "stream_cps", "run", "--source", "kafka"],
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=log,
                    )
                    for _ in range(members)
                ]
                try:
                    used = wait_stitched(
                        conn,
                        n,
                        lambda: all(p.poll() is None for p in processes),
                        _cpu(conn, server, [p.pid for p in processes], broker),
                    )
                    wall = time.monotonic() - started
                finally:
                    for process in processes:
                        process.send_signal(signal.SIGTERM)
                    for process in processes:
                        process.wait(timeout=30)
        span = conn.execute(
            "SELECT extract(epoch FROM max(stitched) - min(created)) FROM cdp_ce.customer_events"
        ).fetchone()
        assert span is not None
        print_cpu(used)
        return float(span[0]), wall, dsn


@dataclass(frozen=True)
class Mark:
    """The start of a mode's CPU window: events stitched by then, the clock, a CPU reading."""

    events: int
    clock: float
    cpu: dict[str, float]

    @classmethod
    def now(cls, events: int, cpu: Callable[[], dict[str, float]]) -> Mark:
        return cls(events, time.monotonic(), cpu())


@dataclass(frozen=True)
class CpuUsed:
    """CPU seconds by process over a mode's window (``wait_stitched``), and the events
    stitched and the seconds in it."""

    events: int
    seconds: float
    by_process: dict[str, float]


def _cpu(
    conn: psycopg.Connection[Any],
    server: embedded.EmbeddedPostgres,
    services: list[int],
    broker: kafka_service.KafkaBroker,
) -> Callable[[], dict[str, float]]:
    """A reading of CPU seconds so far: the server's processes by role (the service's
    sessions are named ``stream-cps <role>``, the bench's ``bench``), the service's process
    (or each member's; none for ``inproc``, which runs in the bench's), the broker and the
    bench's own Python."""
    postmaster = server_pid(server.datadir)
    named = {"kafka broker": broker.pid, "bench (python)": os.getpid()}
    for i, pid in enumerate(services):
        named["service (python)" if len(services) == 1 else f"member {i + 1} (python)"] = pid
    return lambda: processes_cpu(conn, postmaster, named)


def wait_stitched(
    conn: psycopg.Connection[Any],
    n: int,
    alive: Callable[[], bool],
    cpu: Callable[[], dict[str, float]],
    first: Mark | None = None,
) -> CpuUsed:
    """Until ``n`` events are stitched; the CPU used from ``first``, by default the first
    count that saw stitched events, to the last.
    The count is a sequential scan that grows with the table (25-50 ms at 150,000 events),
    taken from the 2 cores the paths share: polled twice a second after the first seconds,
    which only delays the stop, since the span measured is the database's clock."""
    started = time.monotonic()
    while True:
        row = conn.execute(
            "SELECT count(*) FROM cdp_ce.customer_events WHERE stitched IS NOT NULL"
        ).fetchone()
        done = int(row[0]) if row else 0
        if first is None and done:
            first = Mark.now(done, cpu)
        if done >= n:
            assert first is not None
            used = used_since(first.cpu, cpu())
            return CpuUsed(done - first.events, time.monotonic() - first.clock, used)
        if not alive():
            raise SystemExit("the consumer stopped before stitching everything")
        time.sleep(POLL_FIRST if time.monotonic() - started < 2 else POLL_EVERY)


def print_cpu(used: CpuUsed) -> None:
    """CPU seconds per 100,000 events by process, and the cores they kept busy: a path
    that keeps fewer busy than the machine has is waiting on itself, not on the CPU."""
    if used.events <= 0 or used.seconds <= 0:
        print("   CPU: not measured (every event was stitched by the first count: too short)")
        return
    per = 100_000 / used.events
    # Unclipped: a session that closed meanwhile counts negative, its CPU being in "exited
    # server processes" (procstat.used_since), so the total is whole.
    total = sum(used.by_process.values())
    shown = ", ".join(f"{name} {v * per:.1f}" for name, v in used.by_process.items() if v > 0.05)
    print(
        f"   CPU s per 100k events over the last {used.seconds:.1f} s: {shown}; "
        f"{total / used.seconds:.2f} of {len(os.sched_getaffinity(0))} cores busy"
    )


if __name__ == "__main__":
    raise SystemExit(main())
