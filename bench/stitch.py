"""Stitching throughput as a fraction of COPY, and insert->stitched latency at a steady rate.

    python bench/stitch.py [--events 100000] [--rate 1000] [--seconds 20]

Baseline and subject run in the same script on the same server (machines here are noisy):
1. COPY the generated events into a plain table of customer_events' shape: the speed at which
   PostgreSQL can take the rows in at all (median of three).
2. COPY the same events into customer_events while `stream-cps run` is up, and time until the
   last one is stitched (logical replication -> extract -> group -> write). Reported as
   events/s and as a fraction of (1), with the service process's CPU seconds meanwhile (from
   /proc: steadier than a rate on a shared machine).
3. Right after that burst, on the same running service (whose attribute calculation is still
   working through the burst's entities), insert at a steady rate (default 1,000 events/s) in
   small transactions for N seconds and report p50/p99 of ``stitched - created``.
4. The contract floor: with no service running, COPY the same events into customer_events and
   write the very ``stitched``/``identifiers`` values the service wrote, in batches of the same
   size, with one set-based UPDATE each (median of three). The contract makes every stitcher do
   at least this much (fill both columns of every row, keep the table's indexes), so
   "COPY + stitch / floor" is how close the stitcher comes to the least any stitcher could do.
5. The CPU seconds of every process (service, server processes by role, this script) during
   the burst and the floor: the burst's work spread perfectly over the machine's cores still
   takes total / cores, so that bounds the ratio to the floor this machine allows.

The script waits for "all stitched" with a cheap EXISTS probe every 50 ms: a ``count(*)`` every
20 ms cost PostgreSQL more CPU than some stitching steps, on the same two cores.
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
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps.db.arrays import array_literal
from stream_cps_dev import embedded
from stream_cps_dev.procstat import processes_cpu, server_pid, used_since
from stream_cps_dev.sample import generator

SCHEMAS = Schemas()
EVENTS = sql.Identifier(SCHEMAS.ce, "customer_events")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--modes", default="stream,peek", help="slot readers to compare")
    parser.add_argument("--batch-size", type=int, default=5000, help="stitching.batch_size")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stream-cps-bench-"))
    server = embedded.start(workdir / "pg")
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, SCHEMAS)
            conn.execute(generator.config_sql(SCHEMAS))
            persons = max(10, args.events // 8)
            rows = list(generator.events(seed=1, persons=persons, per_person=8))[: args.events]
            print(f"generated {len(rows)} events for {persons} people", flush=True)
            copy_s = copy_baseline(conn, rows)
            n = len(rows)
            print(f"COPY into a plain table: {n / copy_s:,.0f} events/s ({copy_s:.2f} s)")
            written: list[tuple[str, list[str]]] = []
            floor_results: list[tuple[str, float, float]] = []
            for mode in args.modes.split(","):
                reset(conn)
                proc = service(server.dsn, workdir, mode, mode, args.batch_size)
                try:
                    cpu_before = machine_cpu(conn, server, proc.pid)
                    stitch_s, copy_ce_s = stitch_run(conn, rows)
                    spent = used_since(cpu_before, machine_cpu(conn, server, proc.pid))
                    written = stitched_values(conn)
                    p50, p99 = steady_latency(conn, args.rate, args.seconds)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=30)
                print(
                    f"[{mode}] COPY into customer_events (service running): "
                    f"{n / copy_ce_s:,.0f} events/s"
                )
                print(
                    f"[{mode}] COPY + stitch: {n / stitch_s:,.0f} events/s ({stitch_s:.2f} s); "
                    f"/ plain COPY {copy_s / stitch_s:.3f} (target >= 0.10), "
                    f"/ customer_events COPY {copy_ce_s / stitch_s:.3f}"
                )
                service_cpu = spent[SERVICE]
                print(
                    f"[{mode}] the service's CPU during the burst: {service_cpu:.1f} s, "
                    f"{service_cpu / n * 100_000:.2f} s per 100,000 events"
                )
                print(f"[{mode}] CPU s of every process: {cpu_line(spent)}")
                floor_results.append((mode, stitch_s, sum(spent.values())))
                print(
                    f"[{mode}] insert->stitched at {args.rate}/s after the burst: "
                    f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (target p99 < 1000 ms)",
                    flush=True,
                )
            reset(conn)
            floor_s, floor_cpu = contract_floor(conn, server, rows, written, args.batch_size)
            print(
                f"contract floor (COPY into customer_events + one UPDATE of both columns per "
                f"event, batches of {args.batch_size}): {n / floor_s:,.0f} events/s "
                f"({floor_s:.2f} s); / plain COPY {copy_s / floor_s:.3f}"
            )
            print(f"contract floor, CPU s of every process (one run): {cpu_line(floor_cpu)}")
            cores = len(os.sched_getaffinity(0))
            for mode, stitch_s, total_cpu in floor_results:
                print(f"[{mode}] COPY + stitch / contract floor: {floor_s / stitch_s:.3f}")
                # The least wall time the burst's work could take, spread perfectly over
                # every core: how close to the floor this machine allows, whatever overlaps.
                print(
                    f"[{mode}] CPU bound: {total_cpu:.1f} CPU s on {cores} cores take at least "
                    f"{total_cpu / cores:.2f} s: at best {floor_s / (total_cpu / cores):.3f} of "
                    f"the contract floor (whose work is {sum(floor_cpu.values()):.1f} CPU s)"
                )
    finally:
        embedded.destroy(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


SERVICE = "service (python)"


def machine_cpu(
    conn: psycopg.Connection[Any], server: embedded.EmbeddedPostgres, service_pid: int | None
) -> dict[str, float]:
    """CPU seconds so far of everything a burst runs: the server's processes by role, the
    service and this script (which feeds the COPY)."""
    named = {"bench (python)": os.getpid()}
    if service_pid is not None:
        named[SERVICE] = service_pid
    return processes_cpu(conn, server_pid(server.datadir), named)


def cpu_line(spent: dict[str, float]) -> str:
    parts = ", ".join(f"{role} {s:.2f}" for role, s in spent.items() if s >= 0.05)
    return f"{sum(spent.values()):.1f} in all: {parts}"


def reset(conn: psycopg.Connection[Any]) -> None:
    """Empty the stitching state and drop the slot, so each mode starts alike."""
    conn.execute(sql.SQL("TRUNCATE {}").format(EVENTS))
    conn.execute(
        "TRUNCATE customer_attributes, cdp_ps.identifier_clusters, cdp_ps.entity_clusters, "
        "cdp_ps.entity_aliases, "
        "cdp_attr.outbox"
    )
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = 'stream_cps'"
    )


def copy_baseline(conn: psycopg.Connection[Any], rows: list[Any], repeat: int = 3) -> float:
    """Median of ``repeat`` COPYs into a fresh plain table (one COPY of 0.3 s is noisy)."""
    timings = []
    for _ in range(repeat):
        conn.execute("DROP TABLE IF EXISTS plain_events")
        conn.execute("CREATE TABLE plain_events (LIKE cdp_ce.customer_events INCLUDING DEFAULTS)")
        started = time.perf_counter()
        with conn.cursor() as cur:
            generator.copy_events(cur, sql.Identifier("plain_events"), rows)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def service(
    dsn: str, workdir: Path, name: str, mode: str, batch_size: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAM_CPS_DSN": dsn,
        "STREAM_CPS_STITCHING_POLL_INTERVAL": "0.01",
        "STREAM_CPS_STITCHING_BATCH_SIZE": str(batch_size),
        "STREAM_CPS_OPENSEARCH_OUTBOX": "always",  # merges' deletes are part of the cost
        "STREAM_CPS_STITCHING_REPLICATION": mode,
    }
    log = (workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "run"], env=env, stdout=log, stderr=log
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE active IS NOT NULL "
                "AND slot_name = 'stream_cps'"
            ).fetchone():
                break
            time.sleep(0.1)
    time.sleep(0.5)
    return proc


def unstitched(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE stitched IS NULL)").format(EVENTS)
    ).fetchone()
    return bool(row and row[0])


def stitch_run(conn: psycopg.Connection[Any], rows: list[Any]) -> tuple[float, float]:
    """(seconds until all stitched, seconds the COPY itself took)."""
    started = time.perf_counter()
    with conn.cursor() as cur:
        generator.copy_events(cur, EVENTS, rows)
    copied = time.perf_counter() - started
    while unstitched(conn):
        time.sleep(0.05)
    return time.perf_counter() - started, copied


def stitched_values(conn: psycopg.Connection[Any]) -> list[tuple[str, list[str]]]:
    """What the service wrote: the floor phase writes exactly these values."""
    rows = conn.execute(sql.SQL("SELECT id, identifiers FROM {}").format(EVENTS)).fetchall()
    return [(str(r[0]), list(r[1])) for r in rows]


def contract_floor(
    conn: psycopg.Connection[Any],
    server: embedded.EmbeddedPostgres,
    rows: list[Any],
    written: list[tuple[str, list[str]]],
    batch_size: int,
    repeat: int = 3,
) -> tuple[float, dict[str, float]]:
    """Median of ``repeat`` runs of COPY + the one UPDATE per event any stitcher must make
    (no service running), and the CPU seconds of one run (the mean) by process."""
    update = sql.SQL(
        "UPDATE {} AS ev SET stitched = clock_timestamp(), identifiers = k.idents::text[] "
        "FROM unnest(%b::text[], %b::text[]) AS k(id, idents) WHERE ev.id = k.id"
    ).format(EVENTS)
    by_id = dict(written)
    ids = [str(row[0]) for row in rows]
    literals = [array_literal(by_id.get(event_id, [])) for event_id in ids]
    timings = []
    spent: dict[str, float] = {}
    for _ in range(repeat):
        conn.execute(sql.SQL("TRUNCATE {}").format(EVENTS))
        cpu_before = machine_cpu(conn, server, None)
        started = time.perf_counter()
        with conn.cursor() as cur:
            generator.copy_events(cur, EVENTS, rows)
        for start in range(0, len(ids), batch_size):
            with conn.transaction():
                conn.execute(
                    update, (ids[start : start + batch_size], literals[start : start + batch_size])
                )
        timings.append(time.perf_counter() - started)
        for role, s in used_since(cpu_before, machine_cpu(conn, server, None)).items():
            spent[role] = spent.get(role, 0.0) + s / repeat
    return statistics.median(timings), used_since({}, spent)


def steady_latency(conn: psycopg.Connection[Any], rate: int, seconds: float) -> tuple[float, float]:
    """Right after the burst, on the same running service (its calculation backlog included)."""
    rows = list(generator.events(seed=2, persons=max(10, int(rate * seconds) // 8)))
    # fresh ids, so the steady phase measures only its own events
    rows = [(f"steady-{n}", *row[1:]) for n, row in enumerate(rows[: int(rate * seconds)])]
    per_tick = max(1, rate // 100)
    started = time.perf_counter()
    for tick, start in enumerate(range(0, len(rows), per_tick)):
        with conn.cursor() as cur:
            generator.copy_events(cur, EVENTS, rows[start : start + per_tick])
        delay = started + (tick + 1) / 100 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    while unstitched(conn):
        time.sleep(0.05)
    row = conn.execute(
        sql.SQL(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY s) FROM ("
            "SELECT extract(epoch FROM stitched - created) AS s FROM {} "
            "WHERE id LIKE 'steady-%%') x"
        ).format(EVENTS)
    ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


if __name__ == "__main__":
    sys.exit(main())
