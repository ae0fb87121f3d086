"""The read figures of the full benchmark, each beside the bare binary COPY of the same rows
measured in the same run: what the server ships when nothing is decoded.

- ``verify`` against one connection's ``COPY`` of the chain's rows, read and dropped;
- a page of 1000 decoded events (``read(limit=1000)``, ``get_page``) against the same 1000 rows
  as a bare ``COPY``, timed in turns at the same places in the log;
- ``stream_events`` against ``export_arrow`` over the whole log;
- the async store's exports, pages and streams against the sync store's.

The bare ``COPY`` is read by the native libpq reader (`tamma_events.ops.drive.copy_rows`), the
fastest way this client has to take rows off the wire.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from tamma_events.ops.drive import copy_rows
from tamma_events.sql import EVENT_SELECT, statements_of
from tamma_events.stores.aio import AsyncEventStore
from tamma_events.stores.store import EventStore
from tamma_events.tools.bench import BenchResult, percentiles

__all__ = ["measure_bare_chain", "page_latencies", "read_results"]

#: The events of a page.
PAGE = 1_000


def _places(head: int, samples: int) -> list[int]:
    """Where ``samples`` pages of `PAGE` events start, spread over a log of ``head`` events."""
    step = max(PAGE, (head - PAGE) // max(1, samples))
    return [(n * step) % max(1, head - PAGE) for n in range(samples)]


def measure_bare_chain(dsn: str, schema: str, head: int) -> float:
    """Events/s of one connection's binary ``COPY`` of the rows `verify` reads (positions 1 to
    ``head``), read by the native reader and dropped: the baseline of ``verify``."""
    statement = statements_of(schema).chain_rows
    started = time.perf_counter()
    count = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _, chunk_rows in copy_rows(conn, statement, [1, head]):
            count += chunk_rows
    return count / (time.perf_counter() - started)


def page_latencies(store: EventStore, dsn: str, samples: int, head: int) -> dict[str, list[float]]:
    """Seconds per page of `PAGE` events, three ways, in turns at the same places: the bare
    ``COPY`` of the rows (``copy``), ``read(after=, limit=PAGE)`` (``read``), and ``get_page``
    walking the log from the start (``page``; the bare COPY then reads that page's rows)."""
    statement = sql.SQL("SELECT {} FROM {} WHERE position > %s ORDER BY position LIMIT %s").format(
        EVENT_SELECT, sql.Identifier(store.schema, "events")
    )
    times: dict[str, list[float]] = {"copy": [], "read": [], "page": [], "page_copy": []}
    token: str | None = None
    walked = 0
    with psycopg.connect(dsn, autocommit=True) as conn:

        def bare(after: int, limit: int) -> None:
            for _ in copy_rows(conn, statement, [after, limit]):
                pass

        def timed(name: str, call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            call(*args, **kwargs)
            times[name].append(time.perf_counter() - started)

        bare(0, PAGE)  # warm the plans once
        store.read(after=0, limit=PAGE)
        for after in _places(head, samples):
            timed("copy", bare, after, PAGE)
            timed("read", store.read, after=after, limit=PAGE)
            # get_page asks for one event more, to know whether a page follows
            timed("page_copy", bare, walked, PAGE + 1)
            started = time.perf_counter()
            page = store.get_page(page_size=PAGE, token=token)
            times["page"].append(time.perf_counter() - started)
            walked += len(page.events)
            token = page.next_token
            if token is None:
                walked = 0
    return times


async def _async_reads(dsn: str, schema: str, samples: int) -> dict[str, float]:
    """The async store's figures: export and stream rates over the whole log, and the median
    page of `PAGE` events (`read`)."""
    figures: dict[str, float] = {}
    async with AsyncEventStore(dsn, schema=schema, cache_size=0) as store:
        head = await store.head()
        started = time.perf_counter()
        count = 0
        async for batch in store.export_arrow():
            count += batch.num_rows
        figures["export"] = count / (time.perf_counter() - started)
        started = time.perf_counter()
        count = 0
        async for _ in store.stream_events():
            count += 1
        figures["stream"] = count / (time.perf_counter() - started)
        times = []
        for after in _places(head, samples):
            started = time.perf_counter()
            await store.read(after=after, limit=PAGE)
            times.append(time.perf_counter() - started)
        figures["read"] = statistics.median(times)
    return figures


def _sync_reads(store: EventStore, samples: int, head: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    started = time.perf_counter()
    count = sum(batch.num_rows for batch in store.export_arrow())
    figures["export"] = count / (time.perf_counter() - started)
    started = time.perf_counter()
    count = sum(1 for _ in store.stream_events())
    figures["stream"] = count / (time.perf_counter() - started)
    times = []
    for after in _places(head, samples):
        started = time.perf_counter()
        store.read(after=after, limit=PAGE)
        times.append(time.perf_counter() - started)
    figures["read"] = statistics.median(times)
    return figures


def read_results(
    store: EventStore, dsn: str, samples: int, progress: Callable[[str], None]
) -> list[BenchResult]:
    """Pages, streams and the async store against their baselines, on ``store`` (the large
    store of the suite). Every ratio is the figure over its baseline's, as elsewhere in the
    suite: for times, lower is better."""
    results: list[BenchResult] = []
    head = store.head()
    progress("pages of 1000 events against the bare COPY of their rows")
    times = page_latencies(store, dsn, samples, head)

    def latency(name: str, key: str, baseline: str | None, base: str | None, **more: Any) -> None:
        p50, p99 = percentiles(times[key])
        ratio = None
        if base is not None:
            ratio = p50 / percentiles(times[base])[0]
        detail = {"p99_ms": round(p99 * 1000, 3), "samples": samples, **more}
        results.append(BenchResult(name, p50 * 1000, "ms", baseline, ratio, detail))

    latency("copy_1000", "copy", None, None)
    latency("copy_1000.pages", "page_copy", None, None)
    latency("read_1000", "read", "copy_1000", "copy", target_ratio=1.3)
    latency("get_page_1000", "page", "copy_1000.pages", "page_copy", target_ratio=1.3)
    progress("stream_events and export_arrow, sync and async")
    sync = _sync_reads(store, max(10, samples // 4), head)
    asynchronous = asyncio.run(_async_reads(dsn, store.schema, max(10, samples // 4)))

    def rate(name: str, value: float, baseline: str | None = None, **more: Any) -> None:
        base = sync["export"] if baseline == "export_arrow.reads" else sync["stream"]
        ratio = value / base if baseline else None
        results.append(BenchResult(name, value, "events/s", baseline, ratio, dict(more)))

    rate("export_arrow.reads", sync["export"])
    rate("stream_events", sync["stream"], "export_arrow.reads", target_ratio=0.5)
    rate("async.export", asynchronous["export"], "export_arrow.reads", target_ratio=0.9)
    rate("async.stream", asynchronous["stream"], "stream_events", target_ratio=0.9)
    results.append(BenchResult("sync.read_1000", sync["read"] * 1000, "ms"))
    results.append(
        BenchResult(
            "async.read_1000",
            asynchronous["read"] * 1000,
            "ms",
            "sync.read_1000",
            asynchronous["read"] / sync["read"],
            # As fast as the sync store's at 0.9: a time at most 1/0.9 of it.
            {"speed_ratio": round(sync["read"] / asynchronous["read"], 3), "target_ratio": 1.11},
        )
    )
    return results
