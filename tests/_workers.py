"""Code that runs in child processes of the concurrency and atomicity tests.

The functions are targets for ``multiprocessing`` with the ``spawn`` start method (so they live
in an importable module); ``python tests/_workers.py bulk DSN SCHEMA COUNT`` is the client that
the SIGKILL test kills in the middle of one large ``append_batch``. Each child opens its own
`EventStore` on the DSN and schema it is given, and reports back through a queue or stdout.
"""

from __future__ import annotations

import sys
import traceback
import uuid
from typing import Any

from tamma_events import (
    APPEND_CONDITION_FAILED,
    AppendCondition,
    DomainEvent,
    EventStore,
    EventStoreError,
    Query,
)

#: How long a child waits at a barrier before giving up (a sibling died).
BARRIER_TIMEOUT = 120.0

#: The boundary the racing processes all claim.
RACE_TAGS = {"boundary": "race"}


def race_rounds(
    dsn: str, schema: str, worker: int, rounds: int, barrier: Any, results: Any
) -> None:
    """Each round: read the boundary, wait until every racer has read, then append with the
    condition built from the read. Puts ``(worker, [(round, position | None), ...])`` on
    ``results``, or ``(worker, "error: ...")``."""
    outcomes: list[tuple[int, int | None]] = []
    try:
        query = Query.of(tags=RACE_TAGS)
        with EventStore(dsn, schema=schema, migrate=False, max_connections=2) as store:
            for round_ in range(rounds):
                barrier.wait(BARRIER_TIMEOUT)
                seen = store.read(query)
                barrier.wait(BARRIER_TIMEOUT)
                event = DomainEvent("Claimed", {"round": round_, "worker": worker}, RACE_TAGS)
                try:
                    position = store.append(event, AppendCondition(query, after=seen.head))
                except EventStoreError as exc:
                    if exc.code != APPEND_CONDITION_FAILED:
                        raise
                    outcomes.append((round_, None))
                else:
                    outcomes.append((round_, position))
    except BaseException:
        barrier.abort()
        results.put((worker, "error: " + traceback.format_exc()))
        return
    results.put((worker, outcomes))


def append_batches(
    dsn: str,
    schema: str,
    worker: int,
    batches: list[list[str]],
    chunk_events: int,
    barrier: Any,
    results: Any,
) -> None:
    """Append one batch per list of event ids (a list of one through ``append``), after every
    appender has reached the barrier. Puts ``(worker, [last position, ...])`` on ``results``."""
    try:
        with EventStore(
            dsn, schema=schema, migrate=False, max_connections=2, chunk_events=chunk_events
        ) as store:
            barrier.wait(BARRIER_TIMEOUT)
            lasts: list[int] = []
            for number, ids in enumerate(batches):
                events = [
                    DomainEvent(
                        "Appended",
                        {"worker": worker, "batch": number, "i": i},
                        {"worker": str(worker)},
                        event_id=uuid.UUID(event_id),
                    )
                    for i, event_id in enumerate(ids)
                ]
                if len(events) == 1:
                    lasts.append(store.append(events[0]))
                else:
                    lasts.append(store.append_batch(events))
    except BaseException:
        barrier.abort()
        results.put((worker, "error: " + traceback.format_exc()))
        return
    results.put((worker, lasts))


def bulk(dsn: str, schema: str, count: int) -> None:
    """Build ``count`` small events, say ``ready``, then append them in ONE ``append_batch``."""
    events = [DomainEvent("Bulk", {"i": i}) for i in range(count)]
    with EventStore(dsn, schema=schema, migrate=False, max_connections=1) as store:
        store.head()  # the connection is up before we say ready
        print("ready", flush=True)
        last = store.append_batch(events)
        print(f"done {last}", flush=True)


def append_one(dsn: str, schema: str, event_type: str, tags: dict[str, str], results: Any) -> None:
    """Append one event of ``event_type`` with ``tags`` from a store of this process's own.
    Puts ``("appended", position)`` on ``results``, or ``("error", traceback)``."""
    try:
        with EventStore(dsn, schema=schema, migrate=False, max_connections=1) as store:
            position = store.append(DomainEvent(event_type, {"from": "child"}, tags))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    results.put(("appended", position))


def open_and_append(
    dsn: str, schema: str, worker: int, kind: str, count: int, barrier: Any, results: Any
) -> None:
    """Open a store on ``schema`` (migrating it, as a store does by default) at the same moment
    as the other workers, a sync `EventStore` or an `AsyncEventStore` by ``kind``, and append
    ``count`` events one by one. Puts ``(worker, [position, ...])`` on ``results``, or
    ``(worker, "error: ...")``."""
    import asyncio

    from tamma_events.stores.aio import AsyncEventStore

    def event(i: int) -> DomainEvent:
        return DomainEvent("Opened", {"worker": worker, "i": i}, {"worker": str(worker)})

    async def run_async() -> list[int]:
        barrier.wait(BARRIER_TIMEOUT)
        async with AsyncEventStore(dsn, schema=schema, max_connections=2) as store:
            return [await store.append(event(i)) for i in range(count)]

    try:
        if kind == "async":
            positions = asyncio.run(run_async())
        else:
            barrier.wait(BARRIER_TIMEOUT)
            with EventStore(dsn, schema=schema, max_connections=2) as store:
                positions = [store.append(event(i)) for i in range(count)]
    except BaseException:
        barrier.abort()
        results.put((worker, "error: " + traceback.format_exc()))
        return
    results.put((worker, positions))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command != "bulk":
        raise SystemExit(f"unknown command {command!r}")
    bulk(args[0], args[1], int(args[2]))
