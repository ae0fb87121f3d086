"""Throughput measurements shared by ``tamma-events bench`` and ``benchmarks/``.

Each figure is measured on the same generated events in the same run as its baseline, and is
reported as a ratio to it, because absolute numbers on shared machines drift from run to run.
Every append is a durable commit (``synchronous_commit`` stays on).
"""

from __future__ import annotations

import functools
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

from tamma_events import codec as _codec
from tamma_events.codec import reference as _pycodec
from tamma_events.filters import EventFilter, encode_token, normalize
from tamma_events.model import AppendCondition, DomainEvent, Query, SequencedEvent
from tamma_events.ops.appending import FOLD_EVENTS
from tamma_events.ops.archiving import ROW_GROUP_EVENTS, chain_row_groups
from tamma_events.ops.migrating import drop
from tamma_events.stores.store import EventStore
from tamma_events.tools.usage import measured
from tamma_events.tools.workload import EVENT_TYPES, PLATFORMS, PROVIDERS, generate_events

T = TypeVar("T")

__all__ = [
    "BATCH_DEFAULT",
    "BenchResult",
    "concurrent_rate",
    "copy_log",
    "default_page",
    "fresh_ids",
    "latencies",
    "load_query_store",
    "measure_adbc",
    "measure_append_batch",
    "measure_compaction",
    "measure_concurrent_appends",
    "measure_conditional_appends",
    "measure_copy_ceiling",
    "measure_copy_to",
    "measure_cursor",
    "measure_delivery",
    "measure_encode",
    "measure_export",
    "measure_fold",
    "measure_read_throughput",
    "measure_stream",
    "paced_writer",
    "percentiles",
    "query_shapes",
    "relation_bytes",
    "run_export_suite",
    "run_query_suite",
    "run_replica_suite",
    "run_stream_suite",
    "run_suite",
]


@dataclass
class BenchResult:
    name: str
    value: float
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


#: Events per append_batch in every measure, as in the targets.
BATCH_DEFAULT = 10_000


def fresh_ids(events: Sequence[DomainEvent], salt: int) -> list[DomainEvent]:
    """The same events with new ids, so they can be appended again to the same store: ``salt``
    is mixed into the random bits of each UUIDv7, keeping its time order."""
    mix = salt & ((1 << 62) - 1)
    return [
        DomainEvent(
            e.event_type,
            e.data,
            e.tags,
            e.metadata,
            uuid.UUID(int=e.event_id.int ^ mix),
            e.timestamp,
        )
        for e in events
    ]


def _batches(events: Sequence[T], size: int) -> list[Sequence[T]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def _best_rate(count: int, run: Callable[[], None], rounds: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - started))
    return max(rates), rates


def measure_encode(
    codec: Any, events: Sequence[DomainEvent], batch_size: int, rounds: int = 3
) -> float:
    """Events/s of ``codec.prepare`` + ``codec.seal`` (validate, serialise, frame, hash)."""
    batches = _batches(events, batch_size)

    def run() -> None:
        last = _pycodec.GENESIS_HASH
        position = 1
        for batch in batches:
            prepared = codec.prepare(batch)
            last = codec.seal(prepared, position, last)
            position += prepared.count

    return _best_rate(len(events), run, rounds)[0]


def measure_copy_ceiling(
    dsn: str,
    events: Sequence[DomainEvent],
    batch_size: int,
    schema: str,
    like: str | None = None,
) -> float:
    """Events/s of raw, pre-encoded binary COPY of the same rows, batch by batch, each batch a
    durable commit, into a table with the store's columns and no index at all; or, with
    ``like`` (a store's schema), with that store's indexes (and no trigger, chain or head)."""
    buffers = []
    last = _pycodec.GENESIS_HASH
    position = 1
    for batch in _batches(events, batch_size):
        prepared = _codec.prepare(batch)
        last = _codec.seal(prepared, position, last)
        position += prepared.count
        buffers.append(bytes(prepared.buffer))
    table = sql.Identifier(schema, "ceiling")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        if like is not None:
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING INDEXES)").format(
                    table, sql.Identifier(like, "events")
                )
            )
        else:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (position bigint NOT NULL, event_id uuid NOT NULL,"
                    ' event_type text NOT NULL, "timestamp" timestamptz NOT NULL,'
                    " tags jsonb NOT NULL, metadata jsonb NOT NULL, data jsonb NOT NULL,"
                    " recorded_at timestamptz NOT NULL DEFAULT now(), hash bytea NOT NULL)"
                ).format(table)
            )
        copy_sql = sql.SQL(
            'COPY {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " FROM STDIN (FORMAT BINARY)"
        ).format(table)
        started = time.perf_counter()
        for buffer in buffers:
            with conn.transaction(), conn.cursor().copy(copy_sql) as copy:
                copy.write(_pycodec.COPY_HEADER)
                copy.write(buffer)
                copy.write(_pycodec.COPY_TRAILER)
        elapsed = time.perf_counter() - started
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
    return len(events) / elapsed


