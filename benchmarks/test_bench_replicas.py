"""Read throughput with one streaming replica against the primary alone, in the same run.

The benchmark starts its own embedded primary and a replica of it (whatever
TAMMA_EVENTS_TEST_DSN says: a replica needs a primary whose binaries and files are at hand),
loads ``TAMMA_EVENTS_BENCH_REPLICA_EVENTS`` events (default 200,000), and runs a read-mostly
query mix from 4 threads for 10 s against each of: the primary alone; the primary with the
replica, reading your writes; the same with ``consistency="eventual"``.
"""

from __future__ import annotations

import os
from typing import Any

from tamma_events.tools.bench import run_replica_suite

EVENTS = int(os.environ.get("TAMMA_EVENTS_BENCH_REPLICA_EVENTS", "200000"))
SECONDS = float(os.environ.get("TAMMA_EVENTS_BENCH_SECONDS", "10"))


def test_replica_read_throughput(benchmark: Any) -> None:
    results = benchmark.pedantic(
        lambda: run_replica_suite(events=EVENTS, threads=4, seconds=SECONDS), rounds=1, iterations=1
    )
    for result in results:
        benchmark.extra_info[result.name] = {
            "queries_per_s": result.value,
            "ratio_to_primary_alone": result.ratio,
            **result.detail,
        }
