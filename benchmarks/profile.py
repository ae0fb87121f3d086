"""Run one measure of the benchmark once, alone, for a profiler to watch.

    perf record -F 999 -a -g -o perf.data -- python benchmarks/profile.py append
    perf report -i perf.data --no-children --sort comm,dso,symbol --stdio
    py-spy record -o verify.svg -- python benchmarks/profile.py verify

Measures: ``append`` (append_batch of generated events, batches of 10k, into a fresh schema),
``encode`` (the codec's prepare and seal of those events, no database), ``verify`` (the hash
chain of a store it loads first; the load's time is printed apart), ``conditional`` (single
conditional appends from one client). The server is ``TAMMA_EVENTS_DSN``, or the embedded one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

from tamma_events import EventStore, embedded
from tamma_events import codec as _codec
from tamma_events.codec import reference as _pycodec
from tamma_events.ops.migrating import drop
from tamma_events.tools.bench import BATCH_DEFAULT, measure_conditional_appends
from tamma_events.tools.workload import generate_events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measure", choices=["append", "encode", "verify", "conditional"])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args(argv)
    dsn = os.environ.get("TAMMA_EVENTS_DSN") or embedded.start(None).dsn
    events = list(generate_events(args.events))
    schema = f"profile_{uuid.uuid4().hex[:8]}"
    try:
        with EventStore(dsn, schema=schema, cache_size=0) as store:
            started = time.perf_counter()
            if args.measure == "encode":
                last, position = _pycodec.GENESIS_HASH, 1
                for i in range(0, len(events), BATCH_DEFAULT):
                    prepared = _codec.prepare(events[i : i + BATCH_DEFAULT])
                    last = _codec.seal(prepared, position, last)
                    position += prepared.count
                done = len(events)
            elif args.measure == "conditional":
                done = min(args.events, 2_000)
                measure_conditional_appends(store, done)
            else:
                if args.measure == "verify":
                    for i in range(0, len(events), BATCH_DEFAULT):
                        store.append_batch(events[i : i + BATCH_DEFAULT])
                    loaded = time.perf_counter() - started
                    print(f"loaded {len(events):,} events in {loaded:.1f} s", file=sys.stderr)
                    started = time.perf_counter()
                    report = store.verify()
                    assert report.ok, report
                else:
                    for i in range(0, len(events), BATCH_DEFAULT):
                        store.append_batch(events[i : i + BATCH_DEFAULT])
                done = len(events)
            elapsed = time.perf_counter() - started
        print(f"{args.measure}: {done:,} in {elapsed:.2f} s, {done / elapsed:,.0f}/s")
    finally:
        drop(dsn, schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
