"""The full benchmark: every figure of the store beside what a user would pick instead, with the
client CPU, server CPU and WAL each measure cost; and the load curve of a long append run.

``tamma-events bench --suite full`` (and ``pytest benchmarks``) run it. Peers:

- **psycopg ``executemany``**: the same rows INSERTed into a table with the store's columns and
  indexes, by hand, the way an application without an event store would write them;
- **eventsourcing**: its PostgreSQL application recorder (``insert_events``) and its DCB
  recorder (``eventsourcing.dcb.postgres_tt``), from the ``bench`` extra. Where that library is
  not installed the peers' rows say so and the rest of the suite runs.

Resource figures come from the operating system (``/proc``) and PostgreSQL's WAL position, so
the server's CPU is known only when it runs on this machine (otherwise it is reported as None).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from tamma_events.codec import reference as _pycodec
from tamma_events.errors import APPEND_CONDITION_FAILED, EventStoreError, StorageError
from tamma_events.model import AppendCondition, DomainEvent, Query
from tamma_events.ops.migrating import drop
from tamma_events.stores.store import EventStore
from tamma_events.tools.bench import (
    BATCH_DEFAULT,
    BenchResult,
    _batches,
    concurrent_rate,
    fresh_ids,
    load_query_store,
    measure_adbc,
    measure_append_batch,
    measure_archive_verify,
    measure_commit_floor,
    measure_concurrent_appends,
    measure_conditional_appends,
    measure_copy_ceiling,
    measure_copy_to,
    measure_delivery,
    measure_encode,
    measure_export,
    measure_read,
    measure_verify,
    run_query_suite,
)
from tamma_events.tools.bench_consumers import consumer_results
from tamma_events.tools.bench_peers import (
    LeanStore,
    measure_lean_conditional,
    measure_lean_threads,
    measure_umadb_batches,
    measure_umadb_conditional,
    measure_umadb_threads,
    umadb_available,
    umadb_server,
)
from tamma_events.tools.bench_reads import measure_bare_chain, read_results
from tamma_events.tools.usage import Usage, measured
from tamma_events.tools.workload import generate_events

__all__ = [
    "measure_async_appends",
    "measure_concurrent_conditional",
    "measure_eventsourcing_application",
    "measure_eventsourcing_dcb",
    "measure_eventsourcing_dcb_conditional",
    "measure_executemany",
    "measure_process_appends",
    "run_full_suite",
    "run_load_curve",
]

#: UmaDB's batches hold at most this many events: a call is one gRPC message, and 10k of these
#: events approach gRPC's default limit of 4 MB.
UMADB_BATCH = 1_000

# -- peers ------------------------------------------------------------------------------------


def measure_executemany(
    dsn: str, events: Sequence[DomainEvent], batch_size: int, schema: str
) -> float:
    """Events/s of psycopg ``executemany`` INSERTs of the same rows, a transaction per batch,
    into a table with the store's columns and index set (no trigger, no chain, no head): what
    writing events by hand costs."""
    with EventStore(dsn, schema=schema, cache_size=0):
        pass  # creates the schema, so the copy has the store's exact columns and indexes
    table = sql.Identifier(schema, "by_hand")
    insert = sql.SQL(
        'INSERT INTO {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    ).format(table)
    zero = bytes(32)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING INDEXES)").format(
                table, sql.Identifier(schema, "events")
            )
        )
        position = 0
        started = time.perf_counter()
        for batch in _batches(events, batch_size):
            rows = []
            for e in batch:
                position += 1
                rows.append(
                    (
                        position,
                        e.event_id,
                        e.event_type,
                        e.timestamp,
                        Jsonb(e.tags),
                        Jsonb(e.metadata),
                        Jsonb(e.data),
                        zero,
                    )
                )
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(insert, rows)
        elapsed = time.perf_counter() - started
    return len(events) / elapsed


@contextmanager
def _search_path(schema: str) -> Iterator[None]:
    """Connections opened inside the block search ``schema`` first (libpq's ``PGOPTIONS``):
    the DCB recorder's foreign key names its table without a schema."""
    before = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = f"-c search_path={schema}"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PGOPTIONS"]
        else:
            os.environ["PGOPTIONS"] = before


@contextmanager
def _eventsourcing_datastore(dsn: str, schema: str) -> Iterator[Any]:
    """An eventsourcing datastore on ``schema`` (created here), closed on leaving; its
    connections search that schema first for as long as it is open."""
    from eventsourcing.postgres import PostgresDatastore

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    with _search_path(schema):
        datastore = PostgresDatastore(
            dbname=str(params.get("dbname", "postgres")),
            host=str(params.get("host", "localhost")),
            port=str(params.get("port", "5432")),
            user=str(params.get("user", "postgres")),
            password=str(params.get("password", "")),
            schema=schema,
            pool_size=2,
            max_overflow=16,
        )
        try:
            yield datastore
        finally:
            datastore.close()


def eventsourcing_available() -> bool:
    try:
        import eventsourcing.dcb.postgres_tt
        import eventsourcing.postgres  # noqa: F401
    except ImportError:
        return False
    return True


#: Events per ``insert_events`` call: that recorder sends one INSERT per event in a psycopg
#: pipeline, and here calls of 3,000 events or more stalled (the server waiting to read the rest
#: of the pipeline), so it gets batches no larger than this.
ES_APPLICATION_BATCH = 1_000


def measure_eventsourcing_application(
    dsn: str, events: Sequence[DomainEvent], batch_size: int, schema: str
) -> float:
    """Events/s of eventsourcing's ``PostgresApplicationRecorder.insert_events``, a batch per
    call (at most `ES_APPLICATION_BATCH`): each issue an aggregate (its versions in order), the
    event's JSON as its state."""
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder

    encode = _codec_json()
    versions: dict[str, int] = {}
    stored = []
    for e in events:
        key = str(e.tags.get("issueId", e.event_type))
        versions[key] = versions.get(key, 0) + 1
        stored.append(
            StoredEvent(
                originator_id=uuid.uuid5(uuid.NAMESPACE_URL, key),
                originator_version=versions[key],
                topic=e.event_type,
                state=encode({"tags": e.tags, "metadata": e.metadata, "data": e.data}),
            )
        )
    with _eventsourcing_datastore(dsn, schema) as datastore:
        recorder = PostgresApplicationRecorder(datastore, events_table_name="stored_events")
        recorder.create_table()
        started = time.perf_counter()
        for batch in _batches(stored, min(batch_size, ES_APPLICATION_BATCH)):
            recorder.insert_events(batch)
        elapsed = time.perf_counter() - started
    return len(events) / elapsed


def _dcb_events(events: Sequence[DomainEvent]) -> list[Any]:
    from eventsourcing.dcb.api import DCBEvent

    encode = _codec_json()
    return [
        DCBEvent(
            type=e.event_type,
            data=encode({"metadata": e.metadata, "data": e.data}),
            tags=[f"{k}:{v}" for k, v in e.tags.items()],
        )
        for e in events
    ]


def measure_eventsourcing_dcb(
    dsn: str, events: Sequence[DomainEvent], batch_size: int, schema: str
) -> float:
    """Events/s of eventsourcing's DCB recorder (``postgres_tt``) appending the same events, a
    batch per unconditional ``append``, tags as ``key:value`` strings."""
    from eventsourcing.dcb.postgres_tt import PostgresDCBRecorderTT

    converted = _dcb_events(events)
    with _eventsourcing_datastore(dsn, schema) as datastore:
        recorder = PostgresDCBRecorderTT(datastore)
        recorder.create_table()
        started = time.perf_counter()
        for batch in _batches(converted, batch_size):
            recorder.append(batch)
        elapsed = time.perf_counter() - started
    return len(events) / elapsed


def measure_eventsourcing_dcb_conditional(dsn: str, count: int, schema: str) -> float:
    """Appends/s of eventsourcing's DCB recorder appending single events under a condition that
    holds (the decision of `tamma_events.tools.bench.measure_conditional_appends`), one client."""
    from eventsourcing.dcb.api import DCBAppendCondition, DCBEvent, DCBQuery, DCBQueryItem
    from eventsourcing.dcb.postgres_tt import PostgresDCBRecorderTT

    with _eventsourcing_datastore(dsn, schema) as datastore:
        recorder = PostgresDCBRecorderTT(datastore)
        recorder.create_table()
        started = time.perf_counter()
        for n in range(count):
            tag = f"issueId:bench-cond-{n}"
            condition = DCBAppendCondition(
                DCBQuery([DCBQueryItem(types=["BenchDecided"], tags=[tag])]), after=None
            )
            recorder.append([DCBEvent("BenchDecided", b'{"n":%d}' % n, [tag])], condition)
        elapsed = time.perf_counter() - started
    return count / elapsed


def _codec_json() -> Callable[[Any], bytes]:
    import msgspec

    return msgspec.json.Encoder(order="sorted").encode


# -- our own measures the other suites do not have --------------------------------------------


def measure_concurrent_conditional(
    store: EventStore, threads: int, per_thread: int
) -> tuple[float, int]:
    """Events/s of single appends from ``threads`` threads at once, each thread deciding about
    its own issue: every append is conditional on no event of that issue after the last one
    the thread appended (read, decide, append). Returns the rate and the false conflicts: the
    appends refused although nothing else writes that issue (there should be none)."""
    salt = uuid.uuid4().hex[:6]
    last = [0] * threads
    conflicts = [0] * threads

    def decide(k: int, n: int) -> None:
        tags = {"issueId": f"bench-{salt}-{k}"}
        condition = AppendCondition(Query.of(types=["BenchDecided"], tags=tags), after=last[k])
        try:
            last[k] = store.append(DomainEvent("BenchDecided", {"n": n}, tags), condition)
        except EventStoreError as exc:
            if exc.code != APPEND_CONDITION_FAILED:
                raise
            conflicts[k] += 1

    return concurrent_rate(threads, per_thread, decide), sum(conflicts)


def measure_async_appends(dsn: str, schema: str, tasks: int, per_task: int) -> float:
    """Events/s of single `AsyncEventStore.append` calls from ``tasks`` tasks of one event loop
    at once, each appending ``per_task`` events in turn."""
    from tamma_events.stores.aio import AsyncEventStore

    async def main() -> float:
        async with AsyncEventStore(dsn, schema=schema, cache_size=0) as store:
            start = asyncio.Event()

            async def task(k: int) -> None:
                await start.wait()
                for n in range(per_task):
                    await store.append(
                        DomainEvent("BenchTicked", {"task": k, "n": n}, {"userId": f"u{k}"})
                    )

            running = [asyncio.ensure_future(task(k)) for k in range(tasks)]
            await asyncio.sleep(0)
            started = time.perf_counter()
            start.set()
            await asyncio.gather(*running)
            return tasks * per_task / (time.perf_counter() - started)

    return asyncio.run(main())


def _process_appends(
    dsn: str, schema: str, threads: int, per_thread: int, ready: Any, go: Any, done: Any
) -> None:
    """One process of `measure_process_appends`: opens the store, says it is ready, waits for
    the start, appends from ``threads`` threads, then says it is done (before closing)."""
    with EventStore(dsn, schema=schema, cache_size=0, max_connections=threads + 2) as store:
        store.append(DomainEvent("BenchWarmed", {}))  # the pool's first connection is open
        ready.release()
        go.wait()
        measure_concurrent_appends(store, threads, per_thread)
        done.release()


def measure_process_appends(
    dsn: str, schema: str, processes: int, threads: int, per_thread: int
) -> tuple[float, bool]:
    """Events/s of single appends from ``processes`` processes of ``threads`` threads each, all
    started at once (each process groups its own threads' appends); and whether the positions
    of the store are gapless afterwards (the count of events equals the head)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready = context.Semaphore(0)
    done = context.Semaphore(0)
    go = context.Event()
    with EventStore(dsn, schema=schema, cache_size=0):
        pass  # created once, before the processes open it
    workers = [
        context.Process(
            target=_process_appends, args=(dsn, schema, threads, per_thread, ready, go, done)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            if not ready.acquire(timeout=300):
                raise StorageError("a benchmark process did not start")
        started = time.perf_counter()
        go.set()
        for _ in workers:
            if not done.acquire(timeout=600):
                raise StorageError("a benchmark process did not finish")
        elapsed = time.perf_counter() - started
        for worker in workers:
            worker.join(600)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
    failed = [worker.exitcode for worker in workers if worker.exitcode != 0]
    if failed:
        raise StorageError(f"benchmark processes failed: exit codes {failed}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(max(position), 0), (SELECT position FROM {}) FROM {}"
            ).format(sql.Identifier(schema, "head"), sql.Identifier(schema, "events"))
        ).fetchone()
    gapless = row is not None and row[0] == row[1] == row[2]
    return processes * threads * per_thread / elapsed, gapless


# -- the suite --------------------------------------------------------------------------------


def _result(
    name: str,
    value: float,
    unit: str,
    usage: Usage | None,
    count: float,
    baseline: str | None = None,
    base_value: float | None = None,
    **detail: Any,
) -> BenchResult:
    if usage is not None:
        detail.update(usage.per(count, unit.split("/")[0].rstrip("s") or "event"))
    ratio = value / base_value if base_value else None
    return BenchResult(name, value, unit, baseline, ratio, detail)


def run_full_suite(
    dsn: str,
    *,
    events: int = 1_000_000,
    append_events: int = 100_000,
    batch_size: int = BATCH_DEFAULT,
    rounds: int = 2,
    conditional: int = 1_000,
    threads: int = 16,
    per_thread: int = 200,
    tasks: int = 256,
    per_task: int = 20,
    processes: int = 4,
    process_threads: int = 4,
    samples: int = 200,
    rate: float = 10_000,
    seconds: float = 10.0,
    keep: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """Every figure of the store on one generated event set, each beside its baseline (a
    ceiling, a peer, or the same work done another way) measured in this run, with the
    resources each measure used. Appends use ``append_events`` events; queries, verify, exports
    and the subscription run over a store of ``events`` events."""
    results: list[BenchResult] = []
    workload = list(generate_events(append_events))
    have_peers = eventsourcing_available()

    # Encode: the native codec against the reference, client CPU only.
    progress("encode")
    sample = workload[: min(len(workload), 50_000)]
    python_rate = measure_encode(_pycodec, sample, batch_size)
    results.append(BenchResult("encode.python", python_rate, "events/s"))
    # The native codec is measured whenever it is built, whichever codec the store uses.
    native = _native_codec()
    if native is not None:
        native_rate = measure_encode(native, sample, batch_size)
        results.append(
            BenchResult(
                "encode.native",
                native_rate,
                "events/s",
                "encode.python",
                native_rate / python_rate,
                {"target_events_per_s": 650_000, "target_ratio": 2.5},
            )
        )

    # Appends: the store against the raw COPY ceiling and against the peers, best of rounds.
    best: dict[str, tuple[float, Usage]] = {}

    def keep_best(name: str, rate_: float, usage: Usage) -> None:
        if name not in best or rate_ > best[name][0]:
            best[name] = (rate_, usage)

    for r in range(rounds):
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            progress(f"raw COPY ceiling, round {r + 1}")
            with measured(dsn) as usage:
                value = measure_copy_ceiling(dsn, workload, batch_size, schema)
            keep_best("copy_ceiling", value, usage)
            progress(f"append_batch, round {r + 1}")
            with EventStore(dsn, schema=schema, cache_size=0) as store:
                with measured(dsn) as usage:
                    value = measure_append_batch(store, fresh_ids(workload, r + 1), batch_size)
                keep_best("append_batch", value, usage)
            progress(f"raw COPY, the store's indexes, round {r + 1}")
            with measured(dsn) as usage:
                value = measure_copy_ceiling(dsn, workload, batch_size, schema, like=schema)
            keep_best("copy_indexed", value, usage)
            drop(dsn, schema)
            progress(f"psycopg executemany, round {r + 1}")
            with measured(dsn) as usage:
                value = measure_executemany(dsn, workload, batch_size, schema)
            keep_best("executemany", value, usage)
            drop(dsn, schema)
            if have_peers:
                progress(f"eventsourcing application recorder, round {r + 1}")
                with measured(dsn) as usage:
                    value = measure_eventsourcing_application(dsn, workload, batch_size, schema)
                keep_best("eventsourcing.application", value, usage)
                drop(dsn, schema)
                progress(f"eventsourcing DCB recorder, round {r + 1}")
                with measured(dsn) as usage:
                    value = measure_eventsourcing_dcb(dsn, workload, batch_size, schema)
                keep_best("eventsourcing.dcb", value, usage)
        finally:
            drop(dsn, schema)
    append_rate, append_usage = best["append_batch"]
    ceiling, ceiling_usage = best["copy_ceiling"]
    results.append(
        _result(
            "append_batch",
            append_rate,
            "events/s",
            append_usage,
            append_events,
            "copy_ceiling",
            ceiling,
            batch_size=batch_size,
            events=append_events,
            target_ratio=0.4,
        )
    )
    results.append(_result("copy_ceiling", ceiling, "events/s", ceiling_usage, append_events))
    indexed, indexed_usage = best["copy_indexed"]
    results.append(
        _result(
            "copy_indexed",
            indexed,
            "events/s",
            indexed_usage,
            append_events,
            what="raw binary COPY into a table with the store's indexes, no trigger",
        )
    )
    results.append(
        BenchResult(
            "append_batch.vs.copy_indexed",
            append_rate,
            "events/s",
            "copy_indexed",
            append_rate / indexed,
            {"target_ratio": 0.9},
        )
    )
    peers = [("executemany", "psycopg executemany, same indexes")]
    if have_peers:
        peers += [
            ("eventsourcing.application", "PostgresApplicationRecorder.insert_events"),
            ("eventsourcing.dcb", "eventsourcing.dcb.postgres_tt append"),
        ]
    for name, what in peers:
        value, usage = best[name]
        results.append(_result(name, value, "events/s", usage, append_events, what=what))
        results.append(
            BenchResult(
                f"append_batch.vs.{name}", append_rate, "events/s", name, append_rate / value
            )
        )
    if not have_peers:
        results.append(
            BenchResult(
                "eventsourcing",
                0.0,
                "events/s",
                detail={
                    "skipped": "eventsourcing is not installed (pip install tamma-events[bench])"
                },
            )
        )

    # Single appends: one client under conditions, 16 threads, tasks and processes, against the
    # commit floor, the lean baseline of the same design and the peers.
    progress("single-row durable commits")
    floor_schema = f"bench_{uuid.uuid4().hex[:10]}"
    with measured(dsn) as usage:
        floor = measure_commit_floor(dsn, min(conditional, 1_000), floor_schema)
    results.append(_result("commit_floor", floor, "commits/s", usage, min(conditional, 1_000)))
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    lean_schema = f"{schema}_lean"
    try:
        with EventStore(dsn, schema=schema, cache_size=0, max_connections=threads + 2) as store:
            lean = LeanStore(dsn, lean_schema, like=schema)
            try:
                progress("conditional appends, one client")
                with measured(dsn) as usage:
                    cond = measure_conditional_appends(store, conditional, uuid.uuid4().hex[:6])
                progress("lean baseline: conditional appends, one client")
                with measured(dsn) as lean_usage:
                    lean_cond = measure_lean_conditional(lean, conditional, uuid.uuid4().hex[:6])
                progress(f"single appends, {threads} threads")
                with measured(dsn) as plain_usage:
                    plain = measure_concurrent_appends(store, threads, per_thread)
                progress(f"lean baseline: single appends, {threads} threads")
                with measured(dsn) as lean_threads_usage:
                    lean_plain, lean_group = measure_lean_threads(lean, threads, per_thread)
            finally:
                lean.close()
            results.append(
                _result(
                    "append.conditional",
                    cond,
                    "appends/s",
                    usage,
                    conditional,
                    "lean.conditional",
                    lean_cond,
                    target_ratio=0.9,
                    ratio_to_commit_floor=round(cond / floor, 3),
                )
            )
            results.append(
                _result("lean.conditional", lean_cond, "appends/s", lean_usage, conditional)
            )
            results.append(
                _result(
                    "append.threads",
                    plain,
                    "events/s",
                    plain_usage,
                    threads * per_thread,
                    "lean.threads",
                    lean_plain,
                    threads=threads,
                    target_ratio=1.5,
                    ratio_to_commit_floor=round(plain / floor, 3),
                )
            )
            results.append(
                _result(
                    "lean.threads",
                    lean_plain,
                    "events/s",
                    lean_threads_usage,
                    threads * per_thread,
                    threads=threads,
                    events_per_group=round(lean_group, 2),
                )
            )
            progress(f"conditional appends, {threads} threads")
            with measured(dsn) as usage:
                threaded, conflicts = measure_concurrent_conditional(store, threads, per_thread)
            results.append(
                _result(
                    "append.conditional.threads",
                    threaded,
                    "events/s",
                    usage,
                    threads * per_thread,
                    "commit_floor",
                    floor,
                    threads=threads,
                    false_conflicts=conflicts,
                    target_ratio=2.0,
                )
            )
    finally:
        drop(dsn, schema)
        drop(dsn, lean_schema)
    progress(f"async single appends, {tasks} tasks")
    async_schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        with measured(dsn) as usage:
            tasked = measure_async_appends(dsn, async_schema, tasks, per_task)
    finally:
        drop(dsn, async_schema)
    results.append(
        _result(
            "append.async_tasks",
            tasked,
            "events/s",
            usage,
            tasks * per_task,
            "commit_floor",
            floor,
            tasks=tasks,
            target_ratio=4.0,
        )
    )
    progress(f"single appends, {processes} processes of {process_threads} threads")
    process_schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        with measured(dsn) as usage:
            spread, gapless = measure_process_appends(
                dsn, process_schema, processes, process_threads, per_thread
            )
    finally:
        drop(dsn, process_schema)
    results.append(
        _result(
            "append.processes",
            spread,
            "events/s",
            usage,
            processes * process_threads * per_thread,
            "commit_floor",
            floor,
            processes=processes,
            threads=process_threads,
            gapless=gapless,
            target_ratio=3.0,
        )
    )
    if have_peers:
        progress("eventsourcing DCB conditional appends")
        es_schema = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            with measured(dsn) as usage:
                es_cond = measure_eventsourcing_dcb_conditional(dsn, conditional, es_schema)
        finally:
            drop(dsn, es_schema)
        results.append(
            _result("eventsourcing.dcb.conditional", es_cond, "appends/s", usage, conditional)
        )
        results.append(
            BenchResult(
                "append.conditional.vs.eventsourcing.dcb",
                cond,
                "appends/s",
                "eventsourcing.dcb.conditional",
                cond / es_cond,
                {"target_ratio": 3.0},
            )
        )
    if umadb_available():
        uma_batch = min(batch_size, UMADB_BATCH)
        with umadb_server() as url:
            progress("UmaDB conditional appends, one client")
            with measured(dsn) as usage:
                uma_cond = measure_umadb_conditional(url, conditional, uuid.uuid4().hex[:6])
            results.append(_result("umadb.conditional", uma_cond, "appends/s", usage, conditional))
            progress(f"UmaDB single appends, {threads} clients")
            with measured(dsn) as usage:
                uma_threads = measure_umadb_threads(url, threads, per_thread)
            results.append(
                _result(
                    "umadb.threads",
                    uma_threads,
                    "events/s",
                    usage,
                    threads * per_thread,
                    threads=threads,
                )
            )
            progress(f"UmaDB batches of {uma_batch}")
            with measured(dsn) as usage:
                uma_batches = measure_umadb_batches(url, workload, uma_batch)
            results.append(
                _result(
                    "umadb.batches",
                    uma_batches,
                    "events/s",
                    usage,
                    len(workload),
                    batch_size=uma_batch,
                )
            )
        for name, value, base, base_value, target in (
            ("append.conditional.vs.umadb", cond, "umadb.conditional", uma_cond, 1.0),
            ("append.threads.vs.umadb", plain, "umadb.threads", uma_threads, 2.0),
            ("append_batch.vs.umadb", append_rate, "umadb.batches", uma_batches, None),
        ):
            results.append(
                BenchResult(
                    name,
                    value,
                    "events/s" if "conditional" not in name else "appends/s",
                    base,
                    value / base_value,
                    {"target_ratio": target} if target else {},
                )
            )
    else:
        results.append(
            BenchResult(
                "umadb",
                0.0,
                "events/s",
                detail={"skipped": "UmaDB is not installed (pip install tamma-events[bench])"},
            )
        )

    # The large store: loading, queries, verify, exports, subscription latency.
    query_schema = f"bench_q_{events}"
    progress(f"loading {events:,} events into {query_schema}")
    loads: list[bool] = []  # whether the events were appended now, not reused
    with measured(dsn) as usage:
        store = load_query_store(dsn, query_schema, events, progress, lambda: loads.append(True))
    loaded_fresh = bool(loads)
    try:
        if loaded_fresh:
            results.append(
                _result(
                    "load",
                    events / usage.wall_s,
                    "events/s",
                    usage,
                    events,
                    note="append_batch of 10k-event batches, then VACUUM ANALYZE",
                )
            )
        # The load's dirty pages are flushed first, so that the checkpoint does not land in
        # the query timings (as it would not on a store that has been serving for a while).
        _checkpoint(dsn)
        results.extend(
            run_query_suite(dsn, events=events, samples=samples, schema=query_schema, keep=True)
        )
        progress("verify")
        with measured(dsn) as usage:
            verified = measure_verify(store)
        progress("bare COPY of the chain's rows (the baseline of verify)")
        with measured(dsn) as bare_usage:
            bare_rate = measure_bare_chain(dsn, query_schema, store.head())
        results.append(
            _result(
                "verify",
                verified,
                "events/s",
                usage,
                events,
                "copy_to.chain",
                bare_rate,
                target=500_000,
                target_ratio=1.0,
            )
        )
        results.append(_result("copy_to.chain", bare_rate, "events/s", bare_usage, events))
        progress("verify of an archive file")
        with tempfile.TemporaryDirectory(prefix="tamma-bench-") as directory:
            with measured(dsn) as usage:
                archived, parquet_read, archive_events = measure_archive_verify(
                    store, Path(directory)
                )
        results.append(
            _result(
                "verify.archive",
                archived,
                "events/s",
                usage,
                archive_events,
                "parquet_read",
                parquet_read,
                note="the hash chain over one archive file's row groups, against reading them",
            )
        )
        results.append(_result("parquet_read", parquet_read, "events/s", None, archive_events))
        progress("read")
        with measured(dsn) as read_usage:
            read_rate = measure_read(store, batch_size)
        results.append(_result("read", read_rate, "events/s", read_usage, events))
        progress("ADBC fetch_arrow_table")
        with measured(dsn) as usage:
            adbc = measure_adbc(dsn, query_schema)
        results.append(_result("adbc_fetch_arrow_table", adbc, "events/s", usage, events))
        progress("COPY TO")
        with measured(dsn) as usage:
            copy_rate, copy_mb = measure_copy_to(dsn, query_schema)
        results.append(
            _result("copy_to", copy_rate, "events/s", usage, events, mb_per_s=round(copy_mb, 1))
        )
        progress("export_arrow")
        with measured(dsn) as usage:
            _, exported = measure_export(store)
        results.append(
            _result(
                "export_arrow",
                exported,
                "events/s",
                usage,
                events,
                "adbc_fetch_arrow_table",
                adbc,
                ratio_to_copy_to=round(exported / copy_rate, 3),
                target_ratio=1.0,
            )
        )
        results.extend(read_results(store, dsn, samples, progress))
        results.extend(consumer_results(store, progress, _result))
    finally:
        store.close()
        if not keep:
            drop(dsn, query_schema)
    progress(f"subscription latency under {rate:,.0f} events/s")
    stream_schema = f"bench_s_{uuid.uuid4().hex[:8]}"
    try:
        with EventStore(dsn, schema=stream_schema, cache_size=0) as live:
            with measured(dsn) as usage:
                subscriber, raw, reached = measure_delivery(live, rate=rate, seconds=seconds)
    finally:
        drop(dsn, stream_schema)
    results.append(
        _result(
            "subscribe.latency_p99",
            subscriber["p99_ms"],
            "ms",
            None,
            0,
            "listen_notify_p99",
            raw["p99_ms"] if raw["p99_ms"] > 0 else None,
            p50_ms=round(subscriber["p50_ms"], 3),
            listen_notify_p99_ms=round(raw["p99_ms"], 3),
            load_events_per_s=round(reached),
            target_p99_ms=50,
            **usage.per(max(1.0, reached * seconds)),
        )
    )
    return results


def _native_codec() -> Any:
    try:
        from tamma_events import _native
    except ImportError:
        return None
    return _native


def _checkpoint(dsn: str) -> None:
    """A CHECKPOINT, when this role may run one (superusers and pg_checkpoint members)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass


# -- the load curve ---------------------------------------------------------------------------


def run_load_curve(
    dsn: str,
    *,
    events: int = 10_000_000,
    slice_events: int = 1_000_000,
    batch_size: int = BATCH_DEFAULT,
    schema: str | None = None,
    keep: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[BenchResult]:
    """Append ``events`` generated events with `append_batch` and report the rate of each slice
    of ``slice_events`` against the first slice's, with the resources each slice used: a log
    that grows must not slow its appends down (target: the last slice at least 0.8 of the first).
    """
    schema = schema or f"bench_load_{uuid.uuid4().hex[:8]}"
    drop(dsn, schema)
    results: list[BenchResult] = []
    first: float | None = None
    try:
        with EventStore(dsn, schema=schema, cache_size=0) as store:
            done = 0
            number = 0
            stream = generate_events(events)
            while done < events:
                number += 1
                # Generated before the clock starts: the curve is of the appends alone.
                chunk = list(itertools.islice(stream, slice_events))
                size = len(chunk)
                with measured(dsn) as usage:
                    for batch in _batches(chunk, batch_size):
                        store.append_batch(batch)
                del chunk
                done += size
                rate = size / usage.wall_s
                first = first or rate
                progress(f"slice {number}: {done:,} events, {rate:,.0f} events/s")
                results.append(
                    _result(
                        f"load.slice_{number}",
                        rate,
                        "events/s",
                        usage,
                        size,
                        "load.slice_1",
                        first,
                        through=done,
                    )
                )
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pg_total_relation_size(%s::regclass)", [f'"{schema}".events']
                ).fetchone()
            if results and row:
                results[-1].detail["table_mb"] = round(int(row[0]) / 1e6)
    finally:
        if not keep:
            drop(dsn, schema)
    return results
