"""Two baselines for the append measures of ``tamma-events bench --suite full``.

- **The lean baseline**: the store's head-lock design with nothing else. A table with the store's
  columns and index set (copied from a store's schema), a head row, and one SQL function that
  locks the head, checks a condition, inserts the events at the next positions through
  ``unnest`` and moves the head. No hash chain, no summaries, no notification, no trigger, no
  codec: what the design costs on this server, so that the store's own overhead shows as a ratio.
  Threads share its calls the way the store's group commit does (`tamma_events.stores.group`):
  whoever finds no call running writes every waiting event in one call.
- **UmaDB**, the DCB reference store (Rust, its own storage engine), started from its wheel
  (``pip install tamma-events[bench]``) on a port of its own, and measured on the same kind of
  events: conditional appends, single appends from threads (a client each), and batches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from tamma_events.errors import StorageError
from tamma_events.model import DomainEvent
from tamma_events.ops.request import AppendRequest
from tamma_events.stores.group import GroupCommit
from tamma_events.tools.bench import _batches, concurrent_rate

__all__ = [
    "LeanStore",
    "measure_lean_conditional",
    "measure_lean_threads",
    "measure_umadb_batches",
    "measure_umadb_conditional",
    "measure_umadb_threads",
    "umadb_available",
    "umadb_server",
]

_encode = msgspec.json.encode

# -- the lean baseline ------------------------------------------------------------------------

_LEAN_FUNCTION = """
CREATE FUNCTION {schema}.lean_append(
    p_ids uuid[], p_types text[], p_timestamps timestamptz[], p_tags jsonb[], p_data jsonb[],
    p_condition_types text[], p_condition_tags jsonb, p_after bigint
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    head_at bigint;
BEGIN
    SELECT h.position INTO head_at FROM {schema}.head AS h FOR UPDATE;
    IF p_condition_tags IS NOT NULL AND EXISTS (
        SELECT 1 FROM {schema}.events
        WHERE position > p_after AND event_type = ANY(p_condition_types)
          AND tags @> p_condition_tags
    ) THEN
        RETURN NULL;
    END IF;
    INSERT INTO {schema}.events
        (position, event_id, event_type, "timestamp", tags, metadata, data, hash)
    SELECT head_at + u.n, u.id, u.type, u.ts, u.tags, '{{}}', u.data, ''
    FROM unnest(p_ids, p_types, p_timestamps, p_tags, p_data)
         WITH ORDINALITY AS u (id, type, ts, tags, data, n);
    UPDATE {schema}.head SET position = head_at + cardinality(p_ids);
    RETURN head_at + cardinality(p_ids);
END
$$
"""


class _Row:
    """One event as the lean function takes it, made by the appending thread."""

    __slots__ = ("data", "event_id", "event_type", "tags", "timestamp")

    def __init__(self, event: DomainEvent) -> None:
        self.event_id = event.event_id
        self.event_type = event.event_type
        self.timestamp = event.timestamp
        self.tags = _encode(event.tags).decode()
        self.data = _encode(event.data).decode()


class _Count:
    """What `GroupCommit` reads of a request's batch: its size."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


class LeanStore:
    """The lean baseline in ``schema`` (created here, with the columns and indexes of the store
    schema ``like``): ``append`` from one thread or many, sharing calls like the store's group
    commit. ``groups`` counts the calls, so events per group can be reported."""

    def __init__(self, dsn: str, schema: str, like: str, max_group_events: int = 1_000) -> None:
        self.schema = schema
        self.groups = 0
        self._conn = psycopg.connect(dsn, autocommit=True)
        name = sql.Identifier(schema)
        self._conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        self._conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING INDEXES)").format(
                sql.Identifier(schema, "events"), sql.Identifier(like, "events")
            )
        )
        self._conn.execute(
            sql.SQL(
                "CREATE TABLE {} (singleton boolean PRIMARY KEY, position bigint NOT NULL)"
                " WITH (fillfactor = 10)"
            ).format(sql.Identifier(schema, "head"))
        )
        self._conn.execute(
            sql.SQL("INSERT INTO {} VALUES (true, 0)").format(sql.Identifier(schema, "head"))
        )
        self._conn.execute(sql.SQL(_LEAN_FUNCTION).format(schema=name))
        self._call = (
            sql.SQL("SELECT {}(%s, %s, %s, %s::jsonb[], %s::jsonb[], %s, %s::jsonb, %s)")
            .format(sql.Identifier(schema, "lean_append"))
            .as_bytes(None)
        )
        self._group = GroupCommit(self._write, max_group_events)

    def close(self) -> None:
        self._conn.close()

    def append(
        self,
        event: DomainEvent,
        condition_types: Sequence[str] | None = None,
        condition_tags: dict[str, str] | None = None,
    ) -> int | None:
        """Append one event, alone (with a condition) or in the next group (without); returns
        its position, or None when the condition failed."""
        row = _Row(event)
        if condition_tags is not None:
            return self._send(
                [row], list(condition_types or ()), _encode(condition_tags).decode(), 0
            )
        request = AppendRequest([row], _Count(1), None)  # type: ignore[list-item, arg-type]
        return self._group.submit(request)

    def _write(self, requests: list[AppendRequest]) -> None:
        rows: list[_Row] = [row for request in requests for row in request.events]  # type: ignore[misc]
        last = self._send(rows, [], None, 0)
        assert last is not None
        first = last - len(rows) + 1
        for request in requests:
            request.succeed(first)
            first += request.count

    def _send(self, rows: list[_Row], types: list[str], tags: str | None, after: int) -> int | None:
        self.groups += 1
        params = [
            [r.event_id for r in rows],
            [r.event_type for r in rows],
            [r.timestamp for r in rows],
            [r.tags for r in rows],
            [r.data for r in rows],
            types,
            tags,
            after,
        ]
        row = self._conn.execute(self._call, params).fetchone()
        return None if row is None or row[0] is None else int(row[0])


