"""The store's metrics: counters and latency histograms kept in-process, read as a snapshot
(`EventStore.metrics`) or scraped by Prometheus.

The store counts as it works (a lock and a few additions per operation); the pool, the cache,
the subscriptions and the replicas are read when a snapshot is taken. For Prometheus,
`prometheus_registry` gives a ``prometheus_client.CollectorRegistry`` of the store's own
(nothing is put in the process-wide default registry, so two stores never collide) whose
collector turns a fresh snapshot into metric families at each scrape; the web app serves it at
``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Histogram", "Metrics", "prometheus_registry"]

#: Upper bounds (seconds) of the latency histograms' buckets.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Observations counted per bucket (not cumulative here), with their count and sum."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """``count``, ``sum`` and ``buckets``: cumulative counts by upper bound (the last is
        ``"+Inf"``), as Prometheus has them."""
        cumulative: dict[str, int] = {}
        total = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            cumulative["+Inf" if bound == float("inf") else repr(bound)] = total
        return {"count": self.count, "sum": self.sum, "buckets": cumulative}


class _Kind:
    __slots__ = ("errors", "latency", "retries")

    def __init__(self) -> None:
        self.errors = 0
        self.retries = 0
        self.latency = Histogram()


class Metrics:
    """What a store counts; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events = 0
        self.batches = 0
        self.bytes = 0
        self.conflicts = 0
        self.duplicates = 0
        self.errors = 0
        self.append_latency = Histogram()
        self._queries: dict[str, _Kind] = {}

    def appended(self, events: int, size: int, seconds: float) -> None:
        with self._lock:
            self.events += events
            self.batches += 1
            self.bytes += size
            self.append_latency.observe(seconds)

    def append_failed(self, code: str, seconds: float) -> None:
        """An append refused (its condition, a duplicate id) or failed (anything else)."""
        with self._lock:
            if code == "APPEND_CONDITION_FAILED":
                self.conflicts += 1
            elif code == "DUPLICATE_EVENT":
                self.duplicates += 1
            else:
                self.errors += 1
            self.append_latency.observe(seconds)

    def queried(
        self, kind: str, seconds: float, failed: bool = False, retried: bool = False
    ) -> None:
        """A query of ``kind`` took ``seconds``; it ``failed``, or was ``retried`` (run once
        more after its connection was lost)."""
        with self._lock:
            entry = self._queries.get(kind)
            if entry is None:
                entry = self._queries[kind] = _Kind()
            entry.latency.observe(seconds)
            if failed:
                entry.errors += 1
            if retried:
                entry.retries += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "appends": {
                    "events": self.events,
                    "batches": self.batches,
                    "bytes": self.bytes,
                    "conflicts": self.conflicts,
                    "duplicates": self.duplicates,
                    "errors": self.errors,
                    "latency": self.append_latency.snapshot(),
                },
                "queries": {
                    kind: {
                        "count": entry.latency.count,
                        "errors": entry.errors,
                        "retries": entry.retries,
                        "latency": entry.latency.snapshot(),
                    }
                    for kind, entry in sorted(self._queries.items())
                },
            }


