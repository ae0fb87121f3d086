"""Durable consumers (`EventStore.consumer`) against a real PostgreSQL, in one process.

A consumer delivers every matching event, in position order within a partition, and resumes
from the checkpoints its schema keeps; a checkpoint moves only with an acknowledged batch (at
least once), or in the transaction of a transactional handler (exactly once for what it
writes); workers share partitions by leases; poison events are parked and replayed; resets and
drops are refused while workers hold leases. The tests with real processes killed by SIGKILL
are in ``tests/test_consumer_processes.py``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql

from tamma_events import (
    CONSUMER_CONFLICT,
    QUERY_ERROR,
    AppendCondition,
    AsyncEventStore,
    Consumer,
    ConsumerConflict,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    SequencedEvent,
    Transaction,
)
from tamma_events.ops.consuming import fair_share
from tamma_events.stores.consumers import partition_of

#: How long a test waits for workers to get somewhere before it reports what they did.
DEADLINE = 120.0
ISSUES = 13


def issue_events(count: int, start: int = 0) -> list[DomainEvent]:
    return [
        DomainEvent(
            "IssueUpdated" if n % 3 else "IssueCreated",
            {"n": n},
            {"issueId": f"ISSUE-{n % ISSUES}"},
        )
        for n in range(start, start + count)
    ]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Running:
    """A worker's `run` in a thread of its own; `stop` ends it and raises what it raised."""

    def __init__(self, consumer: Consumer, handler: Callable[..., object], **options: Any) -> None:
        self.consumer = consumer
        self.error: BaseException | None = None

        def target() -> None:
            try:
                consumer.run(handler, **options)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def positions(events: list[SequencedEvent]) -> list[int]:
    return [e.position for e in events]


@pytest.fixture
def projection(store: EventStore) -> Iterator[sql.Identifier]:
    """A projection table in the store's schema: one row per event handled."""
    table = sql.Identifier(store.schema, "projection")
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (seq bigserial, position bigint NOT NULL, issue text, worker text)"
            ).format(table)
        )
    yield table


def projected(store: EventStore, table: sql.Identifier) -> list[tuple[int, str]]:
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT position, issue FROM {} ORDER BY seq").format(table))
        return [(int(p), i) for p, i in rows]


# -- delivery and checkpoints ------------------------------------------------------------------


def test_every_event_is_delivered_in_order_and_a_rerun_resumes_after_the_checkpoint(
    store: EventStore,
) -> None:
    store.append_batch(issue_events(1_234))
    seen: list[list[int]] = []
    consumer = store.consumer("board", batch_size=100)
    consumer.run(lambda events: seen.append(positions(events)), until_idle=True)
    assert [p for batch in seen for p in batch] == list(range(1, 1_235))
    assert max(len(batch) for batch in seen) == 100
    (state,) = store.consumers()
    assert (state.name, [p.position for p in state.partitions], state.lag_positions) == (
        "board",
        [1_234],
        0,
    )
    # A new worker of the same consumer starts after its checkpoint.
    store.append_batch(issue_events(7, 1_234))
    again: list[int] = []
    store.consumer("board").run(lambda events: again.extend(positions(events)), until_idle=True)
    assert again == list(range(1_235, 1_242))


def test_a_query_selects_the_events_and_the_checkpoint_passes_the_others(
    store: EventStore,
) -> None:
    store.append_batch(issue_events(300))
    query = Query.of(types=["IssueCreated"], tags={"issueId": "ISSUE-3"})
    seen: list[SequencedEvent] = []
    store.consumer("created", query, batch_size=7).run(seen.extend, until_idle=True)
    expected = [e for e in store.read().events if e.event_type == "IssueCreated"]
    assert positions(seen) == [e.position for e in expected if e.tags["issueId"] == "ISSUE-3"]
    # Caught up with the head, not only with its last match.
    (state,) = store.consumers("created")
    assert state.partitions[0].position == 300
    by_filter: list[SequencedEvent] = []
    store.consumer("by-filter", EventFilter(issue_ids=["ISSUE-3"])).run(
        by_filter.extend, until_idle=True
    )
    assert positions(by_filter) == [
        e.position for e in store.read().events if e.tags["issueId"] == "ISSUE-3"
    ]