def measure_append_batch(
    store: EventStore, events: Sequence[DomainEvent], batch_size: int
) -> float:
    """Events/s of `EventStore.append_batch` (encode included), batch by batch."""
    started = time.perf_counter()
    for batch in _batches(events, batch_size):
        store.append_batch(batch)
    return len(events) / (time.perf_counter() - started)


def measure_verify(store: EventStore) -> float:
    """Events/s of `EventStore.verify` over the whole store."""
    started = time.perf_counter()
    report = store.verify()
    if not report.ok:
        raise RuntimeError(f"the benchmark store does not verify: {report}")
    return report.checked / (time.perf_counter() - started)


ARCHIVE_VERIFY_EVENTS = 200_000


def measure_archive_verify(store: EventStore, directory: Path) -> tuple[float, float, int]:
    """Events/s of recomputing the hash chain over an archive file (the store's first
    `ARCHIVE_VERIFY_EVENTS` events, written with compaction's row groups), and of reading its
    row groups alone (the baseline, from the same file); and how many events."""
    path = directory / "archive.parquet"
    count = store.export_parquet(
        EventFilter(limit=ARCHIVE_VERIFY_EVENTS), path, row_group_size=ROW_GROUP_EVENTS
    )
    try:
        started = time.perf_counter()
        with pq.ParquetFile(path) as parquet:
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group)
        bare = count / (time.perf_counter() - started)
        started = time.perf_counter()
        with pq.ParquetFile(path) as parquet:
            end, _ = chain_row_groups(parquet, 1, _pycodec.GENESIS_HASH)
        verified = count / (time.perf_counter() - started)
    finally:
        path.unlink(missing_ok=True)
    if end != count + 1:
        raise RuntimeError(f"the archive of {count} events ended at {end - 1}")
    return verified, bare, count


def measure_read(store: EventStore, page: int) -> float:
    """Events/s of reading the whole store with `EventStore.read`, page by page: the baseline
    of `verify`, which reads the same rows and recomputes their hashes."""
    started = time.perf_counter()
    after, count = 0, 0
    while True:
        result = store.read(after=after, limit=page)
        if not result.events:
            break
        count += len(result)
        after = result.events[-1].position
    return count / (time.perf_counter() - started)


def measure_commit_floor(dsn: str, count: int, schema: str) -> float:
    """Commits/s of one-row INSERTs into an index-free table, each its own durable commit in one
    round trip, from one client: what the WAL flush latency allows any sequential writer."""
    table = sql.Identifier(schema, "floor")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {} (n bigint, at timestamptz DEFAULT now())").format(table)
        )
        insert = sql.SQL("INSERT INTO {} (n) VALUES (%s)").format(table)
        started = time.perf_counter()
        for n in range(count):
            conn.execute(insert, [n])  # autocommit: one round trip, one durable commit
        elapsed = time.perf_counter() - started
    drop(dsn, schema)
    return count / elapsed


def measure_conditional_appends(store: EventStore, count: int, prefix: str = "") -> float:
    """Appends/s of single events, each under a DCB condition that holds, from one client.

    Each decision is about its own issue (``prefix`` keeps repeated runs apart), so none fails.
    """
    started = time.perf_counter()
    for n in range(count):
        tags = {"issueId": f"bench-cond-{prefix}{n}"}
        condition = AppendCondition(Query.of(types=["BenchDecided"], tags=tags), after=None)
        store.append(DomainEvent("BenchDecided", {"n": n}, tags), condition)
    return count / (time.perf_counter() - started)


