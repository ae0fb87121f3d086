"""Keyset pages (`EventStore.get_page`, `EventStore.paginate`) on a real PostgreSQL.

A walk must return exactly what `get_events` returns for the same filter, in the same order, each
event once, whatever the page size, order and direction; it is pinned to the head at its first
page, so events appended meanwhile (from this thread or another) never show up in it and none of
the pinned ones go missing. Page tokens are checked: they belong to one filter, survive appends
and a reopened store, and anything malformed is a QUERY_ERROR.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from tamma_events import (
    QUERY_ERROR,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Page,
    SequencedEvent,
)
from tamma_events.filters import OrderBy, OrderDirection
from tamma_events.stores.store import MAX_PAGE_SIZE

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
# Lower-case ASCII only, so that every collation sorts them as Python does.
TYPES = ("alpha", "bravo", "charlie", "delta", "echo")
PROVIDERS = ("github", "gitlab", "jira")
ORDERS = [(o, d) for o in ("position", "timestamp", "type") for d in ("asc", "desc")]
PAGE_SIZES = (1, 7, 100, 1000)
WALK_EVENTS = 2000
WINDOW_START = BASE + timedelta(seconds=100)
WINDOW_END = BASE + timedelta(seconds=400)
FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "providers": {"providers": ["github"]},
    "types+window": {
        "event_types": ["bravo", "delta"],
        "start_time": WINDOW_START,
        "end_time": WINDOW_END,
    },
}


# -- helpers ---------------------------------------------------------------------------------


def sort_key(order_by: str) -> Callable[[SequencedEvent], Any]:
    """Python's idea of the order: the key, ties broken by position."""
    if order_by == "timestamp":
        return lambda e: (e.timestamp, e.position)
    if order_by == "type":
        return lambda e: (e.event_type, e.position)
    return lambda e: e.position


def matches(event: SequencedEvent, spec: dict[str, Any]) -> bool:
    """Whether ``event`` matches one of the filter specs used here (written out independently
    of the library's own matching)."""
    if "providers" in spec and event.tags.get("provider") not in spec["providers"]:
        return False
    if "event_types" in spec and event.event_type not in spec["event_types"]:
        return False
    if "start_time" in spec and event.timestamp < spec["start_time"]:
        return False
    return not ("end_time" in spec and event.timestamp >= spec["end_time"])


def expected_walk(
    events: list[SequencedEvent], spec: dict[str, Any], order_by: OrderBy, direction: OrderDirection
) -> list[SequencedEvent]:
    chosen = [e for e in events if matches(e, spec)]
    return sorted(chosen, key=sort_key(order_by), reverse=direction == "desc")


def walk(
    store: EventStore,
    event_filter: EventFilter | None,
    page_size: int,
    *,
    max_pages: int = 5_000,
    between: Callable[[int], None] | None = None,
) -> list[Page]:
    """Every page of a walk, following the tokens; ``between(n)`` runs after the n-th page."""
    pages = [store.get_page(event_filter, page_size=page_size)]
    while pages[-1].next_token is not None:
        assert len(pages) < max_pages, "the walk does not end"
        if between is not None:
            between(len(pages))
        pages.append(store.get_page(event_filter, page_size=page_size, token=pages[-1].next_token))
    return pages


