"""A worker of a durable consumer, run as a process of its own by the tests that kill them
(``tests/test_consumer_processes.py``) and by ``tests/test_model.py``.

    python tests/_consumer_worker.py DSN SCHEMA NAME WORKER [options]

Its handler writes one row per event to ``SCHEMA.projection`` (``seq`` in the order written,
``position``, ``issue``, ``worker``): in the consumer's transaction (``--mode tx``, exactly
once), or on a connection of its own after the fact (``--mode plain``, at least once). It pauses
``--pause`` seconds in each batch, after writing, and stops for good once it has written the
event at ``--stall-at`` (saying ``stalled``), so a kill lands inside a batch. The event at
``--poison`` fails while ``SCHEMA.poison_switch`` holds a row. SIGTERM stops the worker
cleanly; it prints ``running`` once it has started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import psycopg
from psycopg import sql

from tamma_events import EventStore, SequencedEvent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    for name in ("dsn", "schema", "name", "worker"):
        parser.add_argument(name)
    parser.add_argument("--mode", choices=["tx", "plain"], default="tx")
    parser.add_argument("--partition-by")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--poison", type=int)
    parser.add_argument("--stall-at", type=int)
    args = parser.parse_args(argv)
    projection = sql.Identifier(args.schema, "projection")
    switch = sql.Identifier(args.schema, "poison_switch")
    insert = sql.SQL("INSERT INTO {} (position, issue, worker) VALUES (%s, %s, %s)").format(
        projection
    )
    own = psycopg.connect(args.dsn, autocommit=True)

    def poisoned(event: SequencedEvent, conn: Any) -> bool:
        if event.position != args.poison:
            return False
        return conn.execute(sql.SQL("SELECT 1 FROM {}").format(switch)).fetchone() is not None

    def write(events: list[SequencedEvent], conn: Any) -> None:
        for event in events:
            if poisoned(event, conn):
                raise ValueError(f"event {event.position} is poison")
            conn.execute(insert, [event.position, event.tags.get("issueId"), args.worker])
            if event.position == args.stall_at:
                print("stalled", flush=True)  # in the middle of a batch, until killed
                time.sleep(3600)
        time.sleep(args.pause)

    with EventStore(args.dsn, schema=args.schema, migrate=False, max_connections=4) as store:
        consumer = store.consumer(
            args.name,
            partition_by=args.partition_by,
            partitions=args.partitions,
            batch_size=args.batch,
            lease_time=args.lease,
            max_attempts=2,
            retry_delay=0.05,
            worker=args.worker,
        )
        signal.signal(signal.SIGTERM, lambda number, frame: consumer.stop())
        print("running", flush=True)
        if args.mode == "tx":
            consumer.run(lambda events, tx: write(events, tx.connection), transactional=True)
        else:
            consumer.run(lambda events: write(events, own))
    own.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