def concurrent_rate(threads: int, per_thread: int, work: Callable[[int, int], object]) -> float:
    """Events/s of ``threads`` threads each calling ``work(thread, n)`` for n in
    ``range(per_thread)``, all started at once; the first error any of them met is raised."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for n in range(per_thread):
                work(k, n)
        except BaseException as exc:  # reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return threads * per_thread / elapsed


def measure_concurrent_appends(store: EventStore, threads: int, per_thread: int) -> float:
    """Events/s of single `EventStore.append` calls from ``threads`` threads at once."""
    return concurrent_rate(
        threads,
        per_thread,
        lambda k, n: store.append(
            DomainEvent("BenchTicked", {"thread": k, "n": n}, {"userId": f"u{k}"})
        ),
    )


def measure_fold(store: EventStore, events: Sequence[DomainEvent], batch_size: int) -> float:
    """Events/s of folding the query summaries: ``events`` appended with no fold on the way
    (the tail grows), then one `EventStore.fold_summaries` over all of them, timed alone."""
    store._fold_due = lambda position: False  # type: ignore[method-assign]
    for start in range(0, len(events), batch_size):
        store.append_batch(events[start : start + batch_size])
    started = time.perf_counter()
    store.fold_summaries()
    return len(events) / (time.perf_counter() - started)


def run_suite(
    dsn: str,
    *,
    events: int = 100_000,
    batch_size: int = BATCH_DEFAULT,
    rounds: int = 2,
    conditional: int = 2_000,
    threads: int = 16,
    per_thread: int = 500,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """The core figures, each with its baseline from this run."""
    workload = list(generate_events(events))
    results: list[BenchResult] = []

    progress("encode")
    encode_events = workload[: min(len(workload), 50_000)]
    python_rate = measure_encode(_pycodec, encode_events, batch_size)
    if _codec.IMPL == "native":
        from tamma_events import _native

        native_rate = measure_encode(_native, encode_events, batch_size)
        results.append(
            BenchResult(
                "encode.native", native_rate, "events/s", "encode.python", native_rate / python_rate
            )
        )
    results.append(BenchResult("encode.python", python_rate, "events/s"))

    ceilings: list[float] = []
    appends: list[float] = []
    unchained: list[float] = []
    folds: list[float] = []
    verifies: list[float] = []
    reads: list[float] = []
    for r in range(rounds):
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        progress(f"copy ceiling, round {r + 1}")
        ceilings.append(measure_copy_ceiling(dsn, workload, batch_size, schema))
        progress(f"append_batch, round {r + 1}")
        with EventStore(dsn, schema=schema) as store:
            appends.append(measure_append_batch(store, fresh_ids(workload, 2 * r + 1), batch_size))
            progress(f"verify, round {r + 1}")
            verifies.append(measure_verify(store))
            progress(f"read, round {r + 1}")
            reads.append(measure_read(store, batch_size))
        drop(dsn, schema)
        progress(f"append_batch without the hash chain, round {r + 1}")
        with EventStore(dsn, schema=schema) as store:
            store._seal = functools.partial(_codec.seal, chain=False)
            unchained.append(
                measure_append_batch(store, fresh_ids(workload, 2 * r + 2), batch_size)
            )
        drop(dsn, schema)
        progress(f"folding the query summaries, round {r + 1}")
        with EventStore(dsn, schema=schema) as store:
            folds.append(measure_fold(store, fresh_ids(workload, 2 * r + 3), batch_size))
        drop(dsn, schema)
    ceiling = max(ceilings)
    append = max(appends)
    results.append(
        BenchResult(
            "append_batch",
            append,
            "events/s",
            "copy_ceiling",
            append / ceiling,
            {"batch_size": batch_size, "events": events, "rounds": [round(a) for a in appends]},
        )
    )
    results.append(
        BenchResult(
            "copy_ceiling", ceiling, "events/s", detail={"rounds": [round(c) for c in ceilings]}
        )
    )
    results.append(
        BenchResult(
            "append_batch.chain",
            append,
            "events/s",
            "append_batch.no_chain",
            append / max(unchained),
            {"no_chain_rounds": [round(u) for u in unchained]},
        )
    )
    results.append(
        BenchResult(
            "summaries.fold",
            max(folds),
            "events/s",
            "append_batch",
            max(folds) / append,
            {"rounds": [round(f) for f in folds]},
        )
    )
    results.append(
        BenchResult(
            "verify",
            max(verifies),
            "events/s",
            "read",
            max(verifies) / max(reads),
            {"read_rounds": [round(x) for x in reads]},
        )
    )

    progress("single-row durable commits")
    floor = measure_commit_floor(dsn, min(conditional, 1_000), f"bench_{uuid.uuid4().hex[:10]}")
    results.append(BenchResult("commit_floor", floor, "commits/s"))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with EventStore(dsn, schema=schema, max_connections=threads + 2) as store:
        progress("conditional appends")
        cond = measure_conditional_appends(store, conditional)
        results.append(
            BenchResult(
                "append.conditional",
                cond,
                "appends/s",
                "commit_floor",
                cond / floor,
                {"client": 1},
            )
        )
        progress(f"single appends from {threads} threads")
        threaded = measure_concurrent_appends(store, threads, per_thread)
        results.append(
            BenchResult(
                "append.threads",
                threaded,
                "events/s",
                "copy_ceiling",
                threaded / ceiling,
                {"threads": threads, "per_thread": per_thread},
            )
        )
    drop(dsn, schema)
    return results


def query_shapes(store: EventStore, seed: int = 11) -> dict[str, Callable[[], object]]:
    """The query shapes of the benchmark, each a call that asks its question with fresh
    arguments (another issue, window, provider, ...) every time, over a store loaded with the
    generated workload."""
    rng = random.Random(seed)
    head = store.head()
    first = store.get_events(EventFilter(limit=1))
    last = store.get_events(EventFilter(limit=1, order_direction="desc"))
    if not first:
        raise RuntimeError("the benchmark store is empty")
    start, span = first[0].timestamp, (last[0].timestamp - first[0].timestamp).total_seconds()
    issues = max(1, head // 50)
    users = max(10, issues // 20)
    types = list(EVENT_TYPES)
    pages = normalize(None)

    def window_of(hours: float) -> tuple[Any, Any]:
        at = start + timedelta(seconds=rng.uniform(0, max(0.0, span - hours * 3600)))
        return at, at + timedelta(hours=hours)

    def by_issue() -> object:
        return store.get_events(
            EventFilter(issue_ids=[f"ISSUE-{rng.randrange(issues)}"], limit=100)
        )

    def type_window() -> object:
        begin, end = window_of(1)
        return store.get_events(
            EventFilter(event_types=[rng.choice(types)], start_time=begin, end_time=end, limit=100)
        )

    def type_window_by_time() -> object:
        begin, end = window_of(6)
        return store.get_events(
            EventFilter(
                event_types=[rng.choice(types)],
                start_time=begin,
                end_time=end,
                limit=100,
                order_by="timestamp",
            )
        )

    def provider_platform() -> object:
        return store.get_events(
            EventFilter(
                providers=[rng.choice(PROVIDERS)], platforms=[rng.choice(PLATFORMS)], limit=100
            )
        )

    def tags() -> object:
        pair = {"userId": f"user-{rng.randrange(users)}", "provider": rng.choice(PROVIDERS)}
        return store.get_events(EventFilter(tags=pair, limit=100))

    def keyset_page() -> object:
        token = encode_token(pages, head, None, rng.randrange(max(1, head - 1000)))
        return store.get_page(page_size=1000, token=token).events

    walk: list[str | None] = [None]

    def tag_values_page() -> object:
        # The issueId values (one per 50 events), 1000 a page, walked from the first.
        page = store.get_tag_values("issueId", page_size=1000, token=walk[0])
        walk[0] = page.next_token
        return page.values

    def tag_values_prefix() -> object:
        prefix = f"ISSUE-{rng.randrange(1, 100)}"
        return store.get_tag_values("issueId", prefix=prefix, page_size=1000).values

    return {
        "by_issue": by_issue,
        "type_window": type_window,
        "type_window.by_time": type_window_by_time,
        "provider_platform": provider_platform,
        "tags": tags,
        "keyset_page_1000": keyset_page,
        "count_by_type": lambda: store.count_events(EventFilter(event_types=[rng.choice(types)])),
        "count_by_issue": lambda: store.count_events(
            EventFilter(issue_ids=[f"ISSUE-{rng.randrange(issues)}"])
        ),
        "get_event_types": store.get_event_types,
        "get_tags": store.get_tags,
        "get_tag_values.page_1000": tag_values_page,
        "get_tag_values.prefix": tag_values_prefix,
        "aggregate_by_day": lambda: store.aggregate(group_by="day"),
    }


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latencies(call: Callable[[], object], samples: int) -> list[float]:
    call()  # warm the plan and page caches once
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


#: How many runs' tails (`_summary_reads_with_a_tail`) a kept query store may hold and still
#: be reused.
_REUSED_TAILS = 100


def load_query_store(
    dsn: str,
    schema: str,
    events: int,
    progress: Callable[[str], None] = lambda _: None,
    loading: Callable[[], None] = lambda: None,
) -> EventStore:
    """A store on ``schema`` holding ``events`` generated events, vacuumed and analysed; an
    existing schema holding that many is reused (with the few events each earlier run's
    measure of summary reads with a tail appended after them). ``loading`` is called when the
    events are not there yet and are about to be appended."""
    store = EventStore(dsn, schema=schema, cache_size=0)
    head = store.head()
    if head != 0 and not events <= head < events + _REUSED_TAILS * FOLD_EVENTS:
        store.close()
        drop(dsn, schema)
        store = EventStore(dsn, schema=schema, cache_size=0)
    if store.head() == 0:
        loading()
        batch: list[DomainEvent] = []
        for n, event in enumerate(generate_events(events), 1):
            batch.append(event)
            if len(batch) == BATCH_DEFAULT:
                store.append_batch(batch)
                batch = []
                if n % 100_000 == 0:
                    progress(f"loaded {n:,} events")
        if batch:
            store.append_batch(batch)
        store.fold_summaries()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in ("events", "type_summary", "tag_summary", "time_summary"):
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, table)))
    return store


def run_query_suite(
    dsn: str,
    *,
    events: int = 1_000_000,
    samples: int = 200,
    schema: str | None = None,
    keep: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """p50 and p99 latency of each query shape over ``events`` generated events, with the
    result cache off, each against the round trip of ``SELECT 1`` measured in the same run;
    the keyset page also against the same page decoded the way psycopg does by default."""
    schema = schema or f"bench_q_{events}"
    progress(f"loading {events:,} events into {schema}")
    store = load_query_store(dsn, schema, events, progress)
    results: list[BenchResult] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            floor = percentiles(latencies(lambda: conn.execute("SELECT 1").fetchall(), samples))
            results.append(
                BenchResult("round_trip", floor[0] * 1e3, "ms", detail={"p99_ms": floor[1] * 1e3})
            )
            default = percentiles(latencies(default_page(conn, schema, events), samples))
        for name, call in query_shapes(store).items():
            progress(name)
            runs = samples if name != "get_tags" else max(5, samples // 20)
            with measured(dsn) as usage:
                p50, p99 = percentiles(latencies(call, runs))
            results.append(
                BenchResult(
                    f"query.{name}",
                    p50 * 1e3,
                    "ms",
                    "round_trip",
                    p50 / floor[0],
                    {
                        "p99_ms": round(p99 * 1e3, 3),
                        "samples": runs,
                        "events": events,
                        **usage.per(runs + 1, "query"),
                    },
                )
            )
            if name == "keyset_page_1000":
                results.append(
                    BenchResult(
                        "query.keyset_page_1000.decoding",
                        p50 * 1e3,
                        "ms",
                        "psycopg_default_decoding",
                        p50 / default[0],
                        {"default_p50_ms": round(default[0] * 1e3, 3)},
                    )
                )
        results.extend(_summary_reads_with_a_tail(store, samples, floor[0], events))
    finally:
        store.close()
        if not keep:
            drop(dsn, schema)
    return results


def _summary_reads_with_a_tail(
    store: EventStore, samples: int, round_trip: float, events: int
) -> list[BenchResult]:
    """The reads the summaries answer, again with the longest tail an appending store leaves
    unfolded (`FOLD_EVENTS` - 1 events just appended): exact, and what adding it up costs.
    The tail is folded afterwards, so a kept store starts the next run folded."""
    store.fold_summaries()
    tail = FOLD_EVENTS - 1
    store._fold_due = lambda position: False  # type: ignore[method-assign]
    # Later than every stored event, as new events are: events with the generated set's own
    # early times would widen its first time buckets to the end of the log.
    [last] = store.read(backwards=True, limit=1)
    later = last.timestamp + timedelta(seconds=1)
    store.append_batch(list(generate_events(tail, seed=store.head(), start=later)))
    results = []
    try:
        shapes = query_shapes(store)
        for name in ("count_by_type", "count_by_issue", "get_event_types", "aggregate_by_day"):
            p50, p99 = percentiles(latencies(shapes[name], samples))
            results.append(
                BenchResult(
                    f"query.{name}.tail",
                    p50 * 1e3,
                    "ms",
                    "round_trip",
                    p50 / round_trip,
                    {
                        "p99_ms": round(p99 * 1e3, 3),
                        "samples": samples,
                        "events": events,
                        "unfolded_events": tail,
                    },
                )
            )
    finally:
        store.fold_summaries()
    return results


def _to_event(row: Sequence[Any]) -> SequencedEvent:
    position, event_id, event_type, timestamp, tags, metadata, data, recorded_at, hash_ = row
    return SequencedEvent(
        event_type=event_type,
        data=data,
        tags=tags,
        metadata=metadata,
        event_id=event_id,
        timestamp=timestamp,
        position=position,
        recorded_at=recorded_at,
        hash=hash_,
    )


def default_page(conn: psycopg.Connection[Any], schema: str, events: int) -> Callable[[], object]:
    """A keyset page of 1000 read with psycopg's own row and JSON decoding (json.loads per
    jsonb value): the baseline of the store's decoder."""
    rng = random.Random(5)
    statement = sql.SQL(
        'SELECT position, event_id, event_type, "timestamp", tags, metadata, data, recorded_at,'
        " hash FROM {} WHERE position > %s ORDER BY position LIMIT 1000"
    ).format(sql.Identifier(schema, "events"))

    def page() -> object:
        cur = conn.cursor(binary=True)
        rows = cur.execute(statement, [rng.randrange(max(1, events - 1000))]).fetchall()
        return [_to_event(row) for row in rows]

    return page


