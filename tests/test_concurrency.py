"""Concurrent writers and readers on one real PostgreSQL: racing conditions (threads and
processes), disjoint conditions, a reader resuming by position while processes append, and group
commit. Every check is made afterwards from the log; nothing depends on timing."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

import _workers
from _schema_support import history, make_outdated
from tamma_events import (
    APPEND_CONDITION_FAILED,
    QUERY_ERROR,
    AppendCondition,
    DomainEvent,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
)
from tamma_events.ops.migrating import drop
from tamma_events.sql.schema import migrations

JOIN_TIMEOUT = 180.0
SPAWN = multiprocessing.get_context("spawn")


def run_threads(
    count: int, target: Callable[[int], None], barrier: threading.Barrier | None = None
) -> None:
    """Run ``target(0..count-1)`` in threads; re-raise the first exception any of them raised.
    A failing thread breaks ``barrier`` so that the others do not wait for it."""
    errors: list[BaseException] = []

    def wrapped(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)
            if barrier is not None:
                barrier.abort()

    threads = [
        threading.Thread(target=wrapped, args=(i,), name=f"worker-{i}", daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll until ``predicate()`` holds (a synchronisation point, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def collect(results: Any, processes: list[Any]) -> dict[int, Any]:
    """Each process's report from the queue, then join them all."""
    reports: dict[int, Any] = {}
    for _ in processes:
        worker, report = results.get(timeout=JOIN_TIMEOUT)
        assert not (isinstance(report, str) and report.startswith("error")), report
        reports[worker] = report
    for process in processes:
        process.join(JOIN_TIMEOUT)
        assert process.exitcode == 0, process
    return reports


def assert_gapless(store: EventStore) -> list[Any]:
    events = list(store.read())
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    assert store.head() == len(events)
    return events


# -- one boundary, many racers ---------------------------------------------------------------

ROUNDS = 10
RACERS = 8
BOUNDARY_TAGS = {"courseId": "c-1"}
BOUNDARY = Query.of(tags=BOUNDARY_TAGS)


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_threads_racing_on_one_boundary_have_one_winner_per_round(
    make_store: Callable[..., EventStore], shared: bool
) -> None:
    store = make_store()
    stores = [
        store if shared else make_store(schema=store.schema, max_connections=2)
        for _ in range(RACERS)
    ]
    barrier = threading.Barrier(RACERS, timeout=60)
    outcomes: list[tuple[int, int, int | None]] = []
    lock = threading.Lock()

    def racer(worker: int) -> None:
        own = stores[worker]
        for round_ in range(ROUNDS):
            barrier.wait()
            seen = own.read(BOUNDARY)
            barrier.wait()  # every racer has read before anyone appends
            if worker % 2:
                # unrelated appends in between must not make anyone lose
                own.append(DomainEvent("Noise", {"round": round_}, {"worker": str(worker)}))
            event = DomainEvent("Enrolled", {"round": round_, "worker": worker}, BOUNDARY_TAGS)
            try:
                position: int | None = own.append(event, AppendCondition(BOUNDARY, seen.head))
            except EventStoreError as exc:
                assert exc.code == APPEND_CONDITION_FAILED, exc
                position = None
            with lock:
                outcomes.append((round_, worker, position))

    run_threads(RACERS, racer, barrier)

    assert len(outcomes) == ROUNDS * RACERS
    winners = {}
    for round_ in range(ROUNDS):
        won = [(w, p) for r, w, p in outcomes if r == round_ and p is not None]
        assert len(won) == 1, f"round {round_}: winners {won}"
        winners[round_] = won[0]
    claimed = list(store.read(BOUNDARY))
    assert [e.data["round"] for e in claimed] == list(range(ROUNDS))
    for event in claimed:
        worker, position = winners[event.data["round"]]
        assert (event.data["worker"], event.position) == (worker, position)
    events = assert_gapless(store)
    assert sum(e.event_type == "Noise" for e in events) == ROUNDS * RACERS // 2
    assert len(events) == ROUNDS + ROUNDS * RACERS // 2


