"""The query result cache, in the store and on its own (`tamma_events.ops.cache.QueryCache`).

In the store: hits and misses per query method, read-your-writes, invalidation by another
process's append, expiry, the LRU bound, the cache turned off, and results that callers may
mutate without changing what the next (cached) call returns. On its own: get/put against the
head, expiry, the entry and byte bounds, clear and stats. Nothing asserts on durations and
nothing sleeps: expiry runs on a fake clock, and every other cache keeps its entries for an hour,
so that no hit asserted here depends on how long a busy machine takes between a put and a get.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

import _workers
from tamma_events import (
    AggregateRow,
    CacheStats,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    QueryCache,
)

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT = 120.0
BASE = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)
TYPES = ("IssueOpened", "IssueClosed", "IssueCommented")
PROVIDERS = ("github", "gitlab")
#: A time to live no test outlives (the default, 5 s, a busy machine can).
LONG_TTL = 3600.0


def fill(store: EventStore, count: int = 24) -> None:
    store.append_batch(
        [
            DomainEvent(
                TYPES[i % 3],
                {"i": i, "nested": {"list": [i, i + 1]}},
                {"provider": PROVIDERS[i % 2], "issueId": f"I-{i % 5}"},
                {"source": "fill"},
                timestamp=BASE + timedelta(minutes=i),
            )
            for i in range(count)
        ]
    )


@pytest.fixture
def store(make_store: Callable[..., EventStore]) -> EventStore:
    """A store whose cache entries do not expire during a test (expiry has its own tests)."""
    return make_store(cache_ttl=LONG_TTL)


@pytest.fixture
def filled(store: EventStore) -> EventStore:
    fill(store)
    return store


class Counter:
    """Hits and misses since the last `take`."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.last = store.cache_stats()

    def take(self) -> tuple[int, int]:
        now = self.store.cache_stats()
        hits, misses = now.hits - self.last.hits, now.misses - self.last.misses
        self.last = now
        return hits, misses


HIT = (1, 0)
MISS = (0, 1)