@pytest.mark.parametrize(("start", "first"), [("beginning", 1), ("end", 21), (15, 16)])
def test_a_new_consumer_starts_where_asked(store: EventStore, start: Any, first: int) -> None:
    store.append_batch(issue_events(20))
    consumer = store.consumer("late", start=start)
    seen: list[int] = []
    consumer.run(lambda events: seen.extend(positions(events)), until_idle=True)
    store.append_batch(issue_events(3, 20))
    consumer.run(lambda events: seen.extend(positions(events)), until_idle=True)
    assert seen == list(range(first, 24))
    # The start applies to a consumer's first run only.
    store.consumer("late", start="end").run(lambda events: seen.append(-1), until_idle=True)
    assert seen[-1] == 23


def test_a_live_consumer_gets_new_events_as_they_are_committed(store: EventStore) -> None:
    seen: list[int] = []
    running = Running(store.consumer("live"), lambda events: seen.extend(positions(events)))
    try:
        for round_ in range(5):
            store.append_batch(issue_events(10, round_ * 10))
            count = (round_ + 1) * 10
            wait_until(lambda count=count: len(seen) == count, f"round {round_}")  # type: ignore[misc]
    finally:
        running.stop()
    assert seen == list(range(1, 51))
    assert store.consumers("live")[0].workers == []  # it left


def test_a_failed_batch_is_delivered_again_and_the_checkpoint_waits_for_it(
    store: EventStore,
) -> None:
    """At least once: a batch whose handler raised is not acknowledged; the events before the
    failing one may come twice, none is skipped."""
    store.append_batch(issue_events(50))
    seen: list[int] = []
    failures = [3]

    def handler(events: list[SequencedEvent]) -> None:
        seen.extend(positions(events))
        if 37 in positions(events) and failures[0]:
            failures[0] -= 1
            raise RuntimeError("not yet")

    store.consumer("retry", batch_size=20, retry_delay=0.05).run(handler, until_idle=True)
    assert sorted(set(seen)) == list(range(1, 51))
    assert seen.count(37) == 4 and seen.count(1) == 1
    assert store.parked_events("retry") == []


# -- exactly once for transactional handlers ---------------------------------------------------


def test_a_transactional_handler_commits_its_writes_with_the_checkpoint(
    store: EventStore, projection: sql.Identifier
) -> None:
    store.append_batch(issue_events(200))
    failures = {"left": 2}

    def handler(events: list[SequencedEvent], tx: Transaction) -> None:
        for event in events:
            tx.connection.execute(
                sql.SQL("INSERT INTO {} (position, issue) VALUES (%s, %s)").format(projection),
                [event.position, event.tags["issueId"]],
            )
            if event.position == 150 and failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("rolled back with the checkpoint")

    store.consumer("projection", batch_size=40, retry_delay=0.05).run(
        handler, transactional=True, until_idle=True
    )
    assert [p for p, _ in projected(store, projection)] == list(range(1, 201))
    assert failures["left"] == 0


def test_appends_of_a_transactional_handler_are_part_of_its_transaction(
    store: EventStore,
) -> None:
    """A reactor: each issue created gets one follow-up event, appended under a condition, in
    the transaction that moves the checkpoint; a failed attempt leaves no follow-up behind."""
    store.append_batch(issue_events(39))
    attempts: dict[int, int] = {}

    def react(events: list[SequencedEvent], tx: Transaction) -> None:
        for event in events:
            if event.event_type != "IssueCreated":
                continue
            issue = event.tags["issueId"]
            done = tx.read(Query.of(types=["FollowUp"], tags={"issueId": issue}))
            tx.append(
                DomainEvent("FollowUp", {"for": event.position}, {"issueId": issue}),
                AppendCondition(Query.of(types=["FollowUp"], tags={"issueId": issue}), done.head),
            )
            attempts[event.position] = attempts.get(event.position, 0) + 1
            if event.position == 16 and attempts[16] == 1:
                raise RuntimeError("the follow-up above is rolled back")

    store.consumer("reactor", Query.of(types=["IssueCreated"]), batch_size=4, retry_delay=0.05).run(
        react, transactional=True, until_idle=True
    )
    follow_ups = [e for e in store.read(Query.of(types=["FollowUp"])).events]
    created = [e.position for e in store.read(Query.of(types=["IssueCreated"])).events]
    assert sorted(e.data["for"] for e in follow_ups) == created
    assert attempts[16] == 2


# -- poison events -------------------------------------------------------------------------------


