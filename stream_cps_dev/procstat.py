"""CPU time of processes from ``/proc`` (Linux), for the benchmarks' per-process figures."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces): field 3 first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(fields: list[str]) -> float:
    """User plus system CPU seconds used so far by the process of ``fields`` (``stat_fields``)."""
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds(fields: list[str]) -> float:
    """User plus system CPU seconds of the children the process has reaped (cutime, cstime)."""
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def server_pid(datadir: Path) -> int:
    """The postmaster's pid (first line of postmaster.pid)."""
    return int((datadir / "postmaster.pid").read_text().split()[0])


def server_cpu(conn: psycopg.Connection[Any], postmaster: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes by role: client sessions by
    application_name, the others by backend type (walsender, autovacuum worker, checkpointer).
    Processes that exited (an autovacuum worker that finished, a closed session, a walsender
    whose stream was closed) count under "exited server processes": the postmaster reaps
    them, and the kernel adds their CPU to its children's. So the total of a difference of
    two readings is whole; one role's may be off, even negative (a process that exits between
    the readings moves its CPU to "exited"; a session that names itself, to that role)."""
    names = dict(
        conn.execute(
            "SELECT pid, CASE WHEN backend_type = 'client backend' "
            "THEN coalesce(nullif(application_name, ''), 'client') ELSE backend_type END "
            "FROM pg_stat_activity"
        ).fetchall()
    )
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = stat_fields(int(proc.name))
        except OSError:
            continue
        if int(fields[1]) != postmaster:  # field 4: ppid
            continue
        role = names.get(int(proc.name), "other server process")
        out[role] = out.get(role, 0.0) + cpu_seconds(fields)
    out["exited server processes"] = children_cpu_seconds(stat_fields(postmaster))
    return out


def processes_cpu(
    conn: psycopg.Connection[Any], postmaster: int, named: Mapping[str, int]
) -> dict[str, float]:
    """``server_cpu``, and the CPU seconds of the processes ``named`` (name -> pid): what a
    benchmark step runs besides the server (the service, the bench feeding a COPY)."""
    out = server_cpu(conn, postmaster)
    for name, pid in named.items():
        out[name] = cpu_seconds(stat_fields(pid))
    return out


def used_since(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """CPU seconds per role between two readings, largest first. A role of the first reading
    that is gone from the second (a session that closed, whose CPU the postmaster's
    "exited server processes" now holds) counts negative, so that the total stays whole."""
    spent = {k: round(now.get(k, 0.0) - before.get(k, 0.0), 2) for k in {**before, **now}}
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))
