"""Per-event stitching cost as the database grows: a burst into an empty database, into one of
1M events and into one of 10M, and the rate of the history loads in between.

    python bench/scale.py [--sizes 1000000,10000000] [--burst 100000] [--profile tuned]
    python bench/scale.py --smoke          # what CI runs: tiny sizes, checks it all works
    python bench/scale.py --sizes 10000000 --keep       # keeps the work directory
    python bench/scale.py --resume DIR --sizes 10000000 # bursts into that database again

``--resume`` runs only the bursts into a database an earlier ``--keep`` left (its loader state
in ``loader.json``): the way to compare two versions of the code at 10M events without loading
the history again for each (alternate them; the database grows by two bursts a run).

One embedded PostgreSQL, one ``stream-cps run`` (replication path, attribute calculation off:
this measures stitching), the same generator as bench/stitch.py. Each step COPYs events into
``customer_events`` and times until the last is stitched:

- **burst** (``--burst`` events): new customers (a person range of their own), plus
  ``--returning`` of them from people already stored (their e-mails, user ids and phones link
  them to existing entities: joins and merges against the grown tables); then a **new-only**
  burst of the same size with no returning customers, the empty database's mix, which
  separates what the grown tables cost from what the returning customers' merges cost;
- **history**: events of further new customers up to the next size, in chunks of
  ``--chunk``: the rate of a restitch from zero (a backlog the sweep works through).

After the bursts into each grown size, the same burst goes into a fresh, empty database of
the same server (a service and slot of its own), so each ratio also has a baseline measured
minutes from it, not an hour before (the machine's speed drifts that much).

After each burst it records the service's RSS (``/proc/<pid>/status``) and the sizes of the
hot tables and indexes; after a size's bursts and its baseline, the time the guide's
restitch-one script takes to come back stitched (last: at 10M it restitches half a million
events, and the burst after it started with the hot indexes out of shared_buffers).
Rates are reported as ratios against the empty-database burst of the same run (machines here
are noisy; only the ratio means something). ``--profile defaults`` runs PostgreSQL's defaults
(shared_buffers 128 MB, max_wal_size 1 GB), ``tuned`` the settings docs/benchmarks.md
recommends; ``--set name=value`` changes one setting over the profile's. ``--check``
compares the final partition with the offline oracle (minutes at 10M).
``--restitch-all`` ends with the guide's restitch of everything (both statements as written),
timed until every entity is purged and every event stitched again; the entities must come back
unchanged (CI's smoke run does it too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg import sql

from stream_cps.config import Schemas
from stream_cps.db import schema
from stream_cps.stitching.store import StitchStore
from stream_cps_dev import embedded
from stream_cps_dev.procstat import processes_cpu, server_pid, used_since
from stream_cps_dev.sample import generator

SCHEMAS = Schemas()
EVENTS = sql.Identifier(SCHEMAS.ce, "customer_events")
PER_PERSON = 8  # the generator's mean is about this many events per person
PROFILES: dict[str, dict[str, str]] = {
    "defaults": {},
    "tuned": {
        "shared_buffers": "2GB",
        "effective_cache_size": "12GB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "15min",
        "work_mem": "32MB",
        "maintenance_work_mem": "512MB",
    },
}
SIZES_OF = (
    ("customer_events", "cdp_ce.customer_events"),
    ("events GIN identifiers", "cdp_ce.customer_events_identifiers_idx"),
    ("events unstitched", "cdp_ce.customer_events_unstitched_time_idx"),
    ("identifier_clusters", "cdp_ps.identifier_clusters"),
    ("entity_clusters", "cdp_ps.entity_clusters"),
    ("customer_attributes", "public.customer_attributes"),
    ("identifier_pairs", "cdp_ps.identifier_pairs"),
    ("identifier_cooccurrence", "cdp_ps.identifier_cooccurrence"),
    ("entity_aliases", "cdp_ps.entity_aliases"),
    ("outbox", "cdp_attr.outbox"),
)
HOT_TABLES = (
    "customer_events",
    "identifier_clusters",
    "entity_clusters",
    "customer_attributes",
    "entity_aliases",
)


class Profile:
    """Where one step's time goes, from the server's own counters (reset before the step).

    Per statement (pg_stat_statements): calls, time, buffer hits and reads, WAL; per hot
    table: updates and how many were HOT, dead rows, autovacuum runs; the WAL written; and
    CPU seconds per process (the service, and each server process by its role: the
    service's sessions by application_name, the walsender, autovacuum, checkpointer...).
    """

    def __init__(self, conn: psycopg.Connection[Any], postmaster: int, service_pid: int) -> None:
        self.conn, self.postmaster, self.service_pid = conn, postmaster, service_pid
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.cpu_before: dict[str, float] = {}

    def start(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset()")
        self.conn.execute("SELECT pg_stat_reset()")
        self.conn.execute("SELECT pg_stat_reset_shared('wal')")
        self.cpu_before = self.cpu()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by process role (``procstat.processes_cpu``)."""
        return processes_cpu(self.conn, self.postmaster, {"service (python)": self.service_pid})

    def collect(self, top: int = 12) -> dict[str, Any]:
        time.sleep(1.5)  # backends flush their table and WAL counters at most once a second
        cpu = used_since(self.cpu_before, self.cpu())
        statements = [
            {
                "query": q,
                "calls": calls,
                "total_ms": round(total),
                "mean_ms": round(mean, 3),
                "hit": int(hit),
                "read": int(read),
                "dirtied": int(dirtied),
                "wal_mb": round(float(wal) / 2**20, 1),  # numeric in pg_stat_statements
            }
            for q, calls, total, mean, hit, read, dirtied, wal in self.conn.execute(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 100), calls, "
                "total_exec_time, mean_exec_time, shared_blks_hit, shared_blks_read, "
                "shared_blks_dirtied, wal_bytes FROM pg_stat_statements "
                "WHERE query NOT ILIKE '%%pg_stat%%' ORDER BY total_exec_time DESC LIMIT %s",
                [top],
            ).fetchall()
        ]
        tables = {
            name: {"upd": upd, "hot": hot, "dead": dead, "autovacuum": av, "seq_scan": seq}
            for name, upd, hot, dead, av, seq in self.conn.execute(
                "SELECT relname, n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count, "
                "seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
                [list(HOT_TABLES)],
            ).fetchall()
        }
        wal = self.conn.execute("SELECT wal_records, wal_bytes FROM pg_stat_wal").fetchone()
        return {
            "cpu_s": cpu,
            "statements": statements,
            "tables": tables,
            "wal_mb": round(int(wal[1]) / 2**20, 1) if wal else None,
        }


