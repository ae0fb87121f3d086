"""Subscriptions on a real PostgreSQL: every event exactly once and in log order, whether it is
caught up from the log or delivered live, under writer processes, across a resume, across killed
connections and rolled-back appends, through Query and EventFilter subscriptions; the buffer
bound of a slow consumer; stopping from another thread and closing the store; async iteration;
idle subscriptions; notifications that are not the store's; argument validation.

Consumers run in threads and are joined with generous timeouts; synchronisation points wait for
a state (a read made, a consumer blocked waiting, a listener reconnected), not for a time. The
subscriptions that must be woken by the store's notifications get a poll interval of an hour, so
a missing wake-up shows as a consumer that never finishes, not as a slower test. Nothing asserts
how long anything took; the two idle-subscription tests let half a second of idleness pass and
check what the subscription did meanwhile (block, or keep the event loop running).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import multiprocessing
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import PoolClosed, PoolTimeout

import _workers
from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    STORAGE_ERROR,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
    SequencedEvent,
    Subscription,
)
from tamma_events.ops.failures import connection_lost
from tamma_events.ops.migrating import drop
from tamma_events.streaming import subscriptions as stream_module
from tamma_events.streaming.subscriptions import MAX_BUFFER

T = TypeVar("T")

JOIN_TIMEOUT = 60.0
SPAWN = multiprocessing.get_context("spawn")
#: A poll interval no test outlives: only a notification (or stop) can wake such a subscription.
NEVER = 3600.0


# -- helpers ---------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = JOIN_TIMEOUT) -> None:
    """Poll until ``predicate()`` holds (a synchronisation point, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def watchdog(subscription: Subscription, timeout: float = JOIN_TIMEOUT) -> Iterator[None]:
    """Stops ``subscription`` if the block takes longer than ``timeout``: an iteration in this
    thread that would wait forever (for an event it will not get) ends instead, and the test's
    assertions report what was delivered."""
    timer = threading.Timer(timeout, subscription.stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def take(subscription: Subscription, count: int) -> list[SequencedEvent]:
    """The next ``count`` events, iterated in this thread under a `watchdog`."""
    with watchdog(subscription):
        return list(itertools.islice(subscription, count))


def run_loop(
    main: Callable[[], Coroutine[Any, Any, T]], subscription: Subscription, timeout: float
) -> tuple[bool, T | None]:
    """``asyncio.run(main())`` in a thread of its own, waited for up to ``timeout``: a loop that
    stops running fails the test instead of hanging it. If it is still running then, the
    subscription is stopped from here, which ends its iteration and so frees the loop.
    Returns whether that was needed, and what ``main`` returned; re-raises what it raised."""
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run, name="event-loop", daemon=True)
    runner.start()
    runner.join(timeout)
    stuck = runner.is_alive()
    if stuck:
        subscription.stop()
        runner.join(JOIN_TIMEOUT)
        assert not runner.is_alive(), "the event loop did not finish after stop()"
    if errors:
        raise errors[0]
    return stuck, outcome[0] if outcome else None


class Reads:
    """Records every read a subscription makes: the store's real read, called through.

    Each entry is the position read after and how many events the read returned."""

    def __init__(self, subscription: Subscription) -> None:
        self.log: list[tuple[int, int]] = []
        fetch = subscription._fetch

        def recorded(after: int, limit: int) -> tuple[list[SequencedEvent], int]:
            events, read_up_to = fetch(after, limit)
            self.log.append((after, len(events)))
            return events, read_up_to

        subscription._fetch = recorded

    def __len__(self) -> int:
        return len(self.log)

    @property
    def largest(self) -> int:
        return max(count for _, count in self.log)


class Consumer:
    """Iterates a subscription in a thread, keeping what it delivers, until ``until(events)``
    holds or the iteration ends (``ended``). `join` re-raises what the iteration raised."""

    def __init__(
        self,
        subscription: Subscription,
        until: Callable[[list[SequencedEvent]], bool] | None = None,
    ) -> None:
        self.subscription = subscription
        self.events: list[SequencedEvent] = []
        self.error: BaseException | None = None
        self.ended = False
        self._until = until
        self.thread = threading.Thread(target=self._run, name="consumer", daemon=True)

    def _run(self) -> None:
        try:
            for event in self.subscription:
                self.events.append(event)
                if self._until is not None and self._until(self.events):
                    return
            self.ended = True
        except BaseException as exc:
            self.error = exc

    def start(self) -> Consumer:
        self.thread.start()
        return self

    @property
    def waiting(self) -> bool:
        """Whether the consumer is blocked in `Listener.wait`: its subscription has read
        everything it could and waits to be woken."""
        frame = sys._current_frames().get(self.thread.ident or -1)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "wait" and code.co_filename == stream_module.__file__:
                return True
            frame = frame.f_back
        return False

    def join(self, timeout: float = JOIN_TIMEOUT) -> list[SequencedEvent]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.subscription.stop()
            self.thread.join(10)
            last = self.events[-1].position if self.events else None
            raise AssertionError(
                f"the consumer did not finish: {len(self.events)} events delivered,"
                f" the last at {last}"
            )
        if self.error is not None:
            raise self.error
        return self.events


def until_event(event_id: uuid.UUID) -> Callable[[list[SequencedEvent]], bool]:
    return lambda events: events[-1].event_id == event_id


def positions(events: list[SequencedEvent]) -> list[int]:
    return [e.position for e in events]


def assert_log_order(events: list[SequencedEvent]) -> None:
    """Strictly increasing positions: in log order, none twice."""
    assert all(a.position < b.position for a, b in itertools.pairwise(events)), positions(events)


def with_application_name(dsn: str, name: str) -> str:
    return make_conninfo(dsn, application_name=name)


def terminate(dsn: str, application_name: str) -> int:
    """Terminate the other sessions of this database with this application name, waiting for
    each to end (up to a minute: a bound for a hang); how many were found. Counted whether or
    not each ended within the wait, which on a busy machine is not for this to judge."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()"
            " AND datname = current_database()",
            [application_name],
        ).fetchall()
    return len(rows)


def waiting_on_head(dsn: str, schema: str) -> int:
    """How many sessions wait for a lock in a statement naming ``schema`` (an append queued
    behind the head lock)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{schema}%"],
        ).fetchone()
    return int(row[0]) if row else 0