class FakeClock:
    """A `time.monotonic` stand-in that moves only when told: expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


#: Per query method: a question, and (where the method takes one) a different question.
QUERIES: dict[str, tuple[Callable[[EventStore], Any], Callable[[EventStore], Any] | None]] = {
    "get_events": (
        lambda s: s.get_events(EventFilter(providers=["github"])),
        lambda s: s.get_events(EventFilter(providers=["gitlab"])),
    ),
    "count_events": (
        lambda s: s.count_events(EventFilter(event_types=["IssueOpened"])),
        lambda s: s.count_events(EventFilter(event_types=["IssueOpened", "IssueClosed"])),
    ),
    "aggregate": (
        lambda s: s.aggregate(EventFilter(providers=["github"]), "event_type"),
        lambda s: s.aggregate(EventFilter(providers=["github"]), "tag", tag_key="issueId"),
    ),
    "get_tags": (lambda s: s.get_tags(), None),
    "get_event_types": (lambda s: s.get_event_types(), None),
}


def questions(store: EventStore, event_filter: EventFilter) -> list[Callable[[], Any]]:
    """One call of each cached method about ``event_filter``."""
    return [
        lambda: store.get_events(event_filter),
        lambda: store.count_events(event_filter),
        lambda: store.aggregate(event_filter),
        lambda: store.get_tags(),
        lambda: store.get_event_types(),
    ]


# -- hits and misses -------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(QUERIES))
def test_a_repeated_query_is_a_hit_and_another_one_a_miss(filled: EventStore, method: str) -> None:
    ask, ask_other = QUERIES[method]
    counter = Counter(filled)
    first = ask(filled)
    assert counter.take() == MISS
    assert ask(filled) == first
    assert counter.take() == HIT
    assert ask(filled) == first
    assert counter.take() == HIT
    if ask_other is not None:
        other = ask_other(filled)
        assert counter.take() == MISS
        assert other != first
        assert ask_other(filled) == other
        assert counter.take() == HIT
        assert ask(filled) == first  # the first entry is still there
        assert counter.take() == HIT
    assert filled.cache_stats().entries == (2 if ask_other is not None else 1)
    assert filled.cache_stats().bytes > 0


def test_each_method_and_question_has_its_own_entry(filled: EventStore) -> None:
    counter = Counter(filled)
    github = EventFilter(providers=["github"])
    filled.get_events(github)
    filled.count_events(github)  # the same filter, another method
    filled.aggregate(github)
    filled.aggregate(github, "tag", tag_key="provider")
    filled.aggregate(github, "tag", tag_key="issueId")
    filled.aggregate(github, "day")
    filled.get_events(EventFilter(providers=["github"], order_direction="desc"))
    filled.get_events(EventFilter(providers=["github"], limit=3))
    filled.get_events(EventFilter(providers=["github"], limit=3, offset=2))
    assert counter.take() == (0, 9)
    assert filled.cache_stats().entries == 9


def test_paged_variants_answer_right(filled: EventStore) -> None:
    github = EventFilter(providers=["github"])
    everything = filled.get_events(github)
    assert len(everything) == 12
    assert filled.get_events(EventFilter(providers=["github"], limit=3)) == everything[:3]
    assert (
        filled.get_events(EventFilter(providers=["github"], limit=3, offset=2)) == everything[2:5]
    )
    assert filled.get_events(EventFilter(providers=["github"], order_direction="desc")) == list(
        reversed(everything)
    )
    # counts of the same filter share one entry: limit and offset apply after the cache
    counter = Counter(filled)
    assert filled.count_events(github) == 12
    assert counter.take() == MISS
    assert filled.count_events(EventFilter(providers=["github"], limit=5)) == 5
    assert filled.count_events(EventFilter(providers=["github"], offset=10)) == 2
    assert filled.count_events(EventFilter(providers=["github"], offset=20)) == 0
    assert filled.count_events(EventFilter(providers=["github"], limit=0)) == 0
    assert counter.take() == (4, 0)


# -- the cache is never stale ----------------------------------------------------------------


def test_read_your_writes(filled: EventStore) -> None:
    github = EventFilter(providers=["github"])
    asks = questions(filled, github)
    asks[2:2] = [lambda: filled.count_events()]
    asks[4:4] = [lambda: filled.aggregate(None, "tag", tag_key="provider")]
    before = [ask() for ask in asks]
    counter = Counter(filled)
    assert [ask() for ask in asks] == before
    assert counter.take() == (len(asks), 0)

    event = DomainEvent("PrMerged", {"new": True}, {"provider": "github", "prId": "P-1"})
    position = filled.append(event)
    events, count, total, by_type, by_provider, tags, types = [ask() for ask in asks]
    assert counter.take() == (0, len(asks))

    assert events[-1].event_id == event.event_id and events[-1].position == position
    assert events[:-1] == before[0]
    assert count == before[1] + 1
    assert total == before[2] + 1 == position
    assert [row.key for row in by_type] == sorted([*TYPES, "PrMerged"])
    assert {row.key: row.count for row in by_provider}["github"] == 13
    assert tags["prId"] == ["P-1"]
    assert "PrMerged" in types
    # and the new answers are cached in turn
    assert [ask() for ask in asks] == [events, count, total, by_type, by_provider, tags, types]
    assert counter.take() == (len(asks), 0)


def test_a_batch_and_a_transaction_are_seen_too(filled: EventStore) -> None:
    counter = Counter(filled)
    assert filled.count_events() == 24
    filled.append_batch([DomainEvent("Batched", {"k": k}) for k in range(5)])
    assert filled.count_events() == 29
    with filled.transaction() as tx:
        tx.append(DomainEvent("InTransaction"))
    assert filled.count_events() == 30
    assert filled.get_event_types() == sorted([*TYPES, "Batched", "InTransaction"])
    assert counter.take() == (0, 4)


def test_an_append_by_another_process_is_seen(filled: EventStore, pg_dsn: str) -> None:
    asks = questions(filled, EventFilter(providers=["github"]))
    before = [ask() for ask in asks]
    counter = Counter(filled)
    assert [ask() for ask in asks] == before
    assert counter.take() == (len(asks), 0)

    results = SPAWN.Queue()
    child = SPAWN.Process(
        target=_workers.append_one,
        args=(pg_dsn, filled.schema, "FromChild", {"provider": "github", "userId": "kid"}, results),
        daemon=True,
    )
    child.start()
    outcome, detail = results.get(timeout=JOIN_TIMEOUT)
    child.join(JOIN_TIMEOUT)
    assert outcome == "appended", detail
    assert child.exitcode == 0
    assert detail == 25

    events, count, by_type, tags, types = [ask() for ask in asks]
    assert counter.take() == (0, len(asks))
    assert events[-1].event_type == "FromChild" and events[-1].position == 25
    assert events[-1].data == {"from": "child"}
    assert count == before[1] + 1
    assert {row.key: row.count for row in by_type}["FromChild"] == 1
    assert tags["userId"] == ["kid"]
    assert "FromChild" in types


def test_threads_appending_and_querying_always_see_their_own_events(store: EventStore) -> None:
    workers = 6
    rounds = 15
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers, timeout=60)

    def work(worker: int) -> None:
        try:
            mine = EventFilter(user_ids=[f"u{worker}"])
            barrier.wait()
            for round_ in range(rounds):
                event = DomainEvent(f"Worker{worker}", {"round": round_}, {"userId": f"u{worker}"})
                position = store.append(event)
                own = store.get_events(mine)
                assert [e.data["round"] for e in own] == list(range(round_ + 1))
                assert own[-1].position == position
                assert store.count_events(mine) == round_ + 1
                assert store.count_events() >= position
                assert f"Worker{worker}" in store.get_event_types()
                assert f"u{worker}" in store.get_tags()["userId"]
                # a query every thread asks, so that entries are shared and replaced
                shared = store.get_events(EventFilter(limit=1, order_direction="desc"))
                assert shared[0].position >= position
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]
    assert store.count_events() == workers * rounds
    counter = Counter(store)
    assert store.count_events() == workers * rounds
    assert counter.take() == HIT


# -- expiry, bounds, off ---------------------------------------------------------------------


def test_entries_expire_after_the_ttl(make_store: Callable[..., EventStore]) -> None:
    store = make_store(cache_ttl=10)
    clock = FakeClock()
    store.cache.clock = clock  # the store's cache measures its time to live on it
    fill(store, 6)
    counter = Counter(store)
    first = store.get_events()
    assert counter.take() == MISS
    assert store.get_events() == first
    assert counter.take() == HIT
    clock.advance(9)  # (whole seconds: the sums are exact)
    assert store.get_events() == first  # not expired yet
    assert counter.take() == HIT
    clock.advance(1)  # the entry is now exactly cache_ttl old: expired
    assert store.get_events() == first
    assert counter.take() == MISS
    assert store.get_events() == first  # cached again
    assert counter.take() == HIT
    assert store.cache_stats().entries == 1


def test_the_least_recently_used_entry_goes_first(make_store: Callable[..., EventStore]) -> None:
    store = make_store(cache_size=2, cache_ttl=LONG_TTL)
    fill(store, 9)
    q1, q2, q3 = (
        lambda t=t: store.get_events(EventFilter(event_types=[t]))  # type: ignore[misc]
        for t in TYPES
    )
    counter = Counter(store)
    expected = [q1(), q2(), q3()]  # the third evicts q1
    assert counter.take() == (0, 3)
    assert store.cache_stats().evictions == 1
    assert q1() == expected[0]  # evicted: a miss, and it evicts q2
    assert counter.take() == MISS
    assert store.cache_stats().evictions == 2
    assert q3() == expected[2]  # still there, and now the most recent
    assert counter.take() == HIT
    assert q2() == expected[1]  # evicted; it evicts q1, the least recently used
    assert counter.take() == MISS
    assert q3() == expected[2]
    assert counter.take() == HIT
    assert q1() == expected[0]
    assert counter.take() == MISS
    stats = store.cache_stats()
    assert stats.evictions == 4
    assert stats.entries == 2


@pytest.mark.parametrize("settings", [{"cache_size": 0}, {"cache_ttl": 0}])
def test_a_cache_turned_off_never_hits_and_answers_right(
    make_store: Callable[..., EventStore], settings: dict[str, Any]
) -> None:
    store = make_store(**settings)
    assert not store.cache.enabled
    fill(store, 6)
    for round_ in range(3):
        for method, (ask, ask_other) in QUERIES.items():
            assert ask(store) == ask(store), method
            if ask_other is not None:
                assert ask_other(store) == ask_other(store), method
        total = 6 + round_
        assert store.count_events() == total
        assert len(store.get_events()) == total
        assert store.get_events()[-1].position == total
        store.append(DomainEvent(f"Round{round_}", {}, {"round": str(round_)}))
        assert store.count_events() == total + 1
        assert f"Round{round_}" in store.get_event_types()
        assert store.get_tags()["round"] == [str(r) for r in range(round_ + 1)]
    assert store.cache_stats() == CacheStats(0, 0, 0, 0, 0)


@pytest.mark.parametrize("settings", [{"cache_size": -1}, {"cache_ttl": -0.5}])
def test_negative_cache_settings_are_an_event_store_error(
    make_store: Callable[..., EventStore], settings: dict[str, Any]
) -> None:
    """Every failure a caller can see is an EventStoreError (errors.py)."""
    with pytest.raises(EventStoreError):
        make_store(**settings)


# -- returned objects are the caller's -------------------------------------------------------


def test_mutating_returned_events_does_not_change_the_cache(filled: EventStore) -> None:
    github = EventFilter(providers=["github"])
    first = filled.get_events(github)
    snapshot = msgspec.json.encode(first)
    counter = Counter(filled)
    returned = filled.get_events(github)
    assert counter.take() == HIT
    returned[0].data["i"] = "changed"
    returned[0].data["nested"]["list"].append(99)
    returned[0].tags["provider"] = "changed"
    returned[0].metadata["source"] = "changed"
    returned[1].data.clear()
    returned.append(returned[0])
    returned.reverse()
    again = filled.get_events(github)
    assert counter.take() == HIT
    assert msgspec.json.encode(again) == snapshot
    assert again is not returned and again[0] is not returned[-1]
    # the first result too is the caller's own
    first.clear()
    assert msgspec.json.encode(filled.get_events(github)) == snapshot


def test_mutating_returned_tags_types_and_rows_does_not_change_the_cache(
    filled: EventStore,
) -> None:
    tags = filled.get_tags()
    types = filled.get_event_types()
    rows = filled.aggregate(None, "tag", tag_key="provider")
    saved = (msgspec.json.encode(tags), list(types), list(rows))
    counter = Counter(filled)

    tags["provider"].append("bogus")
    tags["issueId"].clear()
    tags["invented"] = ["x"]
    del tags["provider"]
    types.append("Bogus")
    types.sort(reverse=True)
    rows.append(AggregateRow("bogus", 1, BASE, BASE))
    rows.reverse()

    assert msgspec.json.encode(filled.get_tags()) == saved[0]
    assert filled.get_event_types() == saved[1] == sorted(TYPES)
    assert filled.aggregate(None, "tag", tag_key="provider") == saved[2]
    assert counter.take() == (3, 0)
    # a second round of mutation, on values that came from hits
    hit_tags = filled.get_tags()
    hit_tags["provider"][0] = "mutated"
    assert filled.get_tags()["provider"] == sorted(PROVIDERS)


# -- QueryCache on its own -------------------------------------------------------------------


def test_query_cache_get_and_put() -> None:
    cache = QueryCache(max_entries=10, ttl=LONG_TTL, max_bytes=1000)
    assert cache.enabled
    assert cache.get("k", 1) is None
    assert cache.stats() == CacheStats(0, 1, 0, 0, 0)
    cache.put("k", 1, ["v"], 10)
    assert cache.get("k", 1) == ["v"]
    assert cache.stats() == CacheStats(1, 1, 0, 1, 10)
    # falsy answers are answers
    cache.put(("count", 1), 1, 0, 8)
    cache.put(("events", 2), 1, [], 8)
    cache.put(("text",), 1, "", 8)
    assert cache.get(("count", 1), 1) == 0
    assert cache.get(("events", 2), 1) == []
    assert cache.get(("text",), 1) == ""
    assert cache.stats() == CacheStats(4, 1, 0, 4, 34)
    # replacing an entry does not count its size twice
    cache.put("k", 1, ["w"], 20)
    assert cache.get("k", 1) == ["w"]
    assert cache.stats() == CacheStats(5, 1, 0, 4, 44)


@pytest.mark.parametrize("head", [0, 4, 6, 1 << 40])
def test_query_cache_serves_an_entry_only_at_its_head(head: int) -> None:
    cache = QueryCache(ttl=LONG_TTL)
    cache.put("k", 5, "v", 3)
    assert cache.get("k", head) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (0, 1, 0, 0)
    # the stale entry is gone: even its own head misses now
    assert cache.get("k", 5) is None
    cache.put("k", head, "w", 3)
    assert cache.get("k", head) == "w"
    assert cache.stats().hits == 1


def test_query_cache_entries_expire() -> None:
    clock = FakeClock()
    cache = QueryCache(ttl=10, clock=clock)
    cache.put("k", 1, "v", 1)
    assert cache.get("k", 1) == "v"
    clock.advance(9)
    assert cache.get("k", 1) == "v"  # a hit does not extend the lifetime
    clock.advance(1)
    assert cache.get("k", 1) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 1, 0, 0)
    cache.put("k", 1, "v2", 1)  # a new entry gets a new lifetime
    clock.advance(9)
    assert cache.get("k", 1) == "v2"
    clock.advance(1)
    assert cache.get("k", 1) is None


def test_query_cache_measures_the_ttl_on_the_monotonic_clock_by_default() -> None:
    assert QueryCache().clock is time.monotonic


def test_query_cache_entry_bound_is_lru() -> None:
    cache = QueryCache(max_entries=3, ttl=LONG_TTL)
    for key in "abc":
        cache.put(key, 1, key.upper(), 1)
    assert cache.get("a", 1) == "A"  # a is now the most recent; b the least
    cache.put("d", 1, "D", 1)
    assert cache.get("b", 1) is None
    assert [cache.get(key, 1) for key in "acd"] == ["A", "C", "D"]
    cache.put("e", 1, "E", 1)  # evicts a (c, d were used after it)
    assert cache.get("a", 1) is None
    stats = cache.stats()
    assert stats.evictions == 2
    assert stats.entries == 3
    assert stats.bytes == 3


def test_query_cache_byte_bound() -> None:
    cache = QueryCache(max_entries=100, ttl=LONG_TTL, max_bytes=100)
    cache.put("a", 1, "A", 40)
    cache.put("b", 1, "B", 40)
    cache.put("c", 1, "C", 40)  # 120 bytes: a goes
    assert cache.get("a", 1) is None
    assert cache.stats().bytes == 80
    assert cache.stats().evictions == 1
    cache.put("big", 1, "X", 101)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("big", 1) is None
    assert cache.stats().entries == 2 and cache.stats().evictions == 1
    cache.put("full", 1, "F", 100)  # exactly the bound: stored alone
    assert cache.get("full", 1) == "F"
    assert cache.get("b", 1) is None and cache.get("c", 1) is None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (1, 100, 3)


def test_query_cache_clear_forgets_entries_and_counters() -> None:
    cache = QueryCache(ttl=LONG_TTL)
    cache.put("a", 1, "A", 5)
    cache.get("a", 1)
    cache.get("b", 1)
    assert cache.stats() == CacheStats(1, 1, 0, 1, 5)
    cache.clear()
    assert cache.stats() == CacheStats(0, 0, 0, 0, 0)
    assert cache.get("a", 1) is None
    cache.put("a", 1, "A", 5)
    assert cache.get("a", 1) == "A"


@pytest.mark.parametrize(
    "limits", [{"max_entries": 0}, {"ttl": 0}, {"max_bytes": 0}], ids=lambda d: next(iter(d))
)
def test_query_cache_with_a_zero_limit_is_off(limits: dict[str, Any]) -> None:
    cache = QueryCache(**limits)
    assert not cache.enabled
    cache.put("a", 1, "A", 1)
    assert cache.get("a", 1) is None
    stats = cache.stats()
    assert (stats.hits, stats.entries, stats.bytes) == (0, 0, 0)


@pytest.mark.parametrize(
    "limits", [{"max_entries": -1}, {"ttl": -0.1}, {"max_bytes": -1}], ids=lambda d: next(iter(d))
)
def test_query_cache_refuses_negative_limits(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        QueryCache(**limits)


def test_query_cache_under_threads_keeps_its_books() -> None:
    cache = QueryCache(max_entries=16, ttl=LONG_TTL, max_bytes=400)
    threads_count, operations = 8, 2000
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(operations):
                # half the lookups on 4 hot keys (hits), half spread over 36 cold ones (evictions)
                key = i % 4 if i % 2 == 0 else 4 + (i * 7 + worker) % 36
                head = i // 500
                value = cache.get(key, head)
                if value is None:
                    cache.put(key, head, (key, head), 1 + key % 30)
                else:
                    assert value == (key, head)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    if errors:
        raise errors[0]
    stats = cache.stats()
    assert stats.hits + stats.misses == threads_count * operations
    assert stats.hits > 0 and stats.evictions > 0
    assert 0 < stats.entries <= 16
    assert 0 < stats.bytes <= 400
    # the byte count is the sum of the sizes of what is stored (a look inside, for the books)
    stored = list(cache._entries.items())
    assert len(stored) == stats.entries
    assert sum(entry.size for _, entry in stored) == stats.bytes
    assert all(entry.size == 1 + key % 30 for key, entry in stored)