def prometheus_registry(snapshot: Callable[[], dict[str, Any]]) -> Any:
    """A ``prometheus_client.CollectorRegistry`` holding one collector that reads
    ``snapshot()`` (a store's `metrics`) at each scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

    def histogram(
        name: str, documentation: str, labels: list[str], values: list[tuple[list[str], Any]]
    ) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=labels)
        for label_values, latency in values:
            family.add_metric(label_values, list(latency["buckets"].items()), latency["sum"])
        return family

    class _Collector:
        def collect(self) -> Iterator[Metric]:
            now = snapshot()
            appends = now["appends"]
            for key, documentation in (
                ("events", "Events appended"),
                ("batches", "Append calls that wrote their events"),
                ("bytes", "Bytes of encoded events appended"),
                ("conflicts", "Appends refused because their condition failed"),
                ("duplicates", "Appends refused for an event id already stored"),
                ("errors", "Appends that failed for any other reason"),
            ):
                yield CounterMetricFamily(
                    f"tamma_events_append_{key}", documentation, value=appends[key]
                )
            yield histogram(
                "tamma_events_append_latency_seconds",
                "Latency of append calls",
                [],
                [([], appends["latency"])],
            )
            queries = now["queries"]
            errors = CounterMetricFamily(
                "tamma_events_query_errors", "Queries that failed, by kind", labels=["kind"]
            )
            retries = CounterMetricFamily(
                "tamma_events_query_retries",
                "Queries run once more after their connection was lost, by kind",
                labels=["kind"],
            )
            for kind, entry in queries.items():
                errors.add_metric([kind], entry["errors"])
                retries.add_metric([kind], entry["retries"])
            yield errors
            yield retries
            yield histogram(
                "tamma_events_query_latency_seconds",
                "Latency of queries, by kind",
                ["kind"],
                [([kind], entry["latency"]) for kind, entry in queries.items()],
            )
            cache = now["cache"]
            for key in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(
                    f"tamma_events_cache_{key}", f"Query cache {key}", value=cache[key]
                )
            yield GaugeMetricFamily(
                "tamma_events_cache_entries", "Query cache entries", value=cache["entries"]
            )
            pool = now["pool"]
            for key, documentation in (
                ("size", "Connections in the primary's pool"),
                ("idle", "Idle connections in the primary's pool"),
                ("waiting", "Requests waiting for a connection"),
            ):
                yield GaugeMetricFamily(f"tamma_events_pool_{key}", documentation, value=pool[key])
            yield CounterMetricFamily(
                "tamma_events_pool_connection_errors",
                "Failed attempts to open a connection",
                value=pool["connection_errors"],
            )
            subscriptions = now["subscriptions"]
            yield GaugeMetricFamily(
                "tamma_events_subscriptions", "Open subscriptions", value=subscriptions["open"]
            )
            yield GaugeMetricFamily(
                "tamma_events_subscription_lag_positions",
                "Positions committed and not yet delivered, the most of any subscription",
                value=subscriptions["lag_positions"],
            )
            yield GaugeMetricFamily(
                "tamma_events_subscription_lag_seconds",
                "Age of the oldest committed event not yet delivered by a subscription",
                value=subscriptions["lag_seconds"],
            )
            consumer_lag = GaugeMetricFamily(
                "tamma_events_consumer_lag_positions",
                "Positions committed after a consumer partition's checkpoint, by the worker"
                " holding it here",
                labels=["consumer", "partition"],
            )
            consumer_seconds = GaugeMetricFamily(
                "tamma_events_consumer_lag_seconds",
                "Age of the oldest committed position after a consumer partition's checkpoint",
                labels=["consumer", "partition"],
            )
            delivered = CounterMetricFamily(
                "tamma_events_consumer_delivered",
                "Events handed to a consumer's handler by the workers running here",
                labels=["consumer"],
            )
            parked = CounterMetricFamily(
                "tamma_events_consumer_parked",
                "Events a consumer's workers running here parked",
                labels=["consumer"],
            )
            totals: dict[str, list[int]] = {}
            for worker in now["consumers"]:
                total = totals.setdefault(worker["name"], [0, 0])
                total[0] += worker["delivered"]
                total[1] += worker["parked"]
                for partition, lag in worker["partitions"].items():
                    labels = [worker["name"], str(partition)]
                    consumer_lag.add_metric(labels, lag["lag_positions"])
                    consumer_seconds.add_metric(labels, lag["lag_seconds"])
            for consumer, (count, set_aside) in sorted(totals.items()):
                delivered.add_metric([consumer], count)
                parked.add_metric([consumer], set_aside)
            yield from (consumer_lag, consumer_seconds, delivered, parked)
            up = GaugeMetricFamily(
                "tamma_events_replica_up", "Replica reachable", labels=["replica"]
            )
            lag_bytes = GaugeMetricFamily(
                "tamma_events_replica_lag_bytes",
                "WAL bytes the replica has yet to replay",
                labels=["replica"],
            )
            lag_seconds = GaugeMetricFamily(
                "tamma_events_replica_lag_seconds",
                "Seconds since the last transaction the replica replayed, while it is behind",
                labels=["replica"],
            )
            reads = CounterMetricFamily(
                "tamma_events_replica_reads", "Reads served by the replica", labels=["replica"]
            )
            for replica in now["replicas"]:
                name = [replica["name"]]
                if replica["up"] is not None:  # None: not asked anything yet
                    up.add_metric(name, 1 if replica["up"] else 0)
                reads.add_metric(name, replica["reads"])
                if replica["lag_bytes"] is not None:
                    lag_bytes.add_metric(name, replica["lag_bytes"])
                if replica["lag_seconds"] is not None:
                    lag_seconds.add_metric(name, replica["lag_seconds"])
            yield from (up, lag_bytes, lag_seconds, reads)
            yield CounterMetricFamily(
                "tamma_events_replica_fallbacks",
                "Reads meant for a replica that the primary served (replica behind or down)",
                value=now["replica_fallbacks"],
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return registry
