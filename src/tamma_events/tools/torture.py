"""Concurrency torture: the scenarios of the dcb.events test suite, run against a real server.

- ``consistency``: workers append for a while, each with a random DCB query (0 to 3 items, each
  with 0 to 4 types and 0 to 3 tags from a small universe, so queries overlap often) and the
  condition "nothing matching it after the last matching position I read". Afterwards an oracle
  replays the log and checks every attempt: an accepted append's condition held at its commit
  (no matching event between its ``after`` and its own first position), a rejected one really
  conflicted (a matching event between its ``after`` and the head its error reported), and the
  log holds exactly the events of the accepted appends, at the positions they were given.
- ``monotonic``: writers append batches while one reader follows the whole log with a
  subscription; the reader must see strictly increasing positions, every one of them, up to the
  final head: nothing skipped, repeated or reordered, whatever order commits raced in.
- ``parallel``: workers append conditionally on disjoint tags; none may be rejected (0% false
  conflicts).

The workers are threads in several processes (``processes``), each process with a store of its
own, so appends race both through one store's group commit and between stores. Each worker
tries at least one append, and goes on until the scenario's time is up and, when ``run`` is
given minimums (``min_accepted``, ``min_rejected``), until the workers together have reached
them, or ``max_seconds`` have passed (a bound for a hang: a test asks for the races it needs
instead of counting what a busy machine managed in a fixed time). ``run`` returns a
`TortureReport` with the counts (attempted, accepted, rejected, violations, false conflicts).
``tamma-events torture`` runs a scenario from the command line; the tests run short ones, and
``docs/reliability.md`` records long runs.
"""

from __future__ import annotations

import bisect
import multiprocessing
import queue
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tamma_events.errors import APPEND_CONDITION_FAILED, EventStoreError
from tamma_events.model import AppendCondition, DomainEvent, Query, QueryItem
from tamma_events.ops.migrating import drop
from tamma_events.stores.store import EventStore

__all__ = ["SCENARIOS", "TortureReport", "check_log", "run"]

SCENARIOS = ("consistency", "monotonic", "parallel")

#: The universe random queries and events draw from: small, so that queries overlap often.
TYPES = ("CourseDefined", "StudentSubscribed", "CourseRenamed", "CapacityChanged", "Left")
TAGS = {
    "course": ("c1", "c2", "c3"),
    "student": ("s1", "s2", "s3", "s4"),
    "term": ("t1", "t2"),
}

#: How long a process waits for its siblings to be ready, or the reader to catch up.
WAIT = 120.0

# An attempt, as the workers report it: (worker, items, after, events, outcome, first, last,
# head, error). ``items`` are (types, tags) pairs; ``events`` (id, type, tags) triples;
# ``outcome`` "accepted", "rejected" or "failed" (an error other than a conflict). ``items`` is
# None for an append without a condition.
Attempt = tuple[
    int,
    "list[tuple[list[str], dict[str, str]]] | None",
    "int | None",
    list[tuple[str, str, dict[str, str]]],
    str,
    int,
    int,
    int,
    str,
]