def as_json(results: list[BenchResult], **about: Any) -> dict[str, Any]:
    """A machine-readable summary, to compare runs."""
    return {**about, "results": [asdict(r) for r in results]}


# -- streaming and subscriptions ------------------------------------------------------------


def measure_stream(store: EventStore, batch_size: int = 1_000) -> float:
    """Events/s of `EventStore.stream_events` over the whole store."""
    started = time.perf_counter()
    count = sum(1 for _ in store.stream_events(batch_size=batch_size))
    return count / (time.perf_counter() - started)


def measure_cursor(dsn: str, schema: str, itersize: int = 1_000) -> float:
    """Events/s of reading the whole log the way one would by hand: a server-side cursor with
    psycopg's own row and JSON decoding, each row made a `SequencedEvent`. The baseline of
    `measure_stream`."""
    statement = sql.SQL(
        'SELECT position, event_id, event_type, "timestamp", tags, metadata, data, recorded_at,'
        " hash FROM {} ORDER BY position"
    ).format(sql.Identifier(schema, "events"))
    started = time.perf_counter()
    count = 0
    with (
        psycopg.connect(dsn) as conn,
        conn.transaction(),
        conn.cursor("tamma_events_bench", binary=True) as cur,
    ):
        cur.itersize = itersize
        for row in cur.execute(statement):
            _to_event(row)
            count += 1
    return count / (time.perf_counter() - started)


