"""Exports and compaction over ``TAMMA_EVENTS_BENCH_QUERY_EVENTS`` events (default 1,000,000;
the store shared with the query benchmarks), each figure with its baseline from the same run.

- `export_arrow` events/s against the ADBC PostgreSQL driver's ``fetch_arrow_table`` of the
  same columns, and against the binary ``COPY TO`` they both read, transferred and dropped.
- `compact_events` on a copy of that log (all but the newest 1%): events/s, and the
  events table's size before, after VACUUM and after VACUUM FULL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tamma_events import EventStore
from tamma_events.ops.migrating import drop
from tamma_events.tools.bench import (
    copy_log,
    measure_adbc,
    measure_compaction,
    measure_copy_to,
    measure_export,
)


def test_export_arrow_vs_adbc(benchmark: Any, loaded: EventStore, dsn: str) -> None:
    adbc = measure_adbc(dsn, loaded.schema)
    copy_rate, copy_mb = measure_copy_to(dsn, loaded.schema)
    count, _ = benchmark.pedantic(lambda: measure_export(loaded), rounds=1, iterations=1)
    rate = count / benchmark.stats.stats.min
    benchmark.extra_info.update(
        events=count,
        events_per_s=rate,
        adbc_events_per_s=adbc,
        ratio_to_adbc=rate / adbc,
        copy_to_events_per_s=copy_rate,
        copy_to_mb_per_s=copy_mb,
        ratio_to_copy_to=rate / copy_rate,
        target_ratio_to_adbc=1.0,
    )


def test_compaction(benchmark: Any, loaded: EventStore, dsn: str, tmp_path: Path) -> None:
    schema = f"{loaded.schema}_compact"
    store = copy_log(dsn, loaded.schema, schema)
    try:
        figures = benchmark.pedantic(
            lambda: measure_compaction(store, str(tmp_path / "archives")), rounds=1, iterations=1
        )
        assert store.verify().ok
    finally:
        store.close()
        drop(dsn, schema)
    benchmark.extra_info.update(figures)
