"""Query latencies, p50 and p99 per shape, over a store loaded with the generated workload.

The store holds ``TAMMA_EVENTS_BENCH_QUERY_EVENTS`` events (default 1,000,000; the documented
manual run uses 10,000,000); loading takes minutes, so ``TAMMA_EVENTS_BENCH_KEEP=1`` keeps the
schema for the next run. The result cache is off: these are the queries' own costs. Each shape is
reported against a ``SELECT 1`` round trip timed in the same run, and the keyset page also
against the same page decoded by psycopg's defaults.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest

from tamma_events import EventStore
from tamma_events.tools.bench import default_page, latencies, percentiles, query_shapes

from .conftest import QUERY_EVENTS

ROUNDS = int(os.environ.get("TAMMA_EVENTS_BENCH_SAMPLES", "200"))
SHAPES = [
    "by_issue",
    "type_window",
    "type_window.by_time",
    "provider_platform",
    "tags",
    "keyset_page_1000",
    "count_by_type",
    "count_by_issue",
    "get_event_types",
    "get_tags",
    "get_tag_values.page_1000",
    "get_tag_values.prefix",
    "aggregate_by_day",
]


@pytest.fixture(scope="module")
def round_trip(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return percentiles(latencies(lambda: conn.execute("SELECT 1").fetchall(), ROUNDS))[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_query_latency(
    benchmark: Any, loaded: EventStore, round_trip: float, shape: str, dsn: str
) -> None:
    call = query_shapes(loaded)[shape]
    rounds = ROUNDS if shape != "get_tags" else 10
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    p50, p99 = percentiles(list(benchmark.stats.stats.data))
    info: dict[str, Any] = {
        "events": QUERY_EVENTS,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "round_trip_ms": round_trip * 1e3,
        "ratio_to_round_trip": p50 / round_trip,
    }
    if shape == "keyset_page_1000":
        with psycopg.connect(dsn, autocommit=True) as conn:
            default = percentiles(latencies(default_page(conn, loaded.schema, QUERY_EVENTS), 50))[0]
        info.update(default_decoding_ms=default * 1e3, ratio_to_default=p50 / default)
    benchmark.extra_info.update(info)