def paced_writer(
    dsn: str, schema: str, rate: float, seconds: float, batch: int
) -> list[tuple[int, float, float]]:
    """Append ``batch`` events at a time, ``rate`` events per second, for ``seconds``; for each
    append, its last position, and `time.monotonic` before it and after its commit returned.
    Run in its own process (``multiprocessing``), so the load does not share the measuring
    process's interpreter."""
    interval = batch / rate
    rounds = int(seconds / interval)
    events = list(generate_events(rounds * batch, seed=23))
    log: list[tuple[int, float, float]] = []
    with EventStore(dsn, schema=schema, migrate=False, cache_size=0) as store:
        start = time.monotonic()
        for k in range(rounds):
            pause = start + k * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            before = time.monotonic()
            last = store.append_batch(events[k * batch : (k + 1) * batch])
            log.append((last, before, time.monotonic()))
    return log


@dataclass
class Delivery:
    """When each position reached a subscriber, and each announced head a raw listener."""

    subscriber: dict[int, float] = field(default_factory=dict)
    notified: dict[int, float] = field(default_factory=dict)


def _delay_percentiles(
    log: list[tuple[int, float, float]],
    first: int,
    received: dict[int, float],
    per_event: bool,
) -> dict[str, float]:
    """p50/p99 (ms) from each append's commit (and from its start) to receipt, per event or per
    append (whose last position a notification carries); the log's first append starts at
    position ``first``."""
    from_commit: list[float] = []
    from_start: list[float] = []
    for last, before, after in log:
        positions = range(first, last + 1) if per_event else (last,)
        for position in positions:
            at = received.get(position)
            if at is not None:
                from_commit.append(at - after)
                from_start.append(at - before)
        first = last + 1
    if not from_commit:
        raise RuntimeError("nothing was received")
    p50, p99 = percentiles(from_commit)
    s50, s99 = percentiles(from_start)
    return {
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "max_ms": max(from_commit) * 1e3,
        "from_append_start_p50_ms": s50 * 1e3,
        "from_append_start_p99_ms": s99 * 1e3,
        "received": len(from_commit),
    }


