"""What `EventStore` and `AsyncEventStore` share: settings, connections, and the operations.

`StoreCore` holds a store's settings and state and gathers the operations of `tamma_events.ops`
(appending, reading, exporting), each ``_op_*`` method returning a generator of steps; the sync
store runs them with `tamma_events.ops.drive.run` on a pooled ``psycopg.Connection``, the async
store with `tamma_events.ops.drive_async.run_async` on an ``AsyncConnection``. Here too: the
connection settings and the errors of opening one, the maintenance jobs (`verify`,
`compact_events`) and the replica and metrics reports. What differs between the two stores
(threads or tasks, pools) lives in the stores themselves.
"""

from __future__ import annotations

import math
import os
import re
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import platformdirs
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads
from psycopg_pool import PoolTimeout

from tamma_events import codec as _codec
from tamma_events.checks import seconds, whole
from tamma_events.errors import (
    STORAGE_ERROR,
    EventStoreError,
    StorageError,
    ValidationFailed,
)
from tamma_events.filters import (
    parse_time,
)
from tamma_events.ops.appending import Appending
from tamma_events.ops.archiving import ArchiveReader
from tamma_events.ops.archiving import compact as _compact
from tamma_events.ops.cache import CacheStats, QueryCache
from tamma_events.ops.exporting import Exporting
from tamma_events.ops.failures import connection_lost
from tamma_events.ops.replicas import Replica, redact
from tamma_events.ops.steps import Op, Run, Sleep
from tamma_events.ops.verifying import IntegrityReport
from tamma_events.ops.verifying import verify as _verify
from tamma_events.sql import (
    ADVISORY_UNLOCK,
    BEGIN,
    COMMIT,
    REPLAY_LSN,
    TRY_ADVISORY_LOCK,
    Statements,
)
from tamma_events.stores.metrics import Metrics

_T = TypeVar("_T")
_S = TypeVar("_S")
_P = TypeVar("_P")


#: The environment variable naming the schema a store opens when none is passed.
SCHEMA_ENV = "TAMMA_EVENTS_SCHEMA"
#: The schema a store opens when neither ``schema`` nor ``$TAMMA_EVENTS_SCHEMA`` names one.
DEFAULT_SCHEMA = "tamma_events"


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
    return seconds(value, name, "a finite positive number of seconds")


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


@contextmanager
def own_connection(dsn: str, name: str) -> Iterator[psycopg.Connection[Any]]:
    """A sync connection of its own to ``dsn`` (not the pool's), for a maintenance job;
    closed when the block ends."""
    try:
        conn = psycopg.Connection.connect(dsn, **connection_kwargs(dsn, name))
    except psycopg.Error as exc:
        raise storage_error(exc, "connecting to PostgreSQL") from exc
    with conn:
        set_json_loads(msgspec.json.decode, conn)
        yield conn


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
    `tamma_events.stores.store.live_connection`)."""
    if conn.closed:
        return True
    return bool(select.select([conn.fileno()], [], [], 0)[0])


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


def check_size_any(value: int, field: str) -> None:
    """VALIDATION_FAILED unless ``value`` is a positive int."""
    whole(value, field, "a positive int", low=1)


def parse_before(value: datetime | str) -> datetime:
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


class StoreCore(Appending, Exporting):
    """Settings and operations shared by the sync and the async store: the appends
    (`tamma_events.ops.appending`), the reads (`tamma_events.ops.reading`) and the exports
    (`tamma_events.ops.exporting`), with the maintenance and replica operations here."""

    @property
    def dsn(self) -> str:
        """The connection string of the store's server (each store reads it from its pool)."""
        raise NotImplementedError

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
        whole(cache_size, "cache_size", "a non-negative int")
        seconds(cache_ttl, "cache_ttl", "a finite non-negative number of seconds", zero=True)
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

    # -- appends ---------------------------------------------------------------------------

    # -- reads -----------------------------------------------------------------------------

    # -- snapshots and projections ---------------------------------------------------------

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
        thread: it reads whole ranges of the log, and files). A second connection of its own
        reads every other range in the same snapshot."""
        dsn = self.dsn
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
                second=lambda: own_connection(dsn, "tamma-events verify"),
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
        lock = conn.execute(TRY_ADVISORY_LOCK, [key]).fetchone()
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
                conn.execute(ADVISORY_UNLOCK, [key])
            except psycopg.Error:
                pass  # a lost connection took its session lock with it

    def _op_grant(self, role: str, create: bool) -> Op[None]:
        """`EventStore.grant_app_role`, in one transaction."""
        statements = self._statements.grants(role, create)
        yield Run(BEGIN, fetch="none")
        for statement in statements:
            yield Run(statement, fetch="none")
        yield Run(COMMIT, fetch="none")

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
        self,
        pool: dict[str, int],
        listener: Any,
        positions: list[int],
        replicas: list[Any],
        consumers: list[tuple[str, str, dict[int, int], int, int]],
    ) -> dict[str, Any]:
        """`EventStore.metrics`, from what the store counted and what the caller read."""
        snapshot = self._metrics.snapshot()
        snapshot["cache"] = msgspec.structs.asdict(self.cache.stats())
        snapshot["pool"] = pool
        snapshot["subscriptions"] = self._subscription_lag(listener, positions)
        snapshot["consumers"] = [
            {
                "name": name,
                "worker": worker,
                "delivered": delivered,
                "parked": parked,
                "partitions": {
                    partition: {"position": position, **self._lag(listener, position)}
                    for partition, position in sorted(owned.items())
                },
            }
            for name, worker, owned, delivered, parked in sorted(consumers)
        ]
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
        return {"open": len(positions), **StoreCore._lag(listener, min(positions))}

    @staticmethod
    def _lag(listener: Any, position: int) -> dict[str, Any]:
        """How far ``position`` is behind the head the listener last announced, in positions,
        and in seconds since the first head beyond it was announced."""
        if listener is None:
            return {"lag_positions": 0, "lag_seconds": 0.0}
        since = listener.behind_since(position)
        return {
            "lag_positions": max(listener.seen - position, 0),
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