def print_profile(prof: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in prof["cpu_s"].items() if v >= 0.05)
    print(f"    CPU s: {cpu}; WAL {prof['wal_mb']} MB")
    for st in prof["statements"][:8]:
        print(
            f"    {st['total_ms']:>7,} ms {st['calls']:>6} x {st['mean_ms']:>8.2f} ms "
            f"hit {st['hit']:>9,} read {st['read']:>7,}  {st['query'][:70]}"
        )
    for name, t in prof["tables"].items():
        print(f"    {name}: {t}")


class Loader:
    """Generates people in ranges of their own and COPYs their events."""

    def __init__(self, conn: psycopg.Connection[Any], state: dict[str, int] | None = None) -> None:
        self.conn = conn
        state = state or {}
        self.people = state.get("people", 0)  # people stored so far (numbered 0 .. people-1)
        self.events = state.get("events", 0)
        self.seed = state.get("seed", 100)

    def state(self) -> dict[str, int]:
        return {"people": self.people, "events": self.events, "seed": self.seed}

    def new_people(self, n_events: int) -> list[Any]:
        """Events of people never seen before: about ``n_events`` (whole people)."""
        rows: list[Any] = []
        while len(rows) < n_events:
            persons = max(1, (n_events - len(rows)) // PER_PERSON)
            self.seed += 1
            rows += generator.events(seed=self.seed, persons=persons, first=self.people)
            self.people += persons
        return rows

    def returning(self, n_events: int, rng: random.Random) -> list[Any]:
        """Events of people already stored: new cookies, their old e-mails/ids/phones."""
        if not self.people or not n_events:
            return []
        rows: list[Any] = []
        while len(rows) < n_events:
            self.seed += 1
            first = rng.randrange(max(1, self.people - 50))
            rows += generator.events(seed=self.seed, persons=50, first=first)
        return rows[:n_events]

    def copy_and_wait(self, rows: list[Any]) -> tuple[float, float]:
        """Seconds from the start of the COPY until every event is stitched, and of the COPY
        alone (the service sees no row of it before it commits, so it waits meanwhile)."""
        started = time.perf_counter()
        with self.conn.cursor() as cur:
            generator.copy_events(cur, EVENTS, rows)
        copied = time.perf_counter()
        self.events += len(rows)
        wait_stitched(self.conn)
        return time.perf_counter() - started, copied - started


def wait_stitched(conn: psycopg.Connection[Any], timeout: float = 7200.0) -> None:
    """Until nothing is unstitched. Polled every 50 ms for 2 s, then every 250 ms: at 10M
    events this EXISTS walks the partial index's dead entries (milliseconds each), and polled
    every 50 ms it cost the server a sixth of a core during the history loads (at most 250 ms
    more per step, under 3% of a burst)."""
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE stitched IS NULL)").format(EVENTS)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        row = conn.execute(query).fetchone()
        if row and not row[0]:
            return
        time.sleep(0.05 if time.monotonic() - started < 2 else 0.25)
    raise TimeoutError("events still unstitched")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sizes(conn: psycopg.Connection[Any]) -> dict[str, int]:
    found = {}
    for label, name in SIZES_OF:
        row = conn.execute(
            "SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)", [name]
        ).fetchone()
        found[label] = int(row[0]) if row else 0
    return found