def test_processes_racing_on_one_boundary_have_one_winner_per_round(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store()
    processes_count, rounds = 4, 8
    barrier = SPAWN.Barrier(processes_count)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_workers.race_rounds,
            args=(pg_dsn, store.schema, worker, rounds, barrier, results),
            daemon=True,
        )
        for worker in range(processes_count)
    ]
    for process in processes:
        process.start()
    reports = collect(results, processes)

    query = Query.of(tags=_workers.RACE_TAGS)
    claimed = list(store.read(query))
    assert [e.data["round"] for e in claimed] == list(range(rounds))
    for round_, event in enumerate(claimed):
        won = [
            (worker, position)
            for worker, outcomes in reports.items()
            for r, position in outcomes
            if r == round_ and position is not None
        ]
        assert won == [(event.data["worker"], event.position)], f"round {round_}: {won}"
        lost = [
            worker
            for worker, outcomes in reports.items()
            for r, position in outcomes
            if r == round_ and position is None
        ]
        assert len(lost) == processes_count - 1
    assert len(assert_gapless(store)) == rounds


# -- disjoint boundaries ---------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_disjoint_boundaries_never_conflict(
    make_store: Callable[..., EventStore], shared: bool
) -> None:
    store = make_store()
    writers, appends = 8, 15
    stores = [
        store if shared else make_store(schema=store.schema, max_connections=2)
        for _ in range(writers)
    ]
    barrier = threading.Barrier(writers, timeout=60)
    returned: dict[int, list[int]] = {}

    def writer(worker: int) -> None:
        own = stores[worker]
        query = Query((QueryItem(("Step",), {"streamId": f"s-{worker}"}),))
        mine: list[int] = []
        barrier.wait()
        for step in range(appends):
            seen = own.read(query)
            assert len(seen) == step
            event = DomainEvent("Step", {"step": step}, {"streamId": f"s-{worker}"})
            # the head read is stale by the time of the append: others keep writing
            mine.append(own.append(event, AppendCondition(query, after=seen.head)))
        returned[worker] = mine

    run_threads(writers, writer, barrier)

    events = assert_gapless(store)
    assert len(events) == writers * appends
    for worker, mine in returned.items():
        stream = list(store.read(Query.of(tags={"streamId": f"s-{worker}"})))
        assert [e.position for e in stream] == mine
        assert [e.data["step"] for e in stream] == list(range(appends))


# -- a reader resuming by position while processes append ------------------------------------

BATCH_SIZES = [1, 17, 1, 1, 120, 3, 1, 250, 40, 1, 7, 400, 1, 60, 2, 1]


def test_reader_sees_every_event_once_in_order(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    store = make_store()
    appenders = 4
    plans = [
        [[str(uuid.uuid4()) for _ in range(size)] for size in BATCH_SIZES[w:] + BATCH_SIZES[:w]]
        for w in range(appenders)
    ]
    expected = {uuid.UUID(i) for plan in plans for batch in plan for i in batch}
    barrier = SPAWN.Barrier(appenders)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_workers.append_batches,
            # chunk_events=100: the batches of 120, 250 and 400 take the chunked path
            args=(pg_dsn, store.schema, worker, plans[worker], 100, barrier, results),
            daemon=True,
        )
        for worker in range(appenders)
    ]
    for process in processes:
        process.start()

    seen: list[Any] = []
    after = 0
    reads = 0
    deadline = time.monotonic() + JOIN_TIMEOUT
    while True:
        finished = not any(p.is_alive() for p in processes)  # before the read, so it sees all
        # alternate unlimited reads (head = store head) and paged ones (head = last returned)
        limit = 97 if reads % 2 else None
        result = store.read(after=after, limit=limit)
        reads += 1
        seen.extend(result)
        if result.head is not None:
            after = result.head
        if seen:
            assert after >= seen[-1].position
        if finished and not result:
            break
        if not result:
            time.sleep(0.001)
        assert time.monotonic() < deadline, "the appenders did not finish"
    reports = collect(results, processes)

    assert [e.position for e in seen] == list(range(1, len(expected) + 1))
    assert len({e.event_id for e in seen}) == len(seen)
    assert {e.event_id for e in seen} == expected
    # each batch sits at consecutive positions ending at the position its append returned
    by_id = {e.event_id: e for e in seen}
    for worker, lasts in reports.items():
        for batch, last in zip(plans[worker], lasts, strict=True):
            assert [by_id[uuid.UUID(i)].position for i in batch] == list(
                range(last - len(batch) + 1, last + 1)
            )
    assert store.head() == len(expected)


