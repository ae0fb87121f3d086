"""Streaming and subscriptions, each figure with its baseline from the same run.

- Subscription delivery latency (p50, p99) from an append's commit to the subscriber, while
  another process appends ``TAMMA_EVENTS_BENCH_RATE`` events/s (default 10,000) for
  ``TAMMA_EVENTS_BENCH_SECONDS`` (default 10), against a bare LISTEN connection receiving the
  same commits' notifications.
- `stream_events` over ``TAMMA_EVENTS_BENCH_QUERY_EVENTS`` events (default 1,000,000; shared
  with the query benchmarks, and kept with ``TAMMA_EVENTS_BENCH_KEEP=1``) against a psycopg
  server-side cursor with psycopg's own decoding.
"""

from __future__ import annotations

import os
from typing import Any

from tamma_events import EventStore
from tamma_events.tools.bench import measure_cursor, measure_delivery

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