# What a resumed run reads into shared_buffers before its bursts: the indexes every batch
# probes at random, then the small tables whose rows the lookups fetch (customer_events' heap
# is not: a burst writes new rows at its end). A restarted server otherwise starts cold, and
# the first burst measured the cache, not the code: 2.2k-6.9k events/s in one database. Even
# prewarmed, resumed bursts at 10M varied 2.7k-7.0k/s on this machine: compare the statements'
# buffer hits and times (the profile), not the rates of single runs.
PREWARM = """
SELECT c.relname, pg_prewarm(c.oid) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('cdp_ce', 'cdp_ps', 'public') AND c.relkind IN ('i', 'r')
  AND c.relname NOT IN ('customer_events')
  AND c.relname NOT LIKE 'pg_%%'
ORDER BY c.relkind DESC, pg_relation_size(c.oid)
"""


def prewarm(conn: psycopg.Connection[Any]) -> None:
    started = time.monotonic()
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    blocks = sum(int(r[1]) for r in conn.execute(PREWARM))
    mb = blocks * 8192 / 2**20
    print(f"prewarmed {mb:,.0f} MB in {time.monotonic() - started:.0f} s", flush=True)


RESTITCH_ONE = (
    "WITH entities AS (UPDATE customer_attributes SET modified = NULL "
    "WHERE customer_entity_id = %s RETURNING identifiers) "
    "UPDATE customer_events SET stitched = NULL, identifiers = NULL "
    "FROM entities WHERE customer_events.identifiers <@ entities.identifiers"
)
# docs/operations.md: the same result without resetting the events that belong to no entity
# (an entity's events share an identifier with it; '&&' finds them in the GIN index without
# the scan of every empty array that '<@' makes)
RESTITCH_ONE_OWN = RESTITCH_ONE + " AND customer_events.identifiers && entities.identifiers"