def measure_delivery(
    store: EventStore, *, rate: float = 10_000, seconds: float = 10.0, batch: int = 100
) -> tuple[dict[str, float], dict[str, float], float]:
    """Delivery latency while another process appends ``rate`` events/s: from each append's
    commit to a `Subscription` handing over each of its events, and to a bare LISTEN connection
    receiving its notification (the floor of any notification-driven delivery), both in this
    process; and the rate the load reached."""
    import multiprocessing

    delivery = Delivery()
    head = store.head()
    subscription = store.subscribe(after=head)
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        row = conn.execute(store._statements.append_channel).fetchone()
    channel = str(row[0]) if row else ""
    listening = threading.Event()
    done = threading.Event()

    def subscribe() -> None:
        for event in subscription:
            delivery.subscriber[event.position] = time.monotonic()

    def listen() -> None:
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            listening.set()
            while not done.is_set():
                for note in conn.notifies(timeout=0.2):
                    delivery.notified[int(note.payload)] = time.monotonic()

    threads = [threading.Thread(target=subscribe), threading.Thread(target=listen)]
    for t in threads:
        t.start()
    # Bounds for a hang, generous for a busy machine: neither is part of what is measured.
    if not listening.wait(120):
        subscription.stop()
        done.set()
        for t in threads:
            t.join()
        raise RuntimeError("the bare listener did not start listening within 120 s")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        log = pool.apply(paced_writer, (store.dsn, store.schema, rate, seconds, batch))
    final = log[-1][0]
    deadline = time.monotonic() + 120
    while subscription.position < final and time.monotonic() < deadline:
        time.sleep(0.05)
    subscription.stop()
    done.set()
    for t in threads:
        t.join()
    if subscription.position < final:
        raise RuntimeError(f"the subscriber stopped at {subscription.position}, not {final}")
    reached = (final - head) / (log[-1][2] - log[0][1])
    return (
        _delay_percentiles(log, head + 1, delivery.subscriber, per_event=True),
        _delay_percentiles(log, head + 1, delivery.notified, per_event=False),
        reached,
    )


