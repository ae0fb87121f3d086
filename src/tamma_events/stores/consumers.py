# WARNING: generated from src/tamma_events/stores/consumers_async.py by scripts/async_to_sync.py.
# DO NOT CHANGE! Change the original file instead, then run the script.
"""Durable consumers: named subscriptions whose checkpoints live in the store's schema.

Written once, for asyncio; `tamma_events.stores.consumers` is generated from it by
``scripts/async_to_sync.py``, as the store is. `AsyncEventStore.consumer` makes one.

A consumer delivers the events matching its query to a handler, in batches, in position order
within each partition. A partition's checkpoint moves only once its batch is handled: at least
once by default. With ``transactional=True`` the handler gets a transaction of the store
(`AsyncTransaction`: appends, reads, and its ``connection`` for the handler's own SQL), and the
checkpoint moves in that transaction: exactly once for what the handler writes to the
database. Several workers (threads, tasks, processes, machines) running the same consumer share
its partitions through leases. See ``docs/consumers.md``.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, TypeVar

from psycopg import pq

from tamma_events.errors import ConsumerConflict, EventStoreError, QueryError, short_repr
from tamma_events.filters import EventFilter
from tamma_events.model import Query, SequencedEvent
from tamma_events.ops.consuming import (
    check_name,
    check_partitions,
    consumer_statements,
    positive_seconds,
)
from tamma_events.ops.drive import run
from tamma_events.ops.failures import outage
from tamma_events.ops.steps import Op
from tamma_events.sql import after_position

if TYPE_CHECKING:
    from tamma_events.stores.store import EventStore as _Store

__all__ = ["Consumer", "partition_of"]

logger = logging.getLogger("tamma_events.consumers")

_T = TypeVar("_T")

#: The longest wait between two tries of a failing handler, or of the database.
MAX_RETRY_DELAY: Final = 30.0
#: The most events read at once, and the largest batch.
MAX_BATCH: Final = 10_000
#: The fewest events read at once: a read's round trips are shared by this many.
READ_AHEAD: Final = 5_000
#: How many requested replays a worker takes at once.
REPLAYS_AT_ONCE: Final = 100


def partition_of(event: SequencedEvent, key: str | None, partitions: int) -> int:
    """The partition of ``event``: the CRC-32 of its ``key`` tag's value (UTF-8), modulo
    ``partitions``; stable across processes, machines and versions. 0 without that tag."""
    if key is None or partitions == 1:
        return 0
    value = event.tags.get(key)
    if value is None:
        return 0
    return zlib.crc32(value.encode("utf-8", "surrogatepass")) % partitions


class _LeaseLost(Exception):
    """The worker no longer holds a partition at the checkpoint it read."""


class Consumer:
    """A named consumer of the store's events, one worker of it; see the module's docstring
    and `EventStore.consumer`. `run` delivers events until `stop`."""

    def __init__(
        self,
        store: _Store,
        name: str,
        query: Query | EventFilter | None,
        *,
        batch_size: int,
        start: int | str,
        partition_by: str | None,
        partitions: int,
        lease_time: float,
        max_attempts: int,
        retry_delay: float,
        worker: str | None,
    ) -> None:
        self.name = check_name(name)
        self.partitions, self.partition_by = check_partitions(partitions, partition_by)
        for field, value, low, high in (
            ("batch_size", batch_size, 1, MAX_BATCH),
            ("max_attempts", max_attempts, 1, 1_000),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise QueryError(f"{field} is an int from {low} to {high}", {"field": field})
        if start not in ("beginning", "end"):
            start = after_position(start)  # type: ignore[arg-type]
        if worker is not None and (not isinstance(worker, str) or not 1 <= len(worker) <= 200):
            raise QueryError("worker is a name of 1 to 200 characters", {"field": "worker"})
        self.store = store
        self.query = query
        self.batch_size = batch_size
        self.start = start
        self.lease_time = positive_seconds(lease_time, "lease_time")
        self.retry_delay = positive_seconds(retry_delay, "retry_delay")
        self.max_attempts = max_attempts
        #: This worker's name among the consumer's workers (unique by default).
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._statements = consumer_statements(store.schema)
        self._fetch = store._reader(query, "consumer")
        self._stopped = threading.Event()
        self._beating = threading.Event()  # set: the heartbeat is to end
        #: The partitions held, each with the position its handler is done with...
        self._owned: dict[int, int] = {}
        #: ...and with the checkpoint stored (behind the other between two flushes of a plain
        #: handler's progress).
        self._stored: dict[int, int] = {}
        self._running = False
        #: How many events were handed to the handler (retries and replays included).
        self.delivered = 0
        #: How many events this worker parked.
        self.parked = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} worker={self.worker!r}"
            f" partitions={sorted(self._owned)}>"
        )

    # -- public --------------------------------------------------------------------------------

    @property
    def owned(self) -> dict[int, int]:
        """The partitions this worker holds now, each with its checkpoint."""
        return dict(self._owned)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """End `run` once the batch in hand is done (from any thread or task), or the next
        `run` to start, before it delivers anything; the worker's partitions are released for
        the others at once."""
        self._stopped.set()
        listener = self.store._listener
        if listener is not None:
            listener.wake_all()

    def run(
        self,
        handler: Callable[..., None],
        *,
        transactional: bool = False,
        until_idle: bool = False,
    ) -> None:
        """Deliver batches to ``handler`` until `stop`, or with ``until_idle`` until a read
        finds nothing new for the partitions this worker holds.

        ``handler(events)`` gets up to ``batch_size`` events of one partition, in position
        order. With ``transactional``, ``handler(events, tx)`` runs inside the transaction in
        which the checkpoint moves (``tx`` appends, reads, and gives its ``connection``).

        A failing batch of several events is handed over again event by event; a failing
        event is tried again after ``retry_delay`` seconds, doubling up to 30 s, and after
        ``max_attempts`` failures it is parked with its error while the partition goes on. A
        lost connection to the database is waited out for as long as it lasts."""
        if self._running:
            raise QueryError(f"this worker of consumer {self.name!r} is running already")
        self._running = True
        self._beating.clear()
        statements = self._statements
        try:
            listener = self.store._ensure_listener()
            start = self.start
            if start == "beginning":
                start = 0
            elif start == "end":
                start = self.store.head()
            self._op(
                lambda: statements.op_register(
                    self.name, self.partitions, self.partition_by, int(start)
                )
            )
        except BaseException:
            self._running = False
            self._stopped.clear()
            raise
        self.store._consumer_started(self)
        beat = threading.Thread(
            target=self._beat, name=f"tamma-events-consumer-{self.name}", daemon=True
        )
        beat.start()
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"tamma-events-consumer-{self.name}")
        # The next window, read while the handler takes this one: (after, its limit, news, the
        # read).
        ahead: tuple[int, int, int, Any] | None = None
        try:
            balance_due = 0.0
            delay = self.retry_delay
            while not self._stopped.is_set():
                try:
                    if time.monotonic() >= balance_due:
                        self._owned = self._op(
                            lambda: statements.op_balance(
                                self.name,
                                self.worker,
                                self.partitions,
                                self.partition_by,
                                self.lease_time,
                            )
                        )
                        self._stored = dict(self._owned)
                        balance_due = time.monotonic() + self.lease_time / 3
                    if not self._owned:
                        if until_idle:
                            return
                        self._wait(listener, None, balance_due - time.monotonic())
                        continue
                    if self._replays(handler, transactional):
                        continue
                    after = min(self._owned.values())
                    limit = min(MAX_BATCH, max(READ_AHEAD, self.batch_size * len(self._owned)))
                    if ahead is not None and ahead[0] <= after:
                        # Read from where every partition held is now, or before it: the
                        # events up to their checkpoints are left out as they are split.
                        _, limit, news, reading = ahead
                        ahead = None
                        events, read_up_to = self._result(reading)
                    else:
                        if ahead is not None:
                            self._forget(ahead[3])
                            ahead = None
                        news = listener.news
                        events, read_up_to = self._fetch(after, limit)
                    if len(events) >= limit:
                        reading = self._read_ahead(pool, read_up_to, limit)
                        ahead = (read_up_to, limit, listener.news, reading)
                    self._deliver(events, read_up_to, handler, transactional)
                    delay = self.retry_delay
                    if len(events) >= limit:
                        continue
                    if until_idle:
                        return
                    self._wait(listener, news, balance_due - time.monotonic())
                except EventStoreError as exc:
                    if not outage(exc):
                        raise
                    logger.warning(
                        "consumer %s: %s; trying again in %.1f s", self.name, exc.message, delay
                    )
                    self._wait(listener, None, delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                    balance_due = 0.0
        finally:
            if ahead is not None:
                self._forget(ahead[3])
            if pool is not None:
                pool.shutdown()
            self._beating.set()
            beat.join()
            self._running = False
            self._stopped.clear()
            try:
                self._flush()
            except EventStoreError as exc:
                logger.warning("consumer %s: storing its checkpoints failed: %s", self.name, exc)
            self._owned = {}
            self._stored = {}
            self.store._consumer_ended(self)
            try:
                self._op(lambda: statements.op_leave(self.name, self.worker))
            except EventStoreError as exc:
                logger.warning("consumer %s: releasing its partitions failed: %s", self.name, exc)

    # -- the loop's parts --------------------------------------------------------------------

    def _op(self, make: Callable[[], Op[_T]]) -> _T:
        return self.store._run("consumer", make)

    def _beat(self) -> None:
        """Renew this worker's leases every third of the lease time, whatever the handler
        takes meanwhile."""
        statements = self._statements
        while True:
            if self._beating.wait(self.lease_time / 3):
                return
            try:
                self._op(lambda: statements.op_heartbeat(self.name, self.worker, self.lease_time))
            except EventStoreError as exc:
                logger.warning("consumer %s: renewing its leases failed: %s", self.name, exc)

    def _read_ahead(self, pool: Any, after: int, limit: int) -> Any:
        """Start reading the window after ``after``: a task, or a thread's future."""
        return pool.submit(self._fetch, after, limit)

    def _result(self, reading: Any) -> tuple[list[SequencedEvent], int]:
        result: tuple[list[SequencedEvent], int]
        result = reading.result()
        return result

    def _forget(self, reading: Any) -> None:
        """Drop a window read ahead that is not needed, waiting for its connection to be back
        in the pool (the heartbeat task is ended the same way)."""
        try:
            reading.result()
        except Exception:
            pass

    def _wait(self, listener: Any, news: int | None, timeout: float) -> None:
        """Wait until the log moves beyond ``news`` (None: only `stop` ends it early), `stop`,
        or ``timeout`` seconds."""
        timeout = max(0.0, timeout)
        listener.wait(news, timeout, self._stopped.is_set)

    def _deliver(
        self,
        events: list[SequencedEvent],
        read_up_to: int,
        handler: Callable[..., None],
        transactional: bool,
    ) -> None:
        """Hand the events read to the handler, partition by partition; each partition held
        to the end is then done up to ``read_up_to``, and the checkpoints are stored."""
        split: dict[int, list[SequencedEvent]] = {p: [] for p in self._owned}
        if self.partitions == 1 and 0 in self._owned:
            # The events come in position order: those after the checkpoint are a tail.
            done = self._owned[0]
            first = bisect.bisect_right(events, done, key=lambda event: event.position)
            split[0] = events[first:]
        else:
            for event in events:
                partition = partition_of(event, self.partition_by, self.partitions)
                mine = split.get(partition)
                if mine is not None and event.position > self._owned[partition]:
                    mine.append(event)
        for partition, found in split.items():
            try:
                for start in range(0, len(found), self.batch_size):
                    if self._stopped.is_set():
                        break
                    batch = found[start : start + self.batch_size]
                    self._handle(partition, batch, handler, transactional)
            except _LeaseLost:
                self._lost(partition)
                continue
            if self._stopped.is_set():
                break
            held = self._owned.get(partition)
            if held is not None and held < read_up_to:
                self._owned[partition] = read_up_to
        self._flush()

    def _flush(self) -> None:
        """Store the checkpoints of the partitions whose handled position moved past them (a
        plain handler's batches, the windows without events of a partition), in one statement
        that does not wait for the WAL flush: at least once, a checkpoint lost in a crash only
        delivers those events again."""
        moves = [
            (partition, self._stored[partition], position)
            for partition, position in sorted(self._owned.items())
            if position != self._stored.get(partition, position)
        ]
        if not moves:
            return
        statements = self._statements
        moved = self._op(
            lambda: statements.op_advance(
                self.name, self.worker, moves, self.lease_time, durable=False
            )
        )
        for partition, _, position in moves:
            if partition in moved:
                self._stored[partition] = position
            else:
                self._lost(partition)

    def _lost(self, partition: int) -> None:
        self._stored.pop(partition, None)
        if self._owned.pop(partition, None) is not None:
            logger.info(
                "consumer %s: worker %s no longer holds partition %d (taken over or reset)",
                self.name,
                self.worker,
                partition,
            )

    def _handle(
        self,
        partition: int,
        batch: list[SequencedEvent],
        handler: Callable[..., None],
        transactional: bool,
    ) -> None:
        """Deliver one batch until it is handled (or the worker stops): a failing batch of
        several events goes event by event, and an event that keeps failing is parked."""
        delay = self.retry_delay
        attempts = 0
        while not self._stopped.is_set():
            try:
                self._attempt(partition, batch, handler, transactional)
                return
            except _LeaseLost:
                raise
            except Exception as exc:
                if not outage(exc):
                    attempts += 1
                if len(batch) > 1 and attempts:
                    logger.warning(
                        "consumer %s: a batch of %d events from position %d failed (%s);"
                        " handing them over one by one",
                        self.name,
                        len(batch),
                        batch[0].position,
                        short_repr(exc, 200),
                    )
                    for event in batch:
                        if self._stopped.is_set():
                            return
                        self._handle(partition, [event], handler, transactional)
                    return
                if attempts >= self.max_attempts:
                    self._park(partition, batch[0], attempts, exc)
                    return
                logger.warning(
                    "consumer %s: event %d failed (attempt %d of %d): %s",
                    self.name,
                    batch[0].position,
                    attempts,
                    self.max_attempts,
                    short_repr(exc, 200),
                )
                self._wait(self.store._ensure_listener(), None, delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    def _attempt(
        self,
        partition: int,
        batch: list[SequencedEvent],
        handler: Callable[..., None],
        transactional: bool,
    ) -> None:
        self.delivered += len(batch)
        if transactional:
            statements = self._statements
            move = [(partition, self._stored[partition], batch[-1].position)]
            with self.store.transaction() as tx:
                # The checkpoint first: its row stays locked until the commit, so no other
                # worker can take the partition over while the handler runs.
                moved = run(
                    tx.connection,
                    statements.op_advance(self.name, self.worker, move, self.lease_time),
                    owned=False,
                )
                if partition not in moved:
                    raise _LeaseLost(partition)
                handler(batch, tx)
                if tx.connection.info.transaction_status == pq.TransactionStatus.INERROR:
                    raise ConsumerConflict(
                        "a statement of the handler failed inside its transaction (and the"
                        " handler went on): it would commit nothing",
                        {"name": self.name, "position": batch[0].position},
                    )
                run(
                    tx.connection,
                    statements.op_touch(self.name, self.worker, partition, self.lease_time),
                    owned=False,
                )
            self._stored[partition] = batch[-1].position
        else:
            # Stored by `_flush` once the window is done.
            handler(batch)
        self._owned[partition] = batch[-1].position

    def _park(self, partition: int, event: SequencedEvent, attempts: int, exc: Exception) -> None:
        statements = self._statements
        error = f"{type(exc).__name__}: {exc}"[:4000]
        checkpoint = self._stored[partition]
        parked = self._op(
            lambda: statements.op_park(
                self.name, self.worker, partition, checkpoint, event.position, attempts, error
            )
        )
        if not parked:
            raise _LeaseLost(partition)
        self.parked += 1
        self._owned[partition] = self._stored[partition] = event.position
        logger.error(
            "consumer %s: event %d parked after %d attempts: %s",
            self.name,
            event.position,
            attempts,
            error,
        )

    def _replays(self, handler: Callable[..., None], transactional: bool) -> bool:
        """Hand over, once each, the parked events of this worker's partitions whose replay
        was asked for; True when there were some. One that fails again stays parked."""
        statements = self._statements
        owned = sorted(self._owned)
        requested = self._op(lambda: statements.op_requested(self.name, owned, REPLAYS_AT_ONCE))
        for position, _ in requested:
            if self._stopped.is_set():
                break
            self._replay(position, handler, transactional)
        return bool(requested)

    def _replay(self, position: int, handler: Callable[..., None], transactional: bool) -> None:
        statements = self._statements
        found = self.store.read(None, after=position - 1, limit=1)
        event = found.events[0] if found.events else None
        try:
            if event is None or event.position != position:
                raise LookupError(f"event {position} is not in the live log")
            self.delivered += 1
            if transactional:
                with self.store.transaction() as tx:
                    if run(tx.connection, statements.op_replayed(self.name, position), owned=False):
                        handler([event], tx)
            else:
                handler([event])
                self._op(lambda: statements.op_replayed(self.name, position))
            logger.info("consumer %s: parked event %d replayed", self.name, position)
        except Exception as exc:
            if outage(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"[:4000]
            self._op(lambda: statements.op_replay_failed(self.name, position, 1, error))
            logger.error(
                "consumer %s: the replay of event %d failed: %s", self.name, position, error
            )
