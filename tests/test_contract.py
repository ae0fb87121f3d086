"""The store's contract, checked against both `EventStore` and `AsyncEventStore`.

Each test is written once, as a coroutine taking a store with `AsyncEventStore`'s API, and
runs twice: on a real `AsyncEventStore` (opened on a fresh schema inside the test's event loop),
and on `SyncStore`, a thin adapter whose coroutines call a sync `EventStore` directly. The test
function pytest sees is a plain one that runs the coroutine with ``asyncio.run`` (no
pytest-asyncio here).

Covered: appends and their positions, DCB reads, append conditions, duplicates and validation,
filtered queries, counts, aggregates, pages, streams and Arrow exports, transactions, appends
in a caller's transaction, snapshots and projections, subscriptions, metrics, and the
concurrency guarantees: racing conditional appends (one wins), concurrent appends (gapless
positions, consecutive batches) and subscriptions following concurrent writers (every event
once, in order). Concurrency is real for both: the async store's callers are tasks of one
event loop, the sync store's are threads, as their users' are; both share transactions
through their group commit.

Waits are synchronisation points with generous deadlines (a hang fails the test instead of
stalling the run); nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, Union

import psycopg
import pyarrow as pa
import pytest
from psycopg import pq, sql

from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    STORAGE_ERROR,
    VALIDATION_FAILED,
    AggregateRow,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Page,
    Projection,
    Query,
    QueryItem,
    ReadResult,
    SequencedEvent,
    Snapshot,
    Subscription,
)
from tamma_events.codec.arrow import EXPORT_SCHEMA
from tamma_events.filters import GroupBy
from tamma_events.stores.aio import AsyncEventStore
from tamma_events.stores.store import Transaction

T = TypeVar("T")
S = TypeVar("S")

#: The deadline of every wait: long enough never to be reached unless something hangs.
JOIN_TIMEOUT = 60.0
#: A poll interval no test outlives: only a notification (or stop) wakes such a subscription.
NEVER = 3600.0

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)

# The log most query tests read: (type, tags, minutes after BASE) at positions 1..6. The
# timestamps are out of position order, so orders by time differ from the log's.
LOG: list[tuple[str, dict[str, str], int]] = [
    ("IssueOpened", {"issueId": "1", "userId": "u1"}, 30),  # 1
    ("IssueClosed", {"issueId": "1"}, 10),  # 2
    ("IssueOpened", {"issueId": "2", "userId": "u1"}, 50),  # 3
    ("PrMerged", {"prId": "7", "userId": "u2"}, 0),  # 4
    ("IssueOpened", {}, 20),  # 5
    ("IssueCommented", {"issueId": "1", "userId": "u2"}, 40),  # 6
]
ALL = [1, 2, 3, 4, 5, 6]


# -- the sync store behind the async API ----------------------------------------------------


async def _aiter(items: Iterable[T]) -> AsyncGenerator[T, None]:
    """``items`` as an async iterator; closes them (a generator, a RecordBatchReader) when it
    ends, however it ends."""
    try:
        for item in items:
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


class SyncTransaction:
    """`Transaction` with `AsyncTransaction`'s API."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def append(
        self, event: DomainEvent | dict[str, Any], condition: AppendCondition | None = None
    ) -> int:
        return self._tx.append(event, condition)

    async def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
    ) -> int:
        return self._tx.append_batch(events, condition)

    async def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        return self._tx.read(query, after=after, limit=limit, backwards=backwards)


