# WARNING: generated from src/tamma_events/stores/aio.py by scripts/async_to_sync.py.
# DO NOT CHANGE! Change the original file instead, then run the script.
"""The store's driver, written once for asyncio and generated for threads.

The driver is written once, for asyncio, in `tamma_events.stores.aio`;
`tamma_events.stores.store` is generated from it by ``scripts/async_to_sync.py`` (change
`tamma_events.stores.aio`, then run the script: ``scripts/test`` fails while the generated module
is stale). The database work itself is written once too, as the operations of `tamma_events.ops`
(generators of steps), which `tamma_events.ops.drive_async` and `tamma_events.ops.drive` run.
Where the two stores differ for real, the code says so with an ``if True:  # ASYNC`` block: the
sync store connects when it is made, waits in threads (group commit, read-ahead, the summaries'
fold, the subscriptions' listener) and exports through the native libpq COPY reader; the async
store connects in `open`, and uses tasks for the same work.

Every append transaction locks the single head row first, checks its conditions, writes its
events at positions head+1.. (small groups through the ``append_group`` function in one round
trip, larger ones by binary COPY) and moves the head before it commits. Holding that lock until
the commit makes commit order equal position order, so a reader resuming after position P never
skips an event, and a condition checked under it cannot be invalidated before the commit.
Concurrent appends from the threads of one process, or the tasks of one event loop, share
transactions (group commit); each keeps its own condition and its own outcome.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import psycopg
import pyarrow as pa
from psycopg import pq
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from tamma_events import embedded
from tamma_events.codec.arrow import EXPORT_SCHEMA, write_parquet
from tamma_events.codec.reference import DEFAULT_MAX_EVENT_BYTES
from tamma_events.errors import (
    STORAGE_ERROR,
    EventStoreError,
    QueryError,
    StorageError,
    ValidationFailed,
)
from tamma_events.filters import (
    AggregateRow,
    Criteria,
    EventFilter,
    GroupBy,
    Page,
    TagValuesPage,
    check_text,
    normalize,
)
from tamma_events.model import (
    AppendCondition,
    DomainEvent,
    Projection,
    Query,
    ReadResult,
    SequencedEvent,
    Snapshot,
    StoreStats,
)
from tamma_events.ops.appending import TransactionState
from tamma_events.ops.consuming import (
    ConsumerState,
    ParkedEvent,
    check_name,
    consumer_statements,
)
from tamma_events.ops.drive import rollback, run
from tamma_events.ops.failures import connection_lost
from tamma_events.ops.migrating import migrate_op, require_current_op
from tamma_events.ops.reading import (
    MAX_PAGE_SIZE,
    Keyset,
    KeysetWalk,
    check_size,
    check_tag_key,
    decode_document,
    event_key,
    subscription_criteria,
)
from tamma_events.ops.replicas import (
    Behind,
    Consistency,
    Replica,
    ReplicaSet,
    redact,
    replay_state,
    replica_failure,
    wal_position,
)
from tamma_events.ops.request import AppendRequest
from tamma_events.ops.steps import Op
from tamma_events.ops.verifying import IntegrityReport
from tamma_events.sql import BEGIN, after_position, query_shape
from tamma_events.stores.consumers import Consumer
from tamma_events.stores.core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_TIMEOUT,
    SCHEMA_ENV,
    StoreCore,
    check_size_any,
    check_timeout,
    connection_kwargs,
    make_pool,
    parse_before,
    pool_stats,
    retryable,
    server_wrote,
    storage_error,
    unreachable,
)
from tamma_events.stores.group import GroupCommit
from tamma_events.stores.metrics import prometheus_registry
from tamma_events.streaming.listen import Listener
from tamma_events.streaming.subscriptions import Subscription, check_subscription_options

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_POOL_TIMEOUT",
    "DSN_ENV",
    "MAX_PAGE_SIZE",
    "SCHEMA_ENV",
    "EventStore",
    "Transaction",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_S = TypeVar("_S")

#: The DSN the store uses when none is passed.
DSN_ENV = "TAMMA_EVENTS_DSN"

# COPY streams a log-ordered export or stream reads at once (see `_ranges`).
_READ_STREAMS = 2


def _configure(conn: psycopg.Connection[Any]) -> None:
    set_json_loads(msgspec.json.decode, conn)


@contextmanager
def live_connection(
    pool: ConnectionPool[Any], timeout: float | None = None
) -> Iterator[psycopg.Connection[Any]]:
    """A connection from ``pool``, passing over those the server closed while they sat in it.

    A connection the server has written to while idle (`tamma_events.stores.core.server_wrote`) is
    tested with an empty query; a broken one goes back to the pool, which discards it and opens
    another, and the next is taken at once. (The pool's own ``check`` would back off a second,
    then two, between broken connections: after a server restart, the first call would wait
    seconds.)"""
    tries = pool.max_size + 1
    for attempt in range(tries):
        stack = ExitStack()
        conn = stack.enter_context(pool.connection(timeout=timeout))
        if attempt + 1 < tries and server_wrote(conn):
            try:
                ConnectionPool.check_connection(conn)
            except Exception:
                stack.close()
                continue
        with stack:
            yield conn
        return


def _check_pool(pool: ConnectionPool[Any]) -> None:
    """Test the pool's idle connections now (after a lost connection: the others are likely
    broken too), so that the next call gets a working one rather than the next broken one."""
    try:
        pool.check()
    except Exception:  # a closed pool, say: the error being reported says enough
        pass


class EventStore(StoreCore):
    """A DCB event store on PostgreSQL.

    ``dsn`` selects the server; without it, ``$TAMMA_EVENTS_DSN``; without that, an embedded
    PostgreSQL 18 started in ``data_dir`` (default: the user data directory). Everything lives in
    the PostgreSQL schema ``schema`` (default: ``$TAMMA_EVENTS_SCHEMA``, else ``tamma_events``),
    migrated on open unless ``migrate=False``. The sync store opens when it is made; the async
    one when it is opened (``await store.open()``, or ``async with``).

    Connections come from a `psycopg_pool.ConnectionPool` of ``min_connections`` to
    ``max_connections``, each replaced after ``max_lifetime`` seconds or ``max_idle`` seconds
    unused; a call waits up to ``pool_timeout`` seconds for one, then fails with
    ``STORAGE_ERROR``. Opening the store connects once first: a server that refuses the
    connection or gives no answer within ``connect_timeout`` seconds (5 by default; it also
    bounds each later connection attempt) fails it at once with one ``STORAGE_ERROR`` naming
    the host and port; connections lost later are retried by the pool. ``pool`` lets a caller
    share its own pool instead; the store then sets ``autocommit`` on the connections it
    borrows. `pool_stats` reports the pool.

    ``replicas`` are DSNs of streaming replicas of the server: queries, streams and exports go
    to them in turn, reading your own writes unless ``consistency="eventual"`` (see
    `tamma_events.ops.replicas` for ``replica_wait``, ``replica_retry`` and ``replica_timeout``).

    Query results are cached in-process (``cache_size`` entries for ``cache_ttl`` seconds; 0
    turns the cache off); see `tamma_events.ops.cache` for why a hit is never stale.

    Events compacted out of the log (`compact_events`) live in Parquet archives under
    ``archive_dir`` (default: `default_archive_dir`, ``<data dir>-archives/<schema>`` beside
    the embedded server's data directory, or ``archives/<schema>`` in the user data directory
    for a server at a DSN).

    `metrics` counts what the store does; `prometheus_registry` exposes it to Prometheus.

    Use it as a context manager, or call `close`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        pool: ConnectionPool[Any] | None = None,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        data_dir: str | os.PathLike[str] | None = None,
        migrate: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_group_events: int = 2_000,
        chunk_events: int = 10_000,
        cache_size: int = 256,
        cache_ttl: float = 5.0,
        archive_dir: str | os.PathLike[str] | None = None,
        replicas: Iterable[str] = (),
        consistency: Consistency = "read_your_writes",
        replica_wait: float = 1.0,
        replica_retry: float = 2.0,
        replica_timeout: float = 1.0,
    ) -> None:
        self._setup(
            schema=schema,
            max_event_bytes=max_event_bytes,
            chunk_events=chunk_events,
            cache_size=cache_size,
            cache_ttl=cache_ttl,
            archive_dir=archive_dir,
        )
        self._replicas = ReplicaSet(
            [],
            consistency=consistency,
            wait=replica_wait,
            retry=replica_retry,
            timeout=replica_timeout,
        )
        self._replica_dsns = [replicas] if isinstance(replicas, str) else list(replicas)
        self._dsn = dsn
        self._data_dir = data_dir
        self._pool_settings = (
            min_connections,
            max_connections,
            check_timeout("connect_timeout", connect_timeout),
            check_timeout("pool_timeout", pool_timeout),
            max_lifetime,
            max_idle,
        )
        self._migrate_on_open = migrate
        self._pool = pool
        self._owns_pool = pool is None
        self._opened = False
        self._closed = False
        #: The schema migrations this store applied when it opened (the ``init`` command
        #: reports them).
        self.applied_on_open: list[int] = []
        self._listener: Listener | None = None
        # Weak: a subscription dropped without stop() is not kept alive (or counted) by the store.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        #: The consumers' workers running on this store (`Consumer.run`), for `metrics`.
        self._consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()
        self._subscriptions_lock = threading.Lock()
        self._registry: Any = None
        self._group = GroupCommit(self._write_group, max_group_events)
        self._fold_thread: threading.Thread | None = None
        self.embedded: embedded.EmbeddedServer | None = None
        self.open()

    def _make_pool(self, dsn: str, name: str, timeout: float) -> ConnectionPool[Any]:
        min_size, max_size, connect_timeout, _, max_lifetime, max_idle = self._pool_settings
        return make_pool(
            ConnectionPool,
            dsn,
            name,
            connect_timeout,
            timeout=timeout,
            min_size=min_size,
            max_size=max_size,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            configure=_configure,
        )

    def open(self) -> EventStore:
        """Connect (and migrate, unless ``migrate=False``); returns the store. `EventStore`
        calls it when it is made; calling it again does nothing."""
        if self._opened:
            return self
        if self._closed:
            raise StorageError("the store is closed")
        self._opened = True
        connect_timeout, pool_timeout = self._pool_settings[2:4]
        if self._pool is None:
            dsn = self._dsn or os.environ.get(DSN_ENV) or None
            if dsn is None:
                # Starting a server is a one-off subprocess wait, done before any service work.
                self.embedded = embedded.start(self._data_dir)
                dsn = self.embedded.dsn
            self._pool = self._make_pool(dsn, f"tamma-events:{self.schema}", pool_timeout)
            try:
                # One connection first: a server that is not there is one clear error now,
                # not the pool's retries until its timeout.
                try:
                    probe = psycopg.Connection.connect(
                        dsn, **connection_kwargs(dsn, connect_timeout=connect_timeout)
                    )
                except psycopg.OperationalError as exc:
                    raise unreachable(exc, dsn, connect_timeout).with_traceback(None) from None
                probe.close()
                # The server is there: the pool's first connections get the time a call
                # would wait for one.
                self._pool.open(wait=True, timeout=pool_timeout)
            except EventStoreError:
                self._pool.close()
                self._closed = True
                raise
            except Exception as exc:
                self._pool.close()
                self._closed = True
                raise storage_error(
                    exc, "connecting to PostgreSQL", dsn=redact(dsn)
                ).with_traceback(None) from None
        for replica_dsn in self._replica_dsns:
            # Opened without waiting: a replica that is down must not stop the store opening.
            replica_pool = self._make_pool(
                replica_dsn, f"tamma-events:{self.schema}:replica", self._replicas.timeout
            )
            replica_pool.open(wait=False)
            self._replicas.members.append(Replica(replica_dsn, replica_pool))
        try:
            if self._migrate_on_open:
                self.applied_on_open = self.migrate()
            else:
                with self._connection() as conn:
                    try:
                        run(conn, require_current_op(self.schema))
                    except psycopg.Error as exc:
                        raise storage_error(exc, "reading the schema's version") from exc
        except BaseException:
            self.close()
            raise
        return self

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The connection string of the store's server (with its password: do not log it;
        ``repr(store)`` shows it without)."""
        conninfo = self._require_pool().conninfo
        return conninfo() if callable(conninfo) else conninfo

    def __repr__(self) -> str:
        where = "not open"
        if self._pool is not None and self._opened:
            conninfo = self._pool.conninfo
            value: object = conninfo
            if callable(conninfo) and not inspect.iscoroutinefunction(conninfo):
                value = conninfo()
            if isinstance(value, str):
                where = redact(value)
        replicas = f", replicas={len(self._replicas.members)}" if self._replicas else ""
        state = " closed" if self._closed else ""
        return f"<EventStore{state} {where!r} schema={self.schema!r}{replicas}>"

    def _require_pool(self) -> ConnectionPool[Any]:
        if self._pool is None or not self._opened:
            raise StorageError("the store is not open: it opens when it is made")
        return self._pool

    def migrate(self) -> list[int]:
        """Apply the schema migrations not applied yet; returns their versions."""
        try:
            with self._connection() as conn:
                try:
                    return run(conn, migrate_op(self.schema))
                except psycopg.Error as exc:
                    raise storage_error(exc, "migrating the schema") from exc
        except EventStoreError as exc:
            exc.context.setdefault("schema", self.schema)
            raise

    def close(self) -> None:
        """End the store's subscriptions, ask its consumers' workers to stop, and close its
        pools (a caller's own pool stays open)."""
        if self._closed:
            return
        self._join_fold()
        self._closed = True
        with self._subscriptions_lock:
            subscriptions = list(self._subscriptions)
            consumers = list(self._consumers)
        for subscription in subscriptions:
            subscription.stop()
        for consumer in consumers:
            consumer.stop()
        if self._listener is not None:
            self._listener.close()
        for replica in self._replicas.members:
            replica.pool.close()
        if self._owns_pool and self._pool is not None:
            self._pool.close()

    def __enter__(self) -> EventStore:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._closed:
            raise StorageError("the store is closed")
        pool = self._require_pool()
        try:
            with live_connection(pool) as conn:
                if not conn.autocommit:
                    conn.set_autocommit(True)
                if not self._owns_pool:
                    _configure(conn)
                yield conn
        except EventStoreError as exc:
            if retryable(exc):
                _check_pool(pool)
            raise
        except PoolTimeout as exc:  # before psycopg.Error: it is an OperationalError
            stats = pool.get_stats()
            raise storage_error(
                exc,
                "getting a connection",
                pool_size=stats.get("pool_size", 0),
                pool_max=stats.get("pool_max", 0),
                waiting=stats.get("requests_waiting", 0),
            ) from exc
        except psycopg.Error as exc:
            if connection_lost(exc):
                # A restarted server or a terminated backend: the pool's idle connections are
                # likely broken too.
                _check_pool(pool)
            raise storage_error(exc, "using a connection") from exc

    def _run(self, kind: str, make: Callable[[], Op[_T]]) -> _T:
        """Run the operation ``make()`` on the primary, timed as a query of ``kind``. When the
        connection turns out to be lost before anything was committed (a restarted server, a
        terminated backend), the pool is checked and the operation runs once more."""
        start = time.perf_counter()
        failed = True
        retried = False
        try:
            try:
                with self._connection() as conn:
                    result = run(conn, make())
            except EventStoreError as exc:
                if not retryable(exc):
                    raise
                retried = True
                logger.info(
                    "tamma-events: %s; running the %s again",
                    exc.message,
                    kind,
                    extra={"kind": kind},
                )
                with self._connection() as conn:
                    result = run(conn, make())
            failed = False
            return result
        finally:
            self._metrics.queried(kind, time.perf_counter() - start, failed, retried)

    def _query(self, kind: str, make: Callable[[], Op[_T]]) -> _T:
        """Run the operation ``make()`` on a replica in turn (caught up with this store's
        appends, unless consistency is eventual), else on the primary; timed as ``kind``."""
        if not self._replicas:
            return self._run(kind, make)
        start = time.perf_counter()
        failed = True
        try:
            result = self._on_replica(make)
            failed = False
            return result
        finally:
            self._metrics.queried(kind, time.perf_counter() - start, failed)

    def _on_replica(self, make: Callable[[], Op[_T]]) -> _T:
        replicas = self._replicas
        if replicas.pending:
            # Cleared first: an append that sets it meanwhile is covered by the next read.
            replicas.pending = False
            try:
                with self._connection() as conn:
                    replicas.wrote(run(conn, wal_position()))
            except BaseException:
                replicas.pending = True
                raise
        for replica in replicas.order():
            try:
                with live_connection(replica.pool, replicas.timeout) as conn:
                    if not run(conn, self._op_caught_up(replica)):
                        break  # behind for longer than the wait: the primary answers
                    result = run(conn, make())
            except Behind:
                break
            except (psycopg.Error, PoolTimeout) as exc:
                if not replica_failure(exc):
                    raise storage_error(exc, "reading from a replica") from exc
                replicas.failed(replica, exc)
                if connection_lost(exc):
                    _check_pool(replica.pool)
                continue
            replicas.served(replica)
            return result
        replicas.fell_back()
        with self._connection() as conn:
            return run(conn, make())

    def pool_stats(self) -> dict[str, int]:
        """The primary's connection pool: ``size`` (open connections), ``idle``, ``waiting``
        (requests waiting for one), ``min``, ``max``, and since the store opened: ``requests``,
        ``request_timeouts``, ``connections`` opened, ``connection_errors`` (attempts that
        failed), ``connections_lost`` (found broken by a check and replaced) and
        ``connections_discarded`` (found closed or broken when handed out or given back, and
        replaced)."""
        return pool_stats(self._require_pool().get_stats())

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the store's metrics: ``appends`` (events, batches, bytes,
        conflicts, duplicates, errors, latency), ``queries`` (count, errors and latency by
        kind), ``cache``, ``pool`` (see `pool_stats`), ``subscriptions`` (open, lag in
        positions and seconds), ``consumers`` (each worker running here: its consumer, events
        delivered and parked, and each partition it holds with its checkpoint and lag in
        positions and seconds), ``replicas`` (each: up, reads served, replay lag in bytes and
        seconds) and ``replica_fallbacks``. Latencies are histograms: ``count``, ``sum`` and
        cumulative ``buckets`` by upper bound in seconds.

        It reads what the store counted and asks the database nothing (a plain call in both
        stores): ``up`` says whether a replica answered the last time the store asked it
        anything (None before that), and its lag is the one `measure_replicas` last found
        (None before that)."""
        with self._subscriptions_lock:
            positions = [s.position for s in self._subscriptions if not s.stopped]
            consumers = [
                (c.name, c.worker, c.owned, c.delivered, c.parked) for c in self._consumers
            ]
        replicas = [r.status() for r in self._replicas.members]
        return self._snapshot(self.pool_stats(), self._listener, positions, replicas, consumers)

    def measure_replicas(self) -> list[dict[str, Any]]:
        """Ask each replica how far behind the primary it is now (one query to the primary
        and one to each replica that is not left out for failing) and return what `metrics`
        then reports of them: ``up``, ``reads``, ``lag_bytes`` and ``lag_seconds``."""
        if not self._replicas:
            return []
        try:
            with self._connection() as conn:
                primary: int | None = run(conn, wal_position())
        except (psycopg.Error, EventStoreError):
            primary = None
        for replica in self._replicas.members:
            if replica.left_out:
                continue  # not asked again until its retry is due
            try:
                with live_connection(replica.pool, self._replicas.timeout) as conn:
                    replica.measured(primary, run(conn, replay_state()))
            except (psycopg.Error, PoolTimeout, EventStoreError):
                replica.measured(primary, None)
        return [r.status() for r in self._replicas.members]

    @property
    def prometheus_registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` of the store's own. Serve it with
        ``prometheus_client.generate_latest(registry)`` (the web app does, at ``/metrics``).
        In the sync store, each scrape measures the replicas' lag (`measure_replicas`) and
        collects `metrics`; the async store's collector runs outside the event loop, so it
        reports `metrics` as they are, replica lag as `measure_replicas` last found it."""
        if self._registry is None:

            def scrape() -> dict[str, Any]:
                self.measure_replicas()
                return self.metrics()

            self._registry = prometheus_registry(scrape)
        return self._registry

    # -- appends ---------------------------------------------------------------------------

    def append(
        self,
        event: DomainEvent | dict[str, Any],
        condition: AppendCondition | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """Append one event; returns its position.

        Raises `AppendConditionFailed` when ``condition`` is violated, `DuplicateEvent` when
        its ``event_id`` is already stored, `ValidationFailed` for a bad event (all of them
        `EventStoreError`); nothing is written in any of these cases. ``conn``: see
        `append_batch`.
        """
        return self.append_batch([event], condition, conn=conn)

    def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """Append events atomically at consecutive positions; returns the last position.

        All of them are stored, or (on any error) none. Batches up to ``chunk_events`` are
        validated and encoded before any database work; a larger batch is encoded chunk by chunk
        while earlier chunks stream to the server, and an error in a later chunk rolls the whole
        batch back.

        With ``conn``, a psycopg connection of the caller's to the same database (async for the
        async store), the events are written in the caller's
        transaction (outbox style): they commit or roll back with the caller's own work, and
        the head lock is held until then, so keep that transaction short. A connection in
        autocommit with no transaction open gets one of its own, committed before this returns.
        A failed append leaves the caller's transaction usable.
        """
        start = time.perf_counter()
        try:
            batch, check, prepared = self._request(events, condition)
            if conn is not None:
                if prepared is None:
                    raise ValidationFailed(
                        f"a batch in a caller's transaction holds at most chunk_events"
                        f" ({self.chunk_events}) events, got {len(batch)}",
                        {"field": "events"},
                    )
                request = AppendRequest(batch, prepared, condition, check)
                position = self._append_in(conn, request)
                size = len(prepared.buffer)
            elif prepared is not None:
                request = AppendRequest(batch, prepared, condition, check)
                position = self._group.submit(request)
                size = len(prepared.buffer)
            else:
                with self._connection() as own:
                    position, size = run(own, self._op_append_large(batch, condition, check))
        except EventStoreError as exc:
            self._metrics.append_failed(exc.code, time.perf_counter() - start)
            raise
        except BaseException:
            self._metrics.append_failed(STORAGE_ERROR, time.perf_counter() - start)
            raise
        self._metrics.appended(len(batch), size, time.perf_counter() - start)
        if conn is None and self._fold_due(position):
            self._start_fold()
        return position

    def _start_fold(self) -> None:
        """Fold the summaries' tail in the background: appends do not wait for it."""
        fold = threading.Thread(target=self._fold_summaries, name="tamma-events fold", daemon=True)
        try:
            fold.start()
        except RuntimeError:  # no new thread at interpreter shutdown: the append stands
            self._folding = False
        else:
            self._fold_thread = fold

    def _fold_summaries(self) -> None:
        """Fold the summaries' tail (`StoreCore._op_fold`), in a thread (sync) or a task
        (async) of its own: a failure only leaves the tail for the next fold."""
        try:
            with self._connection() as conn:
                run(conn, self._op_fold())
        except Exception as exc:
            logger.warning("tamma-events: folding the query summaries failed: %s", exc)
        finally:
            self._folding = False

    def fold_summaries(self) -> int:
        """Fold every event appended so far into the query summaries now, waiting for a fold
        already running; returns the folded position. Reads are exact without it (they add up
        the tail since the last fold), and appends fold on their own as the tail grows: this is
        for after a bulk load, to make the next summary reads as fast as they get."""
        self._join_fold()
        return self._run("fold", lambda: self._op_fold(0, wait=True))

    def _join_fold(self) -> None:
        thread = self._fold_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _append_in(self, conn: psycopg.Connection[Any], request: AppendRequest) -> int:
        """An append in the caller's transaction on ``conn``."""
        if not isinstance(conn, psycopg.Connection):
            raise ValidationFailed(
                f"conn must be a psycopg.Connection, got {type(conn).__name__}",
                {"field": "conn"},
            )
        op = self._op_tx_append(TransactionState(), request)
        try:
            if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                with conn.transaction():
                    return run(conn, op, owned=False)
            return run(conn, op, owned=False)
        except psycopg.Error as exc:
            raise storage_error(exc, "appending in the caller's transaction") from exc

    def _write_group(self, requests: list[AppendRequest]) -> None:
        """Write ``requests`` in one transaction (`StoreCore._op_write_group`); settles every
        one of them. Run once more on a checked connection when the first was lost before
        anything was sent for commit."""
        try:
            try:
                with self._connection() as conn:
                    run(conn, self._op_write_group(requests))
            except EventStoreError as exc:
                if not retryable(exc):
                    raise
                logger.info("tamma-events: %s; appending again", exc.message)
                for request in requests:
                    request.reset()
                with self._connection() as conn:
                    run(conn, self._op_write_group(requests))
        except EventStoreError as exc:
            for request in requests:
                if not request.done:
                    request.fail(exc)

    # -- reads -----------------------------------------------------------------------------

    def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        """The events matching ``query`` (all events when None or empty) at positions after
        ``after``, in position order (newest first when ``backwards``), at most ``limit``.

        The result's ``head`` is the store's last position at the time of the read; when
        ``limit`` is given it is instead the newest position returned (None when nothing was),
        since later matching events may exist. Either way it is the ``after`` to put in an
        `AppendCondition` built from what was read. Events and head come from one snapshot,
        always the primary's: decisions are made on it.
        """
        return self._run("read", lambda: self._op_read(query, after, limit, backwards))

    def get_event(self, event_id: uuid.UUID | str) -> SequencedEvent | None:
        """The stored event with this id (live or archived), or None."""
        key = event_key(event_id)
        return self._query("get_event", lambda: self._op_get_event(key))

    def head(self) -> int:
        """The last position written (0 for an empty store), on the primary."""
        return self._run("head", lambda: self._op_head())

    # -- queries ---------------------------------------------------------------------------

    def get_events(
        self, event_filter: EventFilter | None = None, *, include_archived: bool = False
    ) -> list[SequencedEvent]:
        """The events matching ``event_filter`` (all events when None), in its order, after its
        offset and at most its limit. Raises `QueryError` for a malformed filter.

        With ``include_archived``, events compacted into archives are read too, so the result
        is what it was before compaction; without it, only the live log is read."""
        criteria = normalize(event_filter)
        document = self._query(
            "get_events", lambda: self._op_get_events(criteria, include_archived)
        )
        return decode_document(document)

    def get_events_by_issue_id(self, issue_id: str) -> list[SequencedEvent]:
        """The events tagged ``issueId=issue_id``, in log order."""
        return self.get_events(EventFilter(issue_ids=[issue_id]))

    def get_events_by_time_range(
        self, start: datetime | str, end: datetime | str
    ) -> list[SequencedEvent]:
        """The events with ``start <= timestamp < end``, in timestamp order."""
        return self.get_events(EventFilter(start_time=start, end_time=end, order_by="timestamp"))

    def count_events(self, event_filter: EventFilter | None = None) -> int:
        """How many events of the whole history match ``event_filter``: what `get_events`
        returns with ``include_archived=True`` (compacted events still count; see
        docs/archives.md).

        Counts by event type, by one tag, and by type over a window whose ends fall on whole
        minutes come from summaries kept by the appends, at a cost that does not grow with the
        log."""
        criteria = normalize(event_filter)
        total = self._query("count", lambda: self._op_count(criteria))
        return self._count_result(criteria, total)

    def get_event_types(self) -> list[str]:
        """Every event type stored, sorted."""
        return self._query("event_types", self._op_event_types)

    def schema_version(self) -> int:
        """The last migration applied to the store's schema: 0 when the schema holds no event
        store (a store opened with ``migrate=False`` on a schema never created)."""
        return self._run("schema_version", lambda: self._op_schema_version())

    def stats(self) -> StoreStats:
        """The store at a glance: head, live and archived events, events per type, tag keys
        and values, archives, table sizes, schema and server versions, and the codec. Read on
        the primary, from summaries and the catalog: its cost does not grow with the log."""
        return self._run("stats", lambda: self._op_stats())

    def get_tags(self) -> dict[str, list[str]]:
        """Every tag key stored, with its distinct values, both sorted. Its cost grows with
        the number of values (seconds for millions): for one key's values, by prefix and in
        pages, see `get_tag_values`."""
        return self._query("tags", self._op_tags)

    def get_tag_values(
        self,
        key: str,
        *,
        prefix: str = "",
        page_size: int = 1_000,
        token: str | None = None,
    ) -> TagValuesPage:
        """One page of the values of the tag ``key`` that start with ``prefix``, each with
        how many events carry it; pass the page's ``next_token`` to get the next one (None on
        the last page).

        Values come in the order of their first 200 characters compared by code point (then
        by their SHA-256, for values alike that far), read through an index of the tag
        summary: a page costs the same at 10M events as at 1,000, whatever the number of
        values. Counts are exact, the events not yet folded into the summary included. A walk
        sees values added meanwhile if they sort after its last page."""
        check_tag_key(key)
        check_text(prefix, "prefix")
        check_size(page_size, "page_size")
        return self._query("tag_values", lambda: self._op_tag_values(key, prefix, page_size, token))

    def aggregate(
        self,
        event_filter: EventFilter | None = None,
        group_by: GroupBy = "event_type",
        *,
        tag_key: str | None = None,
    ) -> list[AggregateRow]:
        """Count the events matching ``event_filter`` per group, with the first and last
        timestamp of each, sorted by key. ``group_by`` is ``"event_type"``, ``"tag"`` (the
        values of ``tag_key``; events without that tag are left out), or a UTC time bucket:
        ``"minute"``, ``"hour"`` or ``"day"`` (keys like ``2026-01-01T00:00:00Z``). The
        filter's order, limit and offset do not apply.

        Grouped by type or bucket, for a filter of types and a window on the bucket boundaries,
        the answer comes from the summaries."""
        self._aggregate_args(group_by, tag_key)
        criteria = normalize(event_filter).unpaged()
        return self._query("aggregate", lambda: self._op_aggregate(criteria, group_by, tag_key))

    def get_page(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        token: str | None = None,
        include_archived: bool = False,
    ) -> Page:
        """One page of the events matching ``event_filter``, in its order; pass the page's
        ``next_token`` to get the next one.

        A walk is pinned to the head at its first page: it returns each event stored by then
        exactly once, however many events are appended meanwhile (read those with a new walk,
        or follow the head with ``read(after=...)``). ``next_token`` is None on the last page.
        The filter may not set limit or offset. ``include_archived`` reads archived events too
        (pass it with every page of a walk)."""
        criteria, until, key, position = self._page_start(event_filter, page_size, token)
        # One event more than the page, to know whether another page follows.
        pinned, events = self._query(
            "page",
            lambda: self._op_keyset_rows(
                criteria, until, key, position, page_size + 1, 0, include_archived
            ),
        )
        return self._page(criteria, pinned, events, page_size)

    def paginate(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        include_archived: bool = False,
    ) -> Generator[list[SequencedEvent], None, None]:
        """KeysetWalk the events matching ``event_filter`` page by page (see `get_page`)."""
        token: str | None = None
        while True:
            page = self.get_page(
                event_filter, page_size=page_size, token=token, include_archived=include_archived
            )
            if page.events:
                yield page.events
            if page.next_token is None:
                return
            token = page.next_token

    def stream_events(
        self,
        event_filter: EventFilter | None = None,
        *,
        batch_size: int = 1_000,
        include_archived: bool = False,
    ) -> Generator[SequencedEvent, None, None]:
        """Every event matching ``event_filter``, in its order, one at a time, in constant
        memory: the events are read ``batch_size`` at a time, each batch after the last event
        of the previous one (keyset paging), so the filter's offset and limit apply to the
        whole stream. Batch n+1 is read (by a worker thread, or a task) while the consumer
        takes batch n. In log order, over the live log and without limit or offset, the
        batches are consecutive ranges of positions instead, two read at once, as
        `export_arrow` reads them.

        The stream is pinned to the head when it starts (events appended meanwhile are for
        `subscribe`). No connection is held between batches, so a consumer may take its time;
        one that stops early should close the iterator (the async store's is an async
        generator): the read ahead is then waited for (sync) or cancelled (async) at once, and
        nothing is left open. Raises
        `QueryError` at the call for a malformed filter or batch size. ``include_archived``
        streams archived events too, in the same order."""
        criteria = normalize(event_filter)
        check_size(batch_size, "batch_size")
        return self._stream(criteria, batch_size, include_archived)

    def _stream(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> Generator[SequencedEvent, None, None]:
        if self._export_by_ranges(criteria, archived):
            # In log order, over the live log, without limit or offset: consecutive ranges of
            # positions, two read at once, as the export reads them.
            def read_range(start: int, end: int) -> list[SequencedEvent]:
                _, events = self._query(
                    "stream",
                    lambda: self._op_keyset_rows(criteria, end, None, start, end - start, 0),
                )
                return events

            ranges = _ranges(read_range, self.head(), batch_size, "stream")
            try:
                for events in ranges:
                    for event in events:
                        yield event
            finally:
                ranges.close()
            return

        def read(args: Keyset) -> tuple[int, list[SequencedEvent]]:
            return self._query("stream", lambda: self._op_keyset_rows(criteria, *args, archived))

        walk = _keyset_walk(
            KeysetWalk(criteria, batch_size),
            read,
            len,
            functools.partial(self._stream_last, criteria),
            "stream",
        )
        try:
            for events in walk:
                for event in events:
                    yield event
        finally:
            walk.close()

    def export_arrow(
        self,
        event_filter: EventFilter | None = None,
        *,
        batch_size: int = 65_536,
        include_archived: bool = False,
    ) -> pa.RecordBatchReader:
        """The events matching ``event_filter``, in its order, as a stream of Arrow record
        batches of `tamma_events.codec.arrow.EXPORT_SCHEMA`, in constant memory.

        Each batch is one binary ``COPY`` of at most ``batch_size`` events, read from libpq
        and decoded natively into Arrow buffers (see ``docs/archives.md``). In log order
        without limit or offset, the batches are consecutive ranges of positions, two read
        at once; otherwise each follows the last event of the previous one (keyset paging,
        as in `stream_events`). The export is pinned to the head when it starts; no
        connection is held between batches. DuckDB, Polars and ``pyarrow`` read the reader
        directly. Raises `QueryError` at the call for a malformed filter or batch size.

        With ``include_archived``, archived events are exported too, in the same order,
        from their Parquet files."""
        criteria = normalize(event_filter)
        check_size(batch_size, "batch_size")
        return pa.RecordBatchReader.from_batches(
            EXPORT_SCHEMA, self._export_batches(criteria, batch_size, include_archived)
        )

    def _export_batches(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> Generator[pa.RecordBatch, None, None]:
        if self._export_by_ranges(criteria, archived):
            ranges = self._export_ranges(criteria, batch_size)
            try:
                for batch in ranges:
                    yield batch
            finally:
                ranges.close()  # its reads in flight are cancelled (or waited for)
            return

        def read(args: Keyset) -> tuple[int, list[pa.RecordBatch]]:
            return self._query("export", lambda: self._op_export_batch(criteria, *args, archived))

        walk = _keyset_walk(
            KeysetWalk(criteria, batch_size),
            read,
            _rows_in,
            functools.partial(self._export_last, criteria),
            "export",
        )
        try:
            for batches in walk:
                for batch in batches:
                    yield batch
        finally:
            walk.close()

    def _export_ranges(
        self, criteria: Criteria, batch_size: int
    ) -> Generator[pa.RecordBatch, None, None]:
        """The log-ordered export of the live log, as `_ranges` of ``batch_size`` positions."""

        def read(start: int, end: int) -> list[pa.RecordBatch]:
            _, batches = self._query(
                "export",
                lambda: self._op_export_batch(criteria, end, None, start, end - start, 0, False),
            )
            return batches

        ranges = _ranges(read, self.head(), batch_size, "export")
        try:
            for batches in ranges:
                for batch in batches:
                    yield batch
        finally:
            ranges.close()

    def export_parquet(
        self,
        event_filter: EventFilter | None,
        path: str | os.PathLike[str],
        *,
        compression: str = "zstd",
        row_group_size: int = 131_072,
        batch_size: int = 65_536,
        progress: Callable[[int], None] | None = None,
        include_archived: bool = False,
    ) -> int:
        """Write the events `export_arrow` returns to the Parquet file ``path``; returns how
        many. The file appears whole or not at all: it is written beside ``path`` and renamed
        over it once complete and synced. ``progress(events_written)`` is called after every
        batch."""
        batches = self.export_arrow(
            event_filter, batch_size=batch_size, include_archived=include_archived
        )
        return write_parquet(
            batches,
            path,
            compression=compression,
            row_group_size=row_group_size,
            progress=progress,
        )

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        query_or_filter: Query | EventFilter | None = None,
        *,
        after: int | None = None,
        buffer: int = 1_000,
        poll_interval: float = 5.0,
        retry_for: float = 60.0,
    ) -> Subscription:
        """Follow the log: the events matching ``query_or_filter`` (a DCB `Query`, an
        `EventFilter`, or None for all) at positions after ``after`` (from the start when
        None; ``after=store.head()`` for new events only), then each new matching event as it
        is committed, in log order, each exactly once.

        The subscription is an iterator (``async for`` with the async store, which must call
        this inside its event loop) and a context manager; its ``position`` is the last
        position delivered, the ``after`` to resume from. It holds at most ``buffer`` events:
        when its consumer is slow, it reads less often instead of growing. It is woken by the
        store's notifications (one LISTEN connection per store, which also reads the head
        every few seconds of silence); while that connection is down, it reads every
        ``poll_interval`` seconds. A read that fails for a lost connection is retried from the
        same position for up to ``retry_for`` seconds. ``stop()`` (from any thread) or leaving
        the ``with`` block ends it.

        An `EventFilter` here selects events only: it may not set limit, offset or an order
        other than the log's."""
        start = after_position(after)
        check_subscription_options(buffer, poll_interval, retry_for)
        fetch = self._reader(query_or_filter, "subscription")
        listener = self._ensure_listener()
        options: dict[str, Any] = {
            "after": start,
            "buffer": buffer,
            "poll_interval": poll_interval,
            "retry_for": retry_for,
            "on_close": self._forget,
        }
        subscription = Subscription(fetch, listener, **options)
        with self._subscriptions_lock:
            if self._closed:
                raise StorageError("the store is closed")
            self._subscriptions.add(subscription)
        return subscription

    def _reader(
        self, query_or_filter: Query | EventFilter | None, kind: str
    ) -> Callable[[int, int], tuple[list[SequencedEvent], int]]:
        """How a subscription or a consumer (``kind``) reads: ``fetch(after, limit)`` returns
        at most ``limit`` events matching ``query_or_filter`` after ``after``, and the position
        read up to (see `tamma_events.streaming.subscriptions.ReadAfter`). The query is
        validated now, not at the first read."""
        if query_or_filter is None or isinstance(query_or_filter, Query):
            query = query_or_filter
            query_shape(query, [])

            def fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return self._run(kind, lambda: self._op_read_after(query, after, limit))

            return fetch
        if isinstance(query_or_filter, EventFilter):
            criteria = subscription_criteria(query_or_filter)

            def fetch_filtered(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return self._run(kind, lambda: self._op_filter_after(criteria, after, limit))

            return fetch_filtered
        verb = "subscribe" if kind == "subscription" else kind
        raise QueryError(
            f"{verb} takes a Query, an EventFilter or None, not {type(query_or_filter).__name__}",
        )

    # -- durable consumers ---------------------------------------------------------------------

    def consumer(
        self,
        name: str,
        query_or_filter: Query | EventFilter | None = None,
        *,
        batch_size: int = 500,
        start: int | str = "beginning",
        partition_by: str | None = None,
        partitions: int | None = None,
        lease_time: float = 10.0,
        max_attempts: int = 5,
        retry_delay: float = 0.5,
        worker: str | None = None,
    ) -> Consumer:
        """A worker of the durable consumer ``name``: the events matching ``query_or_filter``
        (a DCB `Query`, an `EventFilter` selecting events, or None for all), delivered by its
        `Consumer.run` to a handler in batches of up to ``batch_size``, from the
        checkpoints stored in the store's schema (see ``docs/consumers.md``).

        ``start`` is where a consumer that does not exist yet begins: ``"beginning"``,
        ``"end"`` (the head, when it is first run) or a position to start after. With
        ``partition_by`` (a tag key), its events are split into ``partitions`` (default 16)
        by that tag's value: events of one value stay in order on one worker, and the
        workers running the same ``name`` share the partitions, each holding its own for
        ``lease_time`` seconds at a time (renewed every third of it). A worker that dies has
        its partitions taken over once their leases run out. ``max_attempts`` and
        ``retry_delay`` govern a failing handler, before its event is parked. ``worker`` names
        this worker (by default its host, process and a random suffix)."""
        if partitions is None:
            partitions = 1 if partition_by is None else 16
        return Consumer(
            self,
            name,
            query_or_filter,
            batch_size=batch_size,
            start=start,
            partition_by=partition_by,
            partitions=partitions,
            lease_time=lease_time,
            max_attempts=max_attempts,
            retry_delay=retry_delay,
            worker=worker,
        )

    def consumers(self, name: str | None = None) -> list[ConsumerState]:
        """The durable consumers (or the one named ``name``): each partition's checkpoint, the
        worker holding it, its lag in positions and seconds; the workers alive; how many
        events are parked."""
        if name is not None:
            check_name(name)
        statements = consumer_statements(self.schema)
        return self._run("consumers", lambda: statements.op_states(name))

    def reset_consumer(self, name: str, *, to: int, force: bool = False) -> int:
        """Set every checkpoint of consumer ``name`` to position ``to`` (its next events are
        those after it); returns how many partitions were reset. Refused with
        `ConsumerConflict` while its workers hold leases or handle a batch (it waits up to
        2 s for one to end), unless ``force``: it then waits for the batches in hand, and the
        workers lose their partitions at their next checkpoint and read again from ``to``."""
        check_name(name)
        position = after_position(to)
        statements = consumer_statements(self.schema)
        return self._run("consumers", lambda: statements.op_reset(name, position, force))

    def drop_consumer(self, name: str, *, force: bool = False) -> int:
        """Remove consumer ``name`` with its checkpoints, workers and parked events; returns
        how many partitions it had. Refused with `ConsumerConflict` while its workers hold
        leases or handle a batch, unless ``force``: they then lose their partitions at their
        next checkpoint, and stop with `ConsumerConflict` when they next balance."""
        check_name(name)
        statements = consumer_statements(self.schema)
        return self._run("consumers", lambda: statements.op_drop(name, force))

    def parked_events(self, name: str) -> list[ParkedEvent]:
        """The events consumer ``name`` parked, in position order, with their last error."""
        check_name(name)
        statements = consumer_statements(self.schema)
        return self._run("consumers", lambda: statements.op_parked(name))

    def replay_parked(self, name: str, positions: Iterable[int] | None = None) -> list[int]:
        """Ask for the parked events of consumer ``name`` at ``positions`` (all when None) to
        be handed to its handler again: the worker holding each one's partition does it once,
        and removes it when the handler succeeds. Returns the positions asked for."""
        check_name(name)
        wanted = None if positions is None else [after_position(p) for p in positions]
        statements = consumer_statements(self.schema)
        return self._run("consumers", lambda: statements.op_request_replay(name, wanted))

    def _consumer_started(self, consumer: Consumer) -> None:
        with self._subscriptions_lock:
            self._consumers.add(consumer)

    def _consumer_ended(self, consumer: Consumer) -> None:
        with self._subscriptions_lock:
            self._consumers.discard(consumer)

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscriptions)

    def _forget(self, subscription: Subscription) -> None:
        with self._subscriptions_lock:
            self._subscriptions.discard(subscription)

    def _ensure_listener(self) -> Listener:
        with self._subscriptions_lock:
            if self._closed:
                raise StorageError("the store is closed")
            if self._listener is None:
                dsn = self.dsn
                pool = self._require_pool()

                def connect() -> psycopg.Connection[Any]:
                    # The pool's settings as they are now: a callable may rotate credentials.
                    pool_kwargs: Any = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
                    kwargs = {
                        **(pool_kwargs or {}),
                        **connection_kwargs(dsn, "tamma-events listener"),
                    }
                    return psycopg.Connection.connect(dsn, **kwargs)

                self._listener = Listener(
                    connect, self._statements.append_channel, self._statements.head_position
                )
                self._listener.start()
            return self._listener

    # -- more ------------------------------------------------------------------------------

    def explain(
        self,
        event_filter: EventFilter | None = None,
        *,
        count: bool = False,
        analyze: bool = False,
    ) -> dict[str, Any]:
        """PostgreSQL's plan (``EXPLAIN (FORMAT JSON)``, with ``ANALYZE`` when asked) of the
        statement `get_events` (or, with ``count``, `count_events`) runs for ``event_filter``:
        to see which index serves a filter."""
        criteria = normalize(event_filter)
        return self._run("explain", lambda: self._op_explain(criteria, count, analyze))

    # -- snapshots -------------------------------------------------------------------------

    def create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Snapshot:
        """Save ``state`` (any value msgspec encodes as JSON) as folded from the log up to
        position ``version`` (0 to the head) under ``aggregate_id``. Saving the same version
        again replaces it. Raises `ValidationFailed` naming the field otherwise."""
        return self._run("snapshot", lambda: self._op_create_snapshot(aggregate_id, version, state))

    def get_snapshot(self, aggregate_id: str, *, state_type: Any = Any) -> Snapshot | None:
        """The latest snapshot of ``aggregate_id`` (its highest version), its state decoded as
        ``state_type`` (plain JSON values by default), or None."""
        return self._run("snapshot", lambda: self._op_get_snapshot(aggregate_id, state_type))

    def project(
        self,
        query: Query | None,
        initial: _S,
        fold: Callable[[_S, SequencedEvent], _S],
        *,
        key: str | None = None,
        snapshot_every: int | None = None,
        state_type: Any = None,
        batch_size: int = 1_000,
    ) -> Projection:
        """Fold the events matching ``query`` into a state: ``fold(state, event)`` for each, in
        log order, from ``initial``.

        With ``key``, it starts from the latest snapshot saved under that key (its state
        decoded as ``state_type``, by default the type of ``initial``) and folds only the
        events after it; with ``snapshot_every`` as well, it saves a snapshot each time that
        many events have been folded. A key must always name the same query and fold. The
        result holds the state and the head it is current at. It reads the primary, on one
        connection, ``batch_size`` events at a time."""
        self._project_args(key, snapshot_every, batch_size)
        return self._run(
            "project",
            lambda: self._op_project(
                query, initial, fold, key, snapshot_every, state_type, batch_size
            ),
        )

    # -- integrity and maintenance ---------------------------------------------------------

    def verify(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        batch_size: int = 5_000,
        progress: Callable[[int, int], None] | None = None,
        include_archived: bool = True,
    ) -> IntegrityReport:
        """Recompute the hash chain over positions ``start`` to ``end`` (default: all) and
        report the first position where it breaks; see `tamma_events.ops.verifying.verify`.

        When events were compacted and the range reaches into them, every archive file is
        checked first, whole (its SHA-256 against the manifest, and the chain through every
        event it holds, from the genesis hash), then the live log from the last archived hash.
        A broken archive is reported with its range. ``include_archived=False`` checks the
        live log only, anchored on the manifest's last hash.

        An ``end`` past the head stops at the head. A ``start`` past the head (nothing is
        stored there yet) or after ``end`` is `ValidationFailed` naming ``start``: a
        mistaken range, not a broken chain.

        A maintenance job: it reads whole ranges through a server-side cursor, on a sync
        connection; the async store runs it in a worker thread, which calls ``progress``."""
        return self._maintenance(
            lambda conn: self._verify_on(conn, start, end, batch_size, progress, include_archived)
        )

    def compact_events(
        self,
        before: datetime | str,
        *,
        archive_dir: str | os.PathLike[str] | None = None,
        file_events: int = 1_000_000,
        progress: Callable[[int, int], None] | None = None,
        fault: Callable[[str, int, int], None] | None = None,
    ) -> int:
        """Move the events recorded before ``before`` out of PostgreSQL into verified Parquet
        archives; returns how many events left the log (see `tamma_events.ops.archiving`).

        Files go to ``archive_dir`` (default: the store's, else `default_archive_dir`), at
        most ``file_events`` events each. It is idempotent and safe to
        interrupt: run it again to finish. Only the role that owns the schema can compact (the
        application role of `grant_app_role` cannot delete). ``progress(done, total)`` follows
        the events archived; ``fault(step, first, last)`` is called after each step of each
        file (``"written"``, ``"verified"``, ``"recorded"``, ``"compacted"``), for tests that
        interrupt a compaction. A maintenance job, like `verify`."""
        when = parse_before(before)
        check_size_any(file_events, "file_events")
        return self._maintenance(
            lambda conn: self._compact_on(conn, when, archive_dir, file_events, progress, fault)
        )

    def _maintenance(self, job: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``job`` on a connection of the store's pool."""
        with self._connection() as conn:
            return job(conn)

    def grant_app_role(self, role: str, *, create: bool = True) -> None:
        """Give ``role`` what an application needs and nothing more: read everything, append
        events (INSERT on ``events``: a trigger ties each write to the head, which the role
        locks through a function and cannot update), and save snapshots. It cannot update,
        delete or truncate events, move the head, compact, or change the schema.

        With ``create`` the role is created (NOLOGIN) if it does not exist; give it a login and
        password yourself, or grant it to a login role. Skip this if you manage roles yourself.
        """
        self._run("grant", lambda: self._op_grant(role, create))

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A block whose appends commit together when it exits normally, or not at all.

        The first append in the block takes the head lock and holds it until the block ends, so
        other writers wait meanwhile: keep the block short. Each append's condition is checked
        inside the transaction and sees the block's earlier appends.
        """
        with self._connection() as conn:
            conn.execute(BEGIN)
            tx = Transaction(self, conn)
            try:
                yield tx
                run(conn, self._op_tx_commit(tx._state))
            except psycopg.Error as exc:
                rollback(conn)
                raise storage_error(exc, "the transaction") from exc
            except BaseException:
                rollback(conn)
                raise
            finally:
                tx._closed = True


class Transaction:
    """Appends and reads inside `EventStore.transaction`; they commit together."""

    def __init__(self, store: EventStore, conn: psycopg.Connection[Any]) -> None:
        self._store = store
        self._conn = conn
        self._state = TransactionState()
        self._closed = False

    @property
    def connection(self) -> psycopg.Connection[Any]:
        """The transaction's connection, for statements of the caller's own (a projection's
        tables, say): they commit or roll back with the block's appends. Leave the
        transaction itself alone (no COMMIT, ROLLBACK or SAVEPOINT of the caller's)."""
        if self._closed:
            raise StorageError("the transaction has ended")
        return self._conn

    def append(
        self, event: DomainEvent | dict[str, Any], condition: AppendCondition | None = None
    ) -> int:
        """Append one event in the transaction; returns its position."""
        return self.append_batch([event], condition)

    def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
    ) -> int:
        """Append a batch in the transaction; returns its last position. A failed append
        raises and leaves the transaction usable; nothing of that append is written."""
        if self._closed:
            raise StorageError("the transaction has ended")
        request = self._store._full_request(events, condition)
        return run(self._conn, self._store._op_tx_append(self._state, request), owned=False)

    def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        """`EventStore.read` inside the transaction: it sees the block's own appends."""
        if self._closed:
            raise StorageError("the transaction has ended")
        result = run(self._conn, self._store._op_read(query, after, limit, backwards), owned=False)
        if limit is None and self._state.head is not None:
            result.head = self._state.head
        return result


def _rows_in(batches: list[pa.RecordBatch]) -> int:
    return sum(batch.num_rows for batch in batches)


def _ranges(
    read: Callable[[int, int], _T], until: int, size: int, name: str
) -> Generator[_T, None, None]:
    """``read(start, end)`` of the consecutive ranges of ``size`` positions (after ``start``,
    up to ``end``) from the first position up to ``until`` (the head when the walk starts),
    `_READ_STREAMS` at once (each its own COPY and connection), yielded in order. The server
    producing COPY rows bounds a single stream; two keep it busy on two cores while the rows
    are decoded.

    Leaving (the walk ends, fails or is closed) waits for the threads' reads in flight, so their
    connections are back in the pool when the consumer's close() returns, or cancels the
    tasks'."""
    reading: deque[Future[_T]] = deque()
    start = 0
    with ThreadPoolExecutor(_READ_STREAMS, thread_name_prefix=f"tamma-events-{name}") as pool:
        try:
            while start < until or reading:
                while start < until and len(reading) < _READ_STREAMS:
                    end = min(start + size, until)
                    reading.append(pool.submit(read, start, end))
                    start = end
                yield reading.popleft().result()
        finally:
            for future in reading:
                future.cancel()


def _keyset_walk(
    walk: KeysetWalk,
    read: Callable[[Keyset], tuple[int, _T]],
    count: Callable[[_T], int],
    last: Callable[[_T], Callable[[], tuple[Any, int]]],
    name: str,
) -> Generator[_T, None, None]:
    """The batches of a keyset walk (`tamma_events.ops.reading.KeysetWalk`), pinned to the head at
    its first read: ``read(args)`` returns ``until`` and a batch holding ``count(batch)`` events,
    ``last(batch)()`` the keyset of its last event.

    Batch n+1 is read (by a worker thread named after ``name``, or a task) while the consumer
    takes batch n. Leaving (the walk ends, fails or is closed) waits for the thread's read in
    flight, so its connection is back in the pool when the consumer's close() returns, or
    cancels the task's."""
    with ThreadPoolExecutor(1, thread_name_prefix=f"tamma-events-{name}") as ahead:
        reading = ahead.submit(read, walk.first)
        while True:
            until, batch = reading.result()
            following = walk.after(until, count(batch), last(batch))
            if following is not None:
                reading = ahead.submit(read, following)
            yield batch
            if following is None:
                return
