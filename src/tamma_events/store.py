"""`EventStore`: the synchronous store on PostgreSQL.

Every append transaction locks the single head row first, checks its conditions, writes its
events at positions head+1.. (small groups through the ``append_group`` function in one round
trip, larger ones by binary COPY) and moves the head before it commits. Holding that lock until
the commit makes commit order equal position order, so a reader resuming after position P never
skips an event, and a condition checked under it cannot be invalidated before the commit.
Concurrent appends from the threads of one process share transactions (group commit); each
keeps its own condition and its own outcome.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import platformdirs
import psycopg
import psycopg.errors
import pyarrow as pa
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from . import _codec, embedded
from ._group import AppendRequest, GroupCommit
from ._pycodec import (
    COPY_HEADER,
    COPY_TRAILER,
    DEFAULT_MAX_EVENT_BYTES,
    PreparedBatch,
    json_rows,
)
from .archive import ArchiveReader
from .archive import compact as _compact
from .arrow import EXPORT_SCHEMA, EXPORT_SELECT, copy_batches, write_parquet
from .cache import CacheStats, QueryCache
from .errors import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    EventStoreError,
)
from .filters import (
    AggregateRow,
    Criteria,
    EventFilter,
    GroupBy,
    Page,
    check_count,
    check_text,
    decode_token,
    encode_token,
    normalize,
    parse_time,
    token_key,
)
from .integrity import IntegrityReport
from .integrity import verify as _verify
from .model import (
    AppendCondition,
    DomainEvent,
    Projection,
    Query,
    ReadResult,
    SequencedEvent,
    Snapshot,
)
from .schema import migrate as _migrate
from .sql import (
    FEW_MATCHES,
    Check,
    Select,
    Statements,
    after_position,
    condition_check,
    count_statement,
    query_shape,
    summary_aggregate,
    tag_matches,
    window_positions,
)
from .stream import Listener, Subscription, check_subscription_options, connection_lost

__all__ = ["DSN_ENV", "MAX_PAGE_SIZE", "EventStore", "Transaction"]

_T = TypeVar("_T")
_S = TypeVar("_S")

#: The DSN the store uses when none is passed.
DSN_ENV = "TAMMA_EVENTS_DSN"

_EVENT_ID_CONSTRAINT = "events_event_id_key"
# COPY data is handed to psycopg in slices of this size, so libpq sends while we slice.
_COPY_SLICE = 1 << 20
# Groups up to these sizes are written by the append function in one round trip. Measured here,
# it saves a quarter of a single append's latency; from about four events (or requests) on, the
# per-row work in PL/pgSQL and in building its parameters costs more than COPY's round trips.
_FUNCTION_MAX_EVENTS = 2
_FUNCTION_MAX_BYTES = 64 << 10
# COPY streams a log-ordered export reads at once (see `EventStore._export_ranges`).
_EXPORT_STREAMS = 2


def _connection_kwargs(dsn: str, application_name: str = "tamma-events") -> dict[str, Any]:
    """Connection settings; the application name shows in ``pg_stat_activity`` unless the DSN
    names one."""
    kwargs: dict[str, Any] = {"autocommit": True, "options": "-c TimeZone=UTC"}
    if "application_name" not in conninfo_to_dict(dsn):
        kwargs["application_name"] = application_name
    return kwargs


def _configure(conn: psycopg.Connection[Any]) -> None:
    set_json_loads(msgspec.json.decode, conn)


def _as_events(events: Iterable[DomainEvent | dict[str, Any]]) -> list[DomainEvent]:
    """The batch as a list; mappings (from JSON input) are converted to `DomainEvent`s."""
    batch = list(events)
    for index, event in enumerate(batch):
        if isinstance(event, dict):
            try:
                batch[index] = msgspec.convert(event, DomainEvent)
            except msgspec.ValidationError as exc:
                raise EventStoreError(
                    VALIDATION_FAILED, f"event {index}: {exc}", {"index": index, "field": None}
                ) from None
    return batch  # type: ignore[return-value]


def _storage_error(exc: BaseException, action: str, **context: Any) -> EventStoreError:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        context["sqlstate"] = sqlstate
    message = str(exc).strip() or type(exc).__name__
    return EventStoreError(STORAGE_ERROR, f"{action} failed: {message}", context)


def _condition_error(condition: AppendCondition, head: int) -> EventStoreError:
    after = condition.after
    where = "in the store" if after is None else f"after position {after}"
    return EventStoreError(
        APPEND_CONDITION_FAILED,
        f"an event matching the append condition exists {where}; nothing was written",
        {"after": after, "head": head},
    )


def _violated_in_group(condition: AppendCondition, earlier: list[AppendRequest]) -> bool:
    """Whether events accepted earlier in the same transaction violate ``condition``."""
    after = condition.after or 0
    query = condition.fail_if_events_match
    for request in earlier:
        for offset, event in enumerate(request.events):
            if request.first_position + offset > after and query.matches(
                event.event_type, event.tags
            ):
                return True
    return False


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise EventStoreError(
            QUERY_ERROR, f"limit must be a non-negative int or None, got {limit!r}"
        )


def _rollback(conn: psycopg.Connection[Any]) -> None:
    """Leave the connection idle (or let the pool discard it if it is broken)."""
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


_decode_events = msgspec.json.Decoder(list[SequencedEvent]).decode
_decode_event = msgspec.json.Decoder(SequencedEvent).decode
_GROUPS = ("event_type", "tag", "minute", "hour", "day")
#: The largest page `get_page` serves.
MAX_PAGE_SIZE = 100_000


def _size_of_strings(values: list[str]) -> int:
    return sum(len(value) + 56 for value in values)


def _event_rows(cur: psycopg.Cursor[Any], text: sql.Composed, params: list[Any]) -> list[str]:
    """The events a statement selects as `EVENT_JSON` rows, as their JSON texts.

    Filter statements are never prepared: a plan made for the actual values (a selective issue
    id or a whole provider, a narrow or a wide window) is worth the planning time, where a
    generic plan can be orders of magnitude off."""
    return [row[0] for row in cur.execute(text, params, prepare=False).fetchall()]


def _history_rows(
    cur: psycopg.Cursor[Any],
    archive: ArchiveReader,
    text: sql.Composed,
    params: list[Any],
) -> list[str]:
    """`_event_rows` for a statement over the whole history (`Select` with ``archived``): its
    rows are ``(event, position)``, the event NULL when it is archived; those are read from
    their archive files as the same JSON text."""
    rows = cur.execute(text, params, prepare=False).fetchall()
    return _fill_archived(cur.connection, archive, rows, 0, 1)


def _fill_archived(
    conn: psycopg.Connection[Any],
    archive: ArchiveReader,
    rows: list[Any],
    event: int,
    position: int,
) -> list[str]:
    """The JSON texts of ``rows`` (column ``event``, NULL for an archived event, whose
    position is column ``position``), the archived ones read from their files."""
    missing = [row[position] for row in rows if row[event] is None and row[position] is not None]
    if not missing:
        return [row[event] for row in rows if row[event] is not None]
    archived = iter(archive.json_texts(conn, missing))
    return [
        row[event] if row[event] is not None else next(archived)
        for row in rows
        if row[position] is not None
    ]


def _json_array(texts: list[str]) -> str:
    return "[" + ",".join(texts) + "]"


class _SortKey(msgspec.Struct):
    """What keyset paging needs of an event, decoded alone from its JSON text."""

    position: int
    timestamp: datetime
    event_type: str


_decode_key = msgspec.json.Decoder(_SortKey).decode


class EventStore:
    """A DCB event store on PostgreSQL.

    ``dsn`` selects the server; without it, ``$TAMMA_EVENTS_DSN``; without that, an embedded
    PostgreSQL 18 started in ``data_dir`` (default: the user data directory). ``pool`` lets a
    caller share its own `psycopg_pool.ConnectionPool`; the store then sets ``autocommit`` on the
    connections it borrows. Everything lives in the PostgreSQL schema ``schema``, migrated on open
    unless ``migrate=False``.

    Query results are cached in-process (``cache_size`` entries for ``cache_ttl`` seconds; 0
    turns the cache off); see `tamma_events.cache` for why a hit is never stale.

    Events compacted out of the log (`compact_events`) live in Parquet archives under
    ``archive_dir`` (default: ``archives/<schema>`` in the user data directory).

    Use it as a context manager, or call `close`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "tamma_events",
        pool: ConnectionPool[Any] | None = None,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 30.0,
        data_dir: str | os.PathLike[str] | None = None,
        migrate: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_group_events: int = 2_000,
        chunk_events: int = 10_000,
        cache_size: int = 256,
        cache_ttl: float = 5.0,
        archive_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not schema or not isinstance(schema, str):
            raise EventStoreError(VALIDATION_FAILED, "schema must be a non-empty string")
        self.schema = schema
        self.max_event_bytes = max_event_bytes
        self.chunk_events = chunk_events
        self._statements = Statements(schema)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise EventStoreError(
                VALIDATION_FAILED,
                f"cache_size must be a non-negative int, got {cache_size!r}",
                {"field": "cache_size"},
            )
        if (
            isinstance(cache_ttl, bool)
            or not isinstance(cache_ttl, (int, float))
            or not 0 <= cache_ttl < math.inf
        ):
            raise EventStoreError(
                VALIDATION_FAILED,
                f"cache_ttl must be a finite non-negative number of seconds, got {cache_ttl!r}",
                {"field": "cache_ttl"},
            )
        self.cache = QueryCache(cache_size, cache_ttl)
        #: Where `compact_events` writes archives. Reads find each file where the manifest says
        #: it was written or, when it is no longer there, here (archives moved).
        self.archive_dir = Path(archive_dir) if archive_dir is not None else None
        self._archive = ArchiveReader(schema, self.archive_dir)
        self._closed = False
        self._listener: Listener | None = None
        # Weak: a subscription dropped without stop() is not kept alive (or counted) by the store.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._subscriptions_lock = threading.Lock()
        self.embedded: embedded.EmbeddedServer | None = None
        if pool is not None:
            self._pool = pool
            self._owns_pool = False
        else:
            if dsn is None:
                dsn = os.environ.get(DSN_ENV) or None
            if dsn is None:
                self.embedded = embedded.start(data_dir)
                dsn = self.embedded.dsn
            self._pool = ConnectionPool(
                dsn,
                min_size=min_connections,
                max_size=max_connections,
                kwargs=_connection_kwargs(dsn),
                configure=_configure,
                timeout=connect_timeout,
                name=f"tamma-events:{schema}",
                open=False,
            )
            self._owns_pool = True
            try:
                self._pool.open(wait=True, timeout=connect_timeout)
            except Exception as exc:
                self._pool.close()
                raise _storage_error(exc, "connecting to PostgreSQL") from exc
        self._group = GroupCommit(self._write_group, max_group_events)
        # The benchmarks swap this for a sealer without the chain, to measure what it costs.
        self._seal = _codec.seal
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.close()
                raise

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The connection string of the store's server."""
        conninfo = self._pool.conninfo
        return conninfo() if callable(conninfo) else conninfo

    @property
    def impl(self) -> str:
        """Which codec encodes appends: ``"native"`` or ``"python"``."""
        return _codec.IMPL

    def migrate(self) -> list[int]:
        """Apply the schema migrations not applied yet; returns their versions."""
        with self._connection() as conn:
            try:
                return _migrate(conn, self.schema)
            except psycopg.Error as exc:
                raise _storage_error(exc, "migrating the schema", schema=self.schema) from exc

    def close(self) -> None:
        """End the store's subscriptions and close its pool (a caller's own pool stays
        open)."""
        if self._closed:
            return
        self._closed = True
        with self._subscriptions_lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.stop()
        if self._listener is not None:
            self._listener.close()
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> EventStore:
        return self

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
            raise EventStoreError(STORAGE_ERROR, "the store is closed")
        try:
            with self._pool.connection() as conn:
                if not conn.autocommit:
                    conn.autocommit = True
                if not self._owns_pool:
                    _configure(conn)
                yield conn
        except PoolTimeout as exc:  # before psycopg.Error: it is an OperationalError
            raise _storage_error(exc, "getting a connection") from exc
        except psycopg.Error as exc:
            if connection_lost(exc):
                # A restarted server or a terminated backend: the pool's idle connections are
                # likely broken too. Test them now, so the next call (a retry) gets a working
                # one rather than the next broken one.
                self._check_pool()
            raise _storage_error(exc, "using a connection") from exc

    def _check_pool(self) -> None:
        try:
            self._pool.check()
        except Exception:  # a closed pool, say: the error being reported says enough
            pass

    # -- appends ---------------------------------------------------------------------------

    def append(
        self, event: DomainEvent | dict[str, Any], condition: AppendCondition | None = None
    ) -> int:
        """Append one event; returns its position.

        Raises `EventStoreError` with ``APPEND_CONDITION_FAILED`` when ``condition`` is violated,
        ``DUPLICATE_EVENT`` when its ``event_id`` is already stored, ``VALIDATION_FAILED`` for a
        bad event; nothing is written in any of these cases.
        """
        return self.append_batch([event], condition)

    def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
    ) -> int:
        """Append events atomically at consecutive positions; returns the last position.

        All of them are stored, or (on any error) none. Batches up to ``chunk_events`` are
        validated and encoded before any database work; a larger batch is encoded chunk by chunk
        while earlier chunks stream to the server, and an error in a later chunk rolls the whole
        batch back.
        """
        batch = _as_events(events)
        check = self._check(condition)
        if len(batch) <= self.chunk_events:
            prepared = _codec.prepare(batch, self.max_event_bytes)
            return self._group.submit(AppendRequest(batch, prepared, condition, check))
        return self._append_large(batch, condition, check)

    @staticmethod
    def _check(condition: AppendCondition | None) -> Check | None:
        """The condition's SQL parameters, validated before the append queues up."""
        return None if condition is None else condition_check(condition)

    def _write_group(self, requests: list[AppendRequest]) -> None:
        """Write ``requests`` in one transaction; settles every one of them."""
        try:
            with self._connection() as conn:
                self._write(conn, requests)
        except _DuplicateInGroup:
            # Find out whose events were duplicates: each request alone, conditions re-checked.
            for request in requests:
                request.done = False
                request.error = None
            for request in requests:
                try:
                    with self._connection() as conn:
                        self._write(conn, [request])
                except EventStoreError as exc:
                    request.fail(exc)
        except EventStoreError as exc:
            for request in requests:
                if not request.done:
                    request.fail(exc)

    def _write(self, conn: psycopg.Connection[Any], requests: list[AppendRequest]) -> None:
        """One transaction: lock the head, check the conditions, write the accepted requests'
        events, move the head and commit.

        Small groups (single appends, mostly) take one round trip: the ``append_group``
        function does it all server-side, committing as the statement ends. Larger ones lock
        and check, then send their rows by binary COPY, with the chain computed here.
        """
        statements = self._statements
        cur = conn.cursor()
        committing = False
        try:
            if sum(r.count for r in requests) <= _FUNCTION_MAX_EVENTS and (
                sum(len(r.batch.buffer) for r in requests) <= _FUNCTION_MAX_BYTES
            ):
                committing = True
                self._write_by_function(cur, requests)
                return
            head, head_hash, verdicts = self._lock_and_check(cur, requests)
            accepted = _accept(requests, head, verdicts)
            if not accepted:
                cur.execute("ROLLBACK")
                return
            last_hash = head_hash
            for request in accepted:
                last_hash = self._seal(request.batch, request.first_position, last_hash)
            position = accepted[-1].last_position
            with cur.copy(statements.copy_events) as copy:
                copy.write(COPY_HEADER)
                for request in accepted:
                    _write_buffer(copy, request.batch.buffer)
                copy.write(COPY_TRAILER)
            committing = True
            cur.execute(statements.set_head_and_commit(position, last_hash))
        except psycopg.errors.UniqueViolation as exc:
            _rollback(conn)
            if exc.diag.constraint_name != _EVENT_ID_CONSTRAINT:
                raise _storage_error(exc, "appending") from exc
            error = self._duplicates_error(conn, requests)
            if len(requests) > 1:
                raise _DuplicateInGroup(error) from exc
            requests[0].fail(error)
            return
        except psycopg.Error as exc:
            _rollback(conn)
            context = {"outcome": "unknown"} if committing else {}
            raise _storage_error(exc, "appending", **context) from exc
        except BaseException:
            _rollback(conn)
            raise
        for request in accepted:
            request.succeed(request.first_position)

    def _write_by_function(self, cur: psycopg.Cursor[Any], requests: list[AppendRequest]) -> None:
        """One statement, in autocommit: ``append_group`` (schema/0003_append_function.sql)."""
        statements = self._statements
        counts: list[int] = []
        conditions: list[str | None] = []
        events: list[list[Any]] = []
        rows = bytearray()
        offsets = [0]
        for request in requests:
            counts.append(request.count)
            conditions.append(_condition_json(request.condition))
            events += json_rows(request.batch)
            base = len(rows)
            rows += request.batch.buffer
            offsets += [base + offset for offset in request.batch.offsets[1:]]
        params = [counts, conditions, msgspec.json.encode(events).decode(), bytes(rows), offsets]
        cur.execute(statements.append_group, params)
        result = cur.fetchone()
        if result is None:  # pragma: no cover - the function always returns its array
            raise EventStoreError(STORAGE_ERROR, "the append function returned nothing")
        head, *firsts = result[0]
        for request, first in zip(requests, firsts, strict=True):
            if first is None:
                assert request.condition is not None
                request.fail(_condition_error(request.condition, head))
            else:
                request.succeed(first)

    def _lock_and_check(
        self, cur: psycopg.Cursor[Any], requests: list[AppendRequest]
    ) -> tuple[int, bytes, list[bool]]:
        """BEGIN and lock the head row (one round trip), then check the requests' conditions
        against the stored events (one more, if any). Returns the head, its hash and one verdict
        per condition (True: violated).

        The checks are a statement of their own, run after the lock is granted, so under READ
        COMMITTED they see every append committed before it: one statement taking the lock and
        checking would check against a snapshot from before the wait.
        """
        statements = self._statements
        cur.execute(statements.begin_and_lock_head)
        cur.nextset()  # past BEGIN's result
        row = cur.fetchone()
        if row is None:
            raise EventStoreError(STORAGE_ERROR, "the head row is missing: is the schema migrated?")
        checks = [r.check for r in requests if r.check is not None]
        verdicts = list(cur.execute(*statements.checks(checks)).fetchone() or ()) if checks else []
        return int(row[0]), bytes(row[1]), verdicts

    def _duplicates_error(
        self, conn: psycopg.Connection[Any], requests: list[AppendRequest]
    ) -> EventStoreError:
        """Name the ids that made an append fail: those already stored, and those that occur
        twice among ``requests`` (across the chunks of a large batch, or across a group)."""
        ids = [event.event_id for request in requests for event in request.events]
        ids = [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]
        try:
            rows = conn.execute(self._statements.existing_ids, [ids]).fetchall()
        except psycopg.Error as exc:
            return _storage_error(exc, "looking up duplicate event ids")
        existing = [str(row[0]) for row in rows]
        repeated = [str(i) for i, n in Counter(ids).items() if n > 1]
        parts = []
        if existing:
            parts.append(f"{len(existing)} already stored")
        if repeated:
            parts.append(f"{len(repeated)} given twice")
        return EventStoreError(
            DUPLICATE_EVENT,
            f"duplicate event ids ({', '.join(parts) or 'none found'}); nothing was written",
            {"event_ids": list(dict.fromkeys(existing + repeated))},
        )

    def _append_large(
        self,
        batch: list[DomainEvent],
        condition: AppendCondition | None,
        check: Check | None,
    ) -> int:
        """One transaction for a batch above ``chunk_events``, encoded chunk by chunk."""
        size = self.chunk_events
        first = _codec.prepare(batch[:size], self.max_event_bytes)
        request = AppendRequest(batch, first, condition, check)
        statements = self._statements
        with self._connection() as conn:
            cur = conn.cursor()
            committing = False
            try:
                head, last_hash, verdicts = self._lock_and_check(cur, [request])
                # The request's count is that of its first chunk; the condition concerns stored
                # events only, so the verdict is the same.
                if not _accept([request], head, verdicts):
                    cur.execute("ROLLBACK")
                    return request.result()
                position = head + 1
                with cur.copy(statements.copy_events) as copy:
                    copy.write(COPY_HEADER)
                    prepared: PreparedBatch = first
                    for start in range(0, len(batch), size):
                        if start:
                            prepared = _codec.prepare(
                                batch[start : start + size], self.max_event_bytes, start
                            )
                        last_hash = self._seal(prepared, position, last_hash)
                        _write_buffer(copy, prepared.buffer)
                        position += prepared.count
                    copy.write(COPY_TRAILER)
                committing = True
                cur.execute(statements.set_head_and_commit(position - 1, last_hash))
            except EventStoreError as exc:
                _rollback(conn)
                raise exc.with_traceback(None) from None
            except psycopg.errors.UniqueViolation as exc:
                _rollback(conn)
                if exc.diag.constraint_name != _EVENT_ID_CONSTRAINT:
                    raise _storage_error(exc, "appending") from exc
                raise self._duplicates_error(conn, [request]) from exc
            except psycopg.Error as exc:
                _rollback(conn)
                context = {"outcome": "unknown"} if committing else {}
                raise _storage_error(exc, "appending", **context) from exc
            except BaseException:
                _rollback(conn)
                raise
        return position - 1

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
        `AppendCondition` built from what was read. Events and head come from one snapshot.
        """
        with self._connection() as conn:
            return _read(conn, self._statements, self._archive, query, after, limit, backwards)

    def get_event(self, event_id: uuid.UUID | str) -> SequencedEvent | None:
        """The stored event with this id (live or archived), or None."""
        try:
            key = event_id if isinstance(event_id, uuid.UUID) else uuid.UUID(str(event_id))
        except ValueError:
            raise EventStoreError(
                QUERY_ERROR,
                f"event_id must be a UUID, got {event_id!r}",
                {"event_id": str(event_id)},
            ) from None
        with self._connection() as conn:
            rows = conn.execute(self._statements.get_event, [key]).fetchall()
            texts = _fill_archived(conn, self._archive, rows, 0, 1)
        return _decode_event(texts[0]) if texts else None

    def head(self) -> int:
        """The last position written (0 for an empty store)."""
        with self._connection() as conn:
            row = conn.execute(self._statements.head_position).fetchone()
        return int(row[0]) if row else 0

    # -- queries ---------------------------------------------------------------------------

    def get_events(
        self, event_filter: EventFilter | None = None, *, include_archived: bool = False
    ) -> list[SequencedEvent]:
        """The events matching ``event_filter`` (all events when None), in its order, after its
        offset and at most its limit. Raises ``QUERY_ERROR`` for a malformed filter.

        With ``include_archived``, events compacted into archives are read too, so the result
        is what it was before compaction; without it, only the live log is read."""
        criteria = normalize(event_filter)
        with self._connection() as conn:
            cur = conn.cursor()

            def run() -> str:
                select, few = self._select(cur, criteria, include_archived)
                statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
                if include_archived:
                    return _json_array(_history_rows(cur, self._archive, *statement))
                return _json_array(_event_rows(cur, *statement))

            document = self._cached(cur, ("events", criteria, include_archived), run, len)
        return _decode_events(document)

    def get_events_by_issue_id(self, issue_id: str) -> list[SequencedEvent]:
        """The events tagged ``issueId=issue_id``, in log order."""
        return self.get_events(EventFilter(issue_ids=[issue_id]))

    def get_events_by_time_range(
        self, start: datetime | str, end: datetime | str
    ) -> list[SequencedEvent]:
        """The events with ``start <= timestamp < end``, in timestamp order."""
        return self.get_events(EventFilter(start_time=start, end_time=end, order_by="timestamp"))

    def count_events(self, event_filter: EventFilter | None = None) -> int:
        """How many events `get_events` would return for ``event_filter``.

        Counts by event type, by one tag, and by type over a window whose ends fall on whole
        minutes come from summaries kept by the appends, at a cost that does not grow with the
        log."""
        criteria = normalize(event_filter)
        unpaged = criteria.unpaged()
        with self._connection() as conn:
            cur = conn.cursor()

            def run() -> int:
                row = cur.execute(
                    *count_statement(self._statements, unpaged), prepare=False
                ).fetchone()
                return int(row[0]) if row else 0

            total: int = self._cached(cur, ("count", unpaged), run, lambda _: 64)
        total = max(total - criteria.offset, 0)
        return total if criteria.limit is None else min(total, criteria.limit)

    def get_event_types(self) -> list[str]:
        """Every event type stored, sorted."""
        with self._connection() as conn:
            cur = conn.cursor()
            text = sql.SQL("SELECT event_type FROM {} ORDER BY 1").format(
                self._statements.type_summary
            )

            def run() -> list[str]:
                return [row[0] for row in cur.execute(text).fetchall()]

            types: list[str] = self._cached(cur, ("types",), run, _size_of_strings)
        return list(types)

    def get_tags(self) -> dict[str, list[str]]:
        """Every tag key stored, with its distinct values, both sorted."""
        with self._connection() as conn:
            cur = conn.cursor()
            text = sql.SQL(
                "SELECT key, array_agg(value ORDER BY value) FROM {} GROUP BY key ORDER BY key"
            ).format(self._statements.tag_summary)

            def run() -> dict[str, list[str]]:
                return {key: values for key, values in cur.execute(text).fetchall()}

            tags: dict[str, list[str]] = self._cached(
                cur, ("tags",), run, lambda t: sum(_size_of_strings(v) for v in t.values())
            )
        return {key: list(values) for key, values in tags.items()}

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
        if group_by not in _GROUPS:
            raise EventStoreError(
                QUERY_ERROR,
                f"group_by must be one of {', '.join(_GROUPS)}, got {group_by!r}",
                {"field": "group_by"},
            )
        if (group_by == "tag") != (tag_key is not None):
            raise EventStoreError(
                QUERY_ERROR,
                "tag_key is required with group_by='tag', and only with it",
                {"field": "tag_key"},
            )
        if tag_key is not None:
            check_text(tag_key, "tag_key")
        criteria = normalize(event_filter).unpaged()
        with self._connection() as conn:
            cur = conn.cursor()

            def run() -> list[AggregateRow]:
                statement = summary_aggregate(self._statements, criteria, group_by) or Select(
                    self._statements, criteria, archived=True
                ).aggregate(group_by, tag_key)
                return [
                    AggregateRow(key, int(count), first, last)
                    for key, count, first, last in cur.execute(*statement, prepare=False).fetchall()
                ]

            rows: list[AggregateRow] = self._cached(
                cur, ("aggregate", criteria, group_by, tag_key), run, lambda r: 128 * len(r)
            )
        return list(rows)

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
        criteria = normalize(event_filter)
        if criteria.limit is not None or criteria.offset:
            raise EventStoreError(
                QUERY_ERROR,
                "a paged filter may not set limit or offset; use page_size and the page token",
                {"field": "limit" if criteria.limit is not None else "offset"},
            )
        _check_size(page_size, "page_size")
        last_key: Any = None
        last_position: int | None = None
        until: int | None = None
        if token is not None:
            decoded = decode_token(token, criteria)
            until, last_position = decoded.until, decoded.last_position
            last_key = token_key(decoded, criteria)
        # One event more than the page, to know whether another page follows.
        until, rows = self._keyset_rows(
            criteria, until, last_key, last_position, page_size + 1, 0, include_archived
        )
        events = _decode_events(_json_array(rows))
        if len(events) <= page_size:
            return Page(events, None)
        del events[page_size:]
        key = _sort_key(events[-1], criteria)
        if isinstance(key, datetime):
            key = key.isoformat()
        return Page(events, encode_token(criteria, until, key, events[-1].position))

    def _keyset_rows(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool = False,
    ) -> tuple[int, list[str]]:
        """The events matching ``criteria`` at positions up to ``until`` (the head now, when
        None) that follow the event ``(last_key, last_position)`` in the criteria's order (from
        the first, when None), at most ``limit`` after skipping ``offset``, as the server's
        JSON texts; and ``until``. With ``archived``, over the whole history."""
        with self._connection() as conn:
            cur = conn.cursor()
            until, select, few = self._keyset_select(
                cur, criteria, until, last_key, last_position, archived
            )
            statement = select.events(limit=limit, offset=offset, few=few)
            if archived:
                rows = _history_rows(cur, self._archive, *statement)
            else:
                rows = _event_rows(cur, *statement)
        return until, rows

    def _keyset_select(
        self,
        cur: psycopg.Cursor[Any],
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        archived: bool,
    ) -> tuple[int, Select, bool]:
        """The statement builder of a keyset batch (see `_keyset_rows`), whether its matches
        are few (see `_select`), and ``until``, read from the head when None."""
        if until is None:
            row = cur.execute(self._statements.head_position).fetchone()
            until = int(row[0]) if row else 0
        select, few = self._select(cur, criteria, archived)
        select.after(until, last_key, last_position)
        return until, select, few

    def stream_events(
        self,
        event_filter: EventFilter | None = None,
        *,
        batch_size: int = 1_000,
        include_archived: bool = False,
    ) -> Iterator[SequencedEvent]:
        """Every event matching ``event_filter``, in its order, one at a time, in constant
        memory: the events are read ``batch_size`` at a time, each batch after the last event
        of the previous one (keyset paging), so the filter's offset and limit apply to the
        whole stream.

        The stream is pinned to the head when it starts (events appended meanwhile are for
        `subscribe`). No connection is held between batches, so a consumer may take its time;
        one that stops early (``break``, or ``close()`` on the iterator) leaves nothing open.
        Raises ``QUERY_ERROR`` at the call for a malformed filter or batch size.
        ``include_archived`` streams archived events too, in the same order."""
        criteria = normalize(event_filter)
        _check_size(batch_size, "batch_size")
        return self._stream(criteria, batch_size, include_archived)

    def _stream(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> Iterator[SequencedEvent]:
        def read(
            until: int | None, key: Any, position: int | None, limit: int, offset: int
        ) -> tuple[int, list[str]]:
            return self._keyset_rows(criteria, until, key, position, limit, offset, archived)

        def last(rows: list[str]) -> tuple[Any, int]:
            # The keyset comes from the last row's text: the next batch is asked for before
            # this one is decoded.
            event = _decode_key(rows[-1])
            return _sort_key(event, criteria), event.position

        for rows in _keyset_walk(criteria, batch_size, read, len, last, "stream"):
            yield from _decode_events(_json_array(rows))

    def export_arrow(
        self,
        event_filter: EventFilter | None = None,
        *,
        batch_size: int = 65_536,
        include_archived: bool = False,
    ) -> pa.RecordBatchReader:
        """The events matching ``event_filter``, in its order, as a stream of Arrow record
        batches of `tamma_events.arrow.EXPORT_SCHEMA`, in constant memory.

        Each batch is one binary ``COPY`` of at most ``batch_size`` events, read from libpq and
        decoded natively into Arrow buffers (see ``docs/archives.md``). In log order without
        limit or offset, the batches are consecutive ranges of positions, two read at once;
        otherwise each follows the last event of the previous one (keyset paging, as in
        `stream_events`). The export is pinned to the head when it starts; no connection is
        held between batches. DuckDB, Polars and ``pyarrow`` read the reader directly. Raises
        ``QUERY_ERROR`` at the call for a malformed filter or batch size.

        With ``include_archived``, archived events are exported too, in the same order, from
        their Parquet files."""
        criteria = normalize(event_filter)
        _check_size(batch_size, "batch_size")
        return pa.RecordBatchReader.from_batches(
            EXPORT_SCHEMA, self._export_batches(criteria, batch_size, include_archived)
        )

    def _export_batches(
        self, criteria: Criteria, batch_size: int, archived: bool
    ) -> Iterator[pa.RecordBatch]:
        def read(
            until: int | None, key: Any, position: int | None, limit: int, offset: int
        ) -> tuple[int, list[pa.RecordBatch]]:
            return self._export_batch(criteria, until, key, position, limit, offset, archived)

        def count(batches: list[pa.RecordBatch]) -> int:
            return sum(batch.num_rows for batch in batches)

        def last(batches: list[pa.RecordBatch]) -> tuple[Any, int]:
            batch = batches[-1]
            key: Any = None
            if criteria.order_by == "timestamp":
                key = batch.column("timestamp")[-1].as_py()
            elif criteria.order_by == "type":
                key = batch.column("event_type")[-1].as_py()
            return key, batch.column("position")[-1].as_py()

        if (
            criteria.order_by == "position"
            and not criteria.descending
            and criteria.limit is None
            and not criteria.offset
            and not archived
        ):
            yield from self._export_ranges(criteria, batch_size)
            return
        for batches in _keyset_walk(criteria, batch_size, read, count, last, "export"):
            yield from batches

    def _export_ranges(self, criteria: Criteria, batch_size: int) -> Iterator[pa.RecordBatch]:
        """The log-ordered export of the live log, as consecutive ranges of ``batch_size``
        positions up to the head at the start, two read at once (each its own COPY and
        connection) and yielded in order. The server producing COPY rows is the bottleneck of
        a single stream; two keep it busy on two cores while the batches are decoded."""
        until = self.head()
        in_flight: deque[Future[tuple[int, list[pa.RecordBatch]]]] = deque()
        start = 0
        with ThreadPoolExecutor(_EXPORT_STREAMS, thread_name_prefix="tamma-events-export") as pool:
            try:
                while start < until or in_flight:
                    while start < until and len(in_flight) < _EXPORT_STREAMS:
                        end = min(start + batch_size, until)
                        in_flight.append(
                            pool.submit(
                                self._export_batch,
                                criteria,
                                end,
                                None,
                                start,
                                end - start,
                                0,
                                False,
                            )
                        )
                        start = end
                    yield from in_flight.popleft().result()[1]
            finally:
                for reading in in_flight:
                    reading.cancel()

    def _export_batch(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool,
    ) -> tuple[int, list[pa.RecordBatch]]:
        """`_keyset_rows`, as record batches read by binary COPY."""
        with self._connection() as conn:
            cur = conn.cursor()
            until, select, few = self._keyset_select(
                cur, criteria, until, last_key, last_position, archived
            )
            if not archived:
                text, params = select.events(
                    limit=limit, offset=offset, few=few, columns=EXPORT_SELECT
                )
                return until, list(copy_batches(conn, text, params))
            # The batch's positions in order, from one snapshot of the whole history; then the
            # live ones by COPY and the archived ones from their files. An event compacted
            # between the two statements is read from its archive.
            text, params = select.events(
                limit=limit, offset=offset, few=few, columns=sql.SQL("position, event IS NULL")
            )
            order = cur.execute(text, params, prepare=False).fetchall()
            live = [position for position, is_archived in order if not is_archived]
            pieces = (
                list(
                    copy_batches(
                        conn,
                        sql.SQL("SELECT {} FROM {} WHERE position = ANY(%s)").format(
                            EXPORT_SELECT, self._statements.events
                        ),
                        [live],
                    )
                )
                if live
                else []
            )
            found = set()
            for piece in pieces:
                found.update(piece.column("position").to_pylist())
            elsewhere = [position for position, _ in order if position not in found]
            table = pa.Table.from_batches(
                [*pieces, *self._archive.table(conn, elsewhere).to_batches()],
                schema=EXPORT_SCHEMA,
            )
            if not table.num_rows:
                return until, []
            index = {p: i for i, p in enumerate(table.column("position").to_pylist())}
            table = table.take(pa.array([index[p] for p, _ in order], pa.int64()))
            table = table.unify_dictionaries().combine_chunks()
            return until, table.to_batches()

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
        reader = self.export_arrow(
            event_filter, batch_size=batch_size, include_archived=include_archived
        )
        return write_parquet(
            reader,
            path,
            compression=compression,
            row_group_size=row_group_size,
            progress=progress,
        )

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

        The subscription is an iterator (sync or async) and a context manager; its
        ``position`` is the last position delivered, the ``after`` to resume from. It holds at
        most ``buffer`` events: when its consumer is slow, it reads less often instead of
        growing. It is woken by the store's notifications (one LISTEN connection per store,
        which also reads the head every few seconds of silence); while that connection is
        down, it reads every ``poll_interval`` seconds. A read that fails for a lost
        connection is retried from the same position for up to ``retry_for`` seconds.
        ``stop()`` (from any thread) or leaving the ``with`` block ends it.

        An `EventFilter` here selects events only: it may not set limit, offset or an order
        other than the log's."""
        start = after_position(after)
        check_subscription_options(buffer, poll_interval, retry_for)
        fetch: Callable[[int, int], tuple[list[SequencedEvent], int]]
        if query_or_filter is None or isinstance(query_or_filter, Query):
            query = query_or_filter
            query_shape(query, [])  # validates it now, not at the first read

            def fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return self._read_after(query, after, limit)

        elif isinstance(query_or_filter, EventFilter):
            criteria = _subscription_criteria(query_or_filter)

            def fetch(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
                return self._filter_after(criteria, after, limit)

        else:
            raise EventStoreError(
                QUERY_ERROR,
                "subscribe takes a Query, an EventFilter or None,"
                f" not {type(query_or_filter).__name__}",
            )
        subscription = Subscription(
            fetch,
            self._ensure_listener(),
            after=start,
            buffer=buffer,
            poll_interval=poll_interval,
            retry_for=retry_for,
            on_close=self._forget,
        )
        with self._subscriptions_lock:
            if self._closed:
                raise EventStoreError(STORAGE_ERROR, "the store is closed")
            self._subscriptions.add(subscription)
        return subscription

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
                raise EventStoreError(STORAGE_ERROR, "the store is closed")
            if self._listener is None:
                dsn = self.dsn
                pool = self._pool

                def connect() -> psycopg.Connection[Any]:
                    # The pool's settings as they are now: a callable may rotate credentials.
                    pool_kwargs = pool.kwargs() if callable(pool.kwargs) else pool.kwargs
                    kwargs = {
                        **(pool_kwargs or {}),
                        **_connection_kwargs(dsn, "tamma-events listener"),
                    }
                    return psycopg.Connection.connect(dsn, **kwargs)

                self._listener = Listener(
                    connect, self._statements.append_channel, self._statements.head_position
                )
                self._listener.start()
            return self._listener

    def _read_after(
        self, query: Query | None, after: int, limit: int
    ) -> tuple[list[SequencedEvent], int]:
        """A subscription's read: at most ``limit`` events matching ``query`` after ``after``,
        and the position read up to (see `tamma_events.stream.Fetch`)."""
        with self._connection() as conn:
            events, head = _read_with_head(
                conn, self._statements, self._archive, query, after, limit, False
            )
        return events, events[-1].position if len(events) >= limit else head

    def _filter_after(
        self, criteria: Criteria, after: int, limit: int
    ) -> tuple[list[SequencedEvent], int]:
        """`_read_after` for a filter: a keyset page in log order after ``after``."""
        head, rows = self._keyset_rows(criteria, None, None, after, limit, 0, True)
        events = _decode_events(_json_array(rows))
        return events, events[-1].position if len(events) >= limit else head

    def paginate(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        include_archived: bool = False,
    ) -> Iterator[list[SequencedEvent]]:
        """Walk the events matching ``event_filter`` page by page (see `get_page`)."""
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
        if count:
            statement = count_statement(self._statements, criteria)
        options = sql.SQL("ANALYZE, BUFFERS, " if analyze else "")
        with self._connection() as conn:
            if not count:
                select, few = self._select(conn.cursor(), criteria)
                statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
            text = sql.SQL("EXPLAIN ({}FORMAT JSON) {}").format(options, statement[0])
            row = conn.execute(text, statement[1], prepare=False).fetchone()
        plan: dict[str, Any] = row[0][0] if row else {}
        return plan

    def _select(
        self, cur: psycopg.Cursor[Any], criteria: Criteria, archived: bool = False
    ) -> tuple[Select, bool]:
        """The statement builder for reading events matching ``criteria``, and whether they
        are few (then collected before they are ordered; see `Select.events`).

        With tag conditions, the tag summary's exact counts decide: when one condition matches
        few events, only it goes to the GIN index."""
        positions = None
        if criteria.order_by == "position":
            window = window_positions(self._statements, criteria)
            if window is not None:
                positions = cur.execute(*window).fetchone()
        statement = tag_matches(self._statements, criteria)
        row = None if statement is None else cur.execute(*statement).fetchone()
        if not row:
            return Select(self._statements, criteria, positions=positions, archived=archived), False
        counts = [int(count) for count in row]
        smallest = min(range(len(counts)), key=counts.__getitem__)
        if counts[smallest] > FEW_MATCHES:
            return Select(self._statements, criteria, positions=positions, archived=archived), False
        indexed = smallest if len(counts) > 1 else None
        select = Select(
            self._statements, criteria, positions=positions, indexed_tag=indexed, archived=archived
        )
        return select, True

    def cache_stats(self) -> CacheStats:
        """Hits, misses, evictions and size of the query result cache."""
        return self.cache.stats()

    def _cached(
        self,
        cur: psycopg.Cursor[Any],
        key: tuple[Any, ...],
        compute: Callable[[], _T],
        size: Callable[[_T], int],
    ) -> _T:
        """``compute()``, or the cache's answer computed at the current head."""
        if not self.cache.enabled:
            return compute()
        # The head's hash too: a schema dropped and refilled may reach the same position.
        head = cur.execute(self._statements.head_label).fetchone()
        value = self.cache.get(key, head)
        if value is None:
            value = compute()
            self.cache.put(key, head, value, size(value))
        return value

    # -- snapshots -------------------------------------------------------------------------

    def create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Snapshot:
        """Save ``state`` (any value msgspec encodes as JSON) as folded from the log up to
        position ``version`` (0 to the head) under ``aggregate_id``. Saving the same version
        again replaces it. Raises ``VALIDATION_FAILED`` naming the field otherwise."""
        _check_aggregate_id(aggregate_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise EventStoreError(
                VALIDATION_FAILED,
                f"version must be a position (an int from 0 to the head), got {version!r}",
                {"field": "version", "aggregate_id": aggregate_id},
            )
        try:
            data = msgspec.json.encode(state)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise EventStoreError(
                VALIDATION_FAILED,
                f"state cannot be encoded as JSON: {exc}",
                {"field": "state", "aggregate_id": aggregate_id},
            ) from None
        with self._connection() as conn:
            try:
                row = conn.execute(
                    self._statements.save_snapshot,
                    [aggregate_id, version, data.decode(), version],
                ).fetchone()
            except psycopg.errors.UntranslatableCharacter:
                raise EventStoreError(
                    VALIDATION_FAILED,
                    "state holds a NUL character, which PostgreSQL's jsonb cannot store",
                    {"field": "state", "aggregate_id": aggregate_id},
                ) from None
            if row is None:
                head = conn.execute(self._statements.head_position).fetchone()
                raise EventStoreError(
                    VALIDATION_FAILED,
                    f"version {version} is beyond the head ({head[0] if head else 0})",
                    {"field": "version", "aggregate_id": aggregate_id},
                )
        return Snapshot(aggregate_id, version, state, row[0])

    def get_snapshot(self, aggregate_id: str, *, state_type: Any = Any) -> Snapshot | None:
        """The latest snapshot of ``aggregate_id`` (its highest version), its state decoded as
        ``state_type`` (plain JSON values by default), or None."""
        _check_aggregate_id(aggregate_id)
        with self._connection() as conn:
            row = conn.execute(self._statements.latest_snapshot, [aggregate_id]).fetchone()
        if row is None:
            return None
        version, data, created_at = row
        try:
            state = msgspec.json.decode(data, type=state_type)
        except msgspec.ValidationError as exc:
            raise EventStoreError(
                QUERY_ERROR,
                f"the snapshot of {aggregate_id!r} at version {version} is not a {state_type}:"
                f" {exc}",
                {"field": "state_type", "aggregate_id": aggregate_id, "version": version},
            ) from None
        return Snapshot(aggregate_id, int(version), state, created_at)

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
        result holds the state and the head it is current at."""
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 1
        ):
            raise EventStoreError(
                QUERY_ERROR,
                f"snapshot_every must be a positive int or None, got {snapshot_every!r}",
                {"field": "snapshot_every"},
            )
        if snapshot_every is not None and key is None:
            raise EventStoreError(
                QUERY_ERROR, "snapshot_every needs a key to save under", {"field": "key"}
            )
        _check_size(batch_size, "batch_size")
        state: Any = initial
        after = 0
        if key is not None:
            if state_type is None:
                state_type = Any if initial is None else type(initial)
            snapshot = self.get_snapshot(key, state_type=state_type)
            if snapshot is not None:
                state, after = snapshot.state, snapshot.version
        folded = 0
        while True:
            with self._connection() as conn:
                events, head = _read_with_head(
                    conn, self._statements, self._archive, query, after, batch_size, False
                )
            for event in events:
                state = fold(state, event)
                folded += 1
                if snapshot_every is not None and key is not None and folded % snapshot_every == 0:
                    self.create_snapshot(key, event.position, state)
            if len(events) < batch_size:
                return Projection(state, max(head, after))
            after = events[-1].position

    # -- integrity -------------------------------------------------------------------------

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
        report the first position where it breaks; see `tamma_events.integrity.verify`.

        When events were compacted and the range reaches into them, every archive file is
        checked first, whole (its SHA-256 against the manifest, and the chain through every
        event it holds, from the genesis hash), then the live log from the last archived hash.
        A broken archive is reported with its range. ``include_archived=False`` checks the
        live log only, anchored on the manifest's last hash."""
        with self._connection() as conn:
            try:
                return _verify(
                    conn,
                    self.schema,
                    start,
                    end,
                    batch_size=batch_size,
                    progress=progress,
                    archives=self._archive.directory,
                    check_archives=include_archived,
                )
            except psycopg.Error as exc:
                raise _storage_error(exc, "verifying") from exc

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
        archives; returns how many events left the log (see `tamma_events.archive`).

        Files go to ``archive_dir`` (default: the store's, else ``archives/<schema>`` in the
        user data directory), at most ``file_events`` events each. It is idempotent and safe to
        interrupt: run it again to finish. Only the role that owns the schema can compact (the
        application role of `grant_app_role` cannot delete). ``progress(done, total)`` follows
        the events archived; ``fault(step, first, last)`` is called after each step of each
        file (``"written"``, ``"verified"``, ``"recorded"``, ``"compacted"``), for tests that
        interrupt a compaction."""
        moment = _moment(before)
        _check_size_any(file_events, "file_events")
        directory = Path(archive_dir) if archive_dir is not None else self.archive_dir
        if directory is None:
            directory = Path(platformdirs.user_data_dir("tamma-events")) / "archives" / self.schema
        with self._connection() as conn:
            lock = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", [f"tamma_events:compact:{self.schema}"]
            ).fetchone()
            if not lock or not lock[0]:
                raise EventStoreError(
                    STORAGE_ERROR, "another compaction of this store is running", {}
                )
            try:
                return _compact(
                    conn,
                    self.schema,
                    moment,
                    directory,
                    file_events=file_events,
                    progress=progress,
                    fault=fault,
                )
            except psycopg.Error as exc:
                raise _storage_error(exc, "compacting") from exc
            except OSError as exc:
                raise EventStoreError(
                    STORAGE_ERROR, f"compacting failed writing an archive: {exc}", {}
                ) from exc
            finally:
                try:
                    conn.execute(
                        "SELECT pg_advisory_unlock(hashtext(%s))",
                        [f"tamma_events:compact:{self.schema}"],
                    )
                except psycopg.Error:
                    pass  # a lost connection took its session lock with it

    def grant_app_role(self, role: str, *, create: bool = True) -> None:
        """Give ``role`` what an application needs and nothing more: read events, append them
        (INSERT on ``events``, UPDATE on ``head``). It cannot update, delete or truncate events.

        With ``create`` the role is created (NOLOGIN) if it does not exist; give it a login and
        password yourself, or grant it to a login role. Skip this if you manage roles yourself.
        """
        schema = sql.Identifier(self.schema)
        name = sql.Identifier(role)
        statements = []
        if create:
            statements.append(
                sql.SQL(
                    "DO $$BEGIN CREATE ROLE {} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL;"
                    " END$$"
                ).format(name)
            )
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT INSERT ON {} TO {}").format(self._statements.events, name),
            sql.SQL("GRANT UPDATE ON {} TO {}").format(self._statements.head, name),
            sql.SQL("GRANT INSERT, UPDATE ON {} TO {}").format(
                sql.Identifier(self.schema, "event_snapshots"), name
            ),
        ]
        with self._connection() as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A block whose appends commit together when it exits normally, or not at all.

        The first append in the block takes the head lock and holds it until the block ends, so
        other writers wait meanwhile: keep the block short. Each append's condition is checked
        inside the transaction and sees the block's earlier appends.
        """
        with self._connection() as conn:
            conn.execute("BEGIN")
            tx = Transaction(self, conn)
            try:
                yield tx
                tx._commit()
            except psycopg.Error as exc:
                _rollback(conn)
                raise _storage_error(exc, "the transaction") from exc
            except BaseException:
                _rollback(conn)
                raise
            finally:
                tx._closed = True


def _condition_json(condition: AppendCondition | None) -> str | None:
    """A (validated) condition as the append function takes it."""
    if condition is None:
        return None
    items: list[dict[str, Any]] = []
    for item in condition.fail_if_events_match.items:
        if not item.types and not item.tags:
            items = []  # an item matching everything: so does the query
            break
        entry: dict[str, Any] = {"types": list(item.types)}
        if item.tags:
            entry["tags"] = item.tags
        items.append(entry)
    return msgspec.json.encode({"after": condition.after or 0, "items": items}).decode()


def _accept(requests: list[AppendRequest], head: int, verdicts: list[bool]) -> list[AppendRequest]:
    """Settle the requests whose condition is violated (by a stored event, per ``verdicts``,
    one per conditional request, or by an event accepted earlier in the same transaction);
    give the others consecutive positions after ``head``."""
    violated = iter(verdicts)
    accepted: list[AppendRequest] = []
    position = head
    for request in requests:
        condition = request.condition
        if condition is not None:
            if next(violated) or _violated_in_group(condition, accepted):
                request.fail(_condition_error(condition, head))
                continue
        request.first_position = position + 1
        position += request.count
        accepted.append(request)
    return accepted


def _write_buffer(copy: psycopg.Copy, buffer: bytearray) -> None:
    view = memoryview(buffer)
    try:
        for start in range(0, len(view), _COPY_SLICE):
            copy.write(view[start : start + _COPY_SLICE])
    finally:
        view.release()


def _read_with_head(
    conn: psycopg.Connection[Any],
    statements: Statements,
    archive: ArchiveReader,
    query: Query | None,
    after: int | None,
    limit: int | None,
    backwards: bool,
) -> tuple[list[SequencedEvent], int]:
    """The events `EventStore.read` returns, and the store's head in the same snapshot."""
    _check_limit(limit)
    params: list[Any] = [after_position(after)]
    shape = query_shape(query, params)
    params.append(limit)
    # Not prepared, as filter statements are not (see `_event_rows`): after five runs psycopg
    # would prepare it, and PostgreSQL's generic plan for a selective tag took 365 ms at 1M
    # events where one planned for the values takes 1.7 ms.
    rows = conn.execute(statements.read(shape, backwards), params, prepare=False).fetchall()
    store_head = int(rows[0][0]) if rows else 0
    events = _decode_events(_json_array(_fill_archived(conn, archive, rows, 1, 2)))
    return events, store_head


def _read(
    conn: psycopg.Connection[Any],
    statements: Statements,
    archive: ArchiveReader,
    query: Query | None,
    after: int | None,
    limit: int | None,
    backwards: bool,
) -> ReadResult:
    events, store_head = _read_with_head(conn, statements, archive, query, after, limit, backwards)
    if limit is None:
        head: int | None = store_head
    elif events:
        head = events[0].position if backwards else events[-1].position
    else:
        head = None
    return ReadResult(events, head)


def _keyset_walk(
    criteria: Criteria,
    batch_size: int,
    read: Callable[[int | None, Any, int | None, int, int], tuple[int, _T]],
    count: Callable[[_T], int],
    last: Callable[[_T], tuple[Any, int]],
    name: str,
) -> Iterator[_T]:
    """The batches of a keyset walk over ``criteria``, pinned to the head at its first read:
    ``read(until, last_key, last_position, limit, offset)`` returns ``until`` and a batch
    holding ``count(batch)`` events, ``last(batch)`` the keyset of its last event. The
    criteria's offset and limit apply to the whole walk.

    A worker reads batch n+1 while the consumer takes batch n. Leaving (the walk ends, fails
    or is closed) waits for the read in flight, so its connection is back in the pool when
    the consumer's close() returns."""
    remaining = criteria.limit
    size = batch_size if remaining is None else min(batch_size, remaining)
    with ThreadPoolExecutor(1, thread_name_prefix=f"tamma-events-{name}") as ahead:
        reading = ahead.submit(read, None, None, None, size, criteria.offset)
        while True:
            until, batch = reading.result()
            got = count(batch)
            if remaining is not None:
                remaining -= got
            more = got == size and (remaining is None or remaining > 0)
            if more:
                key, position = last(batch)
                size = batch_size if remaining is None else min(batch_size, remaining)
                reading = ahead.submit(read, until, key, position, size, 0)
            yield batch
            if not more:
                return


def _check_size_any(value: int, field: str) -> None:
    """VALIDATION_FAILED unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EventStoreError(
            VALIDATION_FAILED, f"{field} must be a positive int, got {value!r}", {"field": field}
        )


def _moment(value: datetime | str) -> datetime:
    """`compact_events`'s ``before``, read as a filter's time bound is (`parse_time`), but
    required and refused as VALIDATION_FAILED: it is an argument, not a query."""
    try:
        moment = parse_time(value, "before")
    except EventStoreError as exc:
        raise EventStoreError(VALIDATION_FAILED, exc.message, exc.context) from None
    if moment is None:
        raise EventStoreError(
            VALIDATION_FAILED,
            "before must be a datetime or an ISO-8601 string, got None",
            {"field": "before"},
        )
    return moment


def _check_size(value: int, field: str) -> None:
    """QUERY_ERROR unless ``value`` is an int from 1 to `MAX_PAGE_SIZE` (a page or batch)."""
    check_count(value, field, allow_none=False)
    if not 0 < value <= MAX_PAGE_SIZE:
        raise EventStoreError(
            QUERY_ERROR,
            f"{field} must be between 1 and {MAX_PAGE_SIZE}, got {value}",
            {"field": field},
        )


def _check_aggregate_id(aggregate_id: object) -> None:
    if not isinstance(aggregate_id, str) or not 0 < len(aggregate_id) <= 255:
        raise EventStoreError(
            VALIDATION_FAILED,
            f"aggregate_id must be a string of 1 to 255 characters, got {aggregate_id!r}",
            {"field": "aggregate_id"},
        )
    check_text(aggregate_id, "aggregate_id")


def _sort_key(event: SequencedEvent | _SortKey, criteria: Criteria) -> datetime | str | None:
    """The event's key in the criteria's order (besides its position, which breaks ties)."""
    if criteria.order_by == "timestamp":
        return event.timestamp
    if criteria.order_by == "type":
        return event.event_type
    return None


def _subscription_criteria(event_filter: EventFilter) -> Criteria:
    """The filter of a subscription: it selects events; the log decides their order."""
    criteria = normalize(event_filter)
    for field, ok in (
        ("limit", criteria.limit is None),
        ("offset", not criteria.offset),
        ("order_by", criteria.order_by == "position"),
        ("order_direction", not criteria.descending),
    ):
        if not ok:
            raise EventStoreError(
                QUERY_ERROR,
                "a subscription delivers events in log order, all of them: its filter may not"
                " set limit, offset, order_by or order_direction",
                {"field": field},
            )
    return criteria


class _DuplicateInGroup(Exception):
    def __init__(self, error: EventStoreError) -> None:
        super().__init__(error)
        self.error = error


class Transaction:
    """Appends and reads inside `EventStore.transaction`; they commit together."""

    def __init__(self, store: EventStore, conn: psycopg.Connection[Any]) -> None:
        self._store = store
        self._conn = conn
        self._head: int | None = None
        self._hash = b""
        self._closed = False

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
            raise EventStoreError(STORAGE_ERROR, "the transaction has ended")
        store = self._store
        batch = _as_events(events)
        check = store._check(condition)
        prepared = _codec.prepare(batch, store.max_event_bytes)
        request = AppendRequest(batch, prepared, condition, check)
        statements = store._statements
        cur = self._conn.cursor()
        if self._head is None:
            self._head, self._hash = cur.execute(statements.lock_head).fetchone()  # type: ignore[misc]
        # A savepoint per append keeps the transaction usable after a failed one.
        cur.execute("SAVEPOINT tamma_append")
        try:
            verdicts: list[bool] = []
            if request.check is not None:
                checks = statements.checks([request.check])
                verdicts = list(cur.execute(*checks).fetchone() or ())
            if not _accept([request], self._head, verdicts):
                cur.execute("RELEASE SAVEPOINT tamma_append")
                return request.result()
            with cur.copy(statements.copy_events) as copy:
                copy.write(COPY_HEADER)
                last_hash = store._seal(prepared, request.first_position, self._hash)
                _write_buffer(copy, prepared.buffer)
                copy.write(COPY_TRAILER)
            cur.execute("RELEASE SAVEPOINT tamma_append")
        except psycopg.errors.UniqueViolation as exc:
            cur.execute("ROLLBACK TO SAVEPOINT tamma_append")
            if exc.diag.constraint_name != _EVENT_ID_CONSTRAINT:
                raise _storage_error(exc, "appending") from exc
            raise store._duplicates_error(self._conn, [request]) from exc
        except psycopg.Error as exc:
            raise _storage_error(exc, "appending") from exc
        self._head = request.last_position
        self._hash = last_hash
        return request.last_position

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
            raise EventStoreError(STORAGE_ERROR, "the transaction has ended")
        result = _read(
            self._conn,
            self._store._statements,
            self._store._archive,
            query,
            after,
            limit,
            backwards,
        )
        if limit is None and self._head is not None:
            result.head = self._head
        return result

    def _commit(self) -> None:
        statements = self._store._statements
        if self._head is None:
            self._conn.execute("COMMIT")
        else:
            self._conn.execute(statements.set_head, [self._head, self._hash])
            self._conn.execute("COMMIT")