def test_a_poison_event_is_parked_and_replayed_once_fixed(store: EventStore) -> None:
    store.append_batch(issue_events(60))
    broken = {33}
    seen: list[int] = []

    def handler(events: list[SequencedEvent]) -> None:
        for event in events:
            if event.position in broken:
                raise ValueError(f"cannot handle {event.position}")
        seen.extend(positions(events))

    consumer = store.consumer("poison", batch_size=10, max_attempts=3, retry_delay=0.05)
    consumer.run(handler, until_idle=True)
    assert sorted(set(seen)) == [p for p in range(1, 61) if p != 33]
    (parked,) = store.parked_events("poison")
    assert (parked.position, parked.attempts, parked.replay_requested) == (33, 3, False)
    assert parked.error == "ValueError: cannot handle 33"
    assert store.consumers("poison")[0].parked == 1
    # Replayed while still broken: it stays parked, with one more attempt.
    assert store.replay_parked("poison") == [33]
    consumer.run(handler, until_idle=True)
    (parked,) = store.parked_events("poison")
    assert (parked.attempts, parked.replay_requested) == (4, False)
    broken.clear()
    assert store.replay_parked("poison", [33]) == [33]
    assert store.replay_parked("poison", [34]) == []
    consumer.run(handler, until_idle=True)
    assert seen.count(33) == 1
    assert store.parked_events("poison") == []


def test_a_transactional_replay_happens_once(store: EventStore, projection: sql.Identifier) -> None:
    store.append_batch(issue_events(12))
    broken = {5}

    def handler(events: list[SequencedEvent], tx: Transaction) -> None:
        for event in events:
            if event.position in broken:
                raise ValueError("poison")
            tx.connection.execute(
                sql.SQL("INSERT INTO {} (position) VALUES (%s)").format(projection),
                [event.position],
            )

    consumer = store.consumer("tx-poison", max_attempts=1, retry_delay=0.05)
    consumer.run(handler, transactional=True, until_idle=True)
    assert [p for p, _ in projected(store, projection)] == [p for p in range(1, 13) if p != 5]
    broken.clear()
    store.replay_parked("tx-poison")
    consumer.run(handler, transactional=True, until_idle=True)
    consumer.run(handler, transactional=True, until_idle=True)
    assert sorted(p for p, _ in projected(store, projection)) == list(range(1, 13))


# -- partitions and workers ----------------------------------------------------------------------


def test_partitions_are_a_stable_hash_of_the_tag(store: EventStore) -> None:
    """The CRC-32 of the value's UTF-8 modulo the partitions: the same in every process and
    version (these values are fixed), partition 0 without the tag."""
    store.append_batch(
        [DomainEvent("E", {}, {"issueId": value}) for value in ("ISSUE-42", "é", "", "ISSUE-1")]
        + [DomainEvent("E", {}, {"other": "x"})]
    )
    events = store.read().events
    assert [partition_of(e, "issueId", 8) for e in events] == [4, 6, 0, 0, 0]
    assert [partition_of(e, "issueId", 1000) for e in events] == [884, 326, 0, 368, 0]
    assert [partition_of(e, None, 1) for e in events] == [0] * 5


def test_fair_shares_add_up() -> None:
    for partitions in (1, 5, 16):
        for count in (1, 2, 3, 7):
            workers = [f"w{n}" for n in range(count)]
            shares = [fair_share(partitions, workers, w) for w in workers]
            assert sum(shares) == partitions
            assert max(shares) - min(shares) <= 1
    assert fair_share(4, ["a"], "b") == 2  # a worker not yet listed counts itself


def test_workers_share_the_partitions_and_keep_each_key_in_order(
    store: EventStore, projection: sql.Identifier
) -> None:
    store.append_batch(issue_events(600))

    def handler_of(worker: str) -> Callable[[list[SequencedEvent], Transaction], None]:
        def handler(events: list[SequencedEvent], tx: Transaction) -> None:
            for event in events:
                tx.connection.execute(
                    sql.SQL("INSERT INTO {} (position, issue, worker) VALUES (%s, %s, %s)").format(
                        projection
                    ),
                    [event.position, event.tags["issueId"], worker],
                )
            time.sleep(0.002)

        return handler

    def consumer(worker: str) -> Consumer:
        return store.consumer(
            "shared",
            partition_by="issueId",
            partitions=6,
            batch_size=10,
            lease_time=0.6,
            worker=worker,
        )

    first = Running(consumer("a"), handler_of("a"), transactional=True)
    wait_until(lambda: len(projected(store, projection)) >= 50, "the first worker to start")
    second = Running(consumer("b"), handler_of("b"), transactional=True)
    try:
        wait_until(lambda: len(second.consumer.owned) == 3, "the second worker's share")
        wait_until(lambda: len(first.consumer.owned) == 3, "the first worker to let go")
        store.append_batch(issue_events(600, 600))
        wait_until(lambda: len(projected(store, projection)) >= 1_200, "every event")
    finally:
        first.stop()
        second.stop()
    rows = projected(store, projection)
    assert sorted(p for p, _ in rows) == list(range(1, 1_201))
    for issue in {i for _, i in rows}:
        mine = [p for p, i in rows if i == issue]
        assert mine == sorted(mine), issue
    (state,) = store.consumers("shared")
    assert len(state.partitions) == 6 and state.workers == []