def run_stream_suite(
    dsn: str,
    *,
    events: int = 1_000_000,
    rate: float = 10_000,
    seconds: float = 10.0,
    keep: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """Subscription delivery latency under an append load and `stream_events` throughput over
    ``events`` events, each against a baseline measured in the same run."""
    results: list[BenchResult] = []
    progress(f"delivery latency under {rate:,.0f} events/s for {seconds:.0f} s")
    schema = f"bench_s_{uuid.uuid4().hex[:8]}"
    try:
        with EventStore(dsn, schema=schema, cache_size=0) as store:
            subscriber, raw, reached = measure_delivery(store, rate=rate, seconds=seconds)
    finally:
        drop(dsn, schema)
    results.append(
        BenchResult(
            "subscribe.latency_p99",
            subscriber["p99_ms"],
            "ms",
            "listen_notify_p99",
            # p99 against p99: a bare listener's p50 is about zero (the notification often
            # arrives before the writer has seen its own commit return).
            subscriber["p99_ms"] / raw["p99_ms"] if raw["p99_ms"] > 0 else None,
            {
                **{k: round(v, 3) for k, v in subscriber.items()},
                "listen_notify": {k: round(v, 3) for k, v in raw.items()},
                "load_events_per_s": round(reached),
                "target_p99_ms": 50,
            },
        )
    )
    progress(f"loading {events:,} events")
    query_schema = f"bench_q_{events}"
    store = load_query_store(dsn, query_schema, events, progress)
    try:
        progress("stream_events")
        streamed = measure_stream(store)
        progress("server-side cursor")
        cursor = measure_cursor(dsn, query_schema)
    finally:
        store.close()
        if not keep:
            drop(dsn, query_schema)
    results.append(
        BenchResult(
            "stream_events",
            streamed,
            "events/s",
            "psycopg_server_cursor",
            streamed / cursor,
            {"events": events, "cursor_events_per_s": cursor},
        )
    )
    return results


# -- exports and compaction -------------------------------------------------------------------

_EXPORT_STATEMENT = (
    'SELECT position, event_id, event_type, "timestamp", recorded_at, tags, metadata, data, hash'
    " FROM {} ORDER BY position"
)


def measure_export(store: EventStore) -> tuple[int, float]:
    """Events and events/s of `EventStore.export_arrow` over the whole log, every batch taken."""
    started = time.perf_counter()
    count = sum(batch.num_rows for batch in store.export_arrow())
    return count, count / (time.perf_counter() - started)


def measure_copy_to(dsn: str, schema: str) -> tuple[float, float]:
    """Events/s and MB/s of the export's ``COPY ... TO STDOUT (FORMAT BINARY)`` read by psycopg
    and dropped: the transfer without any decoding, the ceiling of `measure_export`."""
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(
        sql.SQL(_EXPORT_STATEMENT).format(sql.Identifier(schema, "events"))
    )
    started = time.perf_counter()
    rows = size = 0
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        with cur.copy(statement) as copy:
            for message in copy:
                rows += 1
                size += len(message)
    elapsed = time.perf_counter() - started
    return (rows - 1) / elapsed, size / elapsed / 1e6


def measure_adbc(dsn: str, schema: str) -> float:
    """Events/s of the ADBC PostgreSQL driver's ``fetch_arrow_table`` for the same columns:
    the baseline of `measure_export` (``adbc-driver-postgresql``, in the test extras)."""
    import adbc_driver_postgresql.dbapi as adbc

    statement = _EXPORT_STATEMENT.format(f'"{schema}".events')
    started = time.perf_counter()
    with adbc.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement)
        count = int(cur.fetch_arrow_table().num_rows)
    return count / (time.perf_counter() - started)


def copy_log(dsn: str, source: str, target: str) -> EventStore:
    """A new store on ``target`` holding the events of ``source`` (same positions, hashes and
    recording times), to compact without touching ``source``."""
    drop(dsn, target)
    store = EventStore(dsn, schema=target, cache_size=0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT * FROM {} ORDER BY position").format(
                    sql.Identifier(target, "events"), sql.Identifier(source, "events")
                )
            )
            conn.execute(
                sql.SQL("UPDATE {} SET position = s.position, hash = s.hash FROM {} s").format(
                    sql.Identifier(target, "head"), sql.Identifier(source, "head")
                )
            )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(target, "events")))
    return store


def relation_bytes(dsn: str, schema: str) -> int:
    """The on-disk size of the events table with its indexes and TOAST."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size(%s::regclass)", [f'"{schema}".events']
        ).fetchone()
    return int(row[0]) if row else 0


def measure_compaction(store: EventStore, archive_dir: str) -> dict[str, float]:
    """Compact all but (about) the newest 1% of ``store``'s events: events/s, and the events table's
    size before, after a VACUUM (space made reusable, not returned), and after a VACUUM FULL
    (space returned to the system)."""
    dsn, schema = store.dsn, store.schema
    head = store.head()
    keep = head // 100
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT recorded_at FROM {} WHERE position = %s").format(
                sql.Identifier(schema, "events")
            ),
            [max(1, head - keep)],
        ).fetchone()
    assert row is not None
    before_bytes = relation_bytes(dsn, schema)
    started = time.perf_counter()
    # Through the append that wrote that event (a log loaded in one batch: all of it).
    moved = store.compact_events(row[0] + timedelta(microseconds=1), archive_dir=archive_dir)
    elapsed = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(schema, "events")))
        vacuumed = relation_bytes(dsn, schema)
        conn.execute(sql.SQL("VACUUM FULL {}").format(sql.Identifier(schema, "events")))
    full = relation_bytes(dsn, schema)
    archive_bytes = sum(
        os.path.getsize(os.path.join(archive_dir, name)) for name in os.listdir(archive_dir)
    )
    return {
        "events": float(moved),
        "events_per_s": moved / elapsed,
        "table_mb_before": before_bytes / 1e6,
        "table_mb_after_vacuum": vacuumed / 1e6,
        "table_mb_after_vacuum_full": full / 1e6,
        "reclaimed_mb": (before_bytes - full) / 1e6,
        "archive_mb": archive_bytes / 1e6,
    }


def run_export_suite(
    dsn: str,
    *,
    events: int = 1_000_000,
    keep: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """`export_arrow` against ADBC and the bare ``COPY TO``, and `compact_events` with the
    space it gives back, over ``events`` events; baselines from the same run."""
    import tempfile

    progress(f"loading {events:,} events")
    query_schema = f"bench_q_{events}"
    store = load_query_store(dsn, query_schema, events, progress)
    try:
        progress("ADBC fetch_arrow_table")
        adbc = measure_adbc(dsn, query_schema)
        progress("COPY TO")
        copy_rate, copy_mb = measure_copy_to(dsn, query_schema)
        progress("export_arrow")
        count, exported = measure_export(store)
        progress("copying the log to compact it")
        compact_store = copy_log(dsn, query_schema, f"{query_schema}_compact")
        try:
            with tempfile.TemporaryDirectory() as directory:
                progress("compact_events")
                figures = measure_compaction(compact_store, directory)
        finally:
            compact_store.close()
            drop(dsn, f"{query_schema}_compact")
    finally:
        store.close()
        if not keep:
            drop(dsn, query_schema)
    return [
        BenchResult(
            "export_arrow",
            exported,
            "events/s",
            "adbc_fetch_arrow_table",
            exported / adbc,
            {
                "events": count,
                "adbc_events_per_s": adbc,
                "copy_to_events_per_s": round(copy_rate),
                "copy_to_mb_per_s": round(copy_mb, 1),
                "ratio_to_copy_to": round(exported / copy_rate, 3),
            },
        ),
        BenchResult(
            "compact_events",
            figures["events_per_s"],
            "events/s",
            None,
            None,
            {k: round(v, 1) for k, v in figures.items()},
        ),
    ]


def measure_read_throughput(
    store: EventStore, *, threads: int, seconds: float, types: Sequence[str]
) -> tuple[float, int]:
    """Queries per second from ``threads`` threads for ``seconds``: a mix of a LIMIT-100 page
    of one event type, a count by type and a first page, as a read-mostly service asks.
    Returns the rate and how many queries ran."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    failures: list[BaseException] = []

    def work(slot: int) -> None:
        n = 0
        try:
            while time.perf_counter() < stop:
                kind = types[n % len(types)]
                store.get_events(EventFilter(event_types=[kind], limit=100))
                store.count_events(EventFilter(event_types=[kind]))
                store.get_page(EventFilter(event_types=[kind]), page_size=100)
                n += 3
        except BaseException as exc:  # reported after the run
            failures.append(exc)
        counts[slot] = n

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return sum(counts) / (time.perf_counter() - started), sum(counts)


