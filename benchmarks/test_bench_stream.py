"""Streaming and subscriptions, each figure with its baseline from the same run.

- Subscription delivery latency (p50, p99) from an append's commit to the subscriber, while
  another process appends ``TAMMA_EVENTS_BENCH_RATE`` events/s (default 10,000) for
  ``TAMMA_EVENTS_BENCH_SECONDS`` (default 10), against a bare LISTEN connection receiving the
  same commits' notifications.
- `stream_events` over ``TAMMA_EVENTS_BENCH_QUERY_EVENTS`` events (default 1,000,000; shared
  with the query benchmarks, and kept with ``TAMMA_EVENTS_BENCH_KEEP=1``) against a psycopg
  server-side cursor with psycopg's own decoding, and against `export_arrow` of the same log.
- A page of 1000 decoded events (``read(limit=1000)``) against the bare binary COPY of the same
  rows, read and dropped (`tamma_events.tools.bench_reads.page_latencies`).
"""

from __future__ import annotations

import os
from typing import Any

from tamma_events import EventStore
from tamma_events.tools.bench import measure_cursor, measure_delivery, measure_export, percentiles
from tamma_events.tools.bench_reads import page_latencies

RATE = float(os.environ.get("TAMMA_EVENTS_BENCH_RATE", "10000"))
SECONDS = float(os.environ.get("TAMMA_EVENTS_BENCH_SECONDS", "10"))


def test_subscription_latency_under_load(benchmark: Any, dsn: str, schema: str) -> None:
    with EventStore(dsn, schema=schema, cache_size=0) as store:
        subscriber, raw, reached = benchmark.pedantic(
            lambda: measure_delivery(store, rate=RATE, seconds=SECONDS), rounds=1, iterations=1
        )
    benchmark.extra_info.update(
        load_events_per_s=reached,
        p50_ms=subscriber["p50_ms"],
        p99_ms=subscriber["p99_ms"],
        listen_notify_p50_ms=raw["p50_ms"],
        listen_notify_p99_ms=raw["p99_ms"],
        ratio_p99_to_listen_notify=subscriber["p99_ms"] / raw["p99_ms"],
        target_p99_ms=50.0,
    )


def test_stream_events_vs_server_cursor(benchmark: Any, loaded: EventStore, dsn: str) -> None:
    cursor = measure_cursor(dsn, loaded.schema)
    count = benchmark.pedantic(
        lambda: sum(1 for _ in loaded.stream_events()), rounds=1, iterations=1
    )
    rate = count / benchmark.stats.stats.min
    benchmark.extra_info.update(
        events=count,
        events_per_s=rate,
        cursor_events_per_s=cursor,
        ratio_to_cursor=rate / cursor,
    )


def test_stream_events_vs_export_arrow(benchmark: Any, loaded: EventStore) -> None:
    _, exported = measure_export(loaded)
    count = benchmark.pedantic(
        lambda: sum(1 for _ in loaded.stream_events()), rounds=1, iterations=1
    )
    rate = count / benchmark.stats.stats.min
    benchmark.extra_info.update(
        events_per_s=rate,
        export_events_per_s=exported,
        ratio_to_export=rate / exported,
        target_ratio=0.5,
    )


def test_page_of_1000_vs_bare_copy(benchmark: Any, loaded: EventStore, dsn: str) -> None:
    times = page_latencies(loaded, dsn, 20, loaded.head())
    benchmark.pedantic(lambda: loaded.read(limit=1000), rounds=20, iterations=1)
    copy_p50 = percentiles(times["copy"])[0]
    read_p50 = percentiles(times["read"])[0]
    benchmark.extra_info.update(
        read_p50_ms=read_p50 * 1e3,
        copy_p50_ms=copy_p50 * 1e3,
        ratio_to_bare_copy=read_p50 / copy_p50,
        target_ratio=1.3,
    )