# -- operations ------------------------------------------------------------------------------------


def test_reset_and_drop_are_refused_while_workers_hold_leases(store: EventStore) -> None:
    store.append_batch(issue_events(30))
    seen: list[int] = []
    running = Running(
        store.consumer("ops", batch_size=5), lambda events: seen.extend(positions(events))
    )
    try:
        wait_until(lambda: len(seen) == 30, "the first pass")
        calls: list[Callable[[], int]] = [
            lambda: store.reset_consumer("ops", to=10),
            lambda: store.drop_consumer("ops"),
        ]
        for call in calls:
            with pytest.raises(ConsumerConflict) as refused:
                call()
            assert refused.value.code == CONSUMER_CONFLICT
            assert refused.value.context == {"name": "ops", "leased": 1}
        # Forced: the worker loses the partition at its next checkpoint and reads again.
        assert store.reset_consumer("ops", to=25, force=True) == 1
        store.append_batch(issue_events(2, 30))
        wait_until(lambda: seen[-1] == 32 and 26 in seen[30:], "the reset to take")
    finally:
        running.stop()
    assert seen[30:].count(26) == 1 and seen[30:][-1] == 32
    assert store.reset_consumer("ops", to=0) == 1
    assert store.consumers("ops")[0].partitions[0].position == 0
    assert store.drop_consumer("ops") == 1
    assert store.consumers("ops") == []
    with pytest.raises(ConsumerConflict):
        store.reset_consumer("ops", to=0)