def collect(results: Any, processes: list[Any]) -> dict[int, Any]:
    """Each process's report from the queue, then join them all."""
    reports: dict[int, Any] = {}
    for _ in processes:
        worker, report = results.get(timeout=120)
        assert not (isinstance(report, str) and report.startswith("error")), report
        reports[worker] = report
    for process in processes:
        process.join(120)
        assert process.exitcode == 0, process
    return reports


# -- exactly once, in order, under writer processes ------------------------------------------

#: Each writer's appends: mostly single events and small batches, and one batch of 120 that
#: (with chunk_events=100) takes the chunked COPY path.
WRITER_SIZES = [1, 1, 2, 1, 5, 1, 1, 3, 1, 12] * 12 + [120] + [1, 2, 1, 1, 4] * 10


def test_every_event_once_in_order_under_four_writer_processes(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store()
    appenders = 4
    plans = [
        [
            [str(uuid.uuid4()) for _ in range(size)]
            for size in WRITER_SIZES[w * 7 :] + WRITER_SIZES[: w * 7]
        ]
        for w in range(appenders)
    ]
    planned = {uuid.UUID(i) for plan in plans for batch in plan for i in batch}
    end = DomainEvent("End", {}, {"worker": "1"})
    worker_two = Query((QueryItem(tags={"worker": "2"}), QueryItem(types=("End",))))
    worker_one = EventFilter(tags={"worker": "1"})
    subscriptions = [
        store.subscribe(after=0, buffer=64, poll_interval=NEVER),
        store.subscribe(worker_two, after=0, buffer=5, poll_interval=NEVER),
        store.subscribe(worker_one, after=0, poll_interval=NEVER),
    ]
    reads = [Reads(s) for s in subscriptions]
    consumers = [Consumer(s, until_event(end.event_id)).start() for s in subscriptions]
    # The subscribers have read the (empty) log and wait: what the writers append is delivered
    # live, woken by notifications.
    wait_for(lambda: all(c.waiting for c in consumers), "the subscribers to wait")
    assert all(len(r) >= 1 for r in reads)

    barrier = SPAWN.Barrier(appenders + 1)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_workers.append_batches,
            args=(pg_dsn, store.schema, worker, plans[worker], 100, barrier, results),
            daemon=True,
        )
        for worker in range(appenders)
    ]
    for process in processes:
        process.start()
    barrier.wait(120)
    late = Consumer(store.subscribe(after=0, buffer=10), until_event(end.event_id)).start()
    collect(results, processes)
    last = store.append(end)
    everything, mine, theirs = (c.join() for c in consumers)

    log = store.read().events
    assert positions(log) == list(range(1, last + 1))
    assert last == len(planned) + 1
    assert {e.event_id for e in log} == planned | {end.event_id}

    assert positions(everything) == list(range(1, last + 1))
    assert everything == log
    assert mine == store.read(worker_two).events
    assert mine == [e for e in log if e.tags.get("worker") == "2" or e.event_type == "End"]
    assert theirs == store.get_events(worker_one)
    assert theirs == [e for e in log if e.tags.get("worker") == "1"]
    for subscription, spy in zip(subscriptions, reads, strict=True):
        # never more than its buffer at a time
        assert spy.largest <= subscription._limit
        assert subscription.position == last
    # the subscriber that started while the writers wrote caught up and followed
    assert late.join() == log


# -- resume ----------------------------------------------------------------------------------