def check_page_shape(pages: list[Page], page_size: int, total: int) -> None:
    """Every page but the last is full and has a token; only the last has none, and it is
    empty only when there is nothing to walk."""
    assert pages, "a walk has at least one page"
    for page in pages[:-1]:
        assert len(page.events) == page_size
        assert page.next_token is not None
    last = pages[-1]
    assert last.next_token is None
    assert 0 < len(last.events) <= page_size or total == 0
    assert sum(len(page.events) for page in pages) == total
    assert len(pages) == max(1, -(-total // page_size))


def flatten(pages: list[Page]) -> list[SequencedEvent]:
    return [event for page in pages for event in page.events]


def positions(events: list[SequencedEvent]) -> list[int]:
    return [event.position for event in events]


def query_error(call: Callable[[], object], field: str | None = None) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        call()
    assert info.value.code == QUERY_ERROR, info.value
    if field is not None:
        assert info.value.context.get("field") == field, info.value.context
    return info.value


def walk_event(i: int) -> DomainEvent:
    """The i-th event of the big walk fixture: types and timestamps out of position order, with
    many ties on both (so that page boundaries fall inside runs of equal keys)."""
    return DomainEvent(
        TYPES[(i * 7) % len(TYPES)],
        {"i": i},
        {"provider": PROVIDERS[i % 3], "issueId": f"I-{i % 40}"},
        timestamp=BASE + timedelta(seconds=(i * 7919) % 600, microseconds=(i % 3) * 250),
    )


@pytest.fixture(scope="module")
def walk_store(pg_dsn: str) -> Iterator[EventStore]:
    """A store of WALK_EVENTS events that the walk tests only read."""
    schema = f"t_pages_{uuid.uuid4().hex[:10]}"
    store = EventStore(pg_dsn, schema=schema, max_connections=4)
    try:
        store.append_batch([walk_event(i) for i in range(WALK_EVENTS)])
        # planner statistics, as autovacuum would gather them on a real store: without them the
        # single-event pages of the filtered walks choose scans that make the walk quadratic
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ANALYZE {}.events").format(sql.Identifier(schema)))
        yield store
    finally:
        store.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def seed(store: EventStore, count: int, *, offset: int = 0) -> None:
    store.append_batch([walk_event(offset + i) for i in range(count)])


# -- walks over a fixed log ------------------------------------------------------------------


@pytest.mark.parametrize(("order_by", "direction"), ORDERS)
@pytest.mark.parametrize("name", list(FILTERS))
def test_pages_concatenate_to_the_query(
    walk_store: EventStore, name: str, order_by: OrderBy, direction: OrderDirection
) -> None:
    spec = FILTERS[name]
    event_filter = EventFilter(**spec, order_by=order_by, order_direction=direction)
    expected = walk_store.get_events(event_filter)
    everything = walk_store.get_events()
    assert len(everything) == WALK_EVENTS
    # the query itself is what Python computes from the whole log
    assert expected == expected_walk(everything, spec, order_by, direction)
    assert expected, "the filter selects something"
    if spec:
        assert len(expected) < WALK_EVENTS
    for page_size in PAGE_SIZES:
        pages = walk(walk_store, event_filter, page_size, max_pages=len(expected) // page_size + 2)
        check_page_shape(pages, page_size, len(expected))
        got = flatten(pages)
        assert len(set(positions(got))) == len(got), f"duplicates at page size {page_size}"
        assert positions(got) == positions(expected), f"page size {page_size}"
        assert got == expected
        if page_size == 1:
            continue  # (paginate over single events: the same pages again, slowly)
        # paginate is the same walk
        chunks = list(walk_store.paginate(event_filter, page_size=page_size))
        assert all(0 < len(chunk) <= page_size for chunk in chunks)
        assert [e for chunk in chunks for e in chunk] == expected


def test_walk_of_nothing(store: EventStore) -> None:
    page = store.get_page()
    assert page == Page([], None)
    assert list(store.paginate()) == []
    seed(store, 10)
    page = store.get_page(EventFilter(providers=["nobody"]), page_size=3)
    assert page.events == [] and page.next_token is None
    assert list(store.paginate(EventFilter(event_types=["nothing"]), page_size=1)) == []


@pytest.mark.parametrize("order_by", ["position", "timestamp", "type"])
def test_a_total_that_is_a_multiple_of_the_page_size(store: EventStore, order_by: OrderBy) -> None:
    seed(store, 12)
    event_filter = EventFilter(order_by=order_by)
    expected = store.get_events(event_filter)
    for page_size in (1, 3, 4, 6, 12):
        pages = walk(store, event_filter, page_size)
        check_page_shape(pages, page_size, 12)
        assert flatten(pages) == expected
    # one page bigger than everything: the first page is the last
    pages = walk(store, event_filter, 13)
    assert len(pages) == 1 and pages[0].next_token is None and pages[0].events == expected


@pytest.mark.parametrize(("order_by", "direction"), ORDERS)
def test_changing_the_page_size_mid_walk_continues_where_it_was(
    store: EventStore, order_by: OrderBy, direction: OrderDirection
) -> None:
    seed(store, 200)
    event_filter = EventFilter(order_by=order_by, order_direction=direction)
    expected = store.get_events(event_filter)
    got: list[SequencedEvent] = []
    token: str | None = None
    sizes = [1, 7, 3, 50, 2, 1000]
    for number in range(1000):
        page = store.get_page(event_filter, page_size=sizes[number % len(sizes)], token=token)
        got.extend(page.events)
        token = page.next_token
        if token is None:
            break
    assert got == expected


# -- pinned to the head ----------------------------------------------------------------------


def intruders(store: EventStore, round_: int) -> None:
    """Appends that would land all over a walk if it were not pinned: types before, between and
    after the stored ones, timestamps older, equal to and newer than theirs, every provider."""
    older = BASE - timedelta(seconds=10 + round_)
    newer = BASE + timedelta(days=1, seconds=round_)
    store.append_batch(
        [
            DomainEvent("aaa", {"r": round_}, {"provider": "github"}, timestamp=older),
            DomainEvent("zzz", {"r": round_}, {"provider": "github"}, timestamp=newer),
            DomainEvent("charlie", {"r": round_}, {"provider": "gitlab"}, timestamp=BASE),
            DomainEvent(
                "bravo",
                {"r": round_},
                {"provider": "github"},
                timestamp=WINDOW_START + timedelta(seconds=1),
            ),
        ]
    )
    store.append(
        DomainEvent(
            "delta",
            {"r": round_, "single": True},
            {"provider": "github"},
            timestamp=WINDOW_START + timedelta(seconds=150),
        )
    )


@pytest.mark.parametrize(("order_by", "direction"), ORDERS)
@pytest.mark.parametrize("name", list(FILTERS))
def test_a_walk_is_pinned_to_the_head_at_its_first_page(
    store: EventStore, name: str, order_by: OrderBy, direction: OrderDirection
) -> None:
    seed(store, 300)
    spec = FILTERS[name]
    event_filter = EventFilter(**spec, order_by=order_by, order_direction=direction)
    pinned = store.get_events(event_filter)
    head = store.head()
    assert pinned

    pages = walk(store, event_filter, 7, between=lambda n: intruders(store, n))
    got = flatten(pages)
    assert store.head() > head + 5, "events were appended during the walk"
    assert got == pinned
    assert max(positions(got)) <= head
    assert len(set(positions(got))) == len(got)

    # a new walk sees the new events, in their places
    now = store.get_events(event_filter)
    assert len(now) > len(pinned)
    assert flatten(walk(store, event_filter, 7)) == now
    assert now == expected_walk(store.get_events(), spec, order_by, direction)


def test_paginate_is_pinned_too(store: EventStore) -> None:
    seed(store, 100)
    event_filter = EventFilter(providers=["github"], order_by="type", order_direction="desc")
    pinned = store.get_events(event_filter)
    got: list[SequencedEvent] = []
    for number, chunk in enumerate(store.paginate(event_filter, page_size=4)):
        got.extend(chunk)
        intruders(store, number)
    assert got == pinned
    assert len(store.get_events(event_filter)) > len(pinned)


# -- a thread appends while the main thread walks --------------------------------------------

CONCURRENT_FILTERS: list[dict[str, Any]] = [
    {},
    {"providers": ["github"]},
    {
        "event_types": ["alfa", "lima", "zulu"],
        "start_time": BASE + timedelta(seconds=200),
        "end_time": BASE + timedelta(seconds=800),
    },
]


def concurrent_seed(i: int) -> DomainEvent:
    return DomainEvent(
        ("kilo", "lima", "mike")[i % 3],
        {"seed": i},
        {"provider": ("github", "gitlab")[i % 2]},
        timestamp=BASE + timedelta(seconds=(i * 37) % 1000),
    )


def concurrent_events(n: int) -> list[DomainEvent]:
    """The appender's n-th append: a single event or a small batch, types sorting before
    ("alfa"), among ("lima") and after ("zulu") the seeded ones, timestamps older, newer and equal
    to theirs (some inside the window)."""
    kinds = [
        ("alfa", BASE - timedelta(seconds=n + 1)),
        ("zulu", BASE + timedelta(days=2, seconds=n)),
        ("lima", BASE + timedelta(seconds=(n * 37) % 1000)),
        ("alfa", BASE + timedelta(seconds=500)),
        ("zulu", BASE + timedelta(seconds=300, microseconds=n)),
    ]
    size = 1 if n % 2 == 0 else 2 + n % 3
    return [
        DomainEvent(
            kinds[(n + k) % len(kinds)][0],
            {"append": n, "k": k},
            {"provider": ("github", "gitlab")[(n + k) % 2]},
            timestamp=kinds[(n + k) % len(kinds)][1],
        )
        for k in range(size)
    ]


def test_walks_stay_pinned_while_a_thread_appends(store: EventStore) -> None:
    store.append_batch([concurrent_seed(i) for i in range(120)])
    page_size = 5
    gate = threading.Lock()  # held by the appender while it appends
    progress = threading.Condition()
    state = {"turns": 0, "appends": 0}
    stop = threading.Event()
    errors: list[BaseException] = []

    def appender() -> None:
        n = 0
        try:
            while True:
                with progress:
                    while state["turns"] <= n and not stop.is_set():
                        progress.wait(1.0)
                    if stop.is_set():
                        return
                events = concurrent_events(n)
                with gate:
                    if len(events) == 1:
                        store.append(events[0])
                    else:
                        store.append_batch(events)
                n += 1
                with progress:
                    state["appends"] = n
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)
            with progress:
                progress.notify_all()

    thread = threading.Thread(target=appender, name="appender", daemon=True)
    thread.start()

    def give_turn() -> None:
        """Let the appender append once more, and wait until it has done the append before
        (so one append may still be running while the next page is read)."""
        with progress:
            state["turns"] += 1
            progress.notify_all()
            done = progress.wait_for(
                lambda: state["appends"] >= state["turns"] - 1 or bool(errors), timeout=60
            )
        assert done, "the appender is stuck"
        if errors:
            raise errors[0]

    walks: list[tuple[EventFilter, dict[str, Any], int, list[SequencedEvent]]] = []
    try:
        for spec in CONCURRENT_FILTERS:
            for order_by, direction in ORDERS:
                event_filter = EventFilter(**spec, order_by=order_by, order_direction=direction)
                with gate:  # no append between reading the head and the first page
                    head = store.head()
                    page = store.get_page(event_filter, page_size=page_size)
                got = list(page.events)
                number = 0
                while page.next_token is not None:
                    number += 1
                    assert number < 5_000, "the walk does not end"
                    if number % 3 == 1:
                        give_turn()
                    page = store.get_page(event_filter, page_size=page_size, token=page.next_token)
                    got.extend(page.events)
                walks.append((event_filter, spec, head, got))
    finally:
        stop.set()
        with progress:
            progress.notify_all()
        thread.join(60)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    assert state["appends"] > 50, "the appender ran during the walks"

    everything = store.get_events()
    assert positions(everything) == list(range(1, store.head() + 1))
    heads = [head for _, _, head, _ in walks]
    assert heads[-1] > heads[0], "the walks started at different heads"
    for event_filter, spec, head, got in walks:
        label = f"{spec} {event_filter.order_by} {event_filter.order_direction} head {head}"
        as_of_head = [e for e in everything if e.position <= head]
        want = expected_walk(as_of_head, spec, event_filter.order_by, event_filter.order_direction)
        assert len(set(positions(got))) == len(got), label
        assert positions(got) == positions(want), label
        assert got == want, label
        # the same as the query now, less what came after the head
        assert got == [e for e in store.get_events(event_filter) if e.position <= head], label

        # a new walk sees every event, the ones appended during the walk included
        again = flatten(walk(store, event_filter, 25))
        assert again == expected_walk(
            everything, spec, event_filter.order_by, event_filter.order_direction
        ), label
        if (event_filter.order_by, event_filter.order_direction) == ORDERS[0]:
            # the first walk of each filter: plenty was appended after it started
            assert any(e.position > head for e in again), label


# -- tokens ----------------------------------------------------------------------------------


@pytest.fixture
def walked(store: EventStore) -> EventStore:
    seed(store, 60)
    return store


def first_token(store: EventStore, event_filter: EventFilter | None, page_size: int = 5) -> str:
    token = store.get_page(event_filter, page_size=page_size).next_token
    assert token is not None
    return token


@pytest.mark.parametrize(
    "other",
    [
        None,
        EventFilter(),
        EventFilter(providers=["gitlab"]),
        EventFilter(providers=["github", "gitlab"]),
        EventFilter(providers=["github"], order_by="timestamp"),
        EventFilter(providers=["github"], order_direction="desc"),
        EventFilter(providers=["github"], event_types=["alpha"]),
        EventFilter(providers=["github"], start_time=BASE),
        EventFilter(issue_ids=["github"]),
        EventFilter(tags={"provider": "github"}, user_ids=["u"]),
    ],
)
def test_a_token_belongs_to_its_filter(walked: EventStore, other: EventFilter | None) -> None:
    token = first_token(walked, EventFilter(providers=["github"]))
    error = query_error(lambda: walked.get_page(other, page_size=5, token=token), "token")
    assert "different filter" in error.message


def test_the_same_question_spelled_differently_accepts_the_token(walked: EventStore) -> None:
    one = EventFilter(
        providers=["github", "gitlab"],
        event_types=["alpha", "bravo", "charlie"],
        start_time=BASE,
        order_by="timestamp",
    )
    other = EventFilter(
        providers=["gitlab", "github", "gitlab"],
        event_types=("charlie", "alpha", "bravo"),
        start_time="2026-03-01T14:00:00+02:00",
        order_by="timestamp",
    )
    expected = walked.get_events(one)
    assert walked.get_events(other) == expected
    page = walked.get_page(one, page_size=3)
    assert page.next_token is not None
    rest = flatten(walk_from(walked, other, 3, page.next_token))
    assert page.events + rest == expected


def walk_from(
    store: EventStore, event_filter: EventFilter, page_size: int, token: str
) -> list[Page]:
    pages = [store.get_page(event_filter, page_size=page_size, token=token)]
    while pages[-1].next_token is not None:
        assert len(pages) < 5_000
        pages.append(store.get_page(event_filter, page_size=page_size, token=pages[-1].next_token))
    return pages


def broken_tokens(token: str) -> dict[str, Any]:
    middle = len(token) // 2
    flipped = token[:3] + ("A" if token[3] != "A" else "B") + token[4:]
    return {
        "empty": "",
        "one-char": token[:1],
        "truncated-by-1": token[:-1],
        "truncated-by-2": token[:-2],
        "half": token[:middle],
        "fingerprint-flipped": flipped,
        "not-base64": "!!!!not*a*token!!!!",
        "non-ascii": "ééééé",
        "padding-only": "====",
        "garbage-base64": base64.urlsafe_b64encode(b"\xff\x00\x13garbage").decode(),
        "json-not-msgpack": base64.urlsafe_b64encode(b'{"until": 5}').decode(),
        "extended": token + token,
        "spaces": " " * 8,
    }


@pytest.mark.parametrize("order_by", ["position", "timestamp", "type"])
def test_malformed_tokens_are_query_errors(walked: EventStore, order_by: OrderBy) -> None:
    event_filter = EventFilter(order_by=order_by)
    token = first_token(walked, event_filter)
    for name, bad in broken_tokens(token).items():
        error = query_error(
            lambda bad=bad: walked.get_page(event_filter, page_size=5, token=bad), "token"
        )
        assert error.message, name
    for bad in (b"abc", 12, ["x"], token.encode()):
        query_error(lambda bad=bad: walked.get_page(event_filter, page_size=5, token=bad), "token")


@pytest.mark.parametrize("order_by", ["position", "timestamp", "type"])
def test_a_damaged_token_is_a_query_error_or_a_page_never_another_error(
    walked: EventStore, order_by: OrderBy
) -> None:
    """Single-character damage anywhere in a token: either still a well-formed token (its
    numbers changed) or a QUERY_ERROR; never a storage error or a Python exception."""
    event_filter = EventFilter(order_by=order_by)
    token = first_token(walked, event_filter)
    refused = 0
    for at in range(len(token)):
        for char in "A_9z-":
            if char == token[at]:
                continue
            bad = token[:at] + char + token[at + 1 :]
            try:
                page = walked.get_page(event_filter, page_size=5, token=bad)
            except EventStoreError as exc:
                assert exc.code == QUERY_ERROR, (bad, exc)
                assert exc.context.get("field") == "token", (bad, exc)
                refused += 1
            else:
                assert isinstance(page, Page)
    assert refused > len(token), "most damage is noticed"


def forged(token: str, **changes: Any) -> str:
    """The token with some of its fields replaced (fingerprint kept): what a client that
    tampers with the token, or a bit flip inside a field, produces."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    fields = msgspec.msgpack.decode(raw)
    assert isinstance(fields, list) and len(fields) == 4, fields
    names = ["fingerprint", "until", "last_key", "last_position"]
    for name, value in changes.items():
        fields[names.index(name)] = value
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(fields)).decode().rstrip("=")


@pytest.mark.parametrize(
    ("order_by", "changes"),
    [
        ("position", {"until": -1}),
        ("position", {"last_position": -5}),
        ("position", {"until": "5"}),
        ("timestamp", {"last_key": None}),
        ("timestamp", {"last_key": "not a time"}),
        ("type", {"last_key": 17}),
        ("type", {"last_key": None}),
        ("type", {"last_key": "bravo\x00"}),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_a_tampered_token_is_a_query_error(
    walked: EventStore, order_by: OrderBy, changes: dict[str, Any]
) -> None:
    event_filter = EventFilter(order_by=order_by)
    token = first_token(walked, event_filter)
    bad = forged(token, **changes)
    query_error(lambda: walked.get_page(event_filter, page_size=5, token=bad), "token")


@pytest.mark.parametrize(
    ("event_filter", "field"),
    [
        (EventFilter(limit=10), "limit"),
        (EventFilter(limit=0), "limit"),
        (EventFilter(offset=5), "offset"),
        (EventFilter(limit=3, offset=1, providers=["github"]), "limit"),
    ],
)
def test_a_paged_filter_may_not_set_limit_or_offset(
    walked: EventStore, event_filter: EventFilter, field: str
) -> None:
    query_error(lambda: walked.get_page(event_filter, page_size=5), field)
    query_error(lambda: next(walked.paginate(event_filter, page_size=5)), field)
    # the same filter without them pages fine
    plain = EventFilter(providers=event_filter.providers)
    assert walked.get_page(plain, page_size=5).events


@pytest.mark.parametrize(
    "page_size", [0, -1, -1000, True, False, MAX_PAGE_SIZE + 1, 10**12, 2.5, "10", None]
)
def test_bad_page_sizes_are_query_errors(walked: EventStore, page_size: Any) -> None:
    query_error(lambda: walked.get_page(page_size=page_size), "page_size")
    query_error(lambda: next(walked.paginate(page_size=page_size)), "page_size")


def test_the_largest_page_size_is_accepted(walked: EventStore) -> None:
    page = walked.get_page(page_size=MAX_PAGE_SIZE)
    assert positions(page.events) == list(range(1, 61))
    assert page.next_token is None


def test_a_token_stays_valid_after_appends_and_a_reopened_store(
    make_store: Callable[..., EventStore],
) -> None:
    first = make_store()
    seed(first, 50)
    event_filter = EventFilter(providers=["github", "jira"], order_by="type")
    pinned = first.get_events(event_filter)
    page = first.get_page(event_filter, page_size=10)
    assert page.next_token is not None
    seed(first, 30, offset=50)
    page2 = first.get_page(event_filter, page_size=10, token=page.next_token)
    assert page.events + page2.events == pinned[:20]
    assert page2.next_token is not None
    first.close()

    reopened = make_store(schema=first.schema)
    seed(reopened, 5, offset=80)
    rest = flatten(walk_from(reopened, event_filter, 10, page2.next_token))
    assert page.events + page2.events + rest == pinned
    # the old first token still works on the new store, and yields the same pinned walk
    assert page.events + flatten(walk_from(reopened, event_filter, 10, page.next_token)) == pinned
    # and a new walk on the new store sees all 85 events' matches
    now = flatten(walk(reopened, event_filter, 10))
    assert now == reopened.get_events(event_filter)
    assert len(now) > len(pinned)