class SyncStore:
    """A sync `EventStore` with `AsyncEventStore`'s API: each coroutine calls the sync method
    directly (it blocks the event loop meanwhile, which these tests allow), and the iterating
    methods return async iterators. A `Subscription` is returned as it is: it supports
    ``async for`` itself."""

    def __init__(self, store: EventStore) -> None:
        self.sync = store

    @property
    def schema(self) -> str:
        return self.sync.schema

    @property
    def dsn(self) -> str:
        return self.sync.dsn

    @property
    def subscriptions(self) -> int:
        return self.sync.subscriptions

    async def close(self) -> None:
        self.sync.close()

    async def append(
        self,
        event: DomainEvent | dict[str, Any],
        condition: AppendCondition | None = None,
        *,
        conn: Any = None,
    ) -> int:
        return self.sync.append(event, condition, conn=conn)

    async def append_batch(
        self,
        events: Iterable[DomainEvent | dict[str, Any]],
        condition: AppendCondition | None = None,
        *,
        conn: Any = None,
    ) -> int:
        return self.sync.append_batch(events, condition, conn=conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SyncTransaction]:
        with self.sync.transaction() as tx:
            yield SyncTransaction(tx)

    async def read(
        self,
        query: Query | None = None,
        *,
        after: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> ReadResult:
        return self.sync.read(query, after=after, limit=limit, backwards=backwards)

    async def get_event(self, event_id: uuid.UUID | str) -> SequencedEvent | None:
        return self.sync.get_event(event_id)

    async def head(self) -> int:
        return self.sync.head()

    async def get_events(
        self, event_filter: EventFilter | None = None, *, include_archived: bool = False
    ) -> list[SequencedEvent]:
        return self.sync.get_events(event_filter, include_archived=include_archived)

    async def get_events_by_issue_id(self, issue_id: str) -> list[SequencedEvent]:
        return self.sync.get_events_by_issue_id(issue_id)

    async def count_events(self, event_filter: EventFilter | None = None) -> int:
        return self.sync.count_events(event_filter)

    async def get_event_types(self) -> list[str]:
        return self.sync.get_event_types()

    async def get_tags(self) -> dict[str, list[str]]:
        return self.sync.get_tags()

    async def aggregate(
        self,
        event_filter: EventFilter | None = None,
        group_by: GroupBy = "event_type",
        *,
        tag_key: str | None = None,
    ) -> list[AggregateRow]:
        return self.sync.aggregate(event_filter, group_by, tag_key=tag_key)

    async def get_page(
        self,
        event_filter: EventFilter | None = None,
        *,
        page_size: int = 1_000,
        token: str | None = None,
    ) -> Page:
        return self.sync.get_page(event_filter, page_size=page_size, token=token)

    def paginate(
        self, event_filter: EventFilter | None = None, *, page_size: int = 1_000
    ) -> AsyncGenerator[list[SequencedEvent], None]:
        return _aiter(self.sync.paginate(event_filter, page_size=page_size))

    def stream_events(
        self, event_filter: EventFilter | None = None, *, batch_size: int = 1_000
    ) -> AsyncGenerator[SequencedEvent, None]:
        # Called now, so that malformed arguments raise at the call, as the async store's do.
        return _aiter(self.sync.stream_events(event_filter, batch_size=batch_size))

    def export_arrow(
        self, event_filter: EventFilter | None = None, *, batch_size: int = 65_536
    ) -> AsyncGenerator[pa.RecordBatch, None]:
        return _aiter(self.sync.export_arrow(event_filter, batch_size=batch_size))

    def subscribe(
        self,
        query_or_filter: Query | EventFilter | None = None,
        *,
        after: int | None = None,
        buffer: int = 1_000,
        poll_interval: float = 5.0,
        retry_for: float = 60.0,
    ) -> Subscription:
        return self.sync.subscribe(
            query_or_filter,
            after=after,
            buffer=buffer,
            poll_interval=poll_interval,
            retry_for=retry_for,
        )

    async def create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Snapshot:
        return self.sync.create_snapshot(aggregate_id, version, state)

    async def get_snapshot(self, aggregate_id: str, *, state_type: Any = Any) -> Snapshot | None:
        return self.sync.get_snapshot(aggregate_id, state_type=state_type)

    async def project(
        self,
        query: Query | None,
        initial: S,
        fold: Callable[[S, SequencedEvent], S],
        *,
        key: str | None = None,
        snapshot_every: int | None = None,
        state_type: Any = None,
        batch_size: int = 1_000,
    ) -> Projection:
        return self.sync.project(
            query,
            initial,
            fold,
            key=key,
            snapshot_every=snapshot_every,
            state_type=state_type,
            batch_size=batch_size,
        )

    def pool_stats(self) -> dict[str, int]:
        return self.sync.pool_stats()

    def metrics(self) -> dict[str, Any]:
        return self.sync.metrics()

    async def measure_replicas(self) -> list[dict[str, Any]]:
        return self.sync.measure_replicas()


Store = Union[AsyncEventStore, SyncStore]  # noqa: UP007 - a runtime alias, on Python 3.10 too
StoreOpener = Callable[[], AbstractAsyncContextManager[Store]]


@pytest.fixture(params=["sync", "async"])
def open_store(
    request: pytest.FixtureRequest, pg_dsn: str, make_store: Callable[..., EventStore]
) -> Iterator[StoreOpener]:
    """Opens a store of the parameter's kind on a fresh schema, in the running event loop;
    closes it when the block ends and drops its schema after the test."""
    schemas: list[str] = []

    @asynccontextmanager
    async def open_sync() -> AsyncIterator[Store]:
        store = make_store()  # closed (again: it is idempotent) and dropped by make_store
        try:
            yield SyncStore(store)
        finally:
            store.close()

    @asynccontextmanager
    async def open_async() -> AsyncIterator[Store]:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        schemas.append(schema)
        store = AsyncEventStore(pg_dsn, schema=schema, max_connections=12)
        try:
            await store.open()
            yield store
        finally:
            await store.close()

    yield open_sync if request.param == "sync" else open_async
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def contract(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The plain test function that runs the coroutine ``test(store, **params)`` under
    ``asyncio.run``, on a store opened by the `open_store` fixture inside that event loop.
    Its signature is ``test``'s with ``open_store`` for ``store``, so ``parametrize`` works."""

    def run(open_store: StoreOpener, **params: Any) -> None:
        async def main() -> None:
            async with open_store() as store:
                await test(store, **params)

        asyncio.run(main())

    parameters = list(inspect.signature(test).parameters.values())[1:]
    opener = inspect.Parameter("open_store", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    run.__signature__ = inspect.Signature([opener, *parameters])  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    run.__module__ = test.__module__
    return run


# -- helpers ---------------------------------------------------------------------------------


def positions(events: Iterable[SequencedEvent]) -> list[int]:
    return [event.position for event in events]


def log_event(n: int) -> DomainEvent:
    """The event at position ``n`` of `LOG`."""
    event_type, tags, minutes = LOG[n - 1]
    return DomainEvent(event_type, {"n": n}, tags, timestamp=BASE + timedelta(minutes=minutes))


async def fill(store: Store) -> None:
    """Append `LOG`, one event at a time."""
    for n in ALL:
        assert await store.append(log_event(n)) == n


def many(count: int) -> list[DomainEvent]:
    """Types, tags and timestamps that repeat, so orders by time and type have ties."""
    return [
        DomainEvent(
            ("IssueCreated", "PrOpened", "LlmCallCompleted")[n % 3],
            {"n": n},
            {"issueId": f"I-{n % 5}", "provider": ("anthropic", "openai")[n % 2]},
            timestamp=BASE + timedelta(minutes=(n * 7) % 40),
        )
        for n in range(count)
    ]


#: Filters for the walks (pages, streams, exports): log order and others, with ties.
WALK_FILTERS: list[EventFilter | None] = [
    None,
    EventFilter(event_types=["PrOpened"]),
    EventFilter(issue_ids=["I-2", "I-3"], providers=["openai"]),
    EventFilter(order_by="timestamp"),
    EventFilter(order_by="type", order_direction="desc"),
    EventFilter(event_types=["Nothing"]),
]


async def expect_error(code: str, call: Coroutine[Any, Any, Any]) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


def expect_error_now(code: str, call: Callable[[], Any]) -> EventStoreError:
    """For the calls that raise at once, before anything is awaited or iterated."""
    with pytest.raises(EventStoreError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``predicate()`` holds (a synchronisation point, not a timing
    assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOIN_TIMEOUT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def concurrently(
    store: Store, calls: Sequence[Callable[[], Coroutine[Any, Any, T]]]
) -> list[T | BaseException]:
    """Run ``calls`` at once and return what each returned or raised, in order.

    On the async store they are tasks of this loop. On the sync store each is a thread of its
    own (running its coroutine in an event loop of its own, since `SyncStore`'s coroutines block
    on the sync store), released together from a barrier: concurrent callers as a threaded
    application has them, so that its group commit sees them at once."""
    if isinstance(store, AsyncEventStore):
        return await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        barrier.wait(JOIN_TIMEOUT)
        return asyncio.run(call())

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(calls), thread_name_prefix="contract-caller") as pool:
        futures = [loop.run_in_executor(pool, run, call) for call in calls]
        return await asyncio.gather(*futures, return_exceptions=True)


class CallerConnection:
    """A caller's own psycopg connection (`raw`, to pass as ``conn=``) with coroutines for the
    caller's side of the work, sync or async as the store wants it."""

    def __init__(self, raw: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
        self.raw: Any = raw

    @property
    def status(self) -> pq.TransactionStatus:
        return self.raw.info.transaction_status  # type: ignore[no-any-return]

    async def fetch_value(self, query: sql.SQL | sql.Composed, params: Sequence[Any] = ()) -> Any:
        if isinstance(self.raw, psycopg.AsyncConnection):
            cur = await self.raw.execute(query, params)
            row = await cur.fetchone()
        else:
            row = self.raw.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    async def commit(self) -> None:
        if isinstance(self.raw, psycopg.AsyncConnection):
            await self.raw.commit()
        else:
            self.raw.commit()

    async def rollback(self) -> None:
        if isinstance(self.raw, psycopg.AsyncConnection):
            await self.raw.rollback()
        else:
            self.raw.rollback()


@asynccontextmanager
async def caller_connection(
    store: Store, *, autocommit: bool = False, other_kind: bool = False
) -> AsyncIterator[CallerConnection]:
    """A new connection to the store's database of the kind its ``conn=`` takes (an
    ``AsyncConnection`` for the async store, a ``Connection`` for the sync one), or of the
    other kind; closed at the end, rolling back what was not committed."""
    use_async = isinstance(store, AsyncEventStore) != other_kind
    if use_async:
        aconn = await psycopg.AsyncConnection.connect(store.dsn, autocommit=autocommit)
        try:
            yield CallerConnection(aconn)
        finally:
            await aconn.close()
    else:
        conn = psycopg.Connection.connect(store.dsn, autocommit=autocommit)
        try:
            yield CallerConnection(conn)
        finally:
            conn.close()


async def consume(subscription: Subscription, count: int) -> list[SequencedEvent]:
    """The subscription's next ``count`` events (it stays open)."""
    got: list[SequencedEvent] = []
    if count == 0:
        return got
    async for event in subscription:
        got.append(event)
        if len(got) == count:
            break
    return got


# -- appends and reads -----------------------------------------------------------------------


@contract
async def test_appends_return_their_positions(store: Store) -> None:
    """`append` returns the event's position and `append_batch` its last; positions are
    gapless from 1, and `head` follows them."""
    assert await store.head() == 0
    assert await store.append(DomainEvent("A")) == 1
    assert await store.append_batch([DomainEvent("B"), DomainEvent("C"), DomainEvent("D")]) == 4
    assert await store.append({"event_type": "E", "data": {"x": 1}, "tags": {"k": "v"}}) == 5
    assert await store.append_batch([{"event_type": "F"}]) == 6
    assert await store.head() == 6
    result = await store.read()
    assert positions(result) == [1, 2, 3, 4, 5, 6]
    assert [e.event_type for e in result] == ["A", "B", "C", "D", "E", "F"]
    assert result.head == 6
    assert (result[4].data, result[4].tags) == ({"x": 1}, {"k": "v"})
    assert len({e.event_id for e in result}) == 6
    assert all(len(e.hash) == 32 for e in result)


@contract
async def test_read_matches_types_and_tags(store: Store) -> None:
    """Types are OR'd and tags AND'd within an item; items are OR'd; an empty query matches
    every event."""
    await fill(store)
    for query in (None, Query(), Query.all(), Query((QueryItem(),))):
        result = await store.read(query)
        assert positions(result) == ALL
        assert result.head == 6
    read = [(e.event_type, e.tags, e.data, e.timestamp) for e in await store.read()]
    assert read == [
        (t, tags, {"n": n}, BASE + timedelta(minutes=m)) for n, (t, tags, m) in enumerate(LOG, 1)
    ]
    cases: list[tuple[Query, list[int]]] = [
        (Query.of(types=["IssueClosed", "PrMerged"]), [2, 4]),
        (Query.of(types=["Unknown"]), []),
        (Query.of(tags={"issueId": "1"}), [1, 2, 6]),
        (Query.of(tags={"issueId": "1", "userId": "u2"}), [6]),
        (Query.of(tags={"issueId": "1", "prId": "7"}), []),
        (Query.of(types=["IssueOpened"], tags={"userId": "u1"}), [1, 3]),
        (Query([QueryItem(types=["PrMerged"]), QueryItem(tags={"issueId": "2"})]), [3, 4]),
        (Query([QueryItem(tags={"issueId": "1"}), QueryItem(tags={"userId": "u1"})]), [1, 2, 3, 6]),
    ]
    for query, expected in cases:
        result = await store.read(query)
        assert positions(result) == expected, query
        assert result.head == 6


@contract
async def test_read_after_limit_and_backwards(store: Store) -> None:
    """``after`` is exclusive; ``limit`` caps the result and makes ``head`` the newest position
    returned; ``backwards`` reads newest first."""
    await fill(store)
    assert positions(await store.read(after=2)) == [3, 4, 5, 6]
    assert positions(await store.read(Query.of(tags={"issueId": "1"}), after=1)) == [2, 6]
    result = await store.read(after=6)
    assert (positions(result), result.head) == ([], 6)
    result = await store.read(limit=2)
    assert (positions(result), result.head) == ([1, 2], 2)
    result = await store.read(Query.of(types=["IssueOpened"]), after=1, limit=1)
    assert (positions(result), result.head) == ([3], 3)
    result = await store.read(backwards=True)
    assert (positions(result), result.head) == ([6, 5, 4, 3, 2, 1], 6)
    result = await store.read(Query.of(types=["IssueOpened"]), backwards=True)
    assert positions(result) == [5, 3, 1]
    result = await store.read(Query.of(types=["IssueOpened"]), backwards=True, limit=2)
    assert (positions(result), result.head) == ([5, 3], 5)
    result = await store.read(Query.of(types=["Unknown"]), limit=3)
    assert (positions(result), result.head) == ([], None)
    await expect_error(QUERY_ERROR, store.read(limit=-1))
    await expect_error(QUERY_ERROR, store.read(after=-1))


@contract
async def test_get_event_by_id(store: Store) -> None:
    """An event is found by its id (a UUID or its string); an unknown id gives None and a
    malformed one QUERY_ERROR."""
    await fill(store)
    event = DomainEvent("Found", {"a": [1, 2]}, {"t": "1"}, {"m": True})
    assert await store.append(event) == 7
    got = await store.get_event(event.event_id)
    assert got is not None
    assert got.position == 7
    assert (got.event_id, got.event_type, got.data, got.tags, got.metadata) == (
        event.event_id,
        "Found",
        {"a": [1, 2]},
        {"t": "1"},
        {"m": True},
    )
    assert got.timestamp == event.timestamp
    assert await store.get_event(str(event.event_id)) == got
    assert got == (await store.read(after=6))[0]
    assert await store.get_event(uuid.uuid4()) is None
    error = await expect_error(QUERY_ERROR, store.get_event("not-a-uuid"))
    assert error.context["event_id"] == "not-a-uuid"


# -- append conditions, duplicates, validation ------------------------------------------------


@contract
async def test_condition_fails_when_a_match_exists_after(store: Store) -> None:
    """APPEND_CONDITION_FAILED when an event matching the condition's query is after its
    ``after`` (anywhere, without one); the refused append writes none of its events."""
    await fill(store)
    issue2 = Query.of(tags={"issueId": "2"})  # matches position 3 only
    batch = [DomainEvent("A", tags={"issueId": "2"}), DomainEvent("B")]
    error = await expect_error(
        APPEND_CONDITION_FAILED, store.append_batch(batch, AppendCondition(issue2, after=2))
    )
    assert error.context["after"] == 2
    error = await expect_error(
        APPEND_CONDITION_FAILED, store.append(batch[0], AppendCondition(issue2))
    )
    assert error.context["after"] is None
    await expect_error(
        APPEND_CONDITION_FAILED, store.append(DomainEvent("C"), AppendCondition(Query(), after=5))
    )
    assert await store.head() == 6
    assert positions(await store.read()) == ALL
    for event in batch:
        assert await store.get_event(event.event_id) is None
    # once the condition's after is past the match, the same events go in
    assert await store.append_batch(batch, AppendCondition(issue2, after=3)) == 8
    assert positions(await store.read(issue2)) == [3, 7]


@contract
async def test_condition_passes_when_nothing_matches_after(store: Store) -> None:
    """An append whose condition matches nothing after its ``after`` goes in."""
    await fill(store)
    conditions = [
        AppendCondition(Query.of(types=["Unknown"])),
        AppendCondition(Query.of(tags={"issueId": "1", "prId": "7"})),
        AppendCondition(Query.of(types=["PrMerged"], tags={"userId": "u1"})),
        AppendCondition(Query([QueryItem(types=["Unknown"]), QueryItem(tags={"issueId": "3"})])),
        AppendCondition(Query.of(tags={"issueId": "1"}), after=6),
    ]
    for expected, condition in enumerate(conditions, 7):
        assert await store.append(DomainEvent("New", tags={"issueId": "9"}), condition) == expected
    # the read's head is the after of a condition built from it
    result = await store.read(Query.of(tags={"issueId": "9"}))
    assert positions(result) == [7, 8, 9, 10, 11]
    condition = AppendCondition(Query.of(tags={"issueId": "9"}), after=result.head)
    assert await store.append(DomainEvent("New", tags={"issueId": "9"}), condition) == 12


@contract
async def test_a_repeated_event_id_is_a_duplicate(store: Store) -> None:
    """DUPLICATE_EVENT for an event id already stored (alone or in a batch, or twice in one
    batch); nothing of that append is written."""
    event = DomainEvent("Once")
    assert await store.append(event) == 1
    error = await expect_error(DUPLICATE_EVENT, store.append(event))
    assert error.context["event_ids"] == [str(event.event_id)]
    fresh = DomainEvent("Fresh")
    error = await expect_error(DUPLICATE_EVENT, store.append_batch([fresh, event]))
    assert error.context["event_ids"] == [str(event.event_id)]
    twice = DomainEvent("Twice")
    error = await expect_error(DUPLICATE_EVENT, store.append_batch([twice, twice]))
    assert error.context["event_ids"] == [str(twice.event_id)]
    assert await store.head() == 1
    assert await store.get_event(fresh.event_id) is None
    assert await store.get_event(twice.event_id) is None
    # the same event with a new id is another event
    assert await store.append(DomainEvent("Once", event.data, event.tags)) == 2


@contract
async def test_an_invalid_event_is_refused_and_nothing_written(store: Store) -> None:
    """VALIDATION_FAILED for a malformed event, alone or in a batch; the store is unchanged."""
    await fill(store)
    valid = DomainEvent("Valid")
    bad: list[Any] = [
        {"data": {"x": 1}},  # no event_type
        {"event_type": 7},
        {"event_type": "X", "tags": {"k": 1}},
        DomainEvent(""),
        DomainEvent("X" * 256),
        DomainEvent("X", tags={"": "v"}),
    ]
    for event in bad:
        await expect_error(VALIDATION_FAILED, store.append(event))
        await expect_error(VALIDATION_FAILED, store.append_batch([valid, event]))
    assert await store.head() == 6
    assert await store.get_event(valid.event_id) is None
    assert positions(await store.read()) == ALL
    assert await store.append(valid) == 7


# -- queries ---------------------------------------------------------------------------------


@contract
async def test_get_events_filters_orders_and_pages(store: Store) -> None:
    """`get_events`: the fields of an `EventFilter` combine with AND, their values with OR; the
    order, limit and offset apply; a malformed filter raises QUERY_ERROR."""
    await fill(store)
    everything = await store.get_events()
    assert positions(everything) == ALL
    assert everything == (await store.read()).events
    by_time = [4, 2, 5, 1, 6, 3]
    cases: list[tuple[EventFilter, list[int]]] = [
        (EventFilter(), ALL),
        (EventFilter(event_types=["IssueOpened"]), [1, 3, 5]),
        (EventFilter(event_types=["IssueClosed", "PrMerged"]), [2, 4]),
        (EventFilter(issue_ids=["1"]), [1, 2, 6]),
        (EventFilter(user_ids=["u1", "u2"], event_types=["IssueOpened", "PrMerged"]), [1, 3, 4]),
        (EventFilter(tags={"userId": "u1"}), [1, 3]),
        (EventFilter(tags={"issueId": "1", "userId": "u2"}), [6]),
        (EventFilter(pr_ids=["7"]), [4]),
        (EventFilter(event_ids=[everything[1].event_id, str(everything[4].event_id)]), [2, 5]),
        (
            EventFilter(
                start_time=BASE + timedelta(minutes=10), end_time=BASE + timedelta(minutes=40)
            ),
            [1, 2, 5],
        ),
        (EventFilter(order_by="timestamp"), by_time),
        (EventFilter(order_by="timestamp", order_direction="desc"), by_time[::-1]),
        (EventFilter(order_by="type"), [2, 6, 1, 3, 5, 4]),
        (EventFilter(order_direction="desc"), ALL[::-1]),
        (EventFilter(limit=2), [1, 2]),
        (EventFilter(limit=2, offset=1, order_direction="desc"), [5, 4]),
        (EventFilter(offset=5), [6]),
        (EventFilter(offset=9), []),
        (EventFilter(order_by="timestamp", limit=3, offset=1), by_time[1:4]),
        (EventFilter(event_types=["Unknown"]), []),
    ]
    for event_filter, expected in cases:
        assert positions(await store.get_events(event_filter)) == expected, event_filter
    assert positions(await store.get_events_by_issue_id("1")) == [1, 2, 6]
    for malformed in (
        EventFilter(limit=-1),
        EventFilter(offset=-1),
        EventFilter(order_by="nope"),  # type: ignore[arg-type]
        EventFilter(start_time="yesterday"),
        EventFilter(event_ids=["not-a-uuid"]),
    ):
        await expect_error(QUERY_ERROR, store.get_events(malformed))


@contract
async def test_count_events(store: Store) -> None:
    """`count_events` is how many `get_events` returns, limit and offset included."""
    assert await store.count_events() == 0
    await fill(store)
    filters: list[EventFilter | None] = [
        None,
        EventFilter(event_types=["IssueOpened"]),
        EventFilter(issue_ids=["1"]),
        EventFilter(tags={"userId": "u2"}),
        EventFilter(event_types=["IssueOpened"], user_ids=["u1"]),
        EventFilter(start_time=BASE, end_time=BASE + timedelta(minutes=30)),
        EventFilter(limit=2),
        EventFilter(offset=4),
        EventFilter(offset=10),
        EventFilter(event_types=["Unknown"]),
    ]
    for event_filter in filters:
        expected = len(await store.get_events(event_filter))
        assert await store.count_events(event_filter) == expected, event_filter
    assert await store.count_events() == 6
    assert await store.count_events(EventFilter(event_types=["IssueOpened"])) == 3


@contract
async def test_event_types_and_tags(store: Store) -> None:
    """`get_event_types` and `get_tags`: what is stored, sorted."""
    assert await store.get_event_types() == []
    assert await store.get_tags() == {}
    await fill(store)
    assert await store.get_event_types() == [
        "IssueClosed",
        "IssueCommented",
        "IssueOpened",
        "PrMerged",
    ]
    assert await store.get_tags() == {"issueId": ["1", "2"], "prId": ["7"], "userId": ["u1", "u2"]}


@contract
async def test_aggregate(store: Store) -> None:
    """`aggregate` counts per type, per tag value and per time bucket, with each group's first
    and last timestamps; the filter's limit does not apply."""
    await fill(store)

    def at(minutes: int) -> datetime:
        return BASE + timedelta(minutes=minutes)

    by_type = await store.aggregate()
    assert by_type == [
        AggregateRow("IssueClosed", 1, at(10), at(10)),
        AggregateRow("IssueCommented", 1, at(40), at(40)),
        AggregateRow("IssueOpened", 3, at(20), at(50)),
        AggregateRow("PrMerged", 1, at(0), at(0)),
    ]
    assert await store.aggregate(EventFilter(limit=1)) == by_type
    by_user = await store.aggregate(group_by="tag", tag_key="userId")
    assert [(r.key, r.count) for r in by_user] == [("u1", 2), ("u2", 2)]
    opened = await store.aggregate(
        EventFilter(event_types=["IssueOpened"]), "tag", tag_key="userId"
    )
    assert [(r.key, r.count) for r in opened] == [("u1", 2)]
    by_hour = await store.aggregate(group_by="hour")
    assert [(r.key, r.count) for r in by_hour] == [("2026-03-01T00:00:00Z", 6)]
    assert (by_hour[0].first_timestamp, by_hour[0].last_timestamp) == (at(0), at(50))
    assert await store.aggregate(EventFilter(event_types=["Unknown"])) == []
    await expect_error(QUERY_ERROR, store.aggregate(group_by="tag"))
    await expect_error(QUERY_ERROR, store.aggregate(group_by="year"))  # type: ignore[arg-type]


# -- pages, streams, exports -----------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 7, 100])
@contract
async def test_page_tokens_walk_what_get_events_returns(store: Store, page_size: int) -> None:
    """Following `get_page`'s tokens returns each event of `get_events` once, in its order, in
    full pages but the last."""
    await store.append_batch(many(40))
    for event_filter in WALK_FILTERS:
        pages: list[list[SequencedEvent]] = []
        token: str | None = None
        while True:
            page = await store.get_page(event_filter, page_size=page_size, token=token)
            pages.append(page.events)
            token = page.next_token
            if token is None:
                break
        assert [e for p in pages for e in p] == await store.get_events(event_filter)
        assert all(len(p) == page_size for p in pages[:-1]), event_filter
        assert len(pages[-1]) <= page_size
    await expect_error(QUERY_ERROR, store.get_page(EventFilter(limit=5)))
    await expect_error(QUERY_ERROR, store.get_page(token="not a token"))
    await expect_error(QUERY_ERROR, store.get_page(page_size=0))


@contract
async def test_paginate_is_pinned_to_the_head_it_started_at(store: Store) -> None:
    """`paginate` yields the pages of `get_events`; events appended during the walk are not in
    it."""
    await store.append_batch(many(40))
    for event_filter in WALK_FILTERS:
        expected = await store.get_events(event_filter)
        pages = [page async for page in store.paginate(event_filter, page_size=6)]
        assert [e for p in pages for e in p] == expected, event_filter
        assert all(0 < len(p) <= 6 for p in pages)
    walked: list[SequencedEvent] = []
    async for page in store.paginate(page_size=15):
        if not walked:
            assert await store.append_batch(many(5)) == 45  # during the walk
        walked.extend(page)
    assert positions(walked) == list(range(1, 41))
    assert positions(await store.get_events()) == list(range(1, 46))


@pytest.mark.parametrize("batch_size", [1, 7, 1_000])
@contract
async def test_stream_events_returns_what_get_events_returns(store: Store, batch_size: int) -> None:
    """`stream_events` yields `get_events`' events, in its order, whatever the batch size
    (smaller than the result, or not), limit and offset applying to the whole stream."""
    await store.append_batch(many(40))
    filters = [
        *WALK_FILTERS,
        EventFilter(order_direction="desc", limit=17, offset=5),
        EventFilter(order_by="timestamp", limit=20, offset=13),
    ]
    for event_filter in filters:
        streamed = [e async for e in store.stream_events(event_filter, batch_size=batch_size)]
        assert streamed == await store.get_events(event_filter), event_filter
    stream = store.stream_events(batch_size=batch_size)
    first = await anext(stream)
    assert await store.append_batch(many(3)) == 43  # appended while the stream is open
    rest = [e async for e in stream]
    assert positions([first, *rest]) == list(range(1, 41))


@contract
async def test_streams_closed_early_leave_no_connection_in_use(store: Store) -> None:
    """A stream or an export left after a few events, and closed, has nothing in flight: every
    connection of the pool is idle again (the async pool resets a connection whose COPY was
    cancelled in a task of its own, so that one may take a moment), and the store serves as
    before."""
    await store.append_batch(many(50))
    stream = store.stream_events(batch_size=10)
    taken = [await anext(stream) for _ in range(15)]
    await stream.aclose()
    assert positions(taken) == list(range(1, 16))
    export = store.export_arrow(batch_size=10)
    first = await anext(export)
    await export.aclose()
    assert first.num_rows == 10
    ordered = store.export_arrow(EventFilter(order_direction="desc"), batch_size=10)
    assert (await anext(ordered)).column("position").to_pylist()[0] == 50
    await ordered.aclose()

    def all_idle() -> bool:
        stats = store.pool_stats()
        return bool(stats["idle"] == stats["size"])

    await wait_until(all_idle, "every pooled connection to be idle")
    assert await store.count_events() == 50


@pytest.mark.parametrize("batch_size", [1, 7, 65_536])
@contract
async def test_export_arrow_rows_are_get_events(store: Store, batch_size: int) -> None:
    """`export_arrow`'s record batches (of `EXPORT_SCHEMA`, at most ``batch_size`` rows each)
    hold `get_events`' events, in its order: in log order (read by ranges) and otherwise (read
    by keyset)."""
    await store.append_batch(many(40))
    filters = [*WALK_FILTERS, EventFilter(order_direction="desc", limit=11, offset=3)]
    for event_filter in filters:
        batches = [b async for b in store.export_arrow(event_filter, batch_size=batch_size)]
        assert all(b.schema.equals(EXPORT_SCHEMA) for b in batches)
        assert all(b.num_rows <= batch_size for b in batches)
        table = pa.Table.from_batches(batches, schema=EXPORT_SCHEMA)
        expected = await store.get_events(event_filter)
        assert table.column("position").to_pylist() == positions(expected), event_filter
        assert table.column("event_type").to_pylist() == [e.event_type for e in expected]
        assert table.column("hash").to_pylist() == [e.hash for e in expected]
    expect_error_now(QUERY_ERROR, lambda: store.export_arrow(batch_size=0))


# -- transactions ----------------------------------------------------------------------------


@contract
async def test_transaction_appends_commit_together(store: Store) -> None:
    """A transaction's appends are seen by its own reads and conditions, by no one else until
    the block ends, and then all at once; a refused append leaves the transaction usable."""
    assert await store.append(DomainEvent("Before")) == 1
    course = Query.of(types=["CourseCreated"], tags={"course": "c1"})
    async with store.transaction() as tx:
        assert await tx.append(DomainEvent("CourseCreated", tags={"course": "c1"})) == 2
        assert await tx.append_batch([DomainEvent("B"), DomainEvent("C")]) == 4
        inside = await tx.read()
        assert (positions(inside), inside.head) == ([1, 2, 3, 4], 4)
        assert positions(await tx.read(course)) == [2]
        outside = await store.read()
        assert (positions(outside), outside.head) == ([1], 1)
        assert await store.head() == 1
        await expect_error(
            APPEND_CONDITION_FAILED,
            tx.append(DomainEvent("CourseCreated"), AppendCondition(course, after=1)),
        )
        assert await tx.append(DomainEvent("E"), AppendCondition(course, after=2)) == 5
    result = await store.read()
    assert positions(result) == [1, 2, 3, 4, 5]
    assert [e.event_type for e in result] == ["Before", "CourseCreated", "B", "C", "E"]
    await expect_error(STORAGE_ERROR, tx.append(DomainEvent("Late")))
    assert await store.append(DomainEvent("After")) == 6


@contract
async def test_an_exception_in_a_transaction_writes_nothing(store: Store) -> None:
    """An exception leaving the block rolls back every append in it; positions stay
    gapless."""

    class Abandoned(Exception):
        pass

    assert await store.append(DomainEvent("Before")) == 1
    events = [DomainEvent("A"), DomainEvent("B"), DomainEvent("C")]
    with pytest.raises(Abandoned):
        async with store.transaction() as tx:
            assert await tx.append(events[0]) == 2
            assert await tx.append_batch(events[1:]) == 4
            raise Abandoned
    assert await store.head() == 1
    assert positions(await store.read()) == [1]
    for event in events:
        assert await store.get_event(event.event_id) is None
    # a refused append inside makes the block raise too, once not caught
    with pytest.raises(EventStoreError) as info:
        async with store.transaction() as tx:
            await tx.append(events[0])
            await tx.append(DomainEvent("X"), AppendCondition(Query.of(types=["A"])))
    assert info.value.code == APPEND_CONDITION_FAILED
    assert await store.head() == 1
    assert await store.append_batch(events) == 4


# -- appends in a caller's transaction -------------------------------------------------------


@contract
async def test_append_in_a_callers_committed_transaction(store: Store) -> None:
    """With ``conn=``, the append is part of the caller's transaction: the caller sees it, no one
    else does until the caller commits."""
    assert await store.append(DomainEvent("Before")) == 1
    event = DomainEvent("Outbox", {"order": 42})
    stored = sql.SQL("SELECT count(*) FROM {} WHERE event_id = %s").format(
        sql.Identifier(store.schema, "events")
    )
    async with caller_connection(store) as conn:
        assert await conn.fetch_value(sql.SQL("SELECT 1")) == 1  # the caller's own work
        assert await store.append(event, conn=conn.raw) == 2
        assert conn.status == pq.TransactionStatus.INTRANS
        assert await conn.fetch_value(stored, [event.event_id]) == 1
        assert await store.get_event(event.event_id) is None
        assert await store.head() == 1
        await conn.commit()
    got = await store.get_event(event.event_id)
    assert got is not None
    assert (got.position, got.data) == (2, {"order": 42})
    assert await store.head() == 2
    # an autocommit connection with no transaction open gets one of its own, committed
    async with caller_connection(store, autocommit=True) as conn:
        assert await store.append_batch([DomainEvent("A"), DomainEvent("B")], conn=conn.raw) == 4
        assert conn.status == pq.TransactionStatus.IDLE
        assert await store.head() == 4
    assert await store.append(DomainEvent("After")) == 5


@contract
async def test_append_in_a_callers_rolled_back_transaction(store: Store) -> None:
    """When the caller rolls back, its appends are not written and the head does not move; a
    refused append leaves the caller's transaction usable."""
    assert await store.append(DomainEvent("Before", tags={"course": "c1"})) == 1
    course = Query.of(tags={"course": "c1"})
    events = [DomainEvent("A"), DomainEvent("B")]
    async with caller_connection(store) as conn:
        assert await store.append_batch(events, conn=conn.raw) == 3
        await expect_error(
            APPEND_CONDITION_FAILED,
            store.append(DomainEvent("X"), AppendCondition(course), conn=conn.raw),
        )
        assert await conn.fetch_value(sql.SQL("SELECT 1")) == 1  # still usable
        await conn.rollback()
    assert await store.head() == 1
    for event in events:
        assert await store.get_event(event.event_id) is None
    assert await store.append_batch(events) == 3
    # a connection of the other kind is refused before anything is written
    async with caller_connection(store, other_kind=True) as conn:
        error = await expect_error(VALIDATION_FAILED, store.append(DomainEvent("Y"), conn=conn.raw))
        assert error.context["field"] == "conn"
    assert await store.head() == 3


# -- snapshots and projections ---------------------------------------------------------------


@contract
async def test_snapshots(store: Store) -> None:
    """`create_snapshot` saves a state at a version up to the head; `get_snapshot` returns the
    latest, decoded as asked."""
    assert await store.get_snapshot("course-c1") is None
    await store.append_batch([DomainEvent("Enrolled", {"n": n}) for n in range(3)])
    saved = await store.create_snapshot("course-c1", 2, {"enrolled": 2})
    assert (saved.aggregate_id, saved.version, saved.state) == ("course-c1", 2, {"enrolled": 2})
    await store.create_snapshot("course-c1", 3, {"enrolled": 3})
    await store.create_snapshot("course-c2", 1, {"enrolled": 1})
    latest = await store.get_snapshot("course-c1")
    assert latest is not None
    assert (latest.version, latest.state) == (3, {"enrolled": 3})
    typed = await store.get_snapshot("course-c1", state_type=dict[str, int])
    assert typed is not None and typed.state == {"enrolled": 3}
    other = await store.get_snapshot("course-c2")
    assert other is not None and other.version == 1
    error = await expect_error(VALIDATION_FAILED, store.create_snapshot("course-c1", 4, {}))
    assert error.context["field"] == "version"
    latest = await store.get_snapshot("course-c1")
    assert latest is not None and latest.version == 3


@contract
async def test_project_folds_and_resumes_from_its_snapshot(store: Store) -> None:
    """`project` folds the matching events in log order; with a key it saves snapshots and
    the next projection folds only the events after the latest one."""
    await fill(store)
    folded: list[int] = []

    def fold(state: list[int], event: SequencedEvent) -> list[int]:
        folded.append(event.position)
        return [*state, event.position]

    opened = Query.of(types=["IssueOpened"])
    empty: list[int] = []
    result = await store.project(opened, empty, fold)
    assert (result.state, result.head) == ([1, 3, 5], 6)
    everything = await store.project(None, 0, lambda count, _: count + 1)
    assert (everything.state, everything.head) == (6, 6)

    folded.clear()
    result = await store.project(opened, empty, fold, key="opened", snapshot_every=2, batch_size=1)
    assert (result.state, result.head) == ([1, 3, 5], 6)
    assert folded == [1, 3, 5]
    snapshot = await store.get_snapshot("opened")
    assert snapshot is not None
    assert (snapshot.version, snapshot.state) == (3, [1, 3])

    assert await store.append(DomainEvent("IssueOpened")) == 7
    folded.clear()
    result = await store.project(opened, empty, fold, key="opened")
    assert (result.state, result.head) == ([1, 3, 5, 7], 7)
    assert folded == [5, 7]  # from the snapshot at 3


# -- subscriptions ---------------------------------------------------------------------------


@contract
async def test_subscription_replays_then_follows_and_stops(store: Store) -> None:
    """A subscription delivers the matching events already stored, then each new one as it is
    committed, in order; `stop` ends its iteration, a waiting one too."""
    await store.append_batch([DomainEvent("Old", {"i": i}) for i in range(3)])
    await store.append(DomainEvent("Other"))
    subscription = store.subscribe(Query.of(types=["Old", "New"]), after=0, poll_interval=NEVER)
    assert store.subscriptions == 1
    got: list[SequencedEvent] = []

    async def follow() -> None:
        async for event in subscription:
            got.append(event)

    task = asyncio.create_task(follow())
    try:
        await wait_until(lambda: len(got) == 3, "the replay")
        assert positions(got) == [1, 2, 3]
        assert await store.append(DomainEvent("Other")) == 5
        assert await store.append(DomainEvent("New", {"live": True})) == 6
        await wait_until(lambda: len(got) == 4, "the live event")
        assert not task.done()  # waiting for more
    finally:
        subscription.stop()
        await asyncio.wait_for(task, JOIN_TIMEOUT)
    assert got == (await store.read(Query.of(types=["Old", "New"]))).events
    assert positions(got) == [1, 2, 3, 6]
    assert got[-1].data == {"live": True}
    assert subscription.stopped
    assert subscription.position == 6
    assert store.subscriptions == 0
    # resuming from its position delivers only what came after
    assert await store.append(DomainEvent("New")) == 7
    resumed = store.subscribe(after=subscription.position, poll_interval=NEVER)
    try:
        assert positions(await asyncio.wait_for(consume(resumed, 1), JOIN_TIMEOUT)) == [7]
    finally:
        resumed.stop()


# -- concurrency -----------------------------------------------------------------------------


@contract
async def test_racing_conditional_appends_one_wins(store: Store) -> None:
    """Twenty callers at once append "CourseCreated" for the same course, each on the
    condition that no such event exists: exactly one succeeds, the others are refused with
    APPEND_CONDITION_FAILED, and the store holds exactly one such event. Three rounds, three
    courses."""
    assert await store.append(DomainEvent("CourseCreated", tags={"course": "other"})) == 1
    for round_, course in enumerate(["c1", "c2", "c3"]):
        created = Query([QueryItem(types=["CourseCreated"], tags={"course": course})])
        condition = AppendCondition(fail_if_events_match=created, after=None)
        events = [DomainEvent("CourseCreated", {"by": n}, {"course": course}) for n in range(20)]

        def attempt(
            event: DomainEvent, condition: AppendCondition = condition
        ) -> Callable[[], Coroutine[Any, Any, int]]:
            return lambda: store.append(event, condition)

        outcomes = await concurrently(store, [attempt(event) for event in events])
        wins = [(o, e) for o, e in zip(outcomes, events, strict=True) if isinstance(o, int)]
        refused = [o for o in outcomes if isinstance(o, EventStoreError)]
        assert len(wins) == 1, outcomes
        assert len(refused) == 19, outcomes
        assert {error.code for error in refused} == {APPEND_CONDITION_FAILED}
        position, winner = wins[0]
        assert position == round_ + 2
        stored = await store.read(created)
        assert [(e.position, e.event_id) for e in stored] == [(position, winner.event_id)]
        assert await store.head() == round_ + 2
    assert await store.count_events(EventFilter(event_types=["CourseCreated"])) == 4


@contract
async def test_concurrent_appends_on_disjoint_tags_are_gapless(store: Store) -> None:
    """Twenty callers at once, each appending on its own course's condition: all succeed, at
    the positions 1..20, each returning its event's position."""
    count = 20
    events = [DomainEvent("CourseCreated", {"n": n}, {"course": f"c{n}"}) for n in range(count)]

    def attempt(event: DomainEvent) -> Callable[[], Coroutine[Any, Any, int]]:
        query = Query([QueryItem(types=["CourseCreated"], tags=event.tags)])
        return lambda: store.append(event, AppendCondition(query, after=None))

    outcomes = await concurrently(store, [attempt(event) for event in events])
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sorted(outcomes) == list(range(1, count + 1))  # type: ignore[type-var]
    assert await store.head() == count
    stored = await store.read()
    assert positions(stored) == list(range(1, count + 1))
    by_id = {e.event_id: e.position for e in stored}
    assert [by_id[e.event_id] for e in events] == outcomes
    assert sorted(e.tags["course"] for e in stored) == sorted(f"c{n}" for n in range(count))


@contract
async def test_concurrent_retries_of_one_event_store_it_once(store: Store) -> None:
    """Ten callers at once append the same event (a retried append), beside ten appending
    events of their own: the event is stored once, the other nine are refused with
    DUPLICATE_EVENT naming it, and the callers sharing their transaction are not affected."""
    retried = DomainEvent("Paid", {"amount": 10}, {"order": "o1"})
    others = [DomainEvent("Viewed", {"n": n}) for n in range(10)]

    def attempt(event: DomainEvent) -> Callable[[], Coroutine[Any, Any, int]]:
        return lambda: store.append(event)

    calls = [attempt(event) for pair in zip([retried] * 10, others, strict=True) for event in pair]
    outcomes = await concurrently(store, calls)
    retries, own = outcomes[0::2], outcomes[1::2]
    assert all(isinstance(o, int) for o in own), own
    assert sum(isinstance(o, int) for o in retries) == 1, retries
    refused = [o for o in retries if not isinstance(o, int)]
    assert len(refused) == 9
    for error in refused:
        assert isinstance(error, EventStoreError), error
        assert error.code == DUPLICATE_EVENT
        assert error.context["event_ids"] == [str(retried.event_id)]
    stored = await store.read()
    assert positions(stored) == list(range(1, 12))
    assert [e.event_id for e in stored].count(retried.event_id) == 1
    assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(1, 12))


@contract
async def test_concurrent_batches_are_consecutive(store: Store) -> None:
    """Concurrent batches each land at consecutive positions, their last returned, with no gap
    and no interleaving."""
    writers, size = 12, 3

    def batch(w: int) -> Callable[[], Coroutine[Any, Any, int]]:
        events = [DomainEvent("Step", {"i": i}, {"writer": str(w)}) for i in range(size)]
        return lambda: store.append_batch(events)

    outcomes = await concurrently(store, [batch(w) for w in range(writers)])
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sorted(outcomes) == list(range(size, writers * size + 1, size))  # type: ignore[type-var]
    stored = await store.read()
    assert positions(stored) == list(range(1, writers * size + 1))
    for w, last in enumerate(outcomes):
        mine = [e for e in stored if e.tags["writer"] == str(w)]
        assert positions(mine) == [last - 2, last - 1, last]  # type: ignore[operator]
        assert [e.data["i"] for e in mine] == list(range(size))


@contract
async def test_subscriptions_follow_concurrent_appends(store: Store) -> None:
    """Two subscriptions (all events; an `EventFilter` of one type) follow while several
    callers append at once: each delivers every matching event exactly once, in increasing
    position order, and the same events the log holds."""
    await store.append_batch([DomainEvent("Seed", {"i": i}) for i in range(3)])
    writers, appends = 5, 8
    total = 3 + writers * appends
    everything = store.subscribe(after=0, buffer=4, poll_interval=NEVER)
    written = store.subscribe(EventFilter(event_types=["Written"]), after=0, poll_interval=NEVER)
    try:
        following = asyncio.gather(consume(everything, total), consume(written, writers * appends))

        def writer(w: int) -> Callable[[], Coroutine[Any, Any, list[int]]]:
            async def write() -> list[int]:
                done = []
                for j in range(appends):
                    event = DomainEvent("Written", {"w": w, "j": j}, {"writer": str(w)})
                    done.append(await store.append(event))
                return done

            return write

        outcomes = await concurrently(store, [writer(w) for w in range(writers)])
        got_all, got_written = await asyncio.wait_for(following, JOIN_TIMEOUT)
    finally:
        everything.stop()
        written.stop()
    for outcome in outcomes:
        assert isinstance(outcome, list), outcome
        assert outcome == sorted(outcome)
    log = (await store.read()).events
    assert positions(log) == list(range(1, total + 1))
    assert got_all == log
    assert got_written == [e for e in log if e.event_type == "Written"]
    for got in (got_all, got_written):
        assert len({e.event_id for e in got}) == len(got)
        assert all(a.position < b.position for a, b in itertools.pairwise(got))
    for w in range(writers):
        assert [e.data["j"] for e in got_written if e.data["w"] == w] == list(range(appends))
    assert store.subscriptions == 0


# -- metrics, arguments, closing -------------------------------------------------------------


@contract
async def test_metrics_count_appends_conflicts_and_queries(store: Store) -> None:
    """`metrics` counts the events and batches appended, the refused appends by reason, and
    the queries by kind."""
    events = [[DomainEvent("M", {"i": i, "j": j}) for j in range(2)] for i in range(3)]
    for expected, batch in zip((2, 4, 6), events, strict=True):
        assert await store.append_batch(batch) == expected
    await expect_error(
        APPEND_CONDITION_FAILED, store.append(DomainEvent("X"), AppendCondition(Query.all()))
    )
    await expect_error(DUPLICATE_EVENT, store.append(events[0][0]))
    before = store.metrics()
    appends = before["appends"]
    assert (appends["events"], appends["batches"]) == (6, 3)
    assert (appends["conflicts"], appends["duplicates"], appends["errors"]) == (1, 1, 0)
    assert appends["bytes"] > 0
    assert appends["latency"]["count"] == 5
    assert appends["latency"]["buckets"]["+Inf"] == 5
    assert before["pool"]["max"] == 12
    assert before["subscriptions"]["open"] == 0
    assert before["replicas"] == []
    await store.read()
    await store.read(Query.of(types=["M"]))
    await store.get_events()
    after = store.metrics()
    reads_before = before["queries"].get("read", {"count": 0})["count"]
    assert after["queries"]["read"]["count"] == reads_before + 2
    assert after["queries"]["read"]["errors"] == 0
    gets_before = before["queries"].get("get_events", {"count": 0})["count"]
    assert after["queries"]["get_events"]["count"] == gets_before + 1
    assert after["appends"] == appends


@contract
async def test_malformed_arguments_raise_query_error(store: Store) -> None:
    """Malformed arguments raise QUERY_ERROR: the iterators' and subscriptions' at the call,
    before anything is iterated."""
    await fill(store)
    expect_error_now(QUERY_ERROR, lambda: store.stream_events(batch_size=0))
    expect_error_now(QUERY_ERROR, lambda: store.stream_events(EventFilter(limit=-1)))
    expect_error_now(QUERY_ERROR, lambda: store.export_arrow(EventFilter(order_by="x")))  # type: ignore[arg-type]
    expect_error_now(QUERY_ERROR, lambda: store.subscribe(buffer=0))
    expect_error_now(QUERY_ERROR, lambda: store.subscribe(poll_interval=-1.0))
    expect_error_now(QUERY_ERROR, lambda: store.subscribe(EventFilter(limit=3)))
    expect_error_now(QUERY_ERROR, lambda: store.subscribe("everything"))  # type: ignore[arg-type]
    with pytest.raises(EventStoreError) as info:
        [page async for page in store.paginate(EventFilter(offset=2))]
    assert info.value.code == QUERY_ERROR
    await expect_error(QUERY_ERROR, store.count_events(EventFilter(end_time="not a time")))
    await expect_error(QUERY_ERROR, store.project(None, 0, lambda s, _: s, snapshot_every=2))
    assert store.subscriptions == 0
    assert await store.head() == 6


@contract
async def test_a_closed_store_refuses_work(store: Store) -> None:
    """After `close`, appends, reads and subscriptions raise STORAGE_ERROR; closing again is
    harmless."""
    await fill(store)
    subscription = store.subscribe(after=0, poll_interval=NEVER)
    assert positions(await asyncio.wait_for(consume(subscription, 6), JOIN_TIMEOUT)) == ALL
    await store.close()
    assert subscription.stopped
    assert store.subscriptions == 0
    await expect_error(STORAGE_ERROR, store.append(DomainEvent("Late")))
    await expect_error(STORAGE_ERROR, store.read())
    await expect_error(STORAGE_ERROR, store.head())
    expect_error_now(STORAGE_ERROR, lambda: store.subscribe())
    await store.close()


# -- which calls touch the database ---------------------------------------------------------------

#: `AsyncEventStore`'s calls that return at once without touching the database. Every other call
#: is a coroutine (``paginate`` an async generator), awaited because it talks to the database.
PLAIN_CALLS = {"cache_stats", "default_archive_dir", "metrics", "pool_stats", "validate"}
#: Plain calls that hand back something asynchronous, which queries as it is iterated or entered.
ASYNC_HANDLES = {"consumer", "export_arrow", "stream_events", "subscribe", "transaction"}


def _public_calls(cls: type) -> dict[str, Any]:
    return {
        name: attr
        for name in dir(cls)
        if not name.startswith("_")
        and callable(attr := inspect.getattr_static(cls, name))
        and not isinstance(attr, property)
    }


def test_async_calls_that_touch_the_database_are_coroutines_and_only_those() -> None:
    """What docs/operations.md says of the async store: a call that queries is awaited, and
    `metrics` is a plain call like `pool_stats` (printing it prints the figures, not a
    coroutine)."""
    calls = _public_calls(AsyncEventStore)
    plain = {
        name
        for name, call in calls.items()
        if not inspect.iscoroutinefunction(call) and not inspect.isasyncgenfunction(call)
    }
    assert plain == PLAIN_CALLS | ASYNC_HANDLES
    # The same names in both stores: one API, sync or async.
    assert set(_public_calls(EventStore)) - {"close"} >= set(calls) - {"open", "close"}