def numbered(start: int, count: int) -> list[DomainEvent]:
    return [
        DomainEvent("Even" if i % 2 == 0 else "Odd", {"i": i}) for i in range(start, start + count)
    ]


@pytest.mark.parametrize(
    ("query", "buffer"), [(None, 8), (Query.of(types=["Even"]), 1)], ids=["all", "query"]
)
def test_resuming_after_position_delivers_the_rest_exactly_once(
    store: EventStore, query: Query | None, buffer: int
) -> None:
    store.append_batch(numbered(0, 60))
    first = store.subscribe(query, after=0, buffer=buffer, poll_interval=NEVER)
    taken = take(first, 13)
    assert len(taken) == 13
    first.close()
    assert first.position == taken[-1].position
    # what it had read ahead is not delivered after close, and does not move the position
    with pytest.raises(StopIteration):
        next(first)
    assert first.position == taken[-1].position
    assert store.subscriptions == 0

    store.append_batch(numbered(60, 40))
    end = DomainEvent("Even", {"end": True})
    with store.subscribe(query, after=first.position, buffer=buffer, poll_interval=NEVER) as second:
        consumer = Consumer(second, until_event(end.event_id)).start()
        store.append(end)
        rest = consumer.join()
        assert store.subscriptions == 1
    assert store.subscriptions == 0

    expected = store.read(query).events
    assert [e.event_id for e in taken + rest] == [e.event_id for e in expected]
    assert taken + rest == expected
    assert rest[0].position > taken[-1].position
    assert len(expected) == (101 if query is None else 51)


# -- killed connections ----------------------------------------------------------------------


