"""`EventStore.stream_events`: every matching event once, in the filter's order, in batches,
pinned to the head it started at, holding no connection between batches, in constant memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import resource
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tamma_events import AsyncEventStore, DomainEvent, EventFilter, EventStore, EventStoreError

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)


def _events(count: int) -> list[DomainEvent]:
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


FILTERS = [
    None,
    EventFilter(event_types=["PrOpened"]),
    EventFilter(issue_ids=["I-2", "I-3"], providers=["openai"]),
    EventFilter(start_time=BASE + timedelta(minutes=5), end_time=BASE + timedelta(minutes=30)),
    EventFilter(order_by="timestamp"),
    EventFilter(order_by="timestamp", order_direction="desc", tags={"issueId": "I-1"}),
    EventFilter(order_by="type", order_direction="desc"),
    EventFilter(order_direction="desc", limit=17, offset=5),
    EventFilter(order_by="timestamp", limit=50, offset=13),
    EventFilter(event_types=["Nothing"]),
]


@pytest.mark.parametrize("event_filter", FILTERS)
@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_stream_returns_what_get_events_returns(
    store: EventStore, event_filter: EventFilter | None, batch_size: int
) -> None:
    store.append_batch(_events(120))
    streamed = list(store.stream_events(event_filter, batch_size=batch_size))
    expected = store.get_events(event_filter)
    assert [e.position for e in streamed] == [e.position for e in expected]
    assert streamed == expected


def test_stream_is_pinned_to_the_head_it_started_at(store: EventStore) -> None:
    store.append_batch(_events(30))
    stream = store.stream_events(batch_size=4)
    first = next(stream)
    store.append_batch(_events(10))  # committed while the stream is open
    rest = list(stream)
    assert [e.position for e in [first, *rest]] == list(range(1, 31))
    assert store.head() == 40


def test_no_connection_is_held_between_batches(make_store: Callable[..., EventStore]) -> None:
    # With a single connection, any other call made while the stream is open would wait for
    # the pool (and fail after pool_timeout) if the stream kept that connection.
    store = make_store(max_connections=1, min_connections=1, pool_timeout=5)
    store.append_batch(_events(25))
    seen = []
    for event in store.stream_events(batch_size=3):
        seen.append((event.position, store.head()))
    assert seen == [(n, 25) for n in range(1, 26)]


def test_stopping_early_leaves_nothing_open(
    make_store: Callable[..., EventStore], pg_dsn: str
) -> None:
    # A name of its own, so that only this store's sessions are counted.
    name = f"tamma-events stream {uuid.uuid4().hex[:8]}"
    store = make_store(dsn=make_conninfo(pg_dsn, application_name=name))
    store.append_batch(_events(50))
    stream = store.stream_events(batch_size=10)
    taken = [next(stream) for _ in range(15)]
    stream.close()
    assert [e.position for e in taken] == list(range(1, 16))
    with pytest.raises(StopIteration):
        next(stream)
    # Every connection the stream took is back. Reading two ranges at once may have made the
    # pool open a second connection, which it may still be opening in the background: wait
    # for the pool to settle (a connection the stream kept would never come back).
    deadline = time.monotonic() + 30
    while True:
        stats = store._pool.get_stats()
        if stats["pool_size"] == stats["pool_available"] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert stats["pool_size"] == stats["pool_available"]
    assert stats.get("requests_waiting", 0) == 0
    with psycopg.connect(pg_dsn) as conn:
        sessions = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity"
            " WHERE application_name = %s",
            [name],
        ).fetchone()
    assert sessions is not None
    assert sessions[0] >= 1  # the pool's own
    assert sessions[1] == 0  # none in a query or a transaction


def test_async_reads_cancelled_midway_leave_psycopg_a_coherent_copy(
    store: EventStore, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The async store reads COPY rows natively; a task cancelled at any point of it (a stream
    stopped early cancels the range read ahead, an export's task is cancelled) must leave the
    COPY where psycopg's way out expects it: psycopg never finds a COPY gone that it believes
    still runs ("error ignored terminating ... no COPY in progress")."""
    store.append_batch([DomainEvent("T", {"n": n}, {"k": str(n % 5)}) for n in range(6000)])

    async def main() -> None:
        async with AsyncEventStore(pg_dsn, schema=store.schema, cache_size=0) as aio:
            for k in range(20):
                taken = 0
                stream = aio.stream_events(batch_size=500)
                async for _ in stream:
                    taken += 1
                    if taken >= 300 + 97 * k:
                        break
                await stream.aclose()

                async def export() -> None:
                    async for _ in aio.export_arrow(batch_size=2000):
                        pass

                task = asyncio.ensure_future(export())
                await asyncio.sleep(0.001 * (k % 7))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert len(await aio.read()) == 6000

    with caplog.at_level(logging.WARNING, logger="psycopg"):
        asyncio.run(main())
    assert not [
        r.getMessage() for r in caplog.records if "error ignored terminating" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": 10**6}, "batch_size"),
        ({"event_filter": EventFilter(order_by="size")}, "order_by"),  # type: ignore[arg-type]
        ({"event_filter": EventFilter(limit=-1)}, "limit"),
    ],
)
def test_bad_arguments_fail_at_the_call(
    store: EventStore, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(EventStoreError) as raised:
        store.stream_events(**kwargs)  # no iteration: the call itself raises
    assert raised.value.code == "QUERY_ERROR"
    assert raised.value.context["field"] == field


# -- constant memory over a million events ---------------------------------------------------

MILLION = 1_000_000
#: What streaming may add to the process's peak RSS past its first batches. A million of these
#: events held at once take well over a gigabyte.
RSS_BOUND_MB = 64


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _stream_in_child(dsn: str, schema: str) -> tuple[int, int, float, float]:
    """In a fresh process: stream the whole store; the count, the sum of positions, and the
    peak RSS after the first 20,000 events and at the end."""
    with EventStore(dsn, schema=schema, migrate=False) as store:
        count = total = 0
        warm = 0.0
        for event in store.stream_events(batch_size=1_000):
            count += 1
            total += event.position
            if count == 20_000:
                warm = _rss_mb()
        return count, total, warm, _rss_mb()


# The walk holds `batch_size` events at a time whichever codec decodes them, so this runs once,
# in the native pass; the other tests of this module stream under each codec.
@pytest.mark.slow
@pytest.mark.codec_neutral
def test_a_million_events_stream_in_constant_memory(
    store: EventStore, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The summaries play no part in a stream of the whole log: not folding them as the million
    # events load makes loading faster (reads would still add up the tail, exactly).
    monkeypatch.setattr(store, "_fold_due", lambda position: False)
    pad = "x" * 200
    for start in range(0, MILLION, 20_000):
        store.append_batch(
            [
                DomainEvent("Streamed", {"n": n, "pad": pad}, {"issueId": f"I-{n % 1000}"})
                for n in range(start, start + 20_000)
            ]
        )
    assert store.head() == MILLION
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        count, total, warm, peak = pool.apply(_stream_in_child, (pg_dsn, store.schema))
    assert count == MILLION
    assert total == MILLION * (MILLION + 1) // 2
    assert warm > 0
    assert peak - warm < RSS_BOUND_MB, (warm, peak)
