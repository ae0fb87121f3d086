"""Append throughput, each figure with its baseline from the same run.

- ``append_batch`` (batches of 10k, durable commits, full index set) against raw pre-encoded
  binary COPY of the same rows into an index-free table;
- the native codec against the pure-Python reference;
- single conditional appends from one client, and single appends from 16 threads.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tamma_events import EventStore
from tamma_events.codec import reference as _pycodec
from tamma_events.ops.migrating import drop
from tamma_events.tools.bench import (
    BATCH_DEFAULT,
    fresh_ids,
    measure_commit_floor,
    measure_concurrent_appends,
    measure_conditional_appends,
    measure_copy_ceiling,
    measure_encode,
)

from .conftest import BATCH, SINGLE


def _rate(benchmark: Any, count: int) -> float:
    return count / benchmark.stats.stats.min


def test_append_batch_vs_copy_ceiling(
    benchmark: Any, dsn: str, schema: str, workload: list
) -> None:
    ceiling = measure_copy_ceiling(dsn, workload, BATCH, schema + "_ceiling")
    drop(dsn, schema + "_ceiling")
    rounds = iter(range(1, 100))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        name = f"{schema}_{next(rounds)}"
        store = EventStore(dsn, schema=name)
        return (store, fresh_ids(workload, hash(name))), {}

    def append_all(store: EventStore, events: list) -> None:
        try:
            for i in range(0, len(events), BATCH):
                store.append_batch(events[i : i + BATCH])
        finally:
            store.close()
            drop(dsn, store.schema)

    benchmark.pedantic(append_all, setup=setup, rounds=2, iterations=1)
    rate = _rate(benchmark, len(workload))
    benchmark.extra_info.update(
        events_per_s=rate, ceiling_events_per_s=ceiling, ratio=rate / ceiling
    )


@pytest.mark.parametrize("impl", ["native", "python"])
def test_encode(benchmark: Any, impl: str, workload: list) -> None:
    from tamma_events import codec as _codec

    if impl == "native" and _codec.IMPL != "native":
        pytest.fail("the native codec did not load")
    module = _pycodec if impl == "python" else __import__("tamma_events._native", fromlist=["_"])
    events = workload[:20_000]
    baseline = measure_encode(_pycodec, events, BATCH_DEFAULT, rounds=1)

    def encode() -> None:
        last = _pycodec.GENESIS_HASH
        for i in range(0, len(events), BATCH_DEFAULT):
            prepared = module.prepare(events[i : i + BATCH_DEFAULT])
            last = module.seal(prepared, i + 1, last)

    benchmark.pedantic(encode, rounds=3, iterations=1)
    rate = _rate(benchmark, len(events))
    benchmark.extra_info.update(
        events_per_s=rate, python_events_per_s=baseline, ratio=rate / baseline
    )


def test_conditional_appends(benchmark: Any, dsn: str, schema: str, workload: list) -> None:
    """Against the durable-commit floor: one-row INSERTs, each its own commit."""
    floor = measure_commit_floor(dsn, SINGLE, schema + "_floor")
    count = SINGLE
    with EventStore(dsn, schema=schema) as store:
        benchmark.pedantic(
            lambda: measure_conditional_appends(store, count, str(uuid.uuid4())),
            rounds=2,
            iterations=1,
        )
    rate = _rate(benchmark, count)
    benchmark.extra_info.update(appends_per_s=rate, commit_floor_per_s=floor, ratio=rate / floor)


def test_appends_from_16_threads(benchmark: Any, dsn: str, schema: str, workload: list) -> None:
    ceiling = measure_copy_ceiling(dsn, workload[:20_000], BATCH, schema + "_ceiling")
    drop(dsn, schema + "_ceiling")
    threads, per_thread = 16, max(1, SINGLE // 3)
    with EventStore(dsn, schema=schema, max_connections=threads + 2) as store:
        benchmark.pedantic(
            lambda: measure_concurrent_appends(store, threads, per_thread), rounds=2, iterations=1
        )
    rate = _rate(benchmark, threads * per_thread)
    benchmark.extra_info.update(
        events_per_s=rate, ceiling_events_per_s=ceiling, ratio=rate / ceiling
    )