def measure_lean_conditional(lean: LeanStore, count: int, prefix: str) -> float:
    """Appends/s of single events, each under a condition that holds (no event of its type
    with its own issue tag), from one client: `tamma_events.tools.bench.measure_conditional_appends`
    on the lean baseline."""
    started = time.perf_counter()
    for n in range(count):
        tags = {"issueId": f"bench-cond-{prefix}{n}"}
        if lean.append(DomainEvent("BenchDecided", {"n": n}, tags), ["BenchDecided"], tags) is None:
            raise StorageError("a lean conditional append failed its condition")
    return count / (time.perf_counter() - started)


def measure_lean_threads(lean: LeanStore, threads: int, per_thread: int) -> tuple[float, float]:
    """Events/s of single appends from ``threads`` threads at once on the lean baseline, and the
    mean events per call (`tamma_events.tools.bench.measure_concurrent_appends` on the lean
    baseline)."""
    groups = lean.groups
    rate = concurrent_rate(
        threads,
        per_thread,
        lambda k, n: lean.append(
            DomainEvent("BenchTicked", {"thread": k, "n": n}, {"userId": f"u{k}"})
        ),
    )
    return rate, threads * per_thread / max(1, lean.groups - groups)


# -- UmaDB ------------------------------------------------------------------------------------


def umadb_available() -> bool:
    """Whether the UmaDB wheel (client and server script) is installed."""
    try:
        import umadb  # noqa: F401
    except ImportError:
        return False
    return _umadb_script() is not None


def _umadb_script() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "umadb")
    return beside if os.access(beside, os.X_OK) else shutil.which("umadb")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def umadb_server(timeout: float = 60.0) -> Iterator[str]:
    """A UmaDB server on a free loopback port with a fresh database in a temporary directory,
    stopped and removed on leaving; yields its URL."""
    script = _umadb_script()
    if script is None:
        raise StorageError("UmaDB is not installed (pip install tamma-events[bench])")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tamma-umadb-") as directory:
        process = subprocess.Popen(
            [
                script,
                "--listen",
                f"127.0.0.1:{port}",
                "--db-path",
                os.path.join(directory, "uma.db"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for_umadb(process, url, timeout)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


def _wait_for_umadb(process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    from umadb import Client

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise StorageError(
                f"the UmaDB server exited with {process.returncode}: {error.strip()[-500:]}",
            )
        try:
            with contextlib.closing(Client(url)) as client:
                client.head()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"the UmaDB server did not answer at {url} in {timeout:.0f} s"
                ) from None
            time.sleep(0.1)


def _uma_event(event: DomainEvent) -> Any:
    from umadb import Event

    tags = [f"{key}:{value}" for key, value in event.tags.items()]
    return Event(event.event_type, _encode(event.data), tags, event.event_id)


def measure_umadb_conditional(url: str, count: int, prefix: str) -> float:
    """Appends/s of single UmaDB appends under a condition that holds, from one client: the
    same decisions as `tamma_events.tools.bench.measure_conditional_appends`."""
    from umadb import AppendCondition, Client, Query, QueryItem

    with contextlib.closing(Client(url)) as client:
        started = time.perf_counter()
        for n in range(count):
            tags = {"issueId": f"bench-cond-{prefix}{n}"}
            boundary = Query([QueryItem(["BenchDecided"], [f"issueId:{tags['issueId']}"])])
            client.append(
                [_uma_event(DomainEvent("BenchDecided", {"n": n}, tags))],
                AppendCondition(boundary, None),
            )
        return count / (time.perf_counter() - started)


def measure_umadb_threads(url: str, threads: int, per_thread: int) -> float:
    """Events/s of single UmaDB appends from ``threads`` threads at once, a client each."""
    from umadb import Client

    clients = [Client(url) for _ in range(threads)]
    try:
        return concurrent_rate(
            threads,
            per_thread,
            lambda k, n: clients[k].append(
                [_uma_event(DomainEvent("BenchTicked", {"thread": k, "n": n}, {"userId": f"u{k}"}))]
            ),
        )
    finally:
        for client in clients:
            client.close()


def measure_umadb_batches(url: str, events: Sequence[DomainEvent], batch_size: int) -> float:
    """Events/s of UmaDB appends of the same events, a batch per call (conversion included, as
    `append_batch`'s rate includes its encoding)."""
    from umadb import Client

    with contextlib.closing(Client(url)) as client:
        started = time.perf_counter()
        for batch in _batches(events, batch_size):
            client.append([_uma_event(event) for event in batch])
        return len(events) / (time.perf_counter() - started)