def run_replica_suite(
    *,
    events: int = 200_000,
    threads: int = 4,
    seconds: float = 10.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """Read throughput with one streaming replica against the primary alone, in the same run.

    It starts its own embedded primary and a replica of it (`embedded.start_replica`) in a
    temporary directory: a replica needs a primary whose binaries and files are at hand. Both
    servers share this machine's cores, so the figure shows what routing costs and what a
    second server's caches give, not what a second machine would add."""
    import tempfile

    from tamma_events import embedded

    with tempfile.TemporaryDirectory(prefix="tamma-events-replica-bench-") as base:
        progress("starting a primary and a replica")
        primary = embedded.start(Path(base) / "primary", cleanup="delete")
        replica = embedded.start_replica(primary, Path(base) / "replica", port=5439)
        try:
            progress(f"loading {events:,} events")
            store = load_query_store(primary.dsn, "bench_replica", events, progress)
            types = store.get_event_types()
            store.close()
            with psycopg.connect(primary.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
            target = int(row[0]) if row else 0
            deadline = time.monotonic() + 120
            with psycopg.connect(replica.dsn, autocommit=True) as conn:
                while time.monotonic() < deadline:
                    replayed = conn.execute(
                        "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn"
                    ).fetchone()
                    if replayed and int(replayed[0]) >= target:
                        break
                    time.sleep(0.1)
            figures: dict[str, tuple[float, int, dict[str, Any]]] = {}
            for name, options in (
                ("primary", {}),
                ("replica", {"replicas": [replica.dsn]}),
                ("replica_eventual", {"replicas": [replica.dsn], "consistency": "eventual"}),
            ):
                progress(f"reading: {name}")
                with EventStore(
                    primary.dsn,
                    schema="bench_replica",
                    cache_size=0,
                    migrate=False,
                    max_connections=threads + 2,
                    # The replica's first connections may be slow on a busy machine; left out
                    # for that, it would serve none of the timed reads.
                    replica_timeout=10.0,
                    **options,
                ) as reader:
                    measure_read_throughput(reader, threads=threads, seconds=1.0, types=types)
                    rate, count = measure_read_throughput(
                        reader, threads=threads, seconds=seconds, types=types
                    )
                    members = reader.metrics()
                    served = sum(r["reads"] for r in members["replicas"])
                    figures[name] = (
                        rate,
                        count,
                        {"replica_reads": served, "fallbacks": members["replica_fallbacks"]},
                    )
        finally:
            if replica.running:
                replica.stop()
            primary.stop()
    base_rate = figures["primary"][0]
    return [
        BenchResult(
            "reads, primary alone",
            base_rate,
            "queries/s",
            None,
            None,
            {"queries": figures["primary"][1], "threads": threads, "events": events},
        ),
        *(
            BenchResult(
                f"reads, one replica ({'eventual' if 'eventual' in name else 'read your writes'})",
                figures[name][0],
                "queries/s",
                "primary_alone",
                figures[name][0] / base_rate,
                {"queries": figures[name][1], "threads": threads, **figures[name][2]},
            )
            for name in ("replica", "replica_eventual")
        ),
    ]
