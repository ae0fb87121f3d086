"""`AsyncEventStore`: the store for asyncio services, on psycopg's async connections.

It is `EventStore`'s API with ``async def``: appends, DCB reads, queries, pages, snapshots and
projections, transactions and appends in a caller's transaction; ``stream_events``,
``paginate``, ``export_arrow`` and ``subscribe`` are async iterators. No thread is involved
(but for the two maintenance jobs below): connections come from a
`psycopg_pool.AsyncConnectionPool`, the LISTEN connection of its subscriptions is a task, and
the read-ahead of streams and exports is a task.

Its database work is the sync store's own code: every operation is a generator in
`tamma_events._core`, driven here by `tamma_events._ops.run_async`. Two things to know:

- Concurrent appends from the tasks of one event loop share transactions (group commit), as
  the sync store's threads do.
- The maintenance jobs ``verify`` and ``compact_events`` read whole ranges of the log through a
  server-side cursor and read or write archive files: they run in a worker thread, on a sync
  connection of their own, and are awaited like the rest.

    async with AsyncEventStore(dsn) as store:
        await store.append(DomainEvent(...))
        async for event in store.stream_events(EventFilter(event_types=["X"])):
            ...
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import psycopg
import pyarrow as pa
from psycopg import pq
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import embedded
from ._core import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_POOL_TIMEOUT,
    Keyset,
    StoreCore,
    TxState,
    Walk,
    check_size,
    check_size_any,
    check_timeout,
    connection_kwargs,
    decode_document,
    decode_events,
    event_key,
    make_pool,
    moment,
    pool_stats,
    retryable,
    server_wrote,
    storage_error,
    subscription_criteria,
    unreachable,
)
from ._group import AppendRequest, AsyncGroupCommit
from ._ops import Op, rollback_async, run_async
from ._pycodec import DEFAULT_MAX_EVENT_BYTES
from .arrow import EXPORT_SCHEMA, parquet_writer
from .errors import (
    STORAGE_ERROR,
    EventStoreError,
    QueryError,
    StorageError,
    ValidationFailed,
)
from .filters import AggregateRow, Criteria, EventFilter, GroupBy, Page, normalize
from .integrity import IntegrityReport
from .metrics import prometheus_registry
from .model import (
    AppendCondition,
    DomainEvent,
    Projection,
    Query,
    ReadResult,
    SequencedEvent,
    Snapshot,
    StoreStats,
)
from .replicas import (
    Behind,
    Consistency,
    Replica,
    ReplicaSet,
    redact,
    replay_state,
    replica_failure,
    wal_position,
)
from .schema import migrate_op, require_current_op
from .sql import after_position, query_shape
from .stream import AsyncListener, Subscription, check_subscription_options, connection_lost

__all__ = ["AsyncEventStore", "AsyncTransaction"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_S = TypeVar("_S")

_EXPORT_STREAMS = 2


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(msgspec.json.decode, conn)


@asynccontextmanager
async def live_connection(
    pool: AsyncConnectionPool[Any], timeout: float | None = None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """`tamma_events.store.live_connection` for an async pool."""
    tries = pool.max_size + 1
    for attempt in range(tries):
        stack = AsyncExitStack()
        conn = await stack.enter_async_context(pool.connection(timeout=timeout))
        if attempt + 1 < tries and server_wrote(conn):
            try:
                await AsyncConnectionPool.check_connection(conn)
            except Exception:
                await stack.aclose()
                continue
        async with stack:
            yield conn
        return


class AsyncEventStore(StoreCore):
    """A DCB event store on PostgreSQL, for asyncio.

    Takes `EventStore`'s arguments (``pool`` is then a caller's `AsyncConnectionPool`).
    Nothing connects until `open` (or ``async with``), which starts the embedded server when
    no DSN is given, opens the pools and migrates the schema.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        pool: AsyncConnectionPool[Any] | None = None,
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
        self._listener: AsyncListener | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._registry: Any = None
        self._group = AsyncGroupCommit(self._write_group, max_group_events)
        self._fold_task: asyncio.Task[None] | None = None
        self.embedded: embedded.EmbeddedServer | None = None

    def _make_pool(self, dsn: str, name: str, timeout: float) -> AsyncConnectionPool[Any]:
        min_size, max_size, connect_timeout, _, max_lifetime, max_idle = self._pool_settings
        return make_pool(
            AsyncConnectionPool,
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

    async def open(self) -> AsyncEventStore:
        """Connect (and migrate, unless ``migrate=False``); returns the store."""
        if self._opened:
            return self
        if self._closed:
            raise StorageError("the store is closed")
        self._opened = True
        connect_timeout, pool_timeout = self._pool_settings[2:4]
        if self._pool is None:
            dsn = self._dsn or os.environ.get("TAMMA_EVENTS_DSN") or None
            if dsn is None:
                # Starting a server is a one-off subprocess wait, done before any service work.
                self.embedded = embedded.start(self._data_dir)
                dsn = self.embedded.dsn
            self._pool = self._make_pool(dsn, f"tamma-events:{self.schema}", pool_timeout)
            try:
                # One connection first: a server that is not there is one clear error now,
                # not the pool's retries until its timeout.
                try:
                    probe = await psycopg.AsyncConnection.connect(
                        dsn, **connection_kwargs(dsn, connect_timeout=connect_timeout)
                    )
                except psycopg.OperationalError as exc:
                    raise unreachable(exc, dsn, connect_timeout).with_traceback(None) from None
                await probe.close()
                # The server is there: the pool's first connections get the time a call
                # would wait for one.
                await self._pool.open(wait=True, timeout=pool_timeout)
            except EventStoreError:
                await self._pool.close()
                self._closed = True
                raise
            except Exception as exc:
                await self._pool.close()
                self._closed = True
                raise storage_error(
                    exc, "connecting to PostgreSQL", dsn=redact(dsn)
                ).with_traceback(None) from None
        for replica_dsn in self._replica_dsns:
            replica_pool = self._make_pool(
                replica_dsn, f"tamma-events:{self.schema}:replica", self._replicas.timeout
            )
            await replica_pool.open(wait=False)
            self._replicas.members.append(Replica(replica_dsn, replica_pool))
        try:
            if self._migrate_on_open:
                await self.migrate()
            else:
                async with self._connection() as conn:
                    try:
                        await run_async(conn, require_current_op(self.schema))
                    except psycopg.Error as exc:
                        raise storage_error(exc, "reading the schema's version") from exc
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def dsn(self) -> str:
        """The connection string of the store's server (with its password: do not log it)."""
        pool = self._require_pool()
        conninfo = pool.conninfo
        return conninfo() if callable(conninfo) else conninfo  # type: ignore[return-value]

    def __repr__(self) -> str:
        where = "not open"
        if self._pool is not None and isinstance(self._pool.conninfo, str):
            where = redact(self._pool.conninfo)
        state = " closed" if self._closed else ""
        return f"<AsyncEventStore{state} {where!r} schema={self.schema!r}>"

    def _require_pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None or not self._opened:
            raise StorageError("the store is not open: use `async with` or `await store.open()`")
        return self._pool

    async def migrate(self) -> list[int]:
        """Apply the schema migrations not applied yet; returns their versions."""
        try:
            async with self._connection() as conn:
                return await run_async(conn, migrate_op(self.schema))
        except EventStoreError as exc:
            exc.context.setdefault("schema", self.schema)
            raise

    async def close(self) -> None:
        """End the store's subscriptions and close its pools (a caller's own pool stays
        open)."""
        if self._closed:
            return
        await self._join_fold()
        self._closed = True
        for subscription in list(self._subscriptions):
            subscription.stop()
        if self._listener is not None:
            await self._listener.aclose()
        for replica in self._replicas.members:
            await replica.pool.close()
        if self._owns_pool and self._pool is not None:
            await self._pool.close()

    async def __aenter__(self) -> AsyncEventStore:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise StorageError("the store is closed")
        pool = self._require_pool()
        try:
            async with live_connection(pool) as conn:
                if not conn.autocommit:
                    await conn.set_autocommit(True)
                if not self._owns_pool:
                    await _configure(conn)
                yield conn
        except EventStoreError as exc:
            if retryable(exc):
                with suppress(Exception):
                    await pool.check()
            raise
        except PoolTimeout as exc:
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
                with suppress(Exception):
                    await pool.check()
            raise storage_error(exc, "using a connection") from exc

    async def _run(self, kind: str, make: Callable[[], Op[_T]]) -> _T:
        """`EventStore._run`: on the primary, timed, run once more after a connection lost
        before anything was committed."""
        start = time.perf_counter()
        failed = True
        retried = False
        try:
            try:
                async with self._connection() as conn:
                    result = await run_async(conn, make())
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
                async with self._connection() as conn:
                    result = await run_async(conn, make())
            failed = False
            return result
        finally:
            self._metrics.queried(kind, time.perf_counter() - start, failed, retried)

    async def _query(self, kind: str, make: Callable[[], Op[_T]]) -> _T:
        if not self._replicas:
            return await self._run(kind, make)
        start = time.perf_counter()
        failed = True
        try:
            result = await self._on_replica(make)
            failed = False
            return result
        finally:
            self._metrics.queried(kind, time.perf_counter() - start, failed)

    async def _on_replica(self, make: Callable[[], Op[_T]]) -> _T:
        replicas = self._replicas
        if replicas.pending:
            # Cleared first: an append that sets it meanwhile is covered by the next read.
            replicas.pending = False
            try:
                async with self._connection() as conn:
                    replicas.wrote(await run_async(conn, wal_position()))
            except BaseException:
                replicas.pending = True
                raise
        for replica in replicas.order():
            try:
                async with live_connection(replica.pool, replicas.timeout) as conn:
                    if not await run_async(conn, self._op_caught_up(replica)):
                        break
                    result = await run_async(conn, make())
            except Behind:
                break
            except (psycopg.Error, PoolTimeout) as exc:
                if not replica_failure(exc):
                    raise storage_error(exc, "reading from a replica") from exc
                replicas.failed(replica, exc)
                if connection_lost(exc):
                    with suppress(Exception):
                        await replica.pool.check()
                continue
            replicas.served(replica)
            return result
        replicas.fell_back()
        async with self._connection() as conn:
            return await run_async(conn, make())

    def pool_stats(self) -> dict[str, int]:
        """The primary's connection pool (see `EventStore.pool_stats`)."""
        return pool_stats(self._require_pool().get_stats())

    def metrics(self) -> dict[str, Any]:
        """A snapshot of the store's metrics (see `EventStore.metrics`). A plain call, like
        `pool_stats`: it asks the database nothing (`measure_replicas` does)."""
        return self._snapshot(
            self.pool_stats(), self._listener, self._positions(), self._replica_report()
        )

    def _positions(self) -> list[int]:
        return [s.position for s in self._subscriptions if not s.stopped]

    def _replica_report(self) -> list[dict[str, Any]]:
        return [r.status() for r in self._replicas.members]

    async def measure_replicas(self) -> list[dict[str, Any]]:
        """Ask each replica how far behind the primary it is now (see
        `EventStore.measure_replicas`)."""
        if not self._replicas:
            return []
        try:
            async with self._connection() as conn:
                primary: int | None = await run_async(conn, wal_position())
        except (psycopg.Error, EventStoreError):
            primary = None
        for replica in self._replicas.members:
            if replica.left_out:
                continue
            try:
                async with live_connection(replica.pool, self._replicas.timeout) as conn:
                    replica.measured(primary, await run_async(conn, replay_state()))
            except (psycopg.Error, PoolTimeout, EventStoreError):
                replica.measured(primary, None)
        return self._replica_report()

    # -- appends ---------------------------------------------------------------------------

    async def append(
        self,
        event: DomainEvent | dict[str, Any],
        condition: AppendCondition | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> int:
        """Append one event; returns its position (see `EventStore.append`)."""
        return await self.append_batch([event], condition, conn=conn)

    async def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> int:
        """Append events atomically at consecutive positions; returns the last position (see
        `EventStore.append_batch`; ``conn`` is a caller's ``AsyncConnection``)."""
        start = time.perf_counter()
        try:
            batch, check, prepared = self._request(events, condition)
            if prepared is None:
                if conn is not None:
                    raise ValidationFailed(
                        f"a batch in a caller's transaction holds at most chunk_events"
                        f" ({self.chunk_events}) events, got {len(batch)}",
                        {"field": "events"},
                    )
                async with self._connection() as own:
                    position, size = await run_async(
                        own, self._op_append_large(batch, condition, check)
                    )
            else:
                request = AppendRequest(batch, prepared, condition, check)
                if conn is not None:
                    position = await self._append_in(conn, request)
                else:
                    position = await self._group.submit(request)
                size = len(prepared.buffer)
        except EventStoreError as exc:
            self._metrics.append_failed(exc.code, time.perf_counter() - start)
            raise
        except BaseException:
            self._metrics.append_failed(STORAGE_ERROR, time.perf_counter() - start)
            raise
        self._metrics.appended(len(batch), size, time.perf_counter() - start)
        if conn is None and self._fold_due(position):
            self._fold_task = asyncio.get_running_loop().create_task(self._fold_summaries())
        return position

    async def _fold_summaries(self) -> None:
        """`EventStore._fold_summaries`, as a task of the store's loop."""
        try:
            async with self._connection() as conn:
                await run_async(conn, self._op_fold())
        except Exception as exc:
            logger.warning("tamma-events: folding the query summaries failed: %s", exc)
        finally:
            self._folding = False

    async def fold_summaries(self) -> int:
        """Fold every event appended so far into the query summaries now (see
        `EventStore.fold_summaries`); returns the folded position."""
        await self._join_fold()
        return await self._run("fold", lambda: self._op_fold(0, wait=True))

    async def _join_fold(self) -> None:
        task = self._fold_task
        if task is not None and task is not asyncio.current_task():
            await asyncio.shield(task)

    async def _write_group(self, requests: list[AppendRequest]) -> None:
        """`EventStore._write_group` on an async connection."""
        try:
            try:
                async with self._connection() as conn:
                    await run_async(conn, self._op_write_group(requests))
            except EventStoreError as exc:
                if not retryable(exc):
                    raise
                logger.info("tamma-events: %s; appending again", exc.message)
                for request in requests:
                    request.reset()
                async with self._connection() as conn:
                    await run_async(conn, self._op_write_group(requests))
        except EventStoreError as exc:
            for request in requests:
                if not request.done:
                    request.fail(exc)

    async def _append_in(self, conn: psycopg.AsyncConnection[Any], request: AppendRequest) -> int:
        if not isinstance(conn, psycopg.AsyncConnection):
            raise ValidationFailed(
                f"conn must be a psycopg.AsyncConnection, got {type(conn).__name__}",
                {"field": "conn"},
            )
        op = self._op_tx_append(TxState(), request)
        try:
            if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                async with conn.transaction():
                    return await run_async(conn, op, owned=False)
            return await run_async(conn, op, owned=False)
        except psycopg.Error as exc:
            raise storage_error(exc, "appending in the caller's transaction") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        """A block whose appends commit together when it exits normally, or not at all (see
        `EventStore.transaction`)."""
        async with self._connection() as conn:
            await conn.execute("BEGIN")
            tx = AsyncTransaction(self, conn)
            try:
                yield tx
                await run_async(conn, self._op_tx_commit(tx._state))
            except psycopg.Error as exc:
                await rollback_async(conn)
                raise storage_error(exc, "the transaction") from exc
            except BaseException:
                await rollback_async(conn)
                raise
            finally:
                tx._closed = True

    # -- reads -----------------------------------------------------------------------------

    async def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        """The events matching ``query`` after ``after`` (see `EventStore.read`)."""
        return await self._run("read", lambda: self._op_read(query, after, limit, backwards))

    async def get_event(self, event_id: uuid.UUID | str) -> SequencedEvent | None:
        """The stored event with this id (live or archived), or None."""
        key = event_key(event_id)
        return await self._query("get_event", lambda: self._op_get_event(key))

    async def head(self) -> int:
        """The last position written (0 for an empty store), on the primary."""
        return await self._run("head", lambda: self._op_head())

    async def get_events(
        self, event_filter: EventFilter | None = None, *, include_archived: bool = False
    ) -> list[SequencedEvent]:
        """The events matching ``event_filter`` (see `EventStore.get_events`)."""
        criteria = normalize(event_filter)
        document = await self._query(
            "get_events", lambda: self._op_get_events(criteria, include_archived)
        )
        return decode_document(document)

    async def get_events_by_issue_id(self, issue_id: str) -> list[SequencedEvent]:
        """The events tagged ``issueId=issue_id``, in log order."""
        return await self.get_events(EventFilter(issue_ids=[issue_id]))

    async def get_events_by_time_range(
        self, start: datetime | str, end: datetime | str
    ) -> list[SequencedEvent]:
        """The events with ``start <= timestamp < end``, in timestamp order."""
        return await self.get_events(
            EventFilter(start_time=start, end_time=end, order_by="timestamp")
        )

    async def count_events(self, event_filter: EventFilter | None = None) -> int:
        """How many events `get_events` would return for ``event_filter``."""
        criteria = normalize(event_filter)
        total = await self._query("count", lambda: self._op_count(criteria))
        return self._count_result(criteria, total)

    async def get_event_types(self) -> list[str]:
        """Every event type stored, sorted."""
        return await self._query("event_types", self._op_event_types)

    async def schema_version(self) -> int:
        """The last migration applied to the store's schema: 0 when the schema holds no event
        store (a store opened with ``migrate=False`` on a schema never created)."""
        return await self._run("schema_version", lambda: self._op_schema_version())

    async def stats(self) -> StoreStats:
        """The store at a glance: head, live and archived events, events per type, tag keys
        and values, archives, table sizes, schema and server versions, and the codec. Read on
        the primary, from summaries and the catalog: its cost does not grow with the log."""
        return await self._run("stats", lambda: self._op_stats())

    async def get_tags(self) -> dict[str, list[str]]:
        """Every tag key stored, with its distinct values, both sorted."""
        return await self._query("tags", self._op_tags)

    async def aggregate(
        self,
        event_filter: EventFilter | None = None,
        group_by: GroupBy = "event_type",
        *,
        tag_key: str | None = None,
    ) -> list[AggregateRow]:
        """Count the events matching ``event_filter`` per group (see `EventStore.aggregate`)."""
        self._aggregate_args(group_by, tag_key)
        criteria = normalize(event_filter).unpaged()
        return await self._query(
            "aggregate", lambda: self._op_aggregate(criteria, group_by, tag_key)
        )

    async def get_page(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        token: str | None = None,
        include_archived: bool = False,
    ) -> Page:
        """One page of the events matching ``event_filter`` (see `EventStore.get_page`)."""
        criteria, until, key, position = self._page_start(event_filter, page_size, token)
        pinned, rows = await self._query(
            "page",
            lambda: self._op_keyset_rows(
                criteria, until, key, position, page_size + 1, 0, include_archived
            ),
        )
        return self._page(criteria, pinned, rows, page_size)

    async def paginate(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        include_archived: bool = False,
    ) -> AsyncGenerator[list[SequencedEvent], None]:
        """Walk the events matching ``event_filter`` page by page."""
        token: str | None = None
        while True:
            page = await self.get_page(
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
    ) -> AsyncGenerator[SequencedEvent, None]:
        """Every event matching ``event_filter``, in its order, in constant memory, as an
        async iterator (see `EventStore.stream_events`). Malformed arguments raise at the
        call. A consumer that stops early should ``await stream.aclose()`` (or iterate inside
        ``contextlib.aclosing``): the batch being read ahead is then cancelled at once rather
        than when the event loop collects the generator."""
        criteria = normalize(event_filter)
        check_size(batch_size, "batch_size")
        return self._stream(criteria, batch_size, include_archived)

    async def _stream(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> AsyncGenerator[SequencedEvent, None]:
        async def read(args: Keyset) -> tuple[int, list[str]]:
            return await self._query(
                "stream", lambda: self._op_keyset_rows(criteria, *args, archived)
            )

        walk = _keyset_walk(
            Walk(criteria, batch_size), read, len, lambda rows: self._stream_last(criteria, rows)
        )
        try:
            async for rows in walk:
                for event in decode_events(rows):
                    yield event
        finally:
            await walk.aclose()

    def export_arrow(
        self,
        event_filter: EventFilter | None = None,
        *,
        batch_size: int = 65_536,
        include_archived: bool = False,
    ) -> AsyncGenerator[pa.RecordBatch, None]:
        """The events matching ``event_filter`` as Arrow record batches of
        `tamma_events.arrow.EXPORT_SCHEMA`, in its order, as an async iterator (see
        `EventStore.export_arrow`; here rows come through psycopg's ``AsyncCopy``). Close it
        with ``aclose()`` when stopping early, as `stream_events`."""
        criteria = normalize(event_filter)
        check_size(batch_size, "batch_size")
        return self._export(criteria, batch_size, include_archived)

    async def _export(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> AsyncGenerator[pa.RecordBatch, None]:
        if self._export_by_ranges(criteria, archived):
            ranges = self._export_ranges(criteria, batch_size)
            try:
                async for batch in ranges:
                    yield batch
            finally:
                await ranges.aclose()  # its reads in flight are cancelled at once
            return

        async def read(args: Keyset) -> tuple[int, list[pa.RecordBatch]]:
            return await self._query(
                "export", lambda: self._op_export_batch(criteria, *args, archived)
            )

        walk = _keyset_walk(
            Walk(criteria, batch_size),
            read,
            lambda batches: sum(b.num_rows for b in batches),
            lambda batches: self._export_last(criteria, batches),
        )
        try:
            async for batches in walk:
                for batch in batches:
                    yield batch
        finally:
            await walk.aclose()

    async def _export_ranges(
        self, criteria: Criteria, batch_size: int
    ) -> AsyncGenerator[pa.RecordBatch, None]:
        """`EventStore._export_ranges` with tasks: two ranges read at once, yielded in
        order."""
        until = await self.head()

        async def read(start: int, end: int) -> tuple[int, list[pa.RecordBatch]]:
            return await self._query(
                "export",
                lambda: self._op_export_batch(criteria, end, None, start, end - start, 0, False),
            )

        in_flight: list[asyncio.Task[tuple[int, list[pa.RecordBatch]]]] = []
        start = 0
        try:
            while start < until or in_flight:
                while start < until and len(in_flight) < _EXPORT_STREAMS:
                    end = min(start + batch_size, until)
                    in_flight.append(asyncio.ensure_future(read(start, end)))
                    start = end
                _, batches = await in_flight.pop(0)
                for batch in batches:
                    yield batch
        finally:
            await _cancel(in_flight)

    async def export_parquet(
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
        """Write the events `export_arrow` yields to the Parquet file ``path`` (see
        `EventStore.export_parquet`); returns how many."""
        written = 0
        batches = self.export_arrow(
            event_filter, batch_size=batch_size, include_archived=include_archived
        )
        with parquet_writer(
            path,
            EXPORT_SCHEMA,
            compression=compression,
            row_group_size=row_group_size,
            progress=progress,
        ) as write:
            async for batch in batches:
                written = write(batch)
        return written

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
        """Follow the log (see `EventStore.subscribe`); iterate it with ``async for``. Call
        it inside the event loop: it starts the store's listener task."""
        start = after_position(after)
        check_subscription_options(buffer, poll_interval, retry_for)
        fetch: Callable[[int, int], Awaitable[tuple[list[SequencedEvent], int]]]
        if query_or_filter is None or isinstance(query_or_filter, Query):
            query = query_or_filter
            query_shape(query, [])

            async def fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return await self._run(
                    "subscription", lambda: self._op_read_after(query, after, limit)
                )

        elif isinstance(query_or_filter, EventFilter):
            criteria = subscription_criteria(query_or_filter)

            async def fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return await self._run(
                    "subscription", lambda: self._op_filter_after(criteria, after, limit)
                )

        else:
            raise QueryError(
                "subscribe takes a Query, an EventFilter or None,"
                f" not {type(query_or_filter).__name__}",
            )
        if self._closed:
            raise StorageError("the store is closed")
        subscription = Subscription(
            _unused_fetch,
            self._ensure_listener(),
            after=start,
            buffer=buffer,
            poll_interval=poll_interval,
            retry_for=retry_for,
            on_close=self._subscriptions.discard,
            fetch_async=fetch,
        )
        self._subscriptions.add(subscription)
        return subscription

    @property
    def subscriptions(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscriptions)

    def _ensure_listener(self) -> AsyncListener:
        if self._listener is None:
            dsn = self.dsn
            pool = self._require_pool()

            async def connect() -> psycopg.AsyncConnection[Any]:
                pool_kwargs: Any = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
                if inspect.isawaitable(pool_kwargs):
                    pool_kwargs = await pool_kwargs
                kwargs = {
                    **(pool_kwargs or {}),
                    **connection_kwargs(dsn, "tamma-events listener"),
                }
                return await psycopg.AsyncConnection.connect(dsn, **kwargs)

            self._listener = AsyncListener(
                connect, self._statements.append_channel, self._statements.head_position
            )
            self._listener.start()
        return self._listener

    # -- more ------------------------------------------------------------------------------

    async def explain(
        self,
        event_filter: EventFilter | None = None,
        *,
        count: bool = False,
        analyze: bool = False,
    ) -> dict[str, Any]:
        """PostgreSQL's plan for ``event_filter`` (see `EventStore.explain`)."""
        return await self._run(
            "explain", lambda: self._op_explain(normalize(event_filter), count, analyze)
        )

    async def create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Snapshot:
        """Save a snapshot (see `EventStore.create_snapshot`)."""
        return await self._run(
            "snapshot", lambda: self._op_create_snapshot(aggregate_id, version, state)
        )

    async def get_snapshot(self, aggregate_id: str, *, state_type: Any = Any) -> Snapshot | None:
        """The latest snapshot of ``aggregate_id``, or None."""
        return await self._run("snapshot", lambda: self._op_get_snapshot(aggregate_id, state_type))

    async def project(
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
        """Fold the events matching ``query`` into a state (see `EventStore.project`)."""
        self._project_args(key, snapshot_every, batch_size)
        return await self._run(
            "project",
            lambda: self._op_project(
                query, initial, fold, key, snapshot_every, state_type, batch_size
            ),
        )

    # -- maintenance -----------------------------------------------------------------------

    async def verify(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        batch_size: int = 5_000,
        progress: Callable[[int, int], None] | None = None,
        include_archived: bool = True,
    ) -> IntegrityReport:
        """Recompute the hash chain (see `EventStore.verify`). A maintenance job that reads
        whole ranges of the log and the archive files: it runs in a worker thread, on a sync
        connection of its own, and ``progress`` is called from that thread."""
        return await asyncio.to_thread(
            self._maintenance,
            lambda conn: self._verify_on(conn, start, end, batch_size, progress, include_archived),
        )

    async def compact_events(
        self,
        before: datetime | str,
        *,
        archive_dir: str | os.PathLike[str] | None = None,
        file_events: int = 1_000_000,
        progress: Callable[[int, int], None] | None = None,
        fault: Callable[[str, int, int], None] | None = None,
    ) -> int:
        """Move the events recorded before ``before`` into verified Parquet archives (see
        `EventStore.compact_events`); like `verify`, in a worker thread on a connection of its
        own."""
        when = moment(before)
        check_size_any(file_events, "file_events")
        return await asyncio.to_thread(
            self._maintenance,
            lambda conn: self._compact_on(conn, when, archive_dir, file_events, progress, fault),
        )

    async def grant_app_role(self, role: str, *, create: bool = True) -> None:
        """Give ``role`` what an application needs and nothing more (see
        `EventStore.grant_app_role`)."""
        await self._run("grant", lambda: self._op_grant(role, create))

    def _maintenance(self, job: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        if self._closed:
            raise StorageError("the store is closed")
        dsn = self.dsn
        try:
            conn = psycopg.Connection.connect(
                dsn, **connection_kwargs(dsn, "tamma-events maintenance")
            )
        except psycopg.Error as exc:
            raise storage_error(exc, "connecting to PostgreSQL") from exc
        with conn:
            set_json_loads(msgspec.json.decode, conn)
            return job(conn)

    @property
    def prometheus_registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` of the store's own. Its collector runs at
        scrape time, outside the event loop, so it reports `metrics` as they are, replica lag
        as `measure_replicas` last found it."""
        if self._registry is None:
            self._registry = prometheus_registry(self.metrics)
        return self._registry


class AsyncTransaction:
    """Appends and reads inside `AsyncEventStore.transaction`; they commit together."""

    def __init__(self, store: AsyncEventStore, conn: psycopg.AsyncConnection[Any]) -> None:
        self._store = store
        self._conn = conn
        self._state = TxState()
        self._closed = False

    async def append(
        self, event: DomainEvent | dict[str, Any], condition: AppendCondition | None = None
    ) -> int:
        """Append one event in the transaction; returns its position."""
        return await self.append_batch([event], condition)

    async def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
    ) -> int:
        """Append a batch in the transaction; returns its last position. A failed append
        raises and leaves the transaction usable."""
        if self._closed:
            raise StorageError("the transaction has ended")
        request = self._store._full_request(events, condition)
        return await run_async(
            self._conn, self._store._op_tx_append(self._state, request), owned=False
        )

    async def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        """`AsyncEventStore.read` inside the transaction: it sees the block's own appends."""
        if self._closed:
            raise StorageError("the transaction has ended")
        result = await run_async(
            self._conn, self._store._op_read(query, after, limit, backwards), owned=False
        )
        if limit is None and self._state.head is not None:
            result.head = self._state.head
        return result


def _unused_fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:  # pragma: no cover
    raise RuntimeError("an async subscription reads with its async fetch")


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(asyncio.CancelledError, Exception):
            await task


async def _keyset_walk(
    walk: Walk,
    read: Callable[[Keyset], Awaitable[tuple[int, _T]]],
    count: Callable[[_T], int],
    last: Callable[[_T], Callable[[], tuple[Any, int]]],
) -> AsyncGenerator[_T, None]:
    """The batches of a keyset walk (`tamma_events._core.Walk`), batch n+1 read by a task
    while the consumer takes batch n; leaving cancels the read in flight."""
    reading = asyncio.ensure_future(read(walk.first))
    try:
        while True:
            until, batch = await reading
            following = walk.after(until, count(batch), last(batch))
            if following is not None:
                reading = asyncio.ensure_future(read(following))
            yield batch
            if following is None:
                return
    finally:
        await _cancel([reading])