def test_survives_its_connections_being_killed(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    schema = make_store().schema
    tag = uuid.uuid4().hex[:12]
    # The subscriber's store, pool and listener, go by a name of their own, which is what gets
    # killed; the writer's connections are left alone, so its appends never have an unknown
    # outcome.
    reader_name = f"tamma-events reader {tag}"
    reader = EventStore(with_application_name(pg_dsn, reader_name), schema=schema, migrate=False)
    writer = EventStore(
        with_application_name(pg_dsn, f"writer {tag}"),
        schema=schema,
        migrate=False,
        max_connections=2,
    )
    stop_writing = threading.Event()
    writer_errors: list[BaseException] = []

    def write() -> None:
        try:
            n = 0
            while not stop_writing.is_set():
                if n % 4 == 3:
                    writer.append_batch([DomainEvent("Batch", {"n": n, "j": j}) for j in range(3)])
                else:
                    writer.append(DomainEvent("Single", {"n": n}))
                n += 1
                time.sleep(0.001)
        except BaseException as exc:
            writer_errors.append(exc)

    writer_thread = threading.Thread(target=write, name="writer", daemon=True)
    try:
        subscription = reader.subscribe(after=0, buffer=50, poll_interval=NEVER)
        end = DomainEvent("End")
        consumer = Consumer(subscription, until_event(end.event_id)).start()
        writer_thread.start()
        listener = reader._listener
        assert listener is not None
        for round_ in range(3):
            delivered = len(consumer.events)
            wait_for(
                lambda n=delivered: len(consumer.events) >= n + 50 and listener.connected,
                f"progress before kill {round_}",
            )
            assert not writer_errors, writer_errors
            reconnects = listener.reconnects
            assert terminate(pg_dsn, reader_name) >= 1
            wait_for(
                lambda n=reconnects: listener.reconnects > n and listener.connected,
                f"the listener to reconnect after kill {round_}",
            )
        delivered = len(consumer.events)
        wait_for(lambda: len(consumer.events) >= delivered + 50, "progress after the kills")
        stop_writing.set()
        writer_thread.join(JOIN_TIMEOUT)
        assert not writer_thread.is_alive()
        assert not writer_errors, writer_errors
        last = writer.append(end)
        events = consumer.join()

        log = writer.read().events
        assert positions(log) == list(range(1, last + 1))
        assert positions(events) == list(range(1, last + 1))
        assert events == log
        assert listener.reconnects >= 3
        assert isinstance(listener.last_error, psycopg.OperationalError)
        # Its pool's connections were killed too: each was replaced, when the pool found it
        # broken or after a read on it failed; a lost read was run again at once by the store,
        # or after a backoff by the subscription.
        metrics = reader.metrics()
        replaced = metrics["pool"]["connections_lost"] + metrics["pool"]["connections_discarded"]
        retried = metrics["queries"]["subscription"]["retries"] + subscription.retries
        assert replaced + retried >= 1
        assert not subscription.stopped
    finally:
        stop_writing.set()
        if writer_thread.is_alive():
            writer_thread.join(JOIN_TIMEOUT)
        reader.close()
        writer.close()


# -- a slow consumer -------------------------------------------------------------------------


def test_a_slow_consumer_holds_at_most_buffer_events(store: EventStore) -> None:
    store.append(DomainEvent("First"))
    subscription = store.subscribe(after=0, buffer=100, poll_interval=NEVER)
    reads = Reads(subscription)
    assert positions(take(subscription, 1)) == [1]
    # The consumer is busy while 20,000 events are appended.
    appended = hashlib.sha256()
    for chunk in range(4):
        batch = [
            DomainEvent("Bulk", {"i": chunk * 5_000 + i, "pad": "x" * 200}) for i in range(5_000)
        ]
        store.append_batch(batch)
        for event in batch:
            appended.update(event.event_id.bytes)
    del batch
    last = store.head()
    assert last == 20_001

    delivered = hashlib.sha256()
    largest_buffer = 0
    expected = 2
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with watchdog(subscription):
            for event in subscription:
                assert event.position == expected
                delivered.update(event.event_id.bytes)
                largest_buffer = max(largest_buffer, len(subscription._buffer))
                if event.position == last:
                    break
                expected += 1
        subscription_peak = tracemalloc.get_traced_memory()[1] - baseline
        # for scale: what a read of 1,000 of these events holds (a twentieth of the backlog)
        tracemalloc.reset_peak()
        sample = store.read(after=1, limit=1_000)
        sample_peak = tracemalloc.get_traced_memory()[1] - baseline
        del sample
    finally:
        tracemalloc.stop()
    subscription.close()

    assert subscription.position == last
    assert delivered.digest() == appended.digest()  # every event, in the order appended
    assert largest_buffer <= 100
    assert reads.largest <= 100
    # the backlog was read a buffer at a time, not at once
    assert len(reads) >= 20_000 // 100
    # going through 20,000 events, it never held as much as 1,000 of them take
    assert subscription_peak < sample_peak, (subscription_peak, sample_peak)


# -- stop and close --------------------------------------------------------------------------


def test_stop_from_another_thread_wakes_a_waiting_subscriber(store: EventStore) -> None:
    store.append(DomainEvent("Only"))
    subscription = store.subscribe(after=0, poll_interval=NEVER)
    consumer = Consumer(subscription).start()
    listener = store._listener
    assert listener is not None
    # Blocked with nothing left to wake it: the listener has announced the head already, and
    # the subscription has read since its last news (no wake-up in flight), so that only
    # stop() can end the wait.
    wait_for(
        lambda: (
            len(consumer.events) == 1
            and listener.connected
            and listener.seen == 1
            and subscription._news_read == listener.news
            and consumer.waiting
        ),
        "the consumer to wait with nothing to read",
    )
    assert store.subscriptions == 1
    assert not subscription.stopped

    subscription.stop()
    events = consumer.join()
    assert consumer.ended
    assert positions(events) == [1]
    assert subscription.stopped
    assert subscription.position == 1
    assert store.subscriptions == 0
    subscription.stop()  # again: nothing happens
    with pytest.raises(StopIteration):
        next(subscription)
    assert store.subscriptions == 0


def test_closing_the_store_ends_its_subscriptions(make_store: Callable[..., EventStore]) -> None:
    store = make_store()
    store.append(DomainEvent("Only"))
    waiting = store.subscribe(after=0, poll_interval=NEVER)
    consumer = Consumer(waiting).start()
    idle = store.subscribe(after=0)  # never iterated
    with store.subscribe() as scoped:
        assert positions(take(scoped, 1)) == [1]
    assert store.subscriptions == 2
    wait_for(lambda: consumer.waiting, "the consumer to wait")

    store.close()
    assert positions(consumer.join()) == [1]
    assert consumer.ended
    assert waiting.stopped and idle.stopped and scoped.stopped
    assert store.subscriptions == 0
    with pytest.raises(StopIteration):
        next(idle)
    with pytest.raises(EventStoreError) as excinfo:
        store.subscribe()
    assert excinfo.value.code == STORAGE_ERROR
    listener = store._listener
    assert listener is not None and listener._thread is not None
    assert not listener._thread.is_alive()


# -- live delivery ---------------------------------------------------------------------------


@pytest.mark.parametrize("query", [None, Query.of(types=["Wanted"])], ids=["all", "query"])
def test_an_event_appended_after_subscribing_is_delivered(
    store: EventStore, query: Query | None
) -> None:
    store.append_batch([DomainEvent("Wanted", {"old": True}), DomainEvent("Other")])
    head = store.head()
    subscription = store.subscribe(query, after=head, poll_interval=NEVER)
    wanted = DomainEvent("Wanted", {"old": False})
    consumer = Consumer(subscription, until_event(wanted.event_id)).start()
    wait_for(lambda: consumer.waiting, "the consumer to wait")

    other = store.append(DomainEvent("Other", {"old": False}))
    position = store.append(wanted)
    events = consumer.join()

    assert events == store.read(query, after=head).events
    assert events[-1].event_id == wanted.event_id
    assert events[-1].position == position == head + 2
    assert positions(events) == ([other, position] if query is None else [position])
    subscription.close()
    assert store.subscriptions == 0


# -- async iteration -------------------------------------------------------------------------


def test_async_iteration_catches_up_follows_and_stops(store: EventStore) -> None:
    store.append_batch([DomainEvent("Old", {"i": i}) for i in range(3)])
    subscription = store.subscribe(after=0, buffer=2, poll_interval=NEVER)

    async def main() -> tuple[list[SequencedEvent], int, bool]:
        got: list[SequencedEvent] = []

        async def consume() -> None:
            async for event in subscription:
                got.append(event)

        async def until(count: int) -> None:
            while len(got) < count:
                await asyncio.sleep(0.005)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(until(3), JOIN_TIMEOUT)
        # The consumer awaits new events; the loop keeps running meanwhile (this coroutine
        # appends while it waits).
        position = await asyncio.to_thread(store.append, DomainEvent("New"))
        await asyncio.wait_for(until(4), JOIN_TIMEOUT)
        pending = not task.done()
        await asyncio.to_thread(subscription.stop)
        await asyncio.wait_for(task, JOIN_TIMEOUT)
        return got, position, pending

    stuck, outcome = run_loop(main, subscription, JOIN_TIMEOUT)
    assert not stuck and outcome is not None
    got, position, pending = outcome
    assert pending  # it was still waiting when stopped
    assert position == 4
    assert got == store.read().events
    assert positions(got) == [1, 2, 3, 4]
    assert subscription.stopped
    assert store.subscriptions == 0


# -- an idle subscription --------------------------------------------------------------------


def test_an_idle_subscription_keeps_waiting_after_its_poll_interval(store: EventStore) -> None:
    """With nothing to read and the listener connected, a subscription blocks until it is woken;
    its poll interval passing is no reason to read, and does not turn the wait into a busy
    loop."""
    poll_interval = 0.1
    store.append(DomainEvent("First"))
    subscription = store.subscribe(after=0, poll_interval=poll_interval)
    reads = Reads(subscription)
    listener = store._listener
    assert listener is not None
    waits = [0]
    wait = listener.wait

    def counted(*args: Any) -> None:
        waits[0] += 1
        wait(*args)

    listener.wait = counted  # type: ignore[method-assign]
    end = DomainEvent("End")
    consumer = Consumer(subscription, until_event(end.event_id)).start()
    # Waiting, and read since the listener's last news: nothing in flight is a reason to read.
    wait_for(
        lambda: (
            len(consumer.events) == 1
            and consumer.waiting
            and listener.connected
            and subscription._news_read == listener.news
        ),
        "the consumer to wait",
    )
    started = time.monotonic()
    reads_before, waits_before, news_before = len(reads), waits[0], listener.news
    time.sleep(0.5)  # five poll intervals of idleness at least: a window to count in
    idle_reads = len(reads) - reads_before
    idle_waits = waits[0] - waits_before
    news = listener.news - news_before
    # The window as it was: a busy machine may stretch the sleep well past half a second.
    window = time.monotonic() - started
    last = store.append(end)
    assert positions(consumer.join()) == [1, last]
    # Reads only for the listener's news (none, normally), not each time the interval passes.
    assert idle_reads <= news, f"{idle_reads} reads for {news} news in {window:.2f} s of idleness"
    # A wait per poll interval of the window at most, not a spin (tens of thousands).
    assert idle_waits <= window / poll_interval + 5, f"{idle_waits} waits in {window:.2f} s"
    subscription.close()


def test_an_idle_async_subscription_leaves_the_event_loop_running(store: EventStore) -> None:
    """While an ``async for`` waits for events, past its poll interval too, the event loop runs
    the other tasks."""
    store.append(DomainEvent("First"))
    subscription = store.subscribe(after=0, poll_interval=0.05)
    end = DomainEvent("End")
    got: list[SequencedEvent] = []
    ticks: list[int] = []

    async def main() -> None:
        async def consume() -> None:
            async for event in subscription:
                got.append(event)
                if event.event_id == end.event_id:
                    return

        task = asyncio.create_task(consume())
        for tick in range(10):  # other work, while the subscription has nothing to deliver
            await asyncio.sleep(0.05)
            if subscription.stopped:  # by run_loop: the loop had stopped running
                return
            ticks.append(tick)
        await asyncio.to_thread(store.append, end)
        await asyncio.wait_for(task, JOIN_TIMEOUT)

    stuck, _ = run_loop(main, subscription, JOIN_TIMEOUT)
    assert not stuck, f"the event loop stopped running after {len(ticks)} of 10 ticks"
    assert ticks == list(range(10))
    assert positions(got) == [1, 2]
    subscription.close()


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((), {"buffer": 0}, "buffer"),
        ((), {"buffer": -1}, "buffer"),
        ((), {"buffer": True}, "buffer"),
        ((), {"buffer": 10**9}, "buffer"),
        ((), {"buffer": MAX_BUFFER + 1}, "buffer"),
        ((), {"buffer": 10.0}, "buffer"),
        ((), {"poll_interval": 0}, "poll_interval"),
        ((), {"poll_interval": -1.0}, "poll_interval"),
        ((), {"poll_interval": float("inf")}, "poll_interval"),
        ((), {"poll_interval": float("nan")}, "poll_interval"),
        ((), {"poll_interval": "5"}, "poll_interval"),
        ((), {"retry_for": 0.0}, "retry_for"),
        ((), {"retry_for": float("inf")}, "retry_for"),
        ((), {"after": -1}, "after"),
        ((), {"after": "x"}, "after"),
        ((), {"after": True}, "after"),
        ((), {"after": 2**63}, "after"),
        (({"types": ["X"]},), {}, None),
        (("types=X",), {}, None),
        ((Query((QueryItem(types=(1,)),)),), {}, "types"),  # type: ignore[arg-type]
        ((EventFilter(limit=5),), {}, "limit"),
        ((EventFilter(limit=0),), {}, "limit"),
        ((EventFilter(offset=3),), {}, "offset"),
        ((EventFilter(order_by="timestamp"),), {}, "order_by"),
        ((EventFilter(order_by="type"),), {}, "order_by"),
        ((EventFilter(order_direction="desc"),), {}, "order_direction"),
        ((EventFilter(event_types="Created"),), {}, "event_types"),  # type: ignore[arg-type]
        ((EventFilter(start_time="yesterday"),), {}, "start_time"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_bad_arguments_are_query_errors(
    store: EventStore, args: tuple[Any, ...], kwargs: dict[str, Any], field: str | None
) -> None:
    with pytest.raises(EventStoreError) as excinfo:
        store.subscribe(*args, **kwargs)
    assert excinfo.value.code == QUERY_ERROR
    assert excinfo.value.context.get("field") == field
    assert store.subscriptions == 0
    # refused before any connection was opened for it
    assert store._listener is None


def test_the_edges_of_the_ranges_are_accepted(store: EventStore) -> None:
    store.append_batch(numbered(0, 3))
    accepted = [
        store.subscribe(buffer=1),
        store.subscribe(buffer=MAX_BUFFER, poll_interval=0.001, retry_for=1e9),
        store.subscribe(Query.all(), after=None),
        store.subscribe(EventFilter(order_by="position", order_direction="asc", offset=0)),
        store.subscribe(after=10**6),
    ]
    assert store.subscriptions == len(accepted)
    for subscription in accepted[:4]:
        with subscription:
            assert positions(take(subscription, 3)) == [1, 2, 3]
    # after a position beyond the head: nothing yet
    assert accepted[4].position == 10**6
    accepted[4].close()
    assert store.subscriptions == 0


# -- filter subscriptions --------------------------------------------------------------------

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)


def filter_events(start: int, count: int) -> list[DomainEvent]:
    """Types A, B, C; some issues; timestamps scattered around T0 out of position order."""
    events = []
    for i in range(start, start + count):
        tags = {"issueId": f"i-{i % 4}"} if i % 5 else {}
        if i % 2 == 0:
            tags["provider"] = "github"
        minutes = (i * 37) % (9 * 60) - 120  # T0 - 2h .. T0 + 7h
        events.append(
            DomainEvent(
                "ABC"[i % 3],
                {"i": i},
                tags,
                timestamp=T0 + timedelta(minutes=minutes, seconds=i % 60),
            )
        )
    return events


FILTERS: list[tuple[str, EventFilter, Callable[[SequencedEvent], bool], DomainEvent]] = [
    (
        "types",
        EventFilter(event_types=["A", "C"]),
        lambda e: e.event_type in ("A", "C"),
        DomainEvent("C", {"end": True}),
    ),
    (
        "issues",
        EventFilter(issue_ids=["i-1", "i-3"]),
        lambda e: e.tags.get("issueId") in ("i-1", "i-3"),
        DomainEvent("B", {"end": True}, {"issueId": "i-3"}),
    ),
    (
        "window",
        EventFilter(
            start_time=T0 + timedelta(hours=1), end_time=T0 + timedelta(hours=4, minutes=30)
        ),
        lambda e: T0 + timedelta(hours=1) <= e.timestamp < T0 + timedelta(hours=4, minutes=30),
        DomainEvent("A", {"end": True}, timestamp=T0 + timedelta(hours=1)),
    ),
    (
        "since",
        EventFilter(start_time=(T0 + timedelta(hours=5, minutes=17)).isoformat()),
        lambda e: e.timestamp >= T0 + timedelta(hours=5, minutes=17),
        DomainEvent("A", {"end": True}, timestamp=T0 + timedelta(days=3)),
    ),
    (
        "combined",
        EventFilter(
            event_types=["B"],
            issue_ids=["i-2"],
            providers=["github"],
            end_time=T0 + timedelta(hours=3),
        ),
        lambda e: (
            e.event_type == "B"
            and e.tags.get("issueId") == "i-2"
            and e.tags.get("provider") == "github"
            and e.timestamp < T0 + timedelta(hours=3)
        ),
        DomainEvent("B", {"end": True}, {"issueId": "i-2", "provider": "github"}, timestamp=T0),
    ),
]


@pytest.mark.parametrize(
    ("name", "event_filter", "matches", "end"), FILTERS, ids=[f[0] for f in FILTERS]
)
def test_a_filter_subscription_delivers_what_get_events_returns(
    store: EventStore,
    name: str,
    event_filter: EventFilter,
    matches: Callable[[SequencedEvent], bool],
    end: DomainEvent,
) -> None:
    store.append_batch(filter_events(0, 150))
    subscription = store.subscribe(event_filter, after=0, buffer=3, poll_interval=NEVER)
    reads = Reads(subscription)
    consumer = Consumer(subscription, until_event(end.event_id)).start()
    # live: appended while it follows, one by one and in batches
    for start in range(150, 300, 10):
        if start % 20:
            store.append_batch(filter_events(start, 10))
        else:
            for event in filter_events(start, 10):
                store.append(event)
    store.append(end)
    events = consumer.join()

    expected = store.get_events(event_filter)
    assert events == expected
    assert events == [e for e in store.read().events if matches(e)]
    assert_log_order(events)
    assert len(events) >= 10, name
    assert reads.largest <= 3
    subscription.close()


# -- rolled-back appends ---------------------------------------------------------------------


class Boom(Exception):
    pass


def test_rolled_back_appends_deliver_nothing_and_keep_the_order(
    store: EventStore, pg_dsn: str
) -> None:
    store.append(DomainEvent("Kept"))
    subscription = store.subscribe(after=0, poll_interval=NEVER)
    end = DomainEvent("End")
    consumer = Consumer(subscription, until_event(end.event_id)).start()
    wait_for(lambda: len(consumer.events) == 1, "the first event")

    # A transaction writes three events at positions 2-4 and holds the head lock; another
    # append queues behind it; a subscription starts and reads meanwhile; then the transaction
    # rolls back.
    queued = DomainEvent("Queued")
    queued_at: list[int] = []
    appender = threading.Thread(target=lambda: queued_at.append(store.append(queued)), daemon=True)
    with pytest.raises(Boom), store.transaction() as tx:
        assert tx.append(DomainEvent("RolledBack", {"n": 1})) == 2
        assert tx.append_batch([DomainEvent("RolledBack", {"n": n}) for n in (2, 3)]) == 4
        appender.start()
        wait_for(lambda: waiting_on_head(pg_dsn, store.schema) == 1, "the append to queue")
        probe = store.subscribe(after=0, poll_interval=NEVER)
        reads = Reads(probe)
        late = Consumer(probe, until_event(end.event_id)).start()
        # it read the log while the transaction was open, and found the committed event only
        wait_for(lambda: len(late.events) == 1 and late.waiting, "the new subscription to wait")
        assert positions(late.events) == [1]
        assert len(reads) >= 1
        raise Boom
    appender.join(JOIN_TIMEOUT)
    assert queued_at == [2]  # the position the rolled-back events had held

    # an append whose condition fails, and a batch with a duplicate id: nothing is written
    with pytest.raises(EventStoreError) as excinfo:
        store.append(DomainEvent("Refused"), AppendCondition(Query.of(types=["Kept"]), after=0))
    assert excinfo.value.code == APPEND_CONDITION_FAILED
    with pytest.raises(EventStoreError) as excinfo:
        store.append_batch([DomainEvent("Refused"), queued])
    assert excinfo.value.code == DUPLICATE_EVENT
    # a committed transaction with a refused append inside, and one holding only a refused one
    with store.transaction() as tx:
        tx.append(DomainEvent("Committed", {"n": 1}))
        with pytest.raises(EventStoreError):
            tx.append(DomainEvent("Refused"), AppendCondition(Query.of(types=["Queued"])))
        tx.append(DomainEvent("Committed", {"n": 2}))
    with store.transaction() as tx, pytest.raises(EventStoreError):
        tx.append(DomainEvent("Refused"), AppendCondition(Query.of(types=["Kept"])))
    store.append(end)
    events = consumer.join()

    assert [e.event_type for e in events] == ["Kept", "Queued", "Committed", "Committed", "End"]
    assert positions(events) == [1, 2, 3, 4, 5]
    assert events == store.read().events
    assert events[1].event_id == queued.event_id
    assert late.join() == events
    subscription.close()
    probe.close()


# -- the listener ----------------------------------------------------------------------------


def notify(dsn: str, channel: str, payload: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def test_a_payload_that_is_not_a_position_does_not_stop_the_listener(
    store: EventStore, pg_dsn: str
) -> None:
    """Any session of the database may NOTIFY the store's channel. A payload that is not a
    position is ignored: the listener goes on, and later appends still wake the subscriptions."""
    store.append(DomainEvent("First"))
    subscription = store.subscribe(after=0, poll_interval=NEVER)
    end = DomainEvent("End")
    consumer = Consumer(subscription, until_event(end.event_id)).start()
    wait_for(lambda: len(consumer.events) == 1 and consumer.waiting, "the consumer to wait")
    listener = store._listener
    assert listener is not None and listener._thread is not None
    thread = listener._thread
    # The last is a superscript two: str.isdigit() says yes, int() says no.
    for payload in ("", "hello", "-1", "1.5", " 7", "\u00b2"):
        notify(pg_dsn, f"{store.schema}.appended", payload)
    position = store.append(DomainEvent("Second"))
    wait_for(
        lambda: listener.seen == position or not thread.is_alive(),
        "the listener to take the append",
    )
    assert thread.is_alive(), "the listener thread died on a foreign payload"
    assert listener.seen == position
    last = store.append(end)
    assert positions(consumer.join()) == [1, position, last]
    subscription.close()


def test_a_notification_beyond_the_head_does_not_make_subscribers_spin(
    store: EventStore, pg_dsn: str
) -> None:
    """A position announced on the channel that the log does not reach (a NOTIFY by another
    session) wakes the subscriptions; having read and found nothing new, they wait again
    instead of reading over and over until the log reaches that position."""
    store.append(DomainEvent("First"))
    subscription = store.subscribe(after=0, poll_interval=NEVER)
    reads = Reads(subscription)
    end = DomainEvent("End")
    consumer = Consumer(subscription, until_event(end.event_id)).start()
    wait_for(lambda: len(consumer.events) == 1 and consumer.waiting, "the consumer to wait")
    listener = store._listener
    assert listener is not None
    wait_for(lambda: listener.connected, "the listener to listen")
    wait_for(lambda: consumer.waiting, "the consumer to wait")
    # One read, or two when the listener's connection (news too) came after the first began.
    settled = len(reads)
    assert settled in (1, 2)

    notify(pg_dsn, f"{store.schema}.appended", "1000000")
    wait_for(lambda: listener.seen == 1_000_000, "the listener to take the notification")
    wait_for(lambda: len(reads) > settled, "the read the notification wakes")
    wait_for(lambda: consumer.waiting, "the consumer to wait again")
    assert len(reads) <= settled + 2, f"{len(reads) - settled} reads of an unchanged log"
    last = store.append(end)
    assert positions(consumer.join()) == [1, last]
    subscription.close()


def test_the_subscriptions_of_a_store_share_its_listener(store: EventStore) -> None:
    """Several subscriptions of one store share one listener."""
    first = store.subscribe(poll_interval=NEVER)
    second = store.subscribe(Query.of(types=["B"]), poll_interval=NEVER)
    assert first._listener is second._listener is store._listener
    end = DomainEvent("B", {"end": True})
    consumers = [Consumer(s, until_event(end.event_id)).start() for s in (first, second)]
    wait_for(lambda: all(c.waiting for c in consumers), "the consumers to wait")
    store.append_batch([DomainEvent("A"), DomainEvent("B")])
    store.append(end)
    every, bees = (c.join() for c in consumers)
    assert positions(every) == [1, 2, 3]
    assert positions(bees) == [2, 3]
    for subscription in (first, second):
        subscription.close()
    assert store.subscriptions == 0


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.ConnectionFailure("connection failure"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (PoolTimeout("couldn't get a connection"), True),
        (psycopg.errors.QueryCanceled("statement timeout"), False),
        (psycopg.errors.DeadlockDetected("deadlock detected"), False),
        (PoolClosed("the pool is closed"), False),
        (psycopg.errors.UndefinedTable("no such table"), False),
    ],
)
def test_only_a_lost_connection_counts_as_one(error: Exception, lost: bool) -> None:
    # What a subscription retries from its position, and what makes the pool test its idle
    # connections: the session ended or the link broke, not the statement failed.
    assert connection_lost(error) is lost


def test_an_async_store_subscription_is_an_async_context_manager(pg_dsn: str) -> None:
    """docs/operations.md: ``async with store.subscribe(...) as subscription``; leaving the
    block stops it."""
    from tamma_events.stores.aio import AsyncEventStore

    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def main() -> tuple[list[str], bool]:
        async with AsyncEventStore(pg_dsn, schema=schema, max_connections=2) as store:
            await store.append_batch([DomainEvent("A"), DomainEvent("B")])
            seen: list[str] = []
            async with store.subscribe(after=0) as subscription:
                async for event in subscription:
                    seen.append(event.event_type)
                    if len(seen) == 2:
                        break
            return seen, subscription.stopped

    try:
        assert asyncio.run(main()) == (["A", "B"], True)
    finally:
        drop(pg_dsn, schema)