@dataclass
class TortureReport:
    """What a scenario did, and what its oracle found."""

    scenario: str
    workers: int
    processes: int
    seconds: float
    #: Appends tried, accepted, rejected for their condition, and failed otherwise.
    attempted: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    #: Events in the log at the end.
    events: int = 0
    #: Rejections that no event justified (a subset of the violations' count when > 0).
    false_conflicts: int = 0
    #: Each broken invariant, described (at most 50 kept; `violation_count` counts all).
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    #: Scenario-specific counts (the reader's deliveries, for ``monotonic``).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.violation_count == 0 and self.failed == 0

    def violation(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 50:
            self.violations.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def run(
    scenario: str,
    dsn: str | None = None,
    *,
    schema: str | None = None,
    seconds: float = 30.0,
    workers: int = 20,
    processes: int = 4,
    seed: int | None = None,
    keep: bool = False,
    min_accepted: int = 0,
    min_rejected: int = 0,
    max_seconds: float | None = None,
) -> TortureReport:
    """Run ``scenario`` (one of `SCENARIOS`) for ``seconds`` with ``workers`` threads spread
    over ``processes`` processes, on a fresh store in ``schema`` (default: a new
    ``torture_<random>`` schema, dropped afterwards unless ``keep``), then check the log.
    Without ``dsn``: ``$TAMMA_EVENTS_DSN``, else the embedded server.

    Every worker tries at least one append. After ``seconds`` the workers go on until, all
    together, ``min_accepted`` appends were accepted and ``min_rejected`` rejected, but stop
    after ``max_seconds`` (default ``seconds`` + 120) whatever the counts: the report then
    shows a minimum not reached."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if workers < 1 or processes < 1 or seconds <= 0:
        raise ValueError("workers, processes and seconds must be positive")
    if min_accepted < 0 or min_rejected < 0:
        raise ValueError("min_accepted and min_rejected must not be negative")
    max_seconds = seconds + WAIT if max_seconds is None else max_seconds
    if max_seconds < seconds:
        raise ValueError("max_seconds must be at least seconds")
    processes = min(processes, workers)
    own_schema = schema is None
    name = schema or f"torture_{uuid.uuid4().hex[:12]}"
    seed = random.randrange(2**32) if seed is None else seed
    report = TortureReport(scenario, workers, processes, seconds)
    report.details["seed"] = seed
    with EventStore(dsn, schema=name) as store:
        dsn = store.dsn
        try:
            pace = _Pace(seconds, max_seconds, min_accepted, min_rejected)
            attempts, deliveries = _run_workers(scenario, dsn, name, pace, workers, processes, seed)
            check_log(store, attempts, report, deliveries)
        finally:
            if own_schema and not keep:
                store.close()
                drop(dsn, name)
    return report


@dataclass
class _Pace:
    """When the workers stop: not before ``seconds``, then once the minimums are reached, and
    at ``max_seconds`` whatever the counts. The counts are shared by all the processes."""

    seconds: float
    max_seconds: float
    min_accepted: int
    min_rejected: int
    accepted: Any = None
    rejected: Any = None
    deadline: float = 0.0
    limit: float = 0.0

    def share(self, ctx: Any) -> None:
        """Give the counts to the processes ``ctx`` starts (before they start)."""
        self.accepted = ctx.Value("q", 0)
        self.rejected = ctx.Value("q", 0)

    def start(self) -> None:
        """Start the clock: the workers are about to begin."""
        now = time.monotonic()
        self.deadline = now + self.seconds
        self.limit = now + self.max_seconds

    def go_on(self, attempt: Attempt) -> bool:
        """Count ``attempt``; whether its worker should try another."""
        outcome = attempt[4]
        if outcome in ("accepted", "rejected"):
            counter = self.accepted if outcome == "accepted" else self.rejected
            with counter.get_lock():
                counter.value += 1
        now = time.monotonic()
        if now >= self.limit:
            return False
        return (
            now < self.deadline
            or self.accepted.value < self.min_accepted
            or self.rejected.value < self.min_rejected
        )


def _spread(workers: int, processes: int) -> list[list[int]]:
    """The worker numbers of each process."""
    return [list(range(p, workers, processes)) for p in range(processes)]


def _run_workers(
    scenario: str,
    dsn: str,
    schema: str,
    pace: _Pace,
    workers: int,
    processes: int,
    seed: int,
) -> tuple[list[Attempt], list[tuple[int, str]] | None]:
    """Run the worker processes (and, for ``monotonic``, the reader's), all starting together;
    returns the attempts and the reader's deliveries."""
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    reading = scenario == "monotonic"
    barrier = ctx.Barrier(processes + reading)
    final: Any = ctx.Value("q", -1)
    pace.share(ctx)
    children = [
        ctx.Process(
            target=_process,
            args=(scenario, dsn, schema, numbers, pace, seed, barrier, results),
            daemon=True,
        )
        for numbers in _spread(workers, processes)
    ]
    if reading:
        children.append(
            ctx.Process(target=_reader, args=(dsn, schema, barrier, final, results), daemon=True)
        )
    for child in children:
        child.start()
    attempts: list[Attempt] = []
    deliveries: list[tuple[int, str]] | None = None
    errors: list[str] = []
    try:
        for _ in range(processes):
            kind, payload = results.get(timeout=pace.max_seconds + WAIT)
            if kind == "error":
                errors.append(payload)
            elif kind == "attempts":
                attempts.extend(payload)
            else:
                deliveries = payload
        if reading and not errors:
            # The writers are done: the reader stops once it has delivered up to this head.
            with EventStore(dsn, schema=schema, migrate=False, max_connections=1) as store:
                final.value = store.head()
            while deliveries is None:
                kind, payload = results.get(timeout=WAIT)
                if kind == "error":
                    errors.append(payload)
                    break
                deliveries = payload
    except queue.Empty:
        errors.append("a torture process did not report in time")
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    if errors:
        raise RuntimeError("torture processes failed:\n" + "\n".join(errors))
    return attempts, deliveries


def _process(
    scenario: str,
    dsn: str,
    schema: str,
    numbers: list[int],
    pace: _Pace,
    seed: int,
    barrier: Any,
    results: Any,
) -> None:
    """One worker process: a store of its own, one thread per worker number."""
    try:
        with EventStore(
            dsn, schema=schema, migrate=False, max_connections=len(numbers) + 1
        ) as store:
            store.head()
            barrier.wait(WAIT)
            pace.start()
            found: list[list[Attempt]] = [[] for _ in numbers]
            loop = _LOOPS[scenario]
            threads = [
                threading.Thread(
                    target=loop,
                    args=(store, number, random.Random(seed * 1_000 + number), pace, out),
                )
                for number, out in zip(numbers, found, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    except BaseException:
        barrier.abort()
        results.put(("error", traceback.format_exc()))
        return
    results.put(("attempts", [attempt for out in found for attempt in out]))


def _random_tags(rng: random.Random, count: int) -> dict[str, str]:
    keys = rng.sample(sorted(TAGS), count)
    return {key: rng.choice(TAGS[key]) for key in keys}


def _random_query(rng: random.Random) -> Query:
    items = []
    for _ in range(rng.randint(0, 3)):
        types = rng.sample(TYPES, rng.randint(0, 4))
        items.append(QueryItem(types, _random_tags(rng, rng.randint(0, 3))))
    return Query(items)


def _random_events(
    rng: random.Random, worker: int, tags: dict[str, str] | None
) -> list[DomainEvent]:
    return [
        DomainEvent(
            rng.choice(TYPES),
            {"worker": worker},
            tags if tags is not None else _random_tags(rng, rng.randint(0, 3)),
        )
        for _ in range(rng.randint(1, 3))
    ]


def _attempt(
    store: EventStore,
    worker: int,
    events: list[DomainEvent],
    query: Query | None,
    after: int | None,
) -> Attempt:
    """Append ``events`` (with the condition "nothing matching ``query`` after ``after``" when
    ``query`` is given) and describe what happened."""
    items = None if query is None else [(list(i.types), dict(i.tags)) for i in query.items]
    described = [(str(e.event_id), e.event_type, dict(e.tags)) for e in events]
    condition = None if query is None else AppendCondition(query, after)
    try:
        last = store.append_batch(events, condition)
    except EventStoreError as exc:
        if exc.code == APPEND_CONDITION_FAILED:
            return (worker, items, after, described, "rejected", 0, 0, exc.context["head"], "")
        return (worker, items, after, described, "failed", 0, 0, 0, str(exc))
    return (worker, items, after, described, "accepted", last - len(events) + 1, last, 0, "")


def _last_matching(store: EventStore, query: Query) -> int | None:
    newest = store.read(query, backwards=True, limit=1)
    return newest[0].position if newest else None


# Each loop asks the pace after an attempt, not before: a worker whose thread started late (on
# a busy machine, after the time was up) still tries once.


def _consistency_loop(
    store: EventStore, worker: int, rng: random.Random, pace: _Pace, out: list[Attempt]
) -> None:
    while True:
        query = _random_query(rng)
        after = _last_matching(store, query)
        out.append(_attempt(store, worker, _random_events(rng, worker, None), query, after))
        if not pace.go_on(out[-1]):
            return


def _parallel_loop(
    store: EventStore, worker: int, rng: random.Random, pace: _Pace, out: list[Attempt]
) -> None:
    tags = {"worker": f"w{worker}"}
    query = Query.of(tags=tags)
    while True:
        after = _last_matching(store, query)
        out.append(_attempt(store, worker, _random_events(rng, worker, tags), query, after))
        if not pace.go_on(out[-1]):
            return


def _writer_loop(
    store: EventStore, worker: int, rng: random.Random, pace: _Pace, out: list[Attempt]
) -> None:
    while True:
        out.append(_attempt(store, worker, _random_events(rng, worker, None), None, None))
        if not pace.go_on(out[-1]):
            return


_LOOPS: dict[str, Callable[[EventStore, int, random.Random, _Pace, list[Attempt]], None]] = {
    "consistency": _consistency_loop,
    "parallel": _parallel_loop,
    "monotonic": _writer_loop,
}


def _reader(dsn: str, schema: str, barrier: Any, final: Any, results: Any) -> None:
    """The ``monotonic`` reader: subscribes to the whole log before the writers start, and
    reports every (position, id) delivered once it has reached the ``final`` head."""
    try:
        delivered: list[tuple[int, str]] = []
        with EventStore(dsn, schema=schema, migrate=False, max_connections=2) as store:
            with store.subscribe(after=0, poll_interval=1.0) as subscription:
                barrier.wait(WAIT)
                stopper = threading.Thread(
                    target=_stop_at_final, args=(subscription, final), daemon=True
                )
                stopper.start()
                for event in subscription:
                    delivered.append((event.position, str(event.event_id)))
                stopper.join()
    except BaseException:
        barrier.abort()
        results.put(("error", traceback.format_exc()))
        return
    results.put(("deliveries", delivered))


def _stop_at_final(subscription: Any, final: Any) -> None:
    """Stop ``subscription`` once it has delivered the ``final`` head (or `WAIT` seconds after
    that head is known, so that a reader that missed events still reports them)."""
    known: float | None = None
    while not subscription.stopped:
        target = final.value
        if target >= 0:
            known = known or time.monotonic()
            if subscription.position >= target or time.monotonic() - known > WAIT / 2:
                subscription.stop()
                return
        time.sleep(0.02)


def check_log(
    store: EventStore,
    attempts: Iterable[Attempt],
    report: TortureReport,
    deliveries: list[tuple[int, str]] | None = None,
) -> None:
    """The oracle: replay the log and check every attempt, and the reader's deliveries, against
    it; counts and violations go into ``report``."""
    log = [(e.position, str(e.event_id), e.event_type, dict(e.tags)) for e in store.read()]
    report.events = len(log)
    for expected, (position, *_rest) in enumerate(log, start=1):
        if position != expected:
            report.violation(f"the log has position {position} where {expected} belongs")
            break
    at = {event_id: index for index, (_p, event_id, _t, _g) in enumerate(log)}
    matching = _Matcher(log)
    owned: set[str] = set()
    for attempt in attempts:
        worker, items, after, events, outcome, first, _last, head, _error = attempt
        report.attempted += 1
        owned.update(event_id for event_id, _t, _g in events)
        present = [at.get(event_id) for event_id, _t, _g in events]
        query = None if items is None else Query([QueryItem(t, g) for t, g in items])
        if outcome == "accepted":
            report.accepted += 1
            for offset, ((event_id, event_type, tags), index) in enumerate(
                zip(events, present, strict=True)
            ):
                if index is None or log[index][:4] != (first + offset, event_id, event_type, tags):
                    report.violation(
                        f"worker {worker}: event {event_id} of an accepted append "
                        f"is not at position {first + offset} as it was appended"
                    )
            if query is not None and matching.any(query, after or 0, first - 1):
                report.violation(
                    f"worker {worker}: an append at {first} was accepted although "
                    f"an event matching its condition exists after {after}"
                )
        elif outcome == "rejected":
            report.rejected += 1
            if any(index is not None for index in present):
                report.violation(f"worker {worker}: a rejected append wrote events")
            if query is None or not matching.any(query, after or 0, head):
                report.false_conflicts += 1
                report.violation(
                    f"worker {worker}: an append was rejected although no event "
                    f"matching its condition exists after {after} up to {head}"
                )
            elif report.scenario == "parallel":
                report.violation(f"worker {worker}: a conflict on disjoint tags")
        else:
            report.failed += 1
            if any(index is None for index in present) and any(i is not None for i in present):
                report.violation(f"worker {worker}: a failed append left part of its events")
    strays = [event_id for _p, event_id, _t, _g in log if event_id not in owned]
    if strays:
        report.violation(f"{len(strays)} events in the log come from no attempt, {strays[0]} first")
    if deliveries is not None:
        _check_deliveries(deliveries, log, report)


def _check_deliveries(
    deliveries: list[tuple[int, str]],
    log: list[tuple[int, str, str, dict[str, str]]],
    report: TortureReport,
) -> None:
    report.details["delivered"] = len(deliveries)
    previous = 0
    for position, event_id in deliveries:
        if position <= previous:
            report.violation(f"the reader got position {position} after {previous}")
        elif position != previous + 1:
            report.violation(f"the reader skipped from {previous} to {position}")
        if not 1 <= position <= len(log) or log[position - 1][1] != event_id:
            report.violation(f"the reader got event {event_id} at {position}, not the log's")
        previous = max(previous, position)
    if previous < len(log):
        report.violation(f"the reader stopped at {previous} of {len(log)}")


class _Matcher:
    """Answers "does an event matching this query sit at a position in (low, high]?" over the
    log, by the log's (type, tags) signatures, each with its sorted positions."""

    def __init__(self, log: list[tuple[int, str, str, dict[str, str]]]) -> None:
        by_signature: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
        for position, _id, event_type, tags in log:
            key = (event_type, tuple(sorted(tags.items())))
            by_signature.setdefault(key, []).append(position)
        self._signatures = by_signature
        self._cache: dict[str, list[list[int]]] = {}

    def any(self, query: Query, low: int, high: int) -> bool:
        key = repr(query)
        lists = self._cache.get(key)
        if lists is None:
            lists = [
                positions
                for (event_type, tags), positions in self._signatures.items()
                if query.matches(event_type, dict(tags))
            ]
            self._cache[key] = lists
        for positions in lists:
            index = bisect.bisect_right(positions, low)
            if index < len(positions) and positions[index] <= high:
                return True
        return False
