"""What a benchmark measure costs besides its time: client CPU, server CPU and WAL volume.

The server's CPU is read from ``/proc`` and is known only when PostgreSQL runs on this machine;
the WAL volume is the distance the server's WAL position moved. A CPU figure is None (unknown)
when the work measured was too short for its clock to see: a few fast queries can take less CPU
than one tick of ``/proc``'s clock, and would otherwise read as a true 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

__all__ = ["Usage", "measured", "server_cpu_seconds"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A CPU time is reported only when it spans at least this many steps of its clock, so that the
# clock's rounding moves it by 10% at most; below that it is unknown (None), never 0.
_MIN_STEPS = 10
_PROCESS_CLOCK = time.get_clock_info("process_time").resolution


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _postmaster(conn: psycopg.Connection[Any]) -> int | None:
    """The pid of the server's postmaster, when it runs on this machine."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    fields = _proc_stat(int(row[0])) if row else None
    if fields is None:
        return None
    return int(fields[1])


def server_cpu_seconds(postmaster: int) -> float | None:
    """CPU seconds used so far by a local PostgreSQL server: the postmaster and every live child,
    user and system, including the children they have reaped (a backend that ended is counted
    in its parent's ``cutime``/``cstime``)."""
    root = _proc_stat(postmaster)
    if root is None:
        return None
    ticks = sum(int(x) for x in root[11:15])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is not None and int(fields[1]) == postmaster:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / _TICK


def _client_cpu() -> tuple[float, float]:
    """CPU seconds of this process (every thread, at the fine resolution of
    ``time.process_time``) and of its waited-for children (worker processes, in clock ticks)."""
    times = os.times()
    return time.process_time(), times.children_user + times.children_system


def _resolved(seconds: float, step: float) -> float | None:
    """``seconds`` of CPU read from a clock that moves by ``step``, or None when that is too
    few steps to tell the time from the clock's rounding (see `_MIN_STEPS`)."""
    return seconds if seconds >= _MIN_STEPS * step else None


def _wal_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row else 0


@dataclass
class Usage:
    """What one measure cost: wall time, client CPU (this process and the children it waited
    for), server CPU (None for a server on another machine) and WAL bytes written. A CPU time
    the measure was too short to resolve is None too."""

    wall_s: float = 0.0
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    wal_bytes: int = 0
    #: The CPU figures ("client", "server") that were measured but too small to resolve.
    unresolved: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def per(self, count: float, unit: str = "event") -> dict[str, Any]:
        """The figures per ``unit`` (µs of CPU, bytes of WAL), for a result's detail."""
        if count <= 0:
            return {}

        def micros(seconds: float | None) -> float | None:
            return round(seconds / count * 1e6, 2) if seconds is not None else None

        def total(seconds: float | None) -> float | None:
            return round(seconds, 3) if seconds is not None else None

        out: dict[str, Any] = {
            f"client_cpu_us_per_{unit}": micros(self.client_cpu_s),
            f"server_cpu_us_per_{unit}": micros(self.server_cpu_s),
            f"wal_bytes_per_{unit}": round(self.wal_bytes / count, 1),
            "client_cpu_s": total(self.client_cpu_s),
            "server_cpu_s": total(self.server_cpu_s),
            "wal_mb": round(self.wal_bytes / 1e6, 2),
        }
        if self.unresolved:
            out["cpu_below_resolution"] = list(self.unresolved)
        return out


@contextmanager
def measured(dsn: str) -> Iterator[Usage]:
    """Measure the resources the block uses: ``with measured(dsn) as usage: ...``."""
    usage = Usage()
    with psycopg.connect(dsn, autocommit=True) as conn:
        postmaster = _postmaster(conn)
        server = server_cpu_seconds(postmaster) if postmaster else None
        wal = _wal_lsn(conn)
        own, children = _client_cpu()
        started = time.perf_counter()
    try:
        yield usage
    finally:
        usage.wall_s = time.perf_counter() - started
        own_now, children_now = _client_cpu()
        own_s, children_s = own_now - own, children_now - children
        resolved = (_resolved(own_s, _PROCESS_CLOCK), _resolved(children_s, 1 / _TICK))
        if any(seconds is not None for seconds in resolved):
            usage.client_cpu_s = own_s + children_s
        else:
            usage.unresolved.append("client")
        with psycopg.connect(dsn, autocommit=True) as conn:
            usage.wal_bytes = _wal_lsn(conn) - wal
        if server is not None and postmaster is not None:
            now = server_cpu_seconds(postmaster)
            if now is not None:
                usage.server_cpu_s = _resolved(now - server, 1 / _TICK)
                if usage.server_cpu_s is None:
                    usage.unresolved.append("server")