def restitch_one(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """The guide's restitch-one script on the biggest entity: seconds until stitched again,
    split into the script's statement and the restitch, and the events it reset; then the
    variant of docs/operations.md that leaves identifier-less events alone, timed the same."""
    row = conn.execute(
        "SELECT customer_entity_id FROM customer_attributes "
        "ORDER BY cardinality(identifiers) DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return {"total_s": 0.0, "statement_s": 0.0, "reset": 0, "own_total_s": 0.0}
    out: dict[str, float] = {}
    for prefix, script in (("", RESTITCH_ONE), ("own_", RESTITCH_ONE_OWN)):
        started = time.perf_counter()
        # the biggest entity keeps its id after a restitch (ids come from the events)
        reset = conn.execute(script, [row[0]]).rowcount
        statement = time.perf_counter() - started
        wait_stitched(conn)
        out[prefix + "total_s"] = round(time.perf_counter() - started, 2)
        out[prefix + "statement_s"] = round(statement, 2)
        out[prefix + "reset"] = reset
    return out


# The guide's restitch of everything, its two statements as written (contract.md).
RESTITCH_ALL = (
    "UPDATE customer_attributes SET modified = NULL",
    "UPDATE customer_events SET stitched = NULL, identifiers = NULL",
)
ENTITIES_DIGEST = (
    "SELECT count(*), md5(string_agg(customer_entity_id || ':' || "
    "array_to_string(identifiers, ','), ';' ORDER BY customer_entity_id)) "
    "FROM customer_attributes"
)


SLOT = "stream_cps"  # the service's slot (``service``); the paired baselines use their own
SLOT_BEHIND = (
    "SELECT confirmed_flush_lsn < %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s"
)


def restitch_all(conn: psycopg.Connection[Any], pid: int, profiler: Profile) -> dict[str, Any]:
    """The guide's restitch of everything on the whole database, timed until every entity is
    purged and every event stitched again, with the service's peak RSS and the statements'
    profile meanwhile; the entities must come back the same (ids and identifiers depend only
    on the events)."""
    entities, digest = conn.execute(ENTITIES_DIGEST).fetchone() or (0, "")
    peak = [rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:  # the service's RSS while the statements run, too
        while not done.wait(0.2):
            try:
                peak[0] = max(peak[0], rss_mb(pid))
            except OSError:  # the service is gone: the main thread reports why
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pending = StitchStore(SCHEMAS).has_work  # an unstitched event or a purge signal
    try:
        profiler.start()
        started = time.perf_counter()
        statements = []
        for statement in RESTITCH_ALL:
            begun = time.perf_counter()
            conn.execute(statement)
            statements.append(round(time.perf_counter() - begun, 2))
        written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        while (row := conn.execute(pending).fetchone()) and row[0]:
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        # The service has also read the statements' changes off its slot (a 10M-row
        # transaction's ids: the stream reader's memory) when the slot has passed them.
        while (
            row := conn.execute(SLOT_BEHIND, [written[0] if written else None, SLOT]).fetchone()
        ) and row[0]:
            time.sleep(0.5)
        caught_up = time.perf_counter() - started
        profile = profiler.collect()
    finally:
        done.set()
        sampler.join()
    after, after_digest = conn.execute(ENTITIES_DIGEST).fetchone() or (0, "")
    if (after, after_digest) != (entities, digest):
        raise AssertionError(f"restitch all: {entities} entities before, {after} after, or changed")
    return {
        "kind": "restitch-all",
        "entities": entities,
        "statements_s": statements,
        "seconds": round(seconds, 2),
        "slot_caught_up_s": round(caught_up, 2),
        "rss_peak_mb": round(peak[0], 1),
        "profile": profile,
    }


def service(
    dsn: str, workdir: Path, batch_size: int, slot: str = SLOT, log_name: str = "service"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STREAM_CPS_DSN": dsn,
        "STREAM_CPS_STITCHING_SLOT_NAME": slot,
        "STREAM_CPS_STITCHING_POLL_INTERVAL": "0.01",
        "STREAM_CPS_STITCHING_BATCH_SIZE": str(batch_size),
        "STREAM_CPS_OPENSEARCH_OUTBOX": "always",  # merges' deletes are part of the cost
        "STREAM_CPS_ATTRIBUTES_ENABLED": "false",  # stitching only
        "STREAM_CPS_LOG_LEVEL": "WARNING",
    }
    log = (workdir / f"{log_name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_cps", "run"], env=env, stdout=log, stderr=log
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = %s", [slot]
            ).fetchone():
                return proc
            if proc.poll() is not None:
                raise RuntimeError((workdir / f"{log_name}.log").read_text()[-3000:])
            time.sleep(0.1)
    raise TimeoutError("the service did not start")


def empty_burst(server_dsn: str, workdir: Path, batch_size: int, n: int, seed: int) -> float:
    """Events/s of a burst of ``n`` new customers into a fresh, empty database of the same
    server, with a service of its own (own slot), timed like every step: the baseline for the
    grown database's bursts measured minutes, not an hour, from them. In a 10M run the
    machine's speed drifted by a third between the first burst and the last, which decided
    the ratio more than the database did."""
    name = f"empty_{seed}"
    dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn, SCHEMAS)
            conn.execute(generator.config_sql(SCHEMAS))
            proc = service(dsn, workdir, batch_size, slot="stream_cps_empty", log_name=name)
            try:
                loader = Loader(conn, {"people": 0, "events": 0, "seed": seed})
                rows = loader.new_people(n)
                random.Random(seed).shuffle(rows)
                seconds, _ = loader.copy_and_wait(rows)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            conn.execute("SELECT pg_drop_replication_slot('stream_cps_empty')")
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    return len(rows) / seconds


def _setting(text: str) -> str:
    """A ``--set`` argument: ``name=value``."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="database sizes (events)")
    parser.add_argument("--burst", type=int, default=100_000, help="events per burst")
    parser.add_argument("--returning", type=float, default=0.1, help="share of returning people")
    parser.add_argument("--chunk", type=int, default=200_000, help="history COPY size")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="tuned")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=_setting,
        metavar="NAME=VALUE",
        help="a server setting over the profile's (repeatable): which settings matter",
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="stitching.batch_size")
    parser.add_argument("--check", action="store_true", help="compare with the offline oracle")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (plans, --resume)"
    )
    parser.add_argument("--resume", type=Path, help="a work directory --keep left: bursts only")
    parser.add_argument(
        "--restitch-all",
        action="store_true",
        help="end with the guide's restitch of everything, timed (the entities must not change)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.burst, args.chunk, args.check = "3000", 1000, 1000, True
        args.restitch_all = True
    targets = [int(s) for s in args.sizes.split(",") if s]
    rng = random.Random(5)

    workdir = args.resume or Path(tempfile.mkdtemp(prefix="stream-cps-scale-"))
    keep = args.keep or args.resume is not None
    state = json.loads((workdir / "loader.json").read_text()) if args.resume else None
    settings = {
        **PROFILES[args.profile],
        **dict(item.split("=", 1) for item in args.set),  # checked by _setting
        "shared_preload_libraries": "pg_stat_statements",
    }
    server = embedded.start(workdir / "pg", settings=settings)
    steps: list[dict[str, Any]] = []
    loader: Loader | None = None
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            schema.migrate(conn, SCHEMAS)
            conn.execute(generator.config_sql(SCHEMAS))
            if state:
                prewarm(conn)
            proc = service(server.dsn, workdir, args.batch_size)
            profiler = Profile(conn, server_pid(workdir / "pg"), proc.pid)
            loader = Loader(conn, state)
            try:
                for target in targets if state else [0, *targets]:
                    if loader.events < target:
                        profiler.start()
                    while loader.events < target:
                        rows = loader.new_people(min(args.chunk, target - loader.events))
                        timed = loader.copy_and_wait(rows)
                        steps.append(_step("history", len(rows), timed, loader, proc, conn))
                        _print(steps[-1])
                        if loader.events >= target:
                            steps[-1]["profile"] = profiler.collect()  # of the whole segment
                            print_profile(steps[-1]["profile"])
                    returning = int(args.burst * args.returning) if loader.events else 0
                    rows = loader.new_people(args.burst - returning)
                    rows += loader.returning(returning, rng)
                    rng.shuffle(rows)
                    profiler.start()
                    step = _step("burst", len(rows), loader.copy_and_wait(rows), loader, proc, conn)
                    step["profile"] = profiler.collect()
                    step["rss_mb"] = rss_mb(proc.pid)
                    step["sizes"] = sizes(conn)
                    steps.append(step)
                    _print(step)
                    print_profile(step["profile"])
                    burst = step
                    if returning:
                        # The same size with the empty database's mix (new customers only):
                        # separates what the grown tables cost from what returning ones do.
                        profiler.start()
                        rows = loader.new_people(args.burst)
                        step = _step(
                            "new-only", len(rows), loader.copy_and_wait(rows), loader, proc, conn
                        )
                        step["profile"] = profiler.collect()
                        steps.append(step)
                        _print(step)
                        print_profile(step["profile"])
                        # The empty database again, now: the ratios of these two bursts
                        # against a baseline of the same minutes (``empty_burst``).
                        rate = empty_burst(
                            server.dsn, workdir, args.batch_size, args.burst, 1000 + len(steps)
                        )
                        for done in steps[-2:]:
                            done["empty_now_rate"] = round(rate)
                        print(
                            f"empty    {args.burst:>9,} events into a fresh database: "
                            f"{rate:>7,.0f}/s"
                        )
                    # Last of the size's steps: the guide's script resets and the service
                    # restitches up to half a million events at 10M, which leaves the hot
                    # indexes' pages out of shared_buffers for whatever burst came next.
                    burst["restitch_one"] = restitch_one(conn)
                    _print_restitch_one(burst["restitch_one"])
                if args.restitch_all:
                    steps.append(restitch_all(conn, proc.pid, profiler))
                    _print(steps[-1])
                    print_profile(steps[-1]["profile"])
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            if args.check:
                check(conn)
    finally:
        if keep:
            server.stop()
            if loader is not None:
                (workdir / "loader.json").write_text(json.dumps(loader.state()))
            print(f"kept the work directory {workdir} (--resume {workdir})", flush=True)
        else:
            embedded.destroy(server)
            shutil.rmtree(workdir, ignore_errors=True)
    report(steps, args.profile, args.set)
    if args.json:
        figures = {"profile": args.profile, "set": args.set, "steps": steps}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def _step(
    kind: str,
    n: int,
    timed: tuple[float, float],
    loader: Loader,
    proc: subprocess.Popen[bytes],
    conn: psycopg.Connection[Any],
) -> dict[str, Any]:
    seconds, copy_s = timed
    return {
        "kind": kind,
        "events": n,
        "db_events": loader.events,
        "seconds": round(seconds, 2),
        "copy_s": round(copy_s, 2),
        "rate": round(n / seconds),
        "rss_mb": round(rss_mb(proc.pid), 1),
    }


def _print(step: dict[str, Any]) -> None:
    if step["kind"] == "restitch-all":
        print(
            f"restitch all: {step['entities']:,} entities purged and rebuilt, every event "
            f"restitched, in {step['seconds']:.1f} s (the guide's statements "
            f"{' + '.join(f'{s:.1f}' for s in step['statements_s'])} s of it); the slot passed "
            f"the statements after {step['slot_caught_up_s']:.1f} s; RSS peak "
            f"{step['rss_peak_mb']:.0f} MB; entities unchanged",
            flush=True,
        )
        return
    print(
        f"{step['kind']:8} {step['events']:>9,} events into {step['db_events']:>11,}: "
        f"{step['rate']:>7,}/s  RSS {step['rss_mb']:.0f} MB",
        flush=True,
    )


def _print_restitch_one(r: dict[str, float]) -> None:
    print(
        f"restitch-one {r['total_s']:.2f}s (statement {r['statement_s']:.2f}s, "
        f"{r['reset']:,} events reset); own events only {r['own_total_s']:.2f}s "
        f"({r['own_reset']:,} reset)",
        flush=True,
    )


def report(steps: list[dict[str, Any]], profile: str, overrides: list[str]) -> None:
    bursts = [s for s in steps if s["kind"] in ("burst", "new-only")]
    everything = [s for s in steps if s["kind"] == "restitch-all"]
    history = [s for s in steps if s["kind"] == "history"]
    base = bursts[0]["rate"] if bursts else 1
    empty = bool(bursts) and bursts[0]["db_events"] == bursts[0]["events"]
    first = "empty-database" if empty else "first"
    shown = profile + "".join(f" {item}" for item in overrides)
    print(f"\nprofile {shown}: bursts as a ratio of the {first} burst")
    for s in bursts:
        mb = {k: round(v / 2**20) for k, v in s.get("sizes", {}).items()}
        now = s.get("empty_now_rate")
        print(
            f"  {s['kind']:8} at {s['db_events'] - s['events']:>11,} events: {s['rate']:>7,}/s "
            f"ratio {s['rate'] / base:.2f}"
            + (f" (to an empty database's burst right after: {s['rate'] / now:.2f})" if now else "")
            + f"  RSS {s['rss_mb']:.0f} MB  sizes MB {mb}"
        )
    if history:
        total = sum(s["events"] for s in history)
        seconds = sum(s["seconds"] for s in history)
        copying = sum(s.get("copy_s", 0.0) for s in history)
        print(
            f"  history: {total:,} events in {seconds:.0f} s = {total / seconds:,.0f}/s; "
            f"{copying:.0f} s of it the bench's own COPYs, with the service idle until each "
            f"committed: {total / (seconds - copying):,.0f}/s without them"
        )
    for s in everything:
        events = bursts[-1]["db_events"] if bursts else 0
        print(
            f"  restitch all: {events:,} events, {s['entities']:,} entities in {s['seconds']:.0f} s"
            f" = {events / max(s['seconds'], 1e-9):,.0f} events/s"
        )


def check(conn: psycopg.Connection[Any]) -> None:
    """The stored partition equals the offline union-find over every event."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/
    from tests.support import expected, observed

    assert observed(conn) == expected(conn), "partition differs from the oracle"
    print("check: partition equals the offline oracle")


if __name__ == "__main__":
    sys.exit(main())