# -- group commit ----------------------------------------------------------------------------


def test_group_commit_gives_each_caller_its_own_position(store: EventStore) -> None:
    threads, appends = 16, 25
    barrier = threading.Barrier(threads, timeout=60)
    returned: list[tuple[int, list[DomainEvent]]] = []
    lock = threading.Lock()

    def appender(worker: int) -> None:
        barrier.wait()
        for i in range(appends):
            if worker % 4 == 0 and i % 5 == 0:
                batch = [DomainEvent("Batched", {"w": worker, "i": i, "j": j}) for j in range(3)]
                last = store.append_batch(batch)
            else:
                batch = [DomainEvent("Single", {"w": worker, "i": i}, {"w": str(worker)})]
                last = store.append(batch[0])
            with lock:
                returned.append((last, batch))

    run_threads(threads, appender, barrier)

    claimed: list[int] = []
    for last, batch in returned:
        span = list(range(last - len(batch) + 1, last + 1))
        claimed += span
        for position, event in zip(span, batch, strict=True):
            stored = store.get_event(event.event_id)
            assert stored is not None
            assert stored.position == position
            assert (stored.event_type, stored.data, stored.tags) == (
                event.event_type,
                event.data,
                event.tags,
            )
    assert sorted(claimed) == list(range(1, len(claimed) + 1))
    assert len(assert_gapless(store)) == len(claimed)


def _hold_head_lock(dsn: str, schema: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn)
    conn.execute(sql.SQL("SELECT 1 FROM {} FOR UPDATE").format(sql.Identifier(schema, "head")))
    return conn


@contextmanager
def _behind_a_waiting_leader(
    store: EventStore, pg_dsn: str, lead: Callable[[], None]
) -> Iterator[Callable[[Callable[[], None]], threading.Thread]]:
    """Hold the head lock while ``lead`` runs in a thread until it waits on it (a group's
    leader); the block starts, with the function it is given, the threads that queue behind
    it. On leaving, the lock is released and every thread joined."""
    threads: list[threading.Thread] = []

    def start(target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    holder = _hold_head_lock(pg_dsn, store.schema)
    try:
        start(lead)
        wait_for(lambda: _waiting_on_head(pg_dsn, store.schema) == 1, "the leader to wait")
        yield start
    finally:
        holder.rollback()
        holder.close()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)


