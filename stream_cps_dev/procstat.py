"""CPU time of a process from ``/proc`` (Linux), for the benchmarks' per-process figures."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces): field 3 first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(fields: list[str]) -> float:
    """User plus system CPU seconds used so far by the process of ``fields`` (``stat_fields``)."""
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
