"""What `EventStore` and `AsyncEventStore` share: settings, argument checks, and every
database operation, written once as `tamma_events._ops` generators.

Each ``_op_*`` method returns an operation; the sync store drives it with `_ops.run` on a
pooled ``psycopg.Connection``, the async store with `_ops.run_async` on an
``AsyncConnection``. What differs between the two (threads or tasks for group commit, read
ahead and subscriptions; pools) lives in the stores themselves.
"""

from __future__ import annotations

import math
import os
import re
import select
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import platformdirs
import psycopg
import psycopg.errors
import pyarrow as pa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from . import _codec
from ._group import AppendRequest
from ._ops import CopyIn, CopyOut, Op, Rollback, Run, Sleep
from ._pycodec import COPY_HEADER, COPY_TRAILER, PreparedBatch, json_rows, parse_uuid
from .archive import ArchiveReader
from .archive import compact as _compact
from .arrow import EXPORT_SCHEMA, EXPORT_SELECT
from .cache import CacheStats, QueryCache
from .errors import (
    STORAGE_ERROR,
    AppendConditionFailed,
    DuplicateEvent,
    EventStoreError,
    QueryError,
    StorageError,
    ValidationFailed,
    shown,
)
from .filters import (
    MAX_BIGINT,
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
from .metrics import Metrics
from .model import (
    AppendCondition,
    DomainEvent,
    Projection,
    Query,
    ReadResult,
    SequencedEvent,
    Snapshot,
    StoreStats,
    TypeStats,
)
from .replicas import PRIMARY_LSN, REPLAY_LSN, Behind, Replica, ReplicaSet, redact
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
from .stream import connection_lost

_T = TypeVar("_T")
_S = TypeVar("_S")
_P = TypeVar("_P")

_EVENT_ID_CONSTRAINT = "events_event_id_key"
# COPY data is handed to psycopg in slices of this size, so libpq sends while we slice.
_COPY_SLICE = 1 << 20
# Groups up to these sizes are written by the append function in one round trip, committing as
# the statement ends, so the head lock is held only while the server runs it. A single append
# takes a quarter less time than by lock, check, COPY and commit; 16 threads' groups (about nine
# events each) ran as fast as by COPY in the same runs (within the noise), with one round trip.
_FUNCTION_MAX_EVENTS = 256
_FUNCTION_MAX_BYTES = 256 << 10
_GROUPS = ("event_type", "tag", "minute", "hour", "day")
#: An append that ends this many events past the summaries' folded position folds them, after
#: its commit and outside the head lock, in the background (schema/0010_lean_appends.sql): the
#: tail that reads add up stays short, and each fold is worth its transaction.
FOLD_EVENTS = 256
#: The largest page `get_page` serves.
MAX_PAGE_SIZE = 100_000

#: The environment variable naming the schema a store opens when none is passed.
SCHEMA_ENV = "TAMMA_EVENTS_SCHEMA"
#: The schema a store opens when neither ``schema`` nor ``$TAMMA_EVENTS_SCHEMA`` names one.
DEFAULT_SCHEMA = "tamma_events"

_decode_events = msgspec.json.Decoder(list[SequencedEvent]).decode
_decode_event = msgspec.json.Decoder(SequencedEvent).decode


#: How long opening a store waits for its server by default, in seconds: a server that
#: refuses connections or does not answer is reported after this, not after the pool's retries.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: How long a call waits by default for a free connection of the pool, in seconds.
DEFAULT_POOL_TIMEOUT = 30.0


def _dsn_params(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message quotes the connection string, password included.
        raise ValidationFailed(
            "the DSN is not a valid connection string (libpq's message is not shown: it quotes"
            " the DSN, password included)",
            {"field": "dsn"},
        ) from None


def connection_kwargs(
    dsn: str, application_name: str = "tamma-events", connect_timeout: float | None = None
) -> dict[str, Any]:
    """Connection settings; the application name shows in ``pg_stat_activity`` unless the DSN
    names one. The DSN's own ``options`` (else ``$PGOPTIONS``), such as ``-c role=app`` or
    ``-c lock_timeout=2s``, are kept, and the session's time zone is set to UTC after them.
    ``connect_timeout`` bounds each connection attempt, unless the DSN sets its own (libpq
    counts whole seconds, at least 2)."""
    params = _dsn_params(dsn)
    own = params.get("options") or os.environ.get("PGOPTIONS") or ""
    kwargs: dict[str, Any] = {"autocommit": True, "options": f"{own} -c TimeZone=UTC".strip()}
    if "application_name" not in params:
        kwargs["application_name"] = application_name
    if connect_timeout is not None and "connect_timeout" not in params:
        kwargs["connect_timeout"] = _libpq_seconds(connect_timeout)
    return kwargs


def _libpq_seconds(timeout: float) -> int:
    """A connect timeout as libpq counts it: whole seconds, at least 2."""
    return max(2, math.ceil(timeout))


def _waited(dsn: str, connect_timeout: float) -> float:
    """How long libpq waits for a server given ``dsn`` and the store's ``connect_timeout``:
    the DSN's own ``connect_timeout`` when it sets one, else the store's, in whole seconds and
    at least 2 (`connection_kwargs`)."""
    own = _dsn_params(dsn).get("connect_timeout")
    try:
        if own is not None and float(own) > 0:
            return float(_libpq_seconds(int(float(own))))
    except ValueError:
        pass
    return float(_libpq_seconds(connect_timeout))


def check_timeout(name: str, value: object) -> float:
    """``value`` as a number of seconds, finite and positive, else VALIDATION_FAILED."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValidationFailed(
            f"{name} must be a finite positive number of seconds, got {shown(value)}",
            {"field": name},
        )
    return float(value)


def make_pool(
    pool_class: type[_P], dsn: str, name: str, connect_timeout: float, **options: Any
) -> _P:
    """A pool (`psycopg_pool.ConnectionPool` or ``AsyncConnectionPool``) of the store's
    connections, not open yet; bad settings are a VALIDATION_FAILED error."""
    kwargs = connection_kwargs(dsn, connect_timeout=connect_timeout)
    try:
        return pool_class(dsn, kwargs=kwargs, name=name, open=False, **options)  # type: ignore[call-arg]
    except (ValueError, TypeError, psycopg.ProgrammingError) as exc:
        raise ValidationFailed(f"the connection pool's settings are not valid: {exc}", {}) from None


def server_address(dsn: str) -> str:
    """Where ``dsn`` points, as libpq reads it (the DSN, then ``$PGHOST``/``$PGPORT``):
    ``host:port``, or the Unix socket's path. Never the password."""
    params = _dsn_params(dsn)
    host = str(
        params.get("host")
        or params.get("hostaddr")
        or os.environ.get("PGHOST")
        or os.environ.get("PGHOSTADDR")
        or ""
    )
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if not host:
        return f"the default Unix socket (port {port})"
    if host.startswith("/") or host.startswith("@"):
        return f"the Unix socket {host.rstrip('/')}/.s.PGSQL.{port}"
    if ":" in host and "," not in host:
        return f"[{host}]:{port}"  # an IPv6 address
    return f"{host}:{port}"


# libpq's reason, after the server it names: 'connection to server at "h", port 5432 failed:
# Connection refused' (one line per address tried).
_LIBPQ_REASON = re.compile(r"connection to server (?:at|on socket) .*? failed: (?:FATAL:\s+)?(.+)")


def unreachable(exc: BaseException, dsn: str, timeout: float) -> EventStoreError:
    """STORAGE_ERROR for a server that could not be connected to when a store opened: one
    line naming the host and port, libpq's reason, and what to check."""
    text = str(exc).strip()
    reasons = _LIBPQ_REASON.findall(text)
    reason = reasons[-1] if reasons else (text.splitlines() or [type(exc).__name__])[0]
    reason = reason.strip().rstrip(".")
    lowered = reason.lower()
    if "timeout" in lowered or "timed out" in lowered:
        reason = f"no answer within {_waited(dsn, timeout):g} s"
        check = "check the host and port, and that no firewall drops the connection"
    elif "password" in lowered or "authentication" in lowered:
        check = "check the user name and password"
    elif "does not exist" in lowered:
        check = "check the database and user names in the DSN"
    else:
        check = (
            "check that the server is running there and accepts connections, and that the"
            " DSN names the right host and port"
        )
    where = server_address(dsn)
    return StorageError(
        f"cannot connect to PostgreSQL at {where}: {reason[:1].lower()}{reason[1:]}; {check}",
        {"server": where, "dsn": redact(dsn)},
    )


def server_wrote(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has written to an idle connection, or it is closed: a backend
    terminated or a server shut down sends its FATAL message then. One zero-timeout
    ``select``, no round trip; the stores test such a connection before using it (see
    `tamma_events.store.live_connection`)."""
    if conn.closed:
        return True
    return bool(select.select([conn.fileno()], [], [], 0)[0])


def as_events(events: Iterable[DomainEvent | dict[str, Any]]) -> list[DomainEvent]:
    """The batch as a list; mappings (from JSON input) are converted to `DomainEvent`s."""
    batch = list(events)
    for index, event in enumerate(batch):
        if isinstance(event, dict):
            if isinstance(event.get("event_id"), (bytes, bytearray, memoryview)):
                # msgspec would take 16 bytes for a UUID; a DomainEvent refuses them.
                raise ValidationFailed(
                    f"event {index}: event_id must be a UUID, got bytes",
                    {"index": index, "field": "event_id"},
                )
            try:
                batch[index] = msgspec.convert(event, DomainEvent)
            except (msgspec.ValidationError, UnicodeEncodeError, RecursionError) as exc:
                raise ValidationFailed(
                    f"event {index}: {_conversion_problem(exc)}",
                    {"index": index, "field": _conversion_field(exc, event)},
                ) from None
    return batch  # type: ignore[return-value]


_FIELD_IN_PATH = re.compile(r"at `\$\.([a-z_]+)")


def _conversion_problem(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return "a string holds a lone surrogate"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _conversion_field(exc: Exception, event: dict[Any, Any]) -> str | None:
    """The field of a mapping event that msgspec could not convert: from the path in its
    message, else the first text field that cannot be UTF-8 (what makes msgspec raise
    UnicodeEncodeError while parsing a time or an id)."""
    match = _FIELD_IN_PATH.search(str(exc)) if isinstance(exc, msgspec.ValidationError) else None
    if match:
        return match[1]
    for field in ("tags", "metadata", "data"):  # msgspec names no path for a bad key
        value = event.get(field)
        if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
            return field
    if isinstance(exc, UnicodeEncodeError):
        for field in ("timestamp", "event_id", "event_type"):
            value = event.get(field)
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return field
    return None


def storage_error(exc: BaseException, action: str, **context: Any) -> EventStoreError:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        context["sqlstate"] = sqlstate
    message = str(exc).strip() or type(exc).__name__
    return StorageError(f"{action} failed: {message}", context)


def retryable(exc: EventStoreError) -> bool:
    """Whether an operation that failed with ``exc`` may simply run again: its connection was
    lost (a restarted server, a terminated backend) and nothing had been sent for commit, so
    the server rolled back whatever it had begun. Not a pool timeout: waiting twice helps no
    one."""
    cause = exc.__cause__
    return (
        exc.code == STORAGE_ERROR
        and exc.context.get("outcome") != "unknown"
        and isinstance(cause, psycopg.OperationalError)
        and not isinstance(cause, PoolTimeout)
        and connection_lost(cause)
    )


def _condition_error(condition: AppendCondition, head: int) -> EventStoreError:
    after = condition.after
    where = "in the store" if after is None else f"after position {after}"
    return AppendConditionFailed(
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
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_BIGINT
    ):
        raise QueryError(
            f"limit must be a non-negative int up to 2**63 - 1, or None, got {shown(limit)}",
            {"field": "limit"},
        )


def _size_of_strings(values: list[str]) -> int:
    return sum(len(value) + 56 for value in values)


def json_array(texts: list[str]) -> str:
    return "[" + ",".join(texts) + "]"


def decode_events(texts: list[str]) -> list[SequencedEvent]:
    return _decode_events(json_array(texts))


def decode_document(document: str) -> list[SequencedEvent]:
    """The events of a JSON array of them (`get_events`' cached answer)."""
    return _decode_events(document)


class _SortKey(msgspec.Struct):
    """What keyset paging needs of an event, decoded alone from its JSON text."""

    position: int
    timestamp: datetime
    event_type: str


_decode_key = msgspec.json.Decoder(_SortKey).decode


def _text_array(values: Iterable[str]) -> str:
    """``values`` as a PostgreSQL text[] literal: each element quoted, so none is NULL."""
    quoted = (value.replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return "{" + ",".join(f'"{value}"' for value in quoted) + "}"


def _condition_document(condition: AppendCondition | None) -> dict[str, Any] | None:
    """A (validated) condition as the append function takes it (its types as a text[]
    literal, which the function casts without running a query)."""
    if condition is None:
        return None
    items: list[dict[str, Any]] = []
    for item in condition.fail_if_events_match.items:
        if not item.types and not item.tags:
            items = []  # an item matching everything: so does the query
            break
        entry: dict[str, Any] = {"types": _text_array(item.types)}
        if item.tags:
            entry["tags"] = item.tags
        items.append(entry)
    return {"after": condition.after or 0, "items": items}


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
                # The head this check saw: the stored one, and the group's accepted events.
                request.fail(_condition_error(condition, position))
                continue
        request.first_position = position + 1
        position += request.count
        accepted.append(request)
    return accepted


def _slices(buffer: bytearray) -> Iterator[memoryview]:
    view = memoryview(buffer)
    try:
        for start in range(0, len(view), _COPY_SLICE):
            yield view[start : start + _COPY_SLICE]
    finally:
        view.release()


def check_size_any(value: int, field: str) -> None:
    """VALIDATION_FAILED unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationFailed(
            f"{field} must be a positive int, got {shown(value)}",
            {"field": field},
        )


def moment(value: datetime | str) -> datetime:
    """`compact_events`'s ``before``, read as a filter's time bound is (`parse_time`), but
    required and refused as VALIDATION_FAILED: it is an argument, not a query."""
    try:
        when = parse_time(value, "before")
    except EventStoreError as exc:
        raise ValidationFailed(exc.message, exc.context) from None
    if when is None:
        raise ValidationFailed(
            "before must be a datetime or an ISO-8601 string, got None",
            {"field": "before"},
        )
    return when


def check_size(value: int, field: str) -> None:
    """QUERY_ERROR unless ``value`` is an int from 1 to `MAX_PAGE_SIZE` (a page or batch)."""
    check_count(value, field, allow_none=False)
    if not 0 < value <= MAX_PAGE_SIZE:
        raise QueryError(
            f"{field} must be between 1 and {MAX_PAGE_SIZE}, got {value}",
            {"field": field},
        )


def _check_aggregate_id(aggregate_id: object) -> None:
    if not isinstance(aggregate_id, str) or not 0 < len(aggregate_id) <= 255:
        raise ValidationFailed(
            f"aggregate_id must be a string of 1 to 255 characters, got {shown(aggregate_id)}",
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


def subscription_criteria(event_filter: EventFilter) -> Criteria:
    """The filter of a subscription: it selects events; the log decides their order."""
    criteria = normalize(event_filter)
    for field, ok in (
        ("limit", criteria.limit is None),
        ("offset", not criteria.offset),
        ("order_by", criteria.order_by == "position"),
        ("order_direction", not criteria.descending),
    ):
        if not ok:
            raise QueryError(
                "a subscription delivers events in log order, all of them: its filter may not"
                " set limit, offset, order_by or order_direction",
                {"field": field},
            )
    return criteria


def event_key(event_id: uuid.UUID | str) -> uuid.UUID:
    try:
        if isinstance(event_id, uuid.UUID):
            return event_id
        if not isinstance(event_id, str):
            raise ValueError
        return parse_uuid(event_id)
    except ValueError:
        raise QueryError(
            f"event_id must be a UUID, got {shown(event_id)}",
            {
                "event_id": event_id
                if isinstance(event_id, str) and len(event_id) <= 100
                else shown(event_id)
            },
        ) from None


class DuplicateInGroup(Exception):
    def __init__(self, error: EventStoreError) -> None:
        super().__init__(error)
        self.error = error


class TxState:
    """The head as a transaction of appends (`EventStore.transaction`, or appends in a
    caller's own transaction) has moved it."""

    __slots__ = ("hash", "head")

    def __init__(self) -> None:
        self.head: int | None = None
        self.hash = b""


#: A keyset batch's arguments: ``until``, ``last_key``, ``last_position``, ``limit``,
#: ``offset`` (see `StoreCore._op_keyset_rows`).
Keyset = tuple[int | None, Any, int | None, int, int]


class Walk:
    """The arithmetic of a keyset walk over ``criteria`` (`stream_events`, exports): each
    batch asks for ``(until, last_key, last_position, limit, offset)``; the criteria's offset
    and limit apply to the whole walk."""

    def __init__(self, criteria: Criteria, batch_size: int) -> None:
        self.remaining = criteria.limit
        self.batch_size = batch_size
        self.size = batch_size if self.remaining is None else min(batch_size, self.remaining)
        self.first: Keyset = (None, None, None, self.size, criteria.offset)

    def after(self, until: int, got: int, last: Callable[[], tuple[Any, int]]) -> Keyset | None:
        """The next batch's arguments after one of ``got`` events (``last()``: the keyset of
        its last), or None when the walk is over."""
        if self.remaining is not None:
            self.remaining -= got
        if got < self.size or (self.remaining is not None and self.remaining <= 0):
            return None
        key, position = last()
        size = self.batch_size if self.remaining is None else min(self.batch_size, self.remaining)
        self.size = size
        return (until, key, position, size, 0)


class StoreCore:
    """Settings and operations shared by the sync and the async store."""

    schema: str
    max_event_bytes: int
    chunk_events: int
    cache: QueryCache
    archive_dir: Path | None
    _statements: Statements
    _archive: ArchiveReader
    _metrics: Metrics
    _replicas: ReplicaSet

    def _setup(
        self,
        *,
        schema: str | None,
        max_event_bytes: int,
        chunk_events: int,
        cache_size: int,
        cache_ttl: float,
        archive_dir: str | os.PathLike[str] | None,
    ) -> None:
        if schema is None:
            schema = os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
        if not schema or not isinstance(schema, str):
            raise ValidationFailed("schema must be a non-empty string")
        self.schema = schema
        self.max_event_bytes = max_event_bytes
        self.chunk_events = chunk_events
        self._statements = Statements(schema)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValidationFailed(
                f"cache_size must be a non-negative int, got {shown(cache_size)}",
                {"field": "cache_size"},
            )
        if (
            isinstance(cache_ttl, bool)
            or not isinstance(cache_ttl, (int, float))
            or not 0 <= cache_ttl < math.inf
        ):
            raise ValidationFailed(
                "cache_ttl must be a finite non-negative number of seconds,"
                f" got {shown(cache_ttl)}",
                {"field": "cache_ttl"},
            )
        self.cache = QueryCache(cache_size, cache_ttl)
        #: Where `compact_events` writes archives. Reads find each file where the manifest says
        #: it was written or, when it is no longer there, here (archives moved).
        self.archive_dir = Path(archive_dir) if archive_dir is not None else None
        self._archive = ArchiveReader(schema, self.archive_dir)
        self._metrics = Metrics()
        # The benchmarks swap this for a sealer without the chain, to measure what it costs.
        self._seal = _codec.seal
        #: The last folded position this store saw: the summaries' tail is folded once an
        #: append of this store ends `FOLD_EVENTS` or more past it.
        self._folded = 0
        self._folding = False

    @property
    def impl(self) -> str:
        """Which codec encodes appends: ``"native"`` or ``"python"``."""
        return _codec.IMPL

    def cache_stats(self) -> CacheStats:
        """Hits, misses, evictions and size of the query result cache."""
        return self.cache.stats()

    # -- argument checks -------------------------------------------------------------------

    def _request(
        self, events: Iterable[DomainEvent | dict[str, Any]], condition: AppendCondition | None
    ) -> tuple[list[DomainEvent], Check | None, PreparedBatch | None]:
        """The batch, its condition's SQL parameters, and (up to ``chunk_events`` events) its
        encoding: everything validated before any database work."""
        batch = as_events(events)
        check = None if condition is None else condition_check(condition)
        if len(batch) <= self.chunk_events:
            return batch, check, _codec.prepare(batch, self.max_event_bytes)
        return batch, check, None

    def validate(self, events: Iterable[DomainEvent | dict[str, Any]]) -> list[DomainEvent]:
        """Check ``events`` as `append_batch` would before writing them (types, sizes, JSON,
        ids, timestamps), without touching the database; returns them as `DomainEvent`s.
        Raises the `EventStoreError` the append would raise (``VALIDATION_FAILED``, with the
        event's ``index`` and ``field``). Stored ids are found only by the append itself."""
        batch = as_events(events)
        _codec.prepare(batch, self.max_event_bytes)
        return batch

    def _full_request(
        self, events: Iterable[DomainEvent | dict[str, Any]], condition: AppendCondition | None
    ) -> AppendRequest:
        """A request with the whole batch encoded at once (appends in a transaction)."""
        batch, check, prepared = self._request(events, condition)
        if prepared is None:
            prepared = _codec.prepare(batch, self.max_event_bytes)
        return AppendRequest(batch, prepared, condition, check)

    @staticmethod
    def _page_start(
        event_filter: EventFilter | None, page_size: int, token: str | None
    ) -> tuple[Criteria, int | None, Any, int | None]:
        criteria = normalize(event_filter)
        if criteria.limit is not None or criteria.offset:
            raise QueryError(
                "a paged filter may not set limit or offset; use page_size and the page token",
                {"field": "limit" if criteria.limit is not None else "offset"},
            )
        check_size(page_size, "page_size")
        if token is None:
            return criteria, None, None, None
        decoded = decode_token(token, criteria)
        return criteria, decoded.until, token_key(decoded, criteria), decoded.last_position

    @staticmethod
    def _page(criteria: Criteria, until: int, rows: list[str], page_size: int) -> Page:
        events = decode_events(rows)
        if len(events) <= page_size:
            return Page(events, None)
        del events[page_size:]
        key = _sort_key(events[-1], criteria)
        if isinstance(key, datetime):
            key = key.isoformat()
        return Page(events, encode_token(criteria, until, key, events[-1].position))

    @staticmethod
    def _aggregate_args(group_by: str, tag_key: str | None) -> None:
        if group_by not in _GROUPS:
            raise QueryError(
                f"group_by must be one of {', '.join(_GROUPS)}, got {shown(group_by)}",
                {"field": "group_by"},
            )
        if (group_by == "tag") != (tag_key is not None):
            raise QueryError(
                "tag_key is required with group_by='tag', and only with it",
                {"field": "tag_key"},
            )
        if tag_key is not None:
            check_text(tag_key, "tag_key")

    @staticmethod
    def _snapshot_data(aggregate_id: str, version: int, state: Any) -> bytes:
        _check_aggregate_id(aggregate_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValidationFailed(
                f"version must be a position (an int from 0 to the head), got {shown(version)}",
                {"field": "version", "aggregate_id": aggregate_id},
            )
        try:
            return msgspec.json.encode(state)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise ValidationFailed(
                f"state cannot be encoded as JSON: {exc}",
                {"field": "state", "aggregate_id": aggregate_id},
            ) from None

    @staticmethod
    def _project_args(key: str | None, snapshot_every: int | None, batch_size: int) -> None:
        if snapshot_every is not None and (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 1
        ):
            raise QueryError(
                f"snapshot_every must be a positive int or None, got {shown(snapshot_every)}",
                {"field": "snapshot_every"},
            )
        if snapshot_every is not None and key is None:
            raise QueryError("snapshot_every needs a key to save under", {"field": "key"})
        check_size(batch_size, "batch_size")

    @staticmethod
    def _count_result(criteria: Criteria, total: int) -> int:
        total = max(total - criteria.offset, 0)
        return total if criteria.limit is None else min(total, criteria.limit)

    # -- appends ---------------------------------------------------------------------------

    def _op_write(self, requests: list[AppendRequest]) -> Op[None]:
        """One transaction: lock the head, check the conditions, write the accepted requests'
        events, move the head and commit; settles every request it accepts or refuses.

        Small groups (single appends, mostly) take one round trip: the ``append_group``
        function does it all server-side, committing as the statement ends. Larger ones lock
        and check, then send their rows by binary COPY, with the chain computed here.
        """
        statements = self._statements
        committing = False
        try:
            if sum(r.count for r in requests) <= _FUNCTION_MAX_EVENTS and (
                sum(len(r.batch.buffer) for r in requests) <= _FUNCTION_MAX_BYTES
            ):
                committing = True
                yield from self._op_write_by_function(requests)
                yield from self._op_note_commit()
                return
            head, head_hash, verdicts = yield from self._op_lock_and_check(requests)
            accepted = _accept(requests, head, verdicts)
            if not accepted:
                yield Run("ROLLBACK", fetch="none")
                return
            last_hash = head_hash
            for request in accepted:
                last_hash = self._seal(request.batch, request.first_position, last_hash)

            def chunks() -> Iterator[bytes | memoryview]:
                yield COPY_HEADER
                for request in accepted:
                    yield from _slices(request.batch.buffer)
                yield COPY_TRAILER

            yield CopyIn(statements.copy_events, chunks())
            committing = True
            # The COPY moved the head (the trigger of schema/0009_head_by_trigger.sql).
            yield Run("COMMIT", fetch="none")
        except psycopg.errors.UniqueViolation as exc:
            yield Rollback()
            if exc.diag.constraint_name != _EVENT_ID_CONSTRAINT:
                raise storage_error(exc, "appending") from exc
            error = yield from self._op_duplicates_error(requests)
            if len(requests) > 1:
                raise DuplicateInGroup(error) from exc
            requests[0].fail(error)
            return
        except psycopg.Error as exc:
            yield Rollback()
            context = {"outcome": "unknown"} if committing else {}
            raise storage_error(exc, "appending", **context) from exc
        for request in accepted:
            request.succeed(request.first_position)
        yield from self._op_note_commit()

    def _op_write_group(self, requests: list[AppendRequest]) -> Op[None]:
        """`_op_write` for a group commit's requests: when an event id of the group is
        already stored (or given twice), the transaction fails for all of them, so each is
        then written alone, its condition checked again, to find out whose it was."""
        try:
            yield from self._op_write(requests)
        except DuplicateInGroup:
            for request in requests:
                request.reset()
            for request in requests:
                try:
                    yield from self._op_write([request])
                except EventStoreError as exc:
                    request.fail(exc)

    def _fold_due(self, position: int) -> bool:
        """Whether an append that ended at ``position`` should start folding the summaries
        (none is running here, and the tail may be long): the caller then runs `_op_fold` in
        the background, and clears `_folding` when it is done."""
        if self._folding or position - self._folded < FOLD_EVENTS:
            return False
        self._folding = True
        return True

    def _op_fold(self, min_tail: int = FOLD_EVENTS, *, wait: bool = False) -> Op[int]:
        """Fold the summaries' tail if it holds at least ``min_tail`` events (unless another
        session is folding it and ``wait`` is false); returns the folded position."""
        row = yield Run(self._statements.fold_summaries, [min_tail, wait], fetch="one")
        self._folded = max(self._folded, int(row[0]))
        return self._folded

    def _op_note_commit(self) -> Op[None]:
        """With replicas, note the primary's WAL position after a commit: reads wait for a
        replica to have replayed it (read your writes)."""
        if self._replicas:
            try:
                row = yield Run(PRIMARY_LSN, fetch="one")
            except psycopg.Error:
                # The append committed; only its position is unknown. The next read asks the
                # primary for it before choosing a replica. Raising here would make the
                # append look failed, and a retry store it twice.
                self._replicas.pending = True
                return
            self._replicas.wrote(int(row[0]))

    def _op_write_by_function(self, requests: list[AppendRequest]) -> Op[None]:
        """One statement, in autocommit: ``append_group`` (schema/0010_lean_appends.sql)."""
        described: list[list[Any]] = []
        events: list[list[Any]] = []
        rows = bytearray()
        offsets = [0]
        for request in requests:
            described.append([request.count, _condition_document(request.condition)])
            events += json_rows(request.batch)
            base = len(rows)
            rows += request.batch.buffer
            offsets += [base + offset for offset in request.batch.offsets[1:]]
        document = {"requests": described, "offsets": offsets, "events": events}
        params = [msgspec.json.encode(document).decode(), bytes(rows)]
        result = yield Run(self._statements.append_group, params, fetch="one")
        if result is None:  # pragma: no cover - the function always returns its array
            raise StorageError("the append function returned nothing")
        # The function returns the head its lock found; a request's check also saw the events
        # of the requests accepted before it in the group, so its error reports that head.
        seen, *firsts = result[0]
        for request, first in zip(requests, firsts, strict=True):
            if first is None:
                assert request.condition is not None
                request.fail(_condition_error(request.condition, seen))
            else:
                request.succeed(first)
                seen = first + request.count - 1

    def _op_lock_and_check(
        self, requests: list[AppendRequest]
    ) -> Op[tuple[int, bytes, list[bool]]]:
        """BEGIN and lock the head row (one round trip), then check the requests' conditions
        against the stored events (one more, if any). Returns the head, its hash and one verdict
        per condition (True: violated).

        The checks are a statement of their own, run after the lock is granted, so under READ
        COMMITTED they see every append committed before it: one statement taking the lock and
        checking would check against a snapshot from before the wait.
        """
        statements = self._statements
        row = yield Run(statements.begin_and_lock_head, fetch="last")
        if row is None:
            raise StorageError("the head row is missing: is the schema migrated?")
        checks = [r.check for r in requests if r.check is not None]
        verdicts: list[bool] = []
        if checks:
            found = yield Run(*statements.checks(checks), fetch="one", prepare=False)
            verdicts = list(found or ())
        return int(row[0]), bytes(row[1]), verdicts

    def _op_duplicates_error(self, requests: list[AppendRequest]) -> Op[EventStoreError]:
        """Name the ids that made an append fail: those already stored, and those that occur
        twice among ``requests`` (across the chunks of a large batch, or across a group)."""
        ids = [event.event_id for request in requests for event in request.events]
        ids = [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]
        try:
            rows = yield Run(self._statements.existing_ids, [ids])
        except psycopg.Error as exc:
            return storage_error(exc, "looking up duplicate event ids")
        existing = [str(row[0]) for row in rows]
        repeated = [str(i) for i, n in Counter(ids).items() if n > 1]
        parts = []
        if existing:
            parts.append(f"{len(existing)} already stored")
        if repeated:
            parts.append(f"{len(repeated)} given twice")
        return DuplicateEvent(
            f"duplicate event ids ({', '.join(parts) or 'none found'}); nothing was written",
            {"event_ids": list(dict.fromkeys(existing + repeated))},
        )

    def _op_append_large(
        self,
        batch: list[DomainEvent],
        condition: AppendCondition | None,
        check: Check | None,
    ) -> Op[tuple[int, int]]:
        """One transaction for a batch above ``chunk_events``, encoded chunk by chunk while
        earlier chunks stream to the server. Returns the last position and the bytes sent."""
        size = self.chunk_events
        first = _codec.prepare(batch[:size], self.max_event_bytes)
        request = AppendRequest(batch, first, condition, check)
        statements = self._statements
        committing = False
        sent = 0
        try:
            head, last_hash, verdicts = yield from self._op_lock_and_check([request])
            # The request's count is that of its first chunk; the condition concerns stored
            # events only, so the verdict is the same.
            if not _accept([request], head, verdicts):
                yield Run("ROLLBACK", fetch="none")
                return request.result(), 0
            position = head + 1

            def chunks() -> Iterator[bytes | memoryview]:
                nonlocal position, last_hash, sent
                yield COPY_HEADER
                prepared: PreparedBatch = first
                for start in range(0, len(batch), size):
                    if start:
                        prepared = _codec.prepare(
                            batch[start : start + size], self.max_event_bytes, start
                        )
                    last_hash = self._seal(prepared, position, last_hash)
                    sent += len(prepared.buffer)
                    yield from _slices(prepared.buffer)
                    position += prepared.count
                yield COPY_TRAILER

            yield CopyIn(statements.copy_events, chunks())
            committing = True
            yield Run("COMMIT", fetch="none")
        except EventStoreError as exc:
            yield Rollback()
            raise exc.with_traceback(None) from None
        except psycopg.errors.UniqueViolation as exc:
            yield Rollback()
            if exc.diag.constraint_name != _EVENT_ID_CONSTRAINT:
                raise storage_error(exc, "appending") from exc
            raise (yield from self._op_duplicates_error([request])) from exc
        except psycopg.Error as exc:
            yield Rollback()
            context = {"outcome": "unknown"} if committing else {}
            raise storage_error(exc, "appending", **context) from exc
        yield from self._op_note_commit()
        return position - 1, sent

    def _op_tx_append(self, state: TxState, request: AppendRequest) -> Op[int]:
        """An append inside a transaction the store does not commit: lock the head (once per
        transaction), check, COPY (which moves the head). Each append runs in a savepoint, its
        lock included, so a failed one (a lock timeout, say) is undone alone and leaves the
        transaction usable."""
        statements = self._statements
        locked_here = False
        yield Run("SAVEPOINT tamma_append", fetch="none")
        try:
            if state.head is None:
                row = yield Run(statements.lock_head, fetch="one")
                if row is None:
                    raise StorageError("the head row is missing: is the schema migrated?")
                state.head, state.hash = int(row[0]), bytes(row[1])
                locked_here = True
            verdicts: list[bool] = []
            if request.check is not None:
                found = yield Run(*statements.checks([request.check]), fetch="one", prepare=False)
                verdicts = list(found or ())
            if not _accept([request], state.head, verdicts):
                yield Run("RELEASE SAVEPOINT tamma_append", fetch="none")
                return request.result()
            last_hash = self._seal(request.batch, request.first_position, state.hash)
            yield CopyIn(
                statements.copy_events,
                [COPY_HEADER, *_slices(request.batch.buffer), COPY_TRAILER],
            )
            yield Run("RELEASE SAVEPOINT tamma_append", fetch="none")
        except psycopg.Error as exc:
            # Undo this append only (the head lock too, when it took it), so the transaction
            # stays usable when the connection is.
            if locked_here:
                state.head = None
            try:
                yield Run("ROLLBACK TO SAVEPOINT tamma_append", fetch="none")
            except psycopg.Error:
                pass
            if (
                isinstance(exc, psycopg.errors.UniqueViolation)
                and exc.diag.constraint_name == _EVENT_ID_CONSTRAINT
            ):
                raise (yield from self._op_duplicates_error([request])) from exc
            raise storage_error(exc, "appending") from exc
        state.head = request.last_position
        state.hash = last_hash
        return request.last_position

    def _op_tx_commit(self, state: TxState) -> Op[None]:
        yield Run("COMMIT", fetch="none")
        if state.head is not None:
            yield from self._op_note_commit()

    # -- reads -----------------------------------------------------------------------------

    def _op_fill_archived(self, rows: list[Any], event: int, position: int) -> Op[list[str]]:
        """The JSON texts of ``rows`` (column ``event``, NULL for an archived event, whose
        position is column ``position``), the archived ones read from their files."""
        missing = [
            row[position] for row in rows if row[event] is None and row[position] is not None
        ]
        if not missing:
            return [row[event] for row in rows if row[event] is not None]
        archived = iter((yield from self._archive.json_texts(missing)))
        return [
            row[event] if row[event] is not None else next(archived)
            for row in rows
            if row[position] is not None
        ]

    def _op_event_rows(self, statement: tuple[Any, list[Any]], archived: bool) -> Op[list[str]]:
        """The events a statement selects as `EVENT_JSON` rows, as their JSON texts; over the
        whole history (`Select` with ``archived``), its rows are ``(event, position)``, the
        event NULL when it is archived, read from its archive file as the same text."""
        text, params = statement
        rows = yield Run(text, params, prepare=False)
        if archived:
            return (yield from self._op_fill_archived(rows, 0, 1))
        return [row[0] for row in rows]

    def _op_read_with_head(
        self, query: Query | None, after: int | None, limit: int | None, backwards: bool
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """The events `read` returns, and the store's head in the same snapshot."""
        _check_limit(limit)
        params: list[Any] = [after_position(after)]
        shape = query_shape(query, params)
        params.append(limit)
        # Not prepared, as filter statements are not (see `Run`): after five runs psycopg
        # would prepare it, and PostgreSQL's generic plan for a selective tag took 365 ms at 1M
        # events where one planned for the values takes 1.7 ms.
        rows = yield Run(self._statements.read(shape, backwards), params, prepare=False)
        store_head = int(rows[0][0]) if rows else 0
        texts = yield from self._op_fill_archived(rows, 1, 2)
        return decode_events(texts), store_head

    def _op_read(
        self, query: Query | None, after: int | None, limit: int | None, backwards: bool
    ) -> Op[ReadResult]:
        events, store_head = yield from self._op_read_with_head(query, after, limit, backwards)
        if limit is None:
            head: int | None = store_head
        elif events:
            head = events[0].position if backwards else events[-1].position
        else:
            head = None
        return ReadResult(events, head)

    def _op_get_event(self, key: uuid.UUID) -> Op[SequencedEvent | None]:
        rows = yield Run(self._statements.get_event, [key])
        texts = yield from self._op_fill_archived(rows, 0, 1)
        return _decode_event(texts[0]) if texts else None

    def _op_head(self) -> Op[int]:
        row = yield Run(self._statements.head_position, fetch="one")
        return int(row[0]) if row else 0

    def _op_cached(
        self, key: tuple[Any, ...], compute: Callable[[], Op[_T]], size: Callable[[_T], int]
    ) -> Op[_T]:
        """``compute()``'s result, or the cache's answer computed at the current head."""
        if not self.cache.enabled:
            return (yield from compute())
        # The head's hash too: a schema dropped and refilled may reach the same position.
        head = yield Run(self._statements.head_label, fetch="one")
        value = self.cache.get(key, head)
        if value is None:
            value = yield from compute()
            self.cache.put(key, head, value, size(value))
        return value

    def _op_select(self, criteria: Criteria, archived: bool = False) -> Op[tuple[Select, bool]]:
        """The statement builder for reading events matching ``criteria``, and whether they
        are few (then collected before they are ordered; see `Select.events`).

        With tag conditions, the tag summary's exact counts decide: when one condition matches
        few events, only it goes to the GIN index."""
        statements = self._statements
        positions = None
        if criteria.order_by == "position":
            window = window_positions(statements, criteria)
            if window is not None:
                positions = yield Run(*window, fetch="one")
        statement = tag_matches(statements, criteria)
        row = None if statement is None else (yield Run(*statement, fetch="one"))
        if not row:
            return Select(statements, criteria, positions=positions, archived=archived), False
        counts = [int(count) for count in row]
        smallest = min(range(len(counts)), key=counts.__getitem__)
        if counts[smallest] > FEW_MATCHES:
            return Select(statements, criteria, positions=positions, archived=archived), False
        indexed = smallest if len(counts) > 1 else None
        select = Select(
            statements, criteria, positions=positions, indexed_tag=indexed, archived=archived
        )
        return select, True

    def _op_get_events(self, criteria: Criteria, include_archived: bool) -> Op[str]:
        """`get_events`' answer, as a JSON array of events."""

        def compute() -> Op[str]:
            select, few = yield from self._op_select(criteria, include_archived)
            statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
            return json_array((yield from self._op_event_rows(statement, include_archived)))

        return (yield from self._op_cached(("events", criteria, include_archived), compute, len))

    def _op_count(self, criteria: Criteria) -> Op[int]:
        """How many events match ``criteria`` (its offset and limit are the caller's)."""
        unpaged = criteria.unpaged()

        def compute() -> Op[int]:
            row = yield Run(*count_statement(self._statements, unpaged), fetch="one", prepare=False)
            return int(row[0]) if row else 0

        return (yield from self._op_cached(("count", unpaged), compute, lambda _: 64))

    def _op_schema_version(self) -> Op[int]:
        from .schema import version_op

        return (yield from version_op(self.schema))

    def _op_stats(self) -> Op[StoreStats]:
        """`StoreStats`, from the summaries, the archive manifest and the catalog: a cost that
        does not grow with the log. One snapshot: the counts and timestamps agree with each
        other while appends and compactions go on (the size on disk is read as it is now)."""
        from .schema import no_store_error, version_op

        # On an error, `run` rolls the transaction back.
        yield Run("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", fetch="none")
        version = yield from version_op(self.schema)
        if version == 0:
            raise no_store_error(self.schema)
        head = yield from self._op_head()
        server = yield Run("SELECT current_setting('server_version')", fetch="one")
        types = yield Run(
            sql.SQL(
                "SELECT event_type, count, first_timestamp, last_timestamp FROM {}"
                " ORDER BY count DESC, event_type"
            ).format(self._statements.type_totals)
        )
        tags = yield Run(
            sql.SQL("SELECT count(DISTINCT key), count(*) FROM {}").format(
                self._statements.tag_totals
            ),
            fetch="one",
        )
        archives = yield Run(
            sql.SQL(
                "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(bytes), 0) FROM {}"
                " WHERE compacted_at IS NOT NULL"
            ).format(sql.Identifier(self.schema, "archives")),
            fetch="one",
        )
        size = yield Run(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm')",
            [self.schema],
            fetch="one",
        )
        yield Run("COMMIT", fetch="none")
        event_types = [TypeStats(name, int(n), first, last) for name, n, first, last in types]
        archived = int(archives[1])
        return StoreStats(
            schema=self.schema,
            schema_version=version,
            server_version=str(server[0]),
            codec=_codec.IMPL,
            head=head,
            events=head,
            live_events=head - archived,
            archived_events=archived,
            archive_files=int(archives[0]),
            archive_bytes=int(archives[2]),
            table_bytes=int(size[0]),
            tag_keys=int(tags[0]),
            tag_values=int(tags[1]),
            first_timestamp=min((t.first_timestamp for t in event_types), default=None),
            last_timestamp=max((t.last_timestamp for t in event_types), default=None),
            event_types=event_types,
        )

    def _op_event_types(self) -> Op[list[str]]:
        text = sql.SQL("SELECT event_type FROM {} ORDER BY 1").format(self._statements.type_totals)

        def compute() -> Op[list[str]]:
            return [row[0] for row in (yield Run(text))]

        return list((yield from self._op_cached(("types",), compute, _size_of_strings)))

    def _op_tags(self) -> Op[dict[str, list[str]]]:
        text = sql.SQL(
            "SELECT key, array_agg(value ORDER BY value) FROM {} GROUP BY key ORDER BY key"
        ).format(self._statements.tag_totals)

        def compute() -> Op[dict[str, list[str]]]:
            return {key: values for key, values in (yield Run(text))}

        tags = yield from self._op_cached(
            ("tags",), compute, lambda t: sum(_size_of_strings(v) for v in t.values())
        )
        return {key: list(values) for key, values in tags.items()}

    def _op_aggregate(
        self, criteria: Criteria, group_by: GroupBy, tag_key: str | None
    ) -> Op[list[AggregateRow]]:
        def compute() -> Op[list[AggregateRow]]:
            statement = summary_aggregate(self._statements, criteria, group_by) or Select(
                self._statements, criteria, archived=True
            ).aggregate(group_by, tag_key)
            rows = yield Run(*statement, prepare=False)
            return [AggregateRow(key, int(count), first, last) for key, count, first, last in rows]

        rows = yield from self._op_cached(
            ("aggregate", criteria, group_by, tag_key), compute, lambda r: 128 * len(r)
        )
        return list(rows)

    def _op_keyset_select(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        archived: bool,
    ) -> Op[tuple[int, Select, bool]]:
        """The statement builder of a keyset batch (see `_op_keyset_rows`), whether its
        matches are few (see `_op_select`), and ``until``, read from the head when None.

        With replicas, a batch pinned to a head the server has not reached (a lagging replica)
        raises `Behind`: its reader asks the primary instead."""
        if until is None or self._replicas:
            head = yield from self._op_head()
            if until is None:
                until = head
            elif head < until:
                raise Behind(f"head {head} is behind {until}")
        select, few = yield from self._op_select(criteria, archived)
        select.after(until, last_key, last_position)
        return until, select, few

    def _op_keyset_rows(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool = False,
    ) -> Op[tuple[int, list[str]]]:
        """The events matching ``criteria`` at positions up to ``until`` (the head now, when
        None) that follow the event ``(last_key, last_position)`` in the criteria's order (from
        the first, when None), at most ``limit`` after skipping ``offset``, as the server's
        JSON texts; and ``until``. With ``archived``, over the whole history."""
        until, select, few = yield from self._op_keyset_select(
            criteria, until, last_key, last_position, archived
        )
        rows = yield from self._op_event_rows(
            select.events(limit=limit, offset=offset, few=few), archived
        )
        return until, rows

    @staticmethod
    def _stream_last(criteria: Criteria, rows: list[str]) -> Callable[[], tuple[Any, int]]:
        def last() -> tuple[Any, int]:
            # The keyset comes from the last row's text: the next batch is asked for before
            # this one is decoded.
            event = _decode_key(rows[-1])
            return _sort_key(event, criteria), event.position

        return last

    @staticmethod
    def _export_last(
        criteria: Criteria, batches: list[pa.RecordBatch]
    ) -> Callable[[], tuple[Any, int]]:
        def last() -> tuple[Any, int]:
            batch = batches[-1]
            key: Any = None
            if criteria.order_by == "timestamp":
                key = batch.column("timestamp")[-1].as_py()
            elif criteria.order_by == "type":
                key = batch.column("event_type")[-1].as_py()
            return key, batch.column("position")[-1].as_py()

        return last

    @staticmethod
    def _export_by_ranges(criteria: Criteria, archived: bool) -> bool:
        """Whether an export is read as consecutive ranges of positions, several at once."""
        return (
            criteria.order_by == "position"
            and not criteria.descending
            and criteria.limit is None
            and not criteria.offset
            and not archived
        )

    def _op_export_batch(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool,
    ) -> Op[tuple[int, list[pa.RecordBatch]]]:
        """`_op_keyset_rows`, as record batches read by binary COPY."""
        until, select, few = yield from self._op_keyset_select(
            criteria, until, last_key, last_position, archived
        )
        if not archived:
            text, params = select.events(limit=limit, offset=offset, few=few, columns=EXPORT_SELECT)
            return until, (yield CopyOut(text, params))
        # The batch's positions in order, from one snapshot of the whole history; then the
        # live ones by COPY and the archived ones from their files. An event compacted
        # between the two statements is read from its archive.
        text, params = select.events(
            limit=limit, offset=offset, few=few, columns=sql.SQL("position, event IS NULL")
        )
        order = yield Run(text, params, prepare=False)
        live = [position for position, is_archived in order if not is_archived]
        pieces: list[pa.RecordBatch] = []
        if live:
            pieces = yield CopyOut(
                sql.SQL("SELECT {} FROM {} WHERE position = ANY(%s)").format(
                    EXPORT_SELECT, self._statements.events
                ),
                [live],
            )
        found = set()
        for piece in pieces:
            found.update(piece.column("position").to_pylist())
        elsewhere = [position for position, _ in order if position not in found]
        archived_table = yield from self._archive.table(elsewhere)
        table = pa.Table.from_batches([*pieces, *archived_table.to_batches()], schema=EXPORT_SCHEMA)
        if not table.num_rows:
            return until, []
        index = {p: i for i, p in enumerate(table.column("position").to_pylist())}
        table = table.take(pa.array([index[p] for p, _ in order], pa.int64()))
        table = table.unify_dictionaries().combine_chunks()
        return until, table.to_batches()

    def _op_read_after(
        self, query: Query | None, after: int, limit: int
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """A subscription's read: at most ``limit`` events matching ``query`` after ``after``,
        and the position read up to (see `tamma_events.stream.Fetch`)."""
        events, head = yield from self._op_read_with_head(query, after, limit, False)
        return events, events[-1].position if len(events) >= limit else head

    def _op_filter_after(
        self, criteria: Criteria, after: int, limit: int
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """`_op_read_after` for a filter: a keyset page in log order after ``after``."""
        head, rows = yield from self._op_keyset_rows(criteria, None, None, after, limit, 0, True)
        events = decode_events(rows)
        return events, events[-1].position if len(events) >= limit else head

    def _op_explain(self, criteria: Criteria, count: bool, analyze: bool) -> Op[dict[str, Any]]:
        if count:
            statement = count_statement(self._statements, criteria)
        else:
            select, few = yield from self._op_select(criteria)
            statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
        options = sql.SQL("ANALYZE, BUFFERS, " if analyze else "")
        text = sql.SQL("EXPLAIN ({}FORMAT JSON) {}").format(options, statement[0])
        row = yield Run(text, statement[1], fetch="one", prepare=False)
        plan: dict[str, Any] = row[0][0] if row else {}
        return plan

    # -- snapshots and projections ---------------------------------------------------------

    def _op_create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Op[Snapshot]:
        data = self._snapshot_data(aggregate_id, version, state)
        try:
            row = yield Run(
                self._statements.save_snapshot,
                [aggregate_id, version, data.decode(), version],
                fetch="one",
            )
        except psycopg.errors.UntranslatableCharacter:
            raise ValidationFailed(
                "state holds a NUL character, which PostgreSQL's jsonb cannot store",
                {"field": "state", "aggregate_id": aggregate_id},
            ) from None
        if row is None:
            head = yield from self._op_head()
            raise ValidationFailed(
                f"version {version} is beyond the head ({head})",
                {"field": "version", "aggregate_id": aggregate_id},
            )
        return Snapshot(aggregate_id, version, state, row[0])

    def _op_get_snapshot(self, aggregate_id: str, state_type: Any) -> Op[Snapshot | None]:
        _check_aggregate_id(aggregate_id)
        row = yield Run(self._statements.latest_snapshot, [aggregate_id], fetch="one")
        if row is None:
            return None
        version, data, created_at = row
        try:
            state = msgspec.json.decode(data, type=state_type)
        except msgspec.ValidationError as exc:
            raise QueryError(
                f"the snapshot of {shown(aggregate_id)} at version {version} is not a {state_type}:"
                f" {exc}",
                {"field": "state_type", "aggregate_id": aggregate_id, "version": version},
            ) from None
        return Snapshot(aggregate_id, int(version), state, created_at)

    def _op_project(
        self,
        query: Query | None,
        initial: _S,
        fold: Callable[[_S, SequencedEvent], _S],
        key: str | None,
        snapshot_every: int | None,
        state_type: Any,
        batch_size: int,
    ) -> Op[Projection]:
        state: Any = initial
        after = 0
        if key is not None:
            if state_type is None:
                state_type = Any if initial is None else type(initial)
            snapshot = yield from self._op_get_snapshot(key, state_type)
            if snapshot is not None:
                state, after = snapshot.state, snapshot.version
        folded = 0
        while True:
            events, head = yield from self._op_read_with_head(query, after, batch_size, False)
            for event in events:
                state = fold(state, event)
                folded += 1
                if snapshot_every is not None and key is not None and folded % snapshot_every == 0:
                    yield from self._op_create_snapshot(key, event.position, state)
            if len(events) < batch_size:
                return Projection(state, max(head, after))
            after = events[-1].position

    # -- maintenance -----------------------------------------------------------------------

    def _verify_on(
        self,
        conn: psycopg.Connection[Any],
        start: int | None,
        end: int | None,
        batch_size: int,
        progress: Callable[[int, int], None] | None,
        include_archived: bool,
    ) -> IntegrityReport:
        """`EventStore.verify` on a sync connection (the async store runs it in a worker
        thread: it reads whole ranges of the log through a server-side cursor, and files)."""
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
            raise storage_error(exc, "verifying") from exc

    def default_archive_dir(self) -> Path:
        """Where `compact_events` writes archives when neither it nor the store is given a
        directory. On the embedded server, ``<data dir>-archives/<schema>`` beside its data
        directory (``/srv/pg`` keeps its archives in ``/srv/pg-archives``): they follow the
        data directory, and stay out of PostgreSQL's own files (which a base backup copies and
        a throwaway server deletes). For a server at a DSN, ``archives/<schema>`` in the user
        data directory (``~/.local/share/tamma-events`` on Linux)."""
        embedded = getattr(self, "embedded", None)
        if embedded is not None:
            data_dir = Path(embedded.data_dir)
            return data_dir.with_name(f"{data_dir.name}-archives") / self.schema
        return Path(platformdirs.user_data_dir("tamma-events")) / "archives" / self.schema

    def _compact_on(
        self,
        conn: psycopg.Connection[Any],
        when: datetime,
        archive_dir: str | os.PathLike[str] | None,
        file_events: int,
        progress: Callable[[int, int], None] | None,
        fault: Callable[[str, int, int], None] | None,
    ) -> int:
        """`EventStore.compact_events` on a sync connection, under the store's advisory lock
        (one compaction at a time)."""
        directory = Path(archive_dir) if archive_dir is not None else self.archive_dir
        if directory is None:
            directory = self.default_archive_dir()
        key = f"tamma_events:compact:{self.schema}"
        lock = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()
        if not lock or not lock[0]:
            raise StorageError("another compaction of this store is running", {})
        try:
            return _compact(
                conn,
                self.schema,
                when,
                directory,
                file_events=file_events,
                progress=progress,
                fault=fault,
            )
        except psycopg.Error as exc:
            raise storage_error(exc, "compacting") from exc
        except OSError as exc:
            raise StorageError(f"compacting failed writing an archive: {exc}", {}) from exc
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
            except psycopg.Error:
                pass  # a lost connection took its session lock with it

    def _op_grant(self, role: str, create: bool) -> Op[None]:
        """`EventStore.grant_app_role`, in one transaction."""
        schema = sql.Identifier(self.schema)
        name = sql.Identifier(role)
        statements: list[sql.Composed] = []
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
            sql.SQL("GRANT INSERT, UPDATE ON {} TO {}").format(
                sql.Identifier(self.schema, "event_snapshots"), name
            ),
        ]
        yield Run("BEGIN", fetch="none")
        for statement in statements:
            yield Run(statement, fetch="none")
        yield Run("COMMIT", fetch="none")

    # -- replicas --------------------------------------------------------------------------

    def _op_caught_up(self, replica: Replica) -> Op[bool]:
        """Whether ``replica`` has replayed the appends this store committed, waiting for it
        up to ``replica_wait`` seconds."""
        target = self._replicas.target
        if target <= replica.replayed:
            return True
        deadline = time.monotonic() + self._replicas.wait
        delay = 0.002
        while True:
            row = yield Run(REPLAY_LSN, fetch="one")
            replica.replayed = int(row[0] or 0)
            if replica.replayed >= target:
                return True
            if time.monotonic() >= deadline:
                return False
            yield Sleep(delay)
            delay = min(delay * 2, 0.05)

    def _snapshot(
        self, pool: dict[str, int], listener: Any, positions: list[int], replicas: list[Any]
    ) -> dict[str, Any]:
        """`EventStore.metrics`, from what the store counted and what the caller read."""
        snapshot = self._metrics.snapshot()
        snapshot["cache"] = msgspec.structs.asdict(self.cache.stats())
        snapshot["pool"] = pool
        snapshot["subscriptions"] = self._subscription_lag(listener, positions)
        snapshot["replicas"] = replicas
        snapshot["replica_fallbacks"] = self._replicas.fallbacks
        return snapshot

    @staticmethod
    def _subscription_lag(listener: Any, positions: list[int]) -> dict[str, Any]:
        """The subscriptions' part of `metrics`: how far the furthest behind is from the head
        its listener last announced, in positions, and in seconds since the first head beyond
        its position was announced."""
        if listener is None or not positions:
            return {"open": len(positions), "lag_positions": 0, "lag_seconds": 0.0}
        slowest = min(positions)
        since = listener.behind_since(slowest)
        return {
            "open": len(positions),
            "lag_positions": max(listener.seen - slowest, 0),
            "lag_seconds": 0.0 if since is None else max(time.monotonic() - since, 0.0),
        }


def pool_stats(stats: dict[str, int]) -> dict[str, int]:
    """`psycopg_pool`'s counters as `pool_stats` reports them."""
    return {
        "size": stats.get("pool_size", 0),
        "idle": stats.get("pool_available", 0),
        "waiting": stats.get("requests_waiting", 0),
        "min": stats.get("pool_min", 0),
        "max": stats.get("pool_max", 0),
        "requests": stats.get("requests_num", 0),
        "request_timeouts": stats.get("requests_errors", 0),
        "connections": stats.get("connections_num", 0),
        "connection_errors": stats.get("connections_errors", 0),
        "connections_lost": stats.get("connections_lost", 0),
        "connections_discarded": stats.get("returns_bad", 0),
    }


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