def _waiting_on_head(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{schema}%"],
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize(
    "bad",
    [
        AppendCondition(Query.of(types=["X"]), after=-1),
        AppendCondition("types=X"),  # type: ignore[arg-type]
    ],
    ids=["negative-after", "not-a-query"],
)
def test_a_bad_condition_fails_only_its_own_append_in_a_group(
    store: EventStore, pg_dsn: str, bad: AppendCondition
) -> None:
    """Three appends from three threads: A leads a group and waits on the head lock (held here)
    while B (with a malformed condition) and C (valid) arrive. B's condition is refused before
    it can join C's group: B gets QUERY_ERROR, C is written as if B had never come."""
    outcomes: dict[str, Any] = {}

    def append(name: str, condition: AppendCondition | None) -> None:
        event = DomainEvent("Grouped", tags={"name": name})
        try:
            outcomes[name] = store.append(event, condition)
        except EventStoreError as exc:
            outcomes[name] = exc

    with _behind_a_waiting_leader(store, pg_dsn, lambda: append("a", None)) as start:
        start(lambda: append("b", bad)).join(JOIN_TIMEOUT)
        assert isinstance(outcomes["b"], EventStoreError)
        start(lambda: append("c", None))
        # C is queued behind A's transaction (the group commit's queue)
        wait_for(lambda: len(store._group._queue) == 1, "C to queue")
    assert outcomes["a"] == 1
    assert isinstance(outcomes["b"], EventStoreError)
    assert outcomes["b"].code == QUERY_ERROR
    assert outcomes["c"] == 2, f"C failed because of B's condition: {outcomes['c']!r}"
    assert [e.tags["name"] for e in store.read()] == ["a", "c"]


@pytest.mark.parametrize(
    "boundary",
    [
        Query.of(types=["Decided"], tags={"issueId": "I-1"}),
        Query.of(tags={"issueId": "I-1"}),
        Query.of(types=["Decided"]),
        Query.all(),
    ],
    ids=["type_and_tag", "tag", "type", "any_event"],
)
@pytest.mark.parametrize("size", [1, 300], ids=["append_function", "copy"])
def test_an_append_whose_condition_an_earlier_append_of_its_group_violates_fails(
    store: EventStore, pg_dsn: str, boundary: Query, size: int
) -> None:
    """A leads a group and waits on the head lock (held here) while B and C queue for the next
    group, both deciding on the same boundary, with nothing in it after A's event. B's events,
    written first in that group, violate C's condition: B is written, C fails and writes
    nothing. (One event each: the append function writes the group; B of 300: by COPY.)"""
    store.append(DomainEvent("Other", tags={"issueId": "I-2"}))
    after = store.head() + 1  # A's position: B and C decide after A's event
    outcomes: dict[str, Any] = {}

    def append(name: str, events: list[DomainEvent], condition: AppendCondition | None) -> None:
        try:
            outcomes[name] = store.append_batch(events, condition)
        except EventStoreError as exc:
            outcomes[name] = exc

    decided = [DomainEvent("Decided", tags={"issueId": "I-1", "by": "b"}) for _ in range(size)]
    deciding = [DomainEvent("Decided", tags={"issueId": "I-1", "by": "c"})]
    condition = AppendCondition(boundary, after=after)
    with _behind_a_waiting_leader(
        store, pg_dsn, lambda: append("a", [DomainEvent("Lead")], None)
    ) as start:
        start(lambda: append("b", decided, condition))
        wait_for(lambda: len(store._group._queue) == 1, "B to queue")
        start(lambda: append("c", deciding, condition))
        wait_for(lambda: len(store._group._queue) == 2, "C to queue")
    assert outcomes["a"] == after
    assert outcomes["b"] == after + size
    assert isinstance(outcomes["c"], EventStoreError), outcomes["c"]
    assert outcomes["c"].code == APPEND_CONDITION_FAILED
    assert [e.tags.get("by") for e in store.read(after=after)] == ["b"] * size
    assert store.verify().ok


# -- many processes opening one store at once ------------------------------------------------


@pytest.mark.codec_neutral
@pytest.mark.parametrize("start", ["new", "outdated"])
def test_stores_opened_by_many_processes_at_once_all_work(
    pg_dsn: str, start: str, make_store: Callable[..., EventStore]
) -> None:
    """Processes that open a store on the same schema at the same moment, sync and async
    alike, each migrate it or find it migrated, and all append: on a schema that does not exist
    yet, and on one an older tamma-events made (its first migrations only)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    if start == "outdated":
        # As a tamma-events half way through the migrations before the baseline left it.
        make_outdated(pg_dsn, schema, history()[len(history()) // 2].version)
    kinds = ["sync", "async", "sync", "async", "sync", "async"]
    per_process = 5
    barrier = SPAWN.Barrier(len(kinds))
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_workers.open_and_append,
            args=(pg_dsn, schema, worker, kind, per_process, barrier, results),
            daemon=True,
        )
        for worker, kind in enumerate(kinds)
    ]
    try:
        for process in processes:
            process.start()
        reports = collect(results, processes)
        store = make_store(schema=schema, migrate=False)
        assert store.schema_version() == migrations()[-1].version
        events = assert_gapless(store)
        assert len(events) == len(kinds) * per_process
        for worker, positions in reports.items():
            mine = [e for e in events if e.data["worker"] == worker]
            assert [e.position for e in mine] == positions
            assert [e.data["i"] for e in mine] == list(range(per_process))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        drop(pg_dsn, schema)