def test_a_consumer_with_other_partitions_is_refused(store: EventStore) -> None:
    store.consumer("split", partition_by="issueId", partitions=4).run(
        lambda events: None, until_idle=True
    )
    with pytest.raises(ConsumerConflict) as refused:
        store.consumer("split", partition_by="issueId", partitions=8).run(lambda events: None)
    assert "4 partition(s) by tag 'issueId', not 8" in refused.value.message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"partitions": 4}, "partitions"),
        ({"partition_by": "issueId", "partitions": 2000}, "partitions"),
        ({"partition_by": ""}, "partition_by"),
        ({"lease_time": 0}, "lease_time"),
        ({"lease_time": float("nan")}, "lease_time"),
        ({"retry_delay": -1}, "retry_delay"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"start": "middle"}, "after"),
        ({"start": -1}, "after"),
        ({"worker": ""}, "worker"),
    ],
)
def test_bad_options_are_query_errors(
    store: EventStore, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(EventStoreError) as refused:
        store.consumer("bad", **options)
    assert refused.value.code == QUERY_ERROR
    assert refused.value.context.get("field") == field, refused.value
    for name in ("", "x" * 201, 7):
        with pytest.raises(EventStoreError) as refused:
            store.consumer(name)  # type: ignore[arg-type]
        assert refused.value.context == {"field": "name"}
    assert store.consumers() == []


def test_metrics_and_prometheus_show_the_running_workers(store: EventStore) -> None:
    store.append_batch(issue_events(20))
    gate = threading.Event()
    running = Running(
        store.consumer("metered", partition_by="issueId", partitions=2, batch_size=5),
        lambda events: gate.wait(DEADLINE),
    )
    try:
        wait_until(
            lambda: [len(w["partitions"]) for w in store.metrics()["consumers"]] == [2],
            "the worker to hold both partitions",
        )
        (worker,) = store.metrics()["consumers"]
        assert worker["name"] == "metered" and sorted(worker["partitions"]) == [0, 1]
        assert {lag["position"] for lag in worker["partitions"].values()} == {0}
        text = generate_latest(store.prometheus_registry).decode()
        assert 'tamma_events_consumer_lag_positions{consumer="metered",partition="0"}' in text
        assert 'tamma_events_consumer_lag_seconds{consumer="metered",partition="1"}' in text
    finally:
        gate.set()
        running.stop()
    assert store.metrics()["consumers"] == []


def test_the_async_store_runs_consumers_too(
    pg_dsn: str, make_store: Callable[..., EventStore]
) -> None:
    schema = make_store().schema

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncEventStore(pg_dsn, schema=schema) as store:
            await store.append_batch(issue_events(25))
            seen: list[int] = []

            async def handler(events: list[SequencedEvent]) -> None:
                seen.extend(positions(events))

            await store.consumer("async", batch_size=10).run(handler, until_idle=True)
            appended: list[int] = []

            async def react(events: list[SequencedEvent], tx: Any) -> None:
                for event in events:
                    if event.event_type == "IssueCreated":
                        appended.append(
                            await tx.append(DomainEvent("Seen", {"of": event.position}))
                        )

            await store.consumer("async-tx", Query.of(types=["IssueCreated"])).run(
                react, transactional=True, until_idle=True
            )
            states = await store.consumers()
            assert [s.name for s in states] == ["async", "async-tx"]
            return seen, appended

    seen, appended = asyncio.run(main())
    assert seen == list(range(1, 26))
    assert appended == list(range(26, 26 + len([n for n in range(25) if n % 3 == 0])))


def test_an_error_of_the_handlers_own_sql_is_its_failure_not_an_outage(
    store: EventStore, projection: sql.Identifier
) -> None:
    """A transactional handler's SQL that breaks a constraint (raised, or caught and ignored
    by the handler) fails the event like any error of the handler: it is parked, and the
    partition goes on."""
    store.append_batch(issue_events(9))
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CHECK (position <> 4)").format(projection))

    def write(events: list[SequencedEvent], tx: Transaction, swallow: bool) -> None:
        for event in events:
            try:
                tx.connection.execute(
                    sql.SQL("INSERT INTO {} (position) VALUES (%s)").format(projection),
                    [event.position],
                )
            except psycopg.errors.CheckViolation:
                if not swallow:
                    raise

    for swallow in (False, True):
        name = f"constrained-{swallow}"
        store.consumer(name, max_attempts=2, retry_delay=0.05).run(
            functools.partial(write, swallow=swallow), transactional=True, until_idle=True
        )
        (parked,) = store.parked_events(name)
        assert (parked.position, parked.attempts) == (4, 2)
        wanted = "failed inside its transaction" if swallow else "violates check constraint"
        assert wanted in parked.error, parked.error
    assert sorted(p for p, _ in projected(store, projection)) == sorted(
        [p for p in range(1, 10) if p != 4] * 2
    )


def test_a_worker_of_a_consumer_dropped_and_made_again_otherwise_stops(
    store: EventStore,
) -> None:
    store.append_batch(issue_events(20))
    old = store.consumer("remade", partition_by="issueId", partitions=2, lease_time=0.3)
    running = Running(old, lambda events: None)
    wait_until(lambda: len(old.owned) == 2, "the first worker")
    assert store.drop_consumer("remade", force=True) == 2
    store.consumer("remade", partition_by="issueId", partitions=8).run(
        lambda events: None, until_idle=True
    )
    running.thread.join(DEADLINE)
    assert not running.thread.is_alive()
    assert isinstance(running.error, ConsumerConflict), running.error
    # Dropped ("was dropped"), or already made again ("made again with other partitions"),
    # depending on when it balanced last.
    assert "dropped" in running.error.message


def test_stop_before_run_and_close_end_a_worker(make_store: Callable[..., EventStore]) -> None:
    store = make_store()
    store.append_batch(issue_events(5))
    seen: list[int] = []
    early = store.consumer("early")
    early.stop()
    early.run(lambda events: seen.extend(positions(events)))  # returns at once
    assert seen == [] and not early.stopped
    running = Running(store.consumer("closed"), lambda events: seen.extend(positions(events)))
    wait_until(lambda: len(seen) == 5, "the worker")
    store.close()
    running.thread.join(DEADLINE)
    assert not running.thread.is_alive()


def test_a_reset_waits_for_no_batch_in_progress_unless_forced(store: EventStore) -> None:
    """A transactional batch holds its partition's row until it commits: a reset that is not
    forced gives up after a short wait (CONSUMER_CONFLICT, "busy"); a forced one waits for the
    commit, then resets."""
    store.append_batch(issue_events(3))
    entered, release = threading.Event(), threading.Event()

    def slow(events: list[SequencedEvent], tx: Transaction) -> None:
        entered.set()
        release.wait(DEADLINE)

    running = Running(store.consumer("slow"), slow, transactional=True)
    try:
        assert entered.wait(DEADLINE)
        with pytest.raises(ConsumerConflict) as refused:
            store.reset_consumer("slow", to=0)
        assert refused.value.context == {"name": "slow", "leased": "busy"}
        forced: list[int] = []
        resetting = threading.Thread(
            target=lambda: forced.append(store.reset_consumer("slow", to=0, force=True))
        )
        resetting.start()
        release.set()
        resetting.join(DEADLINE)
        assert forced == [1]
    finally:
        release.set()
        running.stop()
