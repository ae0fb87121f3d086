"""The store beside what a user would pick instead, each pair measured in the same run:

- ``append_batch`` against psycopg ``executemany`` INSERTs of the same rows into a table with
  the store's columns and indexes, and against the eventsourcing library's PostgreSQL
  recorders: ``PostgresApplicationRecorder.insert_events`` and its DCB recorder
  (``eventsourcing.dcb.postgres_tt``), from the ``bench`` extra;
- single conditional appends against eventsourcing's DCB conditional append, and from 16
  threads against one client;
- ``verify`` against reading the same events with ``read``.
"""

from __future__ import annotations

from typing import Any

from tamma_events import EventStore
from tamma_events.ops.migrating import drop
from tamma_events.tools.bench import (
    fresh_ids,
    measure_append_batch,
    measure_conditional_appends,
    measure_verify,
)
from tamma_events.tools.bench_full import (
    measure_concurrent_conditional,
    measure_eventsourcing_application,
    measure_eventsourcing_dcb,
    measure_eventsourcing_dcb_conditional,
    measure_executemany,
)
from tamma_events.tools.bench_reads import measure_bare_chain

from .conftest import BATCH, SINGLE

PEERS = {
    "executemany": measure_executemany,
    "eventsourcing_application": measure_eventsourcing_application,
    "eventsourcing_dcb": measure_eventsourcing_dcb,
}


def _append_batch(dsn: str, schema: str, workload: list, salt: int) -> float:
    try:
        with EventStore(dsn, schema=schema, cache_size=0) as store:
            return measure_append_batch(store, fresh_ids(workload, salt), BATCH)
    finally:
        drop(dsn, schema)


def test_append_batch_vs_peers(benchmark: Any, dsn: str, schema: str, workload: list) -> None:
    peers: dict[str, float] = {}
    for name, measure in PEERS.items():
        try:
            peers[name] = measure(dsn, workload, BATCH, f"{schema}_{name}")
        finally:
            drop(dsn, f"{schema}_{name}")
    salts = iter(range(1, 100))
    benchmark.pedantic(
        lambda: _append_batch(dsn, f"{schema}_ours", workload, next(salts)), rounds=2, iterations=1
    )
    rate = len(workload) / benchmark.stats.stats.min
    benchmark.extra_info["events_per_s"] = rate
    for name, value in peers.items():
        benchmark.extra_info[f"{name}_events_per_s"] = value
        benchmark.extra_info[f"ratio_to_{name}"] = rate / value


def test_conditional_appends_vs_eventsourcing_dcb(benchmark: Any, dsn: str, schema: str) -> None:
    try:
        peer = measure_eventsourcing_dcb_conditional(dsn, SINGLE, f"{schema}_es")
    finally:
        drop(dsn, f"{schema}_es")
    salts = iter(range(1, 100))
    with EventStore(dsn, schema=schema, cache_size=0) as store:
        benchmark.pedantic(
            lambda: measure_conditional_appends(store, SINGLE, f"r{next(salts)}-"),
            rounds=2,
            iterations=1,
        )
    rate = SINGLE / benchmark.stats.stats.min
    benchmark.extra_info.update(
        appends_per_s=rate, eventsourcing_dcb_per_s=peer, ratio_to_eventsourcing_dcb=rate / peer
    )


def test_conditional_appends_from_16_threads(benchmark: Any, dsn: str, schema: str) -> None:
    threads, per_thread = 16, max(1, SINGLE // 3)
    with EventStore(dsn, schema=schema, cache_size=0, max_connections=threads + 2) as store:
        one = measure_conditional_appends(store, SINGLE, "one-")
        benchmark.pedantic(
            lambda: measure_concurrent_conditional(store, threads, per_thread),
            rounds=2,
            iterations=1,
        )
    rate = threads * per_thread / benchmark.stats.stats.min
    benchmark.extra_info.update(
        events_per_s=rate, one_client_per_s=one, ratio_to_one_client=rate / one, target=30_000
    )


def test_verify_vs_bare_copy(benchmark: Any, loaded: EventStore, dsn: str) -> None:
    bare = measure_bare_chain(dsn, loaded.schema, loaded.head())
    benchmark.pedantic(lambda: measure_verify(loaded), rounds=1, iterations=1)
    rate = loaded.head() / benchmark.stats.stats.min
    benchmark.extra_info.update(
        events_per_s=rate,
        bare_copy_events_per_s=bare,
        ratio_to_bare_copy=rate / bare,
        target=500_000,
        target_ratio=1.0,
    )
