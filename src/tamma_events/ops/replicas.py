"""Read replicas: which server serves a read.

A store given ``replicas=[dsn, ...]`` (PostgreSQL streaming replicas of its server) sends its
queries, streams and exports to them in turn; appends, the DCB ``read`` that decisions are made
on, conditions, snapshots and subscriptions stay on the primary.

- **Read your writes.** After each append it commits, the store notes the primary's WAL
  position (one more round trip per append, only when replicas are configured). A read sent to a
  replica first waits until the replica has replayed that position, checking every few
  milliseconds for up to ``replica_wait`` seconds; a replica still behind then hands the read to
  the primary. ``consistency="eventual"`` skips the wait: a replica answers with what it has.
- **Walks stay whole.** A page token and the batches of a stream or an export carry the head
  they are pinned to; a replica whose head is behind it hands the batch to the primary, so a
  walk never ends early on a lagging replica.
- **Down and back.** A replica whose connection fails (or that has no connection to give
  within ``replica_timeout``) is left out for ``replica_retry`` seconds and the read goes to
  the next one, or the primary; after that it is tried again, and used if it answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tamma_events.checks import seconds
from tamma_events.errors import ValidationFailed
from tamma_events.ops.failures import connection_lost
from tamma_events.ops.steps import Op, Run
from tamma_events.sql import PRIMARY_LSN, REPLAY_LSN

__all__ = ["Consistency", "Replica", "ReplicaSet", "redact"]

logger = logging.getLogger(__name__)

Consistency = Literal["read_your_writes", "eventual"]


def redact(dsn: str) -> str:
    """``dsn`` without its password, for logs, errors and ``repr``."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)  # type: ignore[arg-type]


class Replica:
    """One replica: its pool (a `psycopg_pool` pool, sync or async) and what the store knows
    of it."""

    def __init__(self, dsn: str, pool: Any) -> None:
        self.name = redact(dsn)
        self.pool = pool
        #: The WAL position it was last seen to have replayed.
        self.replayed = 0
        self.down_until = 0.0
        self.down = False
        self.reads = 0
        self.last_error: BaseException | None = None
        #: Whether it answered the last time the store asked it anything (a read, or
        #: `EventStore.measure_replicas`); None before the first time.
        self.up: bool | None = None
        #: Its replay lag as `EventStore.measure_replicas` last found it (None: unknown).
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None

    def measured(self, primary: int | None, replay: Any) -> None:
        """Note what measuring its lag found: its `REPLAY_LSN` row (None: it did not answer)
        against the primary's WAL position (None: the primary did not answer)."""
        if replay is None or replay[0] is None:
            self.up = False
            self.lag_bytes = self.lag_seconds = None
            return
        self.up = True
        self.lag_bytes = max(primary - int(replay[0]), 0) if primary is not None else None
        self.lag_seconds = float(replay[1] or 0)

    def status(self) -> dict[str, Any]:
        """What `EventStore.metrics` reports of it, as the store last found it."""
        return {
            "name": self.name,
            "up": self.up,
            "reads": self.reads,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": self.lag_seconds,
        }

    @property
    def left_out(self) -> bool:
        """Whether it failed lately and is not to be tried yet."""
        return self.down_until > time.monotonic()


class ReplicaSet:
    """The replicas of a store, taken in turn, and the WAL position its reads must see."""

    def __init__(
        self,
        replicas: list[Replica],
        *,
        consistency: Consistency,
        wait: float,
        retry: float,
        timeout: float,
    ) -> None:
        if consistency not in ("read_your_writes", "eventual"):
            raise ValidationFailed(
                f"consistency must be 'read_your_writes' or 'eventual', got {consistency!r}",
                {"field": "consistency"},
            )
        for name, value in (
            ("replica_wait", wait),
            ("replica_retry", retry),
            ("replica_timeout", timeout),
        ):
            seconds(value, name, "a finite non-negative number of seconds", zero=True)
        self.members = replicas
        self.consistency = consistency
        self.wait = wait
        self.retry = retry
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next = 0
        self._written = 0
        #: Reads meant for a replica that the primary served.
        self.fallbacks = 0
        #: An append committed but its WAL position could not be read: the next read asks.
        self.pending = False

    def __bool__(self) -> bool:
        return bool(self.members)

    def wrote(self, lsn: int) -> None:
        """Note the primary's WAL position after an append committed."""
        with self._lock:
            if lsn > self._written:
                self._written = lsn

    @property
    def target(self) -> int:
        """The WAL position a replica must have replayed to serve a read (0: any)."""
        return 0 if self.consistency == "eventual" else self._written

    def order(self) -> list[Replica]:
        """The replicas to try for the next read: the next in turn first, those left out
        for failing skipped until their time is up."""
        now = time.monotonic()
        with self._lock:
            n = len(self.members)
            start = self._next
            self._next = (self._next + 1) % n if n else 0
        turn = [self.members[(start + i) % n] for i in range(n)]
        return [replica for replica in turn if replica.down_until <= now]

    def failed(self, replica: Replica, exc: BaseException) -> None:
        """Leave ``replica`` out for ``retry`` seconds."""
        replica.down_until = time.monotonic() + self.retry
        replica.last_error = exc
        replica.up = False
        replica.lag_bytes = replica.lag_seconds = None  # not to be shown as if current
        # What it had replayed is asked again when it is back (it may be another server).
        replica.replayed = 0
        if not replica.down:
            replica.down = True
            logger.warning(
                "tamma-events: replica %s is unavailable (%s); reads go elsewhere",
                replica.name,
                str(exc).strip() or type(exc).__name__,
                extra={"replica": replica.name, "retry_in": self.retry},
            )

    def served(self, replica: Replica) -> None:
        replica.reads += 1
        replica.up = True
        if replica.down:
            replica.down = False
            logger.info(
                "tamma-events: replica %s is back", replica.name, extra={"replica": replica.name}
            )

    def fell_back(self) -> None:
        with self._lock:
            self.fallbacks += 1


def wal_position() -> Op[int]:
    """The primary's WAL position, in bytes."""
    row = yield Run(PRIMARY_LSN, fetch="one")
    return int(row[0]) if row else 0


def replay_state() -> Op[Any]:
    """A replica's `REPLAY_LSN` row: the position it replayed, and seconds behind."""
    return (yield Run(REPLAY_LSN, fetch="one"))


def replica_failure(exc: BaseException) -> bool:
    """Whether a read on a replica failed for the replica, not the statement: its connection
    is lost, or the standby cancelled the query for a conflict with recovery."""
    return connection_lost(exc) or getattr(exc, "sqlstate", None) == "40001"


class Behind(Exception):
    """A replica has not replayed what a read must see; the read goes to the primary."""
