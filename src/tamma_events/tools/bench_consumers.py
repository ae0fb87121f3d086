"""The durable consumers' figures of the full suite, each against a baseline of the same run:

- ``consumer``: one worker of a consumer of every event, from the beginning to the head, with a
  handler that does nothing, against ``stream_events`` of the same log (its checkpoint and its
  lease are the difference);
- ``consumer.transactional``: a projection (one ``INSERT ... SELECT unnest(...)`` per batch)
  run by a transactional consumer over the last events of the log, against the same handler
  run in a transaction per batch of the same events read by ``read``, with no checkpoint;
- ``consumer.takeover``: the seconds from a worker's SIGKILL until another holds all of its
  partitions, against the lease time.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from tamma_events.model import SequencedEvent
from tamma_events.stores.store import EventStore, Transaction

__all__ = ["consumer_results"]

#: Events the projection figures use (the last ones of the log).
PROJECTED = 100_000
BATCH = 500
#: The lease of the takeover figure, and its partitions.
LEASE = 2.0
PARTITIONS = 8
#: How long the takeover figure waits for a worker before it gives up.
DEADLINE = 120.0


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def measure_consumer(store: EventStore) -> tuple[float, float, int]:
    """Events/s of a consumer of every event, and of ``stream_events``, over the same log."""
    name = _unique("bench")
    count = [0]

    def take(events: list[SequencedEvent]) -> None:
        count[0] += len(events)

    started = time.perf_counter()
    store.consumer(name, batch_size=BATCH).run(take, until_idle=True)
    consumed = count[0] / (time.perf_counter() - started)
    store.drop_consumer(name)
    started = time.perf_counter()
    streamed = sum(1 for _ in store.stream_events())
    stream_rate = streamed / (time.perf_counter() - started)
    return consumed, stream_rate, count[0]


def measure_projection(store: EventStore, count: int) -> tuple[float, float, int]:
    """Events/s of a projection over the last ``count`` events: by a transactional consumer,
    and by the same handler in a transaction per batch read by ``read`` (no checkpoint)."""
    table = sql.Identifier(store.schema, _unique("bench_projection"))
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (position bigint, kind text)").format(table))
    insert = sql.SQL("INSERT INTO {} SELECT * FROM unnest(%s::bigint[], %s::text[])").format(table)

    def project(events: list[SequencedEvent], tx: Transaction) -> None:
        tx.connection.execute(
            insert, [[e.position for e in events], [e.event_type for e in events]]
        )

    head = store.head()
    start = max(0, head - count)
    try:
        name = _unique("bench-projection")
        started = time.perf_counter()
        store.consumer(name, start=start, batch_size=BATCH).run(
            project, transactional=True, until_idle=True
        )
        projected = (head - start) / (time.perf_counter() - started)
        store.drop_consumer(name)
        started = time.perf_counter()
        after = start
        while after < head:
            batch = store.read(after=after, limit=BATCH).events
            if not batch:
                break
            with store.transaction() as tx:
                project(list(batch), tx)
            after = batch[-1].position
        bare = (head - start) / (time.perf_counter() - started)
    finally:
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    return projected, bare, head - start


def _hold(dsn: str, schema: str, name: str) -> None:
    """A worker that takes every partition of consumer ``name`` and blocks in its handler:
    the process the takeover figure kills."""
    with EventStore(dsn, schema=schema, migrate=False, max_connections=4) as store:
        store.consumer(
            name, partition_by="issueId", partitions=PARTITIONS, lease_time=LEASE, worker="held"
        ).run(lambda events: time.sleep(DEADLINE))


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the takeover figure timed out waiting for {what}")
        time.sleep(0.01)


def measure_takeover(store: EventStore) -> float:
    """Seconds from the SIGKILL of the worker holding every partition of a consumer until
    another worker holds them all."""
    name = _unique("bench-takeover")
    holder = multiprocessing.get_context("spawn").Process(
        target=_hold, args=(store.dsn, store.schema, name), daemon=True
    )
    holder.start()
    try:

        def held() -> bool:
            if not holder.is_alive():
                raise RuntimeError(f"the takeover figure's worker exited ({holder.exitcode})")
            found = store.consumers(name)
            return bool(found) and all(p.owner == "held" for p in found[0].partitions)

        _wait(held, "the first worker to hold every partition")
        holder.kill()
        killed = time.perf_counter()
        holder.join(DEADLINE)
        heir = store.consumer(
            name, partition_by="issueId", partitions=PARTITIONS, lease_time=LEASE, worker="heir"
        )
        taken: list[float] = []

        def take(events: list[SequencedEvent]) -> None:
            if not taken and len(heir.owned) == PARTITIONS:
                taken.append(time.perf_counter())
                heir.stop()

        runner = threading.Thread(target=heir.run, args=(take,), daemon=True)
        runner.start()
        _wait(lambda: len(heir.owned) == PARTITIONS or bool(taken), "the takeover")
        seconds = (taken[0] if taken else time.perf_counter()) - killed
        heir.stop()
        runner.join(DEADLINE)
    finally:
        if holder.is_alive():
            holder.kill()
        if store.consumers(name):
            store.drop_consumer(name, force=True)
    return seconds


def consumer_results(
    store: EventStore, progress: Callable[[str], None], result: Callable[..., Any]
) -> list[Any]:
    """The three figures, made by ``result(name, value, unit, usage, count, baseline,
    base_value, **detail)`` (the suite's `_result`)."""
    results = []
    progress("a durable consumer against stream_events")
    consumed, streamed, count = measure_consumer(store)
    results.append(result("consumer.stream_events", streamed, "events/s", None, count))
    results.append(
        result(
            "consumer",
            consumed,
            "events/s",
            None,
            count,
            "consumer.stream_events",
            streamed,
            batch_size=BATCH,
            target_ratio=0.8,
        )
    )
    progress("a transactional projection against the same handler without a checkpoint")
    projected, bare, count = measure_projection(store, PROJECTED)
    results.append(result("projection.no_checkpoint", bare, "events/s", None, count))
    results.append(
        result(
            "consumer.transactional",
            projected,
            "events/s",
            None,
            count,
            "projection.no_checkpoint",
            bare,
            batch_size=BATCH,
            target_ratio=0.8,
        )
    )
    progress("taking over a killed worker's partitions")
    seconds = measure_takeover(store)
    results.append(result("consumer.lease_time", LEASE, "s", None, 1))
    results.append(
        result(
            "consumer.takeover",
            seconds,
            "s",
            None,
            1,
            "consumer.lease_time",
            LEASE,
            partitions=PARTITIONS,
        )
    )
    return results
