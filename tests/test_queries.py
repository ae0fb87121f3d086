"""The read side against a real PostgreSQL: `EventFilter` queries, counts, aggregates, event types
and tags, compared with a brute-force reference computed here in Python; filter validation; the
summaries after failed writes; hostile keys and values."""

from __future__ import annotations

import random
import string
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any, NamedTuple

import msgspec
import psycopg
import pytest
from psycopg import sql

from tamma_events import (
    APPEND_CONDITION_FAILED,
    DUPLICATE_EVENT,
    QUERY_ERROR,
    AggregateRow,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    SequencedEvent,
)
from tamma_events.filters import MAX_FILTER_VALUES, normalize
from tamma_events.sql import Statements, summary_aggregate, summary_count

UTC = timezone.utc
BASE = datetime(2026, 1, 5, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)

TYPES = [
    "IssueOpened",
    "IssueClosed",
    "IssueCommented",
    "PrOpened",
    "PrMerged",
    "ReviewRequested",
    "deploy.finished",
    "Zeta",
]
PROVIDERS = ["github", "gitlab", "bitbucket"]
PLATFORMS = ["web", "ios", "android", "cli"]
TEAMS = ["core", "infra", "growth"]
CUSTOM_KEY = "team"
FIXTURE_SIZE = 480
# How the fixture is appended: batches of 3 or more go through COPY, groups of 1 or 2 events
# through the append function.
CHUNKS = [150, 1, 1, 2, 3, 70, 1, 2, 1, 60, 4, 1, 100]
assert sum(CHUNKS) < FIXTURE_SIZE


# -- the fixture ---------------------------------------------------------------------------


def fixture_events(seed: int = 20260105) -> list[DomainEvent]:
    """A deterministic mixed log over five days: types, the usual tags and a custom one,
    timestamps mostly rising with some out of order, ties and some on bucket boundaries."""
    rnd = random.Random(seed)
    events: list[DomainEvent] = []
    previous = BASE
    for i in range(FIXTURE_SIZE):
        step = 5 * 86_400 * i / FIXTURE_SIZE
        at = BASE + timedelta(seconds=step + rnd.randint(0, 600), microseconds=rnd.randint(0, 999))
        if i % 13 == 5:  # out of order: anywhere in the five days
            at = BASE + timedelta(seconds=rnd.randint(0, 5 * 86_400 - 1))
        if i % 17 == 3:  # the same instant as the event before
            at = previous
        elif i % 29 == 7:
            at = at.replace(minute=0, second=0, microsecond=0)
        elif i % 31 == 11:
            at = at.replace(hour=0, minute=0, second=0, microsecond=0)
        elif i % 23 == 2:
            at = at.replace(second=0, microsecond=0)
        previous = at
        tags: dict[str, str] = {}
        if rnd.random() < 0.7:
            tags["issueId"] = f"I-{rnd.randint(1, 110)}"
        if rnd.random() < 0.3:
            tags["prId"] = f"P-{rnd.randint(1, 25)}"
        if rnd.random() < 0.8:
            tags["userId"] = f"u{rnd.randint(1, 12)}" if i % 37 else "I-5"
        if rnd.random() < 0.85:
            tags["provider"] = rnd.choice(PROVIDERS)
        if rnd.random() < 0.6:
            tags["platform"] = rnd.choice(PLATFORMS)
        if rnd.random() < 0.4:
            tags[CUSTOM_KEY] = rnd.choice(TEAMS)
        if i % 19 == 0:
            tags = {}
        events.append(
            DomainEvent(
                rnd.choice(TYPES),
                {"i": i},
                tags,
                {"seq": i},
                uuid.UUID(int=rnd.getrandbits(128), version=4),
                at,
            )
        )
    return events


def append_fixture(store: EventStore) -> list[DomainEvent]:
    """Append `fixture_events` through both write paths; returns them in append order."""
    events = fixture_events()
    head = store.head()
    at = 0
    for size in [*CHUNKS, FIXTURE_SIZE - sum(CHUNKS)]:
        chunk = events[at : at + size]
        if size == 1:
            position = store.append(chunk[0])
        else:
            position = store.append_batch(chunk)
        at += size
        assert position == head + at
    return events


# -- the reference -------------------------------------------------------------------------


def as_utc(value: datetime | date | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) == len("2026-01-06"):
        value = date.fromisoformat(value)  # a date alone: midnight UTC at its start
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value.astimezone(UTC)


def reference(events: list[SequencedEvent], f: EventFilter) -> list[SequencedEvent]:
    """What `get_events(f)` must return, computed by brute force."""
    named = {
        "issueId": f.issue_ids,
        "prId": f.pr_ids,
        "userId": f.user_ids,
        "provider": f.providers,
        "platform": f.platforms,
    }
    ids = {uuid.UUID(str(i)) for i in f.event_ids or ()}
    start, end = as_utc(f.start_time), as_utc(f.end_time)
    selected = []
    for e in events:
        if ids and e.event_id not in ids:
            continue
        if f.event_types and e.event_type not in f.event_types:
            continue
        if any(values and e.tags.get(key) not in values for key, values in named.items()):
            continue
        if f.tags and any(e.tags.get(key) != value for key, value in f.tags.items()):
            continue
        if start is not None and e.timestamp < start:
            continue
        if end is not None and not e.timestamp < end:
            continue
        selected.append(e)
    sort_key: Callable[[SequencedEvent], tuple[Any, ...]]
    if f.order_by == "position":
        sort_key = lambda e: (e.position,)  # noqa: E731
    elif f.order_by == "timestamp":
        sort_key = lambda e: (e.timestamp, e.position)  # noqa: E731
    else:
        sort_key = lambda e: (e.event_type, e.position)  # noqa: E731
    selected.sort(key=sort_key, reverse=f.order_direction == "desc")
    selected = selected[f.offset :]
    return selected if f.limit is None else selected[: f.limit]


def bucket_key(moment: datetime, grain: str) -> str:
    moment = moment.astimezone(UTC).replace(second=0, microsecond=0)
    if grain in ("hour", "day"):
        moment = moment.replace(minute=0)
    if grain == "day":
        moment = moment.replace(hour=0)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def reference_aggregate(
    events: list[SequencedEvent], f: EventFilter, group_by: str, tag_key: str | None = None
) -> list[AggregateRow]:
    unpaged = msgspec.structs.replace(f, limit=None, offset=0)
    groups: dict[str, list[datetime]] = {}
    for e in reference(events, unpaged):
        if group_by == "event_type":
            key = e.event_type
        elif group_by == "tag":
            assert tag_key is not None
            if tag_key not in e.tags:
                continue
            key = e.tags[tag_key]
        else:
            key = bucket_key(e.timestamp, group_by)
        groups.setdefault(key, []).append(e.timestamp)
    return [AggregateRow(k, len(v), min(v), max(v)) for k, v in sorted(groups.items())]


def reference_tags(events: list[SequencedEvent]) -> dict[str, list[str]]:
    tags: dict[str, set[str]] = {}
    for e in events:
        for key, value in e.tags.items():
            tags.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in sorted(tags.items())}


def positions(events: list[SequencedEvent]) -> list[int]:
    return [e.position for e in events]


def expect_error(code: str, call: Callable[[], Any]) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


# -- the shared, read-only store -----------------------------------------------------------


class Loaded(NamedTuple):
    plain: EventStore  # cache off
    cached: EventStore  # the default cache, same schema
    appended: list[DomainEvent]
    events: list[SequencedEvent]


@pytest.fixture(scope="module")
def loaded(pg_dsn: str) -> Iterator[Loaded]:
    schema = f"q_{uuid.uuid4().hex[:12]}"
    plain = EventStore(pg_dsn, schema=schema, cache_size=0, max_connections=4)
    cached = EventStore(pg_dsn, schema=schema, max_connections=4)
    try:
        appended = append_fixture(plain)
        yield Loaded(plain, cached, appended, plain.get_events())
    finally:
        plain.close()
        cached.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_fixture_is_stored_as_appended(loaded: Loaded) -> None:
    events = loaded.events
    assert positions(events) == list(range(1, FIXTURE_SIZE + 1))
    assert list(loaded.plain.read()) == events
    for stored, sent in zip(events, loaded.appended, strict=True):
        assert (stored.event_id, stored.event_type, stored.tags, stored.data) == (
            sent.event_id,
            sent.event_type,
            sent.tags,
            sent.data,
        )
        assert stored.timestamp == sent.timestamp
    # the fixture has what the comparisons below need
    stamps = [e.timestamp for e in events]
    assert stamps != sorted(stamps)  # out of order
    assert len(set(stamps)) < len(stamps)  # ties
    assert {BASE + DAY, BASE + 3 * DAY} <= set(stamps)  # on day boundaries
    assert any(t.minute == 0 and t.second == 0 and t.microsecond == 0 and t.hour for t in stamps)
    assert len({e.tags["issueId"] for e in events if "issueId" in e.tags}) > 70
    assert any(not e.tags for e in events)
    assert any(CUSTOM_KEY in e.tags for e in events)
    assert set(TYPES) == {e.event_type for e in events}


# -- get_events ----------------------------------------------------------------------------

Builder = Callable[[list[SequencedEvent]], EventFilter]

WINDOW_DAY = (BASE + DAY, BASE + 3 * DAY)
WINDOW_HOUR = (BASE + DAY + 3 * HOUR, BASE + 2 * DAY + 9 * HOUR)
WINDOW_MINUTE = (BASE + 2 * DAY + 4 * HOUR + 17 * MINUTE, BASE + 2 * DAY + 6 * HOUR + 3 * MINUTE)
WINDOW_ODD = (
    BASE + DAY + 3 * HOUR + timedelta(minutes=20, seconds=15, microseconds=500_000),
    BASE + 3 * DAY + 7 * HOUR + timedelta(seconds=1),
)


def window(bounds: tuple[datetime, datetime], **kwargs: Any) -> EventFilter:
    return EventFilter(start_time=bounds[0], end_time=bounds[1], **kwargs)


FILTERS: list[tuple[str, Builder]] = [
    ("none", lambda ev: EventFilter()),
    ("event-ids-uuid", lambda ev: EventFilter(event_ids=[ev[3].event_id, ev[-1].event_id])),
    (
        "event-ids-str",
        lambda ev: EventFilter(event_ids=[str(ev[5].event_id), str(ev[200].event_id).upper()]),
    ),
    (
        "event-ids-mixed-unknown",
        lambda ev: EventFilter(
            event_ids=[ev[9].event_id, str(ev[9].event_id), uuid.UUID(int=1), ev[400].event_id]
        ),
    ),
    ("event-ids-unknown", lambda ev: EventFilter(event_ids=[uuid.UUID(int=12345)])),
    ("event-ids-empty", lambda ev: EventFilter(event_ids=[])),
    ("type-one", lambda ev: EventFilter(event_types=["IssueOpened"])),
    ("types-two", lambda ev: EventFilter(event_types=["PrMerged", "Zeta"])),
    ("types-unknown", lambda ev: EventFilter(event_types=["Nope"])),
    ("types-empty", lambda ev: EventFilter(event_types=[])),
    ("types-duplicated", lambda ev: EventFilter(event_types=["PrOpened", "PrOpened"])),
    ("types-tuple", lambda ev: EventFilter(event_types=("deploy.finished",))),
    ("issue-one", lambda ev: EventFilter(issue_ids=["I-5"])),
    ("issues-several", lambda ev: EventFilter(issue_ids=["I-1", "I-2", "I-3", "I-999"])),
    ("prs", lambda ev: EventFilter(pr_ids=["P-1", "P-2"])),
    ("user-one", lambda ev: EventFilter(user_ids=["u3"])),
    ("user-value-of-another-key", lambda ev: EventFilter(user_ids=["I-5"])),
    ("provider-one", lambda ev: EventFilter(providers=["github"])),
    ("providers-two", lambda ev: EventFilter(providers=["gitlab", "bitbucket"])),
    ("platform-one", lambda ev: EventFilter(platforms=["ios"])),
    ("platforms-unknown", lambda ev: EventFilter(platforms=["windows"])),
    ("tags-custom", lambda ev: EventFilter(tags={CUSTOM_KEY: "core"})),
    ("tags-two-pairs", lambda ev: EventFilter(tags={CUSTOM_KEY: "infra", "provider": "github"})),
    (
        "tags-and-named-same-key-overlap",
        lambda ev: EventFilter(providers=["github", "gitlab"], tags={"provider": "github"}),
    ),
    (
        "tags-and-named-same-key-same-value",
        lambda ev: EventFilter(providers=["gitlab"], tags={"provider": "gitlab"}),
    ),
    (
        "tags-and-named-same-key-conflict",
        lambda ev: EventFilter(providers=["gitlab"], tags={"provider": "github"}),
    ),
    ("tags-empty", lambda ev: EventFilter(tags={})),
    ("tags-unknown-key", lambda ev: EventFilter(tags={"nope": "x"})),
    ("tags-key-case", lambda ev: EventFilter(tags={"IssueId": "I-5"})),
    ("start-only", lambda ev: EventFilter(start_time=BASE + 2 * DAY)),
    ("end-only", lambda ev: EventFilter(end_time=BASE + DAY)),
    ("start-only-odd", lambda ev: EventFilter(start_time=WINDOW_ODD[0])),
    ("window-day", lambda ev: window(WINDOW_DAY)),
    ("window-hour", lambda ev: window(WINDOW_HOUR)),
    ("window-minute", lambda ev: window(WINDOW_MINUTE)),
    ("window-unaligned", lambda ev: window(WINDOW_ODD)),
    (
        "window-on-event-timestamps",  # both ends exactly on stored timestamps
        lambda ev: EventFilter(start_time=ev[100].timestamp, end_time=ev[300].timestamp),
    ),
    (
        "window-iso-plus-two",
        lambda ev: EventFilter(
            start_time="2026-01-06T05:00:00+02:00", end_time="2026-01-07T13:30:00+02:00"
        ),
    ),
    (
        "window-iso-z",
        lambda ev: EventFilter(start_time="2026-01-06T00:00:00Z", end_time="2026-01-08T00:00:00Z"),
    ),
    (
        "window-iso-plus-five-thirty",
        lambda ev: EventFilter(
            start_time="2026-01-06T00:00:00+05:30", end_time="2026-01-06T23:45:00+05:30"
        ),
    ),
    (
        "window-iso-negative-offset-fraction",
        lambda ev: EventFilter(
            start_time="2026-01-06T10:15:30.250000-03:00", end_time="2026-01-08T01:02:03.000001Z"
        ),
    ),
    (
        "window-dates",  # dates alone: midnight UTC
        lambda ev: EventFilter(start_time="2026-01-06", end_time="2026-01-08"),
    ),
    (
        "window-date-objects",
        lambda ev: EventFilter(start_time=date(2026, 1, 6), end_time=date(2026, 1, 7)),
    ),
    (
        "window-mixed-datetime-and-string",
        lambda ev: EventFilter(start_time=BASE + DAY, end_time="2026-01-07T12:00:00+01:00"),
    ),
    (
        "window-datetime-non-utc",
        lambda ev: EventFilter(
            start_time=datetime(2026, 1, 6, 1, 0, tzinfo=timezone(timedelta(hours=-7))),
            end_time=datetime(2026, 1, 7, 18, 0, tzinfo=timezone(timedelta(hours=9))),
        ),
    ),
    ("window-empty", lambda ev: EventFilter(start_time=BASE + DAY, end_time=BASE + DAY)),
    ("window-before-log", lambda ev: window((BASE - 3 * DAY, BASE - DAY))),
    ("window-after-log", lambda ev: EventFilter(start_time=BASE + 30 * DAY)),
    ("limit", lambda ev: EventFilter(limit=10)),
    ("limit-zero", lambda ev: EventFilter(limit=0)),
    ("limit-huge", lambda ev: EventFilter(limit=10**9)),
    ("offset", lambda ev: EventFilter(offset=470)),
    ("offset-past-end", lambda ev: EventFilter(offset=10_000)),
    ("limit-and-offset", lambda ev: EventFilter(limit=25, offset=40)),
    (
        "types-and-issues",
        lambda ev: EventFilter(event_types=TYPES[:4], issue_ids=[f"I-{n}" for n in range(7, 19)]),
    ),
    ("types-and-window-hour", lambda ev: window(WINDOW_HOUR, event_types=["PrMerged", "Zeta"])),
    (
        "types-and-window-minute",
        lambda ev: window(WINDOW_MINUTE, event_types=TYPES[:5]),
    ),
    (
        "providers-platforms-window-paged",
        lambda ev: window(
            WINDOW_ODD,
            providers=["github"],
            platforms=["web", "ios"],
            order_by="timestamp",
            order_direction="desc",
            limit=7,
            offset=3,
        ),
    ),
    (
        "tags-types-users",
        lambda ev: EventFilter(
            tags={CUSTOM_KEY: "growth"}, event_types=TYPES[:4], user_ids=["u1", "u2", "u3"]
        ),
    ),
    (
        "event-ids-and-types",
        lambda ev: EventFilter(
            event_ids=[e.event_id for e in ev[::7]], event_types=["PrOpened", "Zeta"]
        ),
    ),
    (
        "event-ids-and-window",
        lambda ev: window(WINDOW_DAY, event_ids=[str(e.event_id) for e in ev[::3]]),
    ),
    # A selective condition of several values, with single values of other keys (which join
    # each of its alternatives), with the same key asked again, and past the alternatives' limit.
    (
        "issues-and-a-provider",
        lambda ev: EventFilter(issue_ids=["I-3", "I-4", "I-5"], providers=["github"]),
    ),
    (
        "issues-and-one-of-them-again",
        lambda ev: EventFilter(
            issue_ids=["I-3", "I-4"], tags={"issueId": "I-4"}, providers=["github"]
        ),
    ),
    (
        "issues-past-the-alternatives-and-a-provider",
        lambda ev: EventFilter(
            issue_ids=[f"I-{n}" for n in range(1, 80)], providers=["gitlab"], user_ids=["u2"]
        ),
    ),
    (
        "all-named-tags",
        lambda ev: EventFilter(
            issue_ids=[f"I-{n}" for n in range(1, 60)],
            pr_ids=[f"P-{n}" for n in range(1, 20)],
            user_ids=[f"u{n}" for n in range(1, 9)],
            providers=["github", "gitlab"],
            platforms=["web", "cli", "android"],
        ),
    ),
    (
        "everything",
        lambda ev: window(
            WINDOW_DAY,
            event_types=TYPES[::2],
            providers=["github", "bitbucket"],
            tags={CUSTOM_KEY: "core"},
            order_by="type",
            order_direction="desc",
            limit=5,
        ),
    ),
]

ORDER_BASES: list[tuple[str, Builder]] = [
    ("all", lambda ev: EventFilter()),
    ("paged", lambda ev: EventFilter(event_types=TYPES[:5], limit=30, offset=11)),
    ("window-day", lambda ev: window(WINDOW_DAY)),
    ("window-unaligned-paged", lambda ev: window(WINDOW_ODD, limit=12, offset=5)),
    ("issues-70", lambda ev: EventFilter(issue_ids=[f"I-{n}" for n in range(1, 71)], limit=40)),
]


@pytest.mark.parametrize("build", [b for _, b in FILTERS], ids=[n for n, _ in FILTERS])
def test_get_events_matches_reference(loaded: Loaded, build: Builder) -> None:
    f = build(loaded.events)
    expected = reference(loaded.events, f)
    got = loaded.plain.get_events(f)
    assert positions(got) == positions(expected)
    assert got == expected
    assert loaded.plain.count_events(f) == len(expected)


@pytest.mark.parametrize("direction", ["asc", "desc"])
@pytest.mark.parametrize("order_by", ["position", "timestamp", "type"])
@pytest.mark.parametrize("build", [b for _, b in ORDER_BASES], ids=[n for n, _ in ORDER_BASES])
def test_order_matches_reference(
    loaded: Loaded, build: Builder, order_by: str, direction: str
) -> None:
    f = msgspec.structs.replace(build(loaded.events), order_by=order_by, order_direction=direction)
    expected = reference(loaded.events, f)
    assert expected  # every base selects something
    got = loaded.plain.get_events(f)
    assert positions(got) == positions(expected)
    assert loaded.plain.count_events(f) == len(expected)


def test_ties_are_broken_by_position_in_the_same_direction(loaded: Loaded) -> None:
    stamps = [e.timestamp for e in loaded.events]
    tied = next(t for t in stamps if stamps.count(t) > 1)
    ties = [e.position for e in loaded.events if e.timestamp == tied]
    f = EventFilter(start_time=tied, end_time=tied + timedelta(microseconds=1))
    for direction, expected in (("asc", ties), ("desc", ties[::-1])):
        got = loaded.plain.get_events(
            msgspec.structs.replace(f, order_by="timestamp", order_direction=direction)
        )
        assert positions(got) == expected
    by_type = loaded.plain.get_events(EventFilter(order_by="type", order_direction="desc"))
    assert positions(by_type) == positions(
        sorted(loaded.events, key=lambda e: (e.event_type, e.position), reverse=True)
    )


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 70, 110, 400])
def test_many_values_in_one_tag_field(loaded: Loaded, count: int) -> None:
    """Up to 64 values are OR'd containments, more are looked up value by value."""
    stored = sorted({e.tags["issueId"] for e in loaded.events if "issueId" in e.tags})
    values = (stored + [f"missing-{n}" for n in range(count)])[:count]
    rnd = random.Random(count)
    rnd.shuffle(values)
    filters = [
        EventFilter(issue_ids=values),
        EventFilter(issue_ids=values, event_types=["IssueOpened", "PrMerged"]),
        EventFilter(issue_ids=values, providers=["github"], order_by="timestamp", limit=50),
        window(WINDOW_HOUR, issue_ids=values, order_direction="desc"),
        EventFilter(issue_ids=values, tags={"issueId": values[0]}),
        EventFilter(user_ids=[f"u{n % 12 + 1}" if n % 2 else f"x{n}" for n in range(count)]),
        EventFilter(tags={CUSTOM_KEY: "infra"}, platforms=[*PLATFORMS, *values][:count]),
    ]
    for f in filters:
        expected = reference(loaded.events, f)
        assert positions(loaded.plain.get_events(f)) == positions(expected), f
        assert loaded.plain.count_events(f) == len(expected), f
    assert loaded.plain.count_events(EventFilter(issue_ids=values)) > 0


def test_at_most_max_filter_values_are_accepted(loaded: Loaded) -> None:
    types = [*TYPES[:2], *(f"T{n}" for n in range(MAX_FILTER_VALUES - 2))]
    f = EventFilter(event_types=types)
    expected = reference(loaded.events, f)
    assert positions(loaded.plain.get_events(f)) == positions(expected)
    assert loaded.plain.count_events(f) == len(expected)
    issues = [f"I-{n}" for n in range(MAX_FILTER_VALUES)]
    f = EventFilter(issue_ids=issues, order_by="timestamp")
    expected = reference(loaded.events, f)
    assert len(expected) > 100
    assert positions(loaded.plain.get_events(f)) == positions(expected)


@pytest.mark.parametrize("build", [b for _, b in FILTERS[::4]], ids=[n for n, _ in FILTERS[::4]])
def test_cached_store_matches_reference(
    loaded: Loaded, build: Builder, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = build(loaded.events)
    store = loaded.cached
    # The cache's clock stands still during this test: no entry expires between the two calls
    # however long a busy machine takes, so the second is a hit.
    now = store.cache.clock()
    monkeypatch.setattr(store.cache, "clock", lambda: now)
    expected = reference(loaded.events, f)
    first = store.get_events(f)
    hits = store.cache_stats().hits
    again = store.get_events(f)
    assert store.cache_stats().hits == hits + 1
    assert first == again == expected
    assert store.count_events(f) == store.count_events(f) == len(expected)
    aggregate = reference_aggregate(loaded.events, f, "day")
    assert store.aggregate(f, "day") == store.aggregate(f, "day") == aggregate


def test_get_events_by_issue_id(loaded: Loaded) -> None:
    issues = sorted({e.tags["issueId"] for e in loaded.events if "issueId" in e.tags})
    for issue in [*issues[:20], "I-5", "nope", ""]:
        expected = [e for e in loaded.events if e.tags.get("issueId") == issue]
        assert loaded.plain.get_events_by_issue_id(issue) == expected
        assert loaded.cached.get_events_by_issue_id(issue) == expected
    assert loaded.plain.get_events_by_issue_id("I-5")  # a value also used as a userId
    assert all(e.tags["issueId"] == "I-5" for e in loaded.plain.get_events_by_issue_id("I-5"))


@pytest.mark.parametrize(
    "bounds",
    [
        WINDOW_DAY,
        WINDOW_HOUR,
        WINDOW_MINUTE,
        WINDOW_ODD,
        ("2026-01-06T05:00:00+02:00", "2026-01-07T13:30:00Z"),
        (BASE - DAY, BASE + 10 * DAY),
        (BASE + DAY, BASE + DAY),
    ],
    ids=["day", "hour", "minute", "unaligned", "strings", "everything", "empty"],
)
def test_get_events_by_time_range(loaded: Loaded, bounds: tuple[Any, Any]) -> None:
    start, end = as_utc(bounds[0]), as_utc(bounds[1])
    assert start is not None and end is not None
    expected = sorted(
        (e for e in loaded.events if start <= e.timestamp < end),
        key=lambda e: (e.timestamp, e.position),
    )
    got = loaded.plain.get_events_by_time_range(*bounds)
    assert positions(got) == positions(expected)
    assert [e.timestamp for e in got] == sorted(e.timestamp for e in got)
    assert loaded.cached.get_events_by_time_range(*bounds) == got


# -- count_events --------------------------------------------------------------------------

COUNTS: list[tuple[str, Builder, str]] = [
    ("none", lambda ev: EventFilter(), "summary"),
    ("type-one", lambda ev: EventFilter(event_types=["IssueOpened"]), "summary"),
    ("types-several", lambda ev: EventFilter(event_types=["IssueOpened", "Zeta", "No"]), "summary"),
    ("tag-one-value", lambda ev: EventFilter(providers=["gitlab"]), "summary"),
    ("tag-several-values", lambda ev: EventFilter(issue_ids=["I-1", "I-2", "I-40"]), "summary"),
    ("tag-custom", lambda ev: EventFilter(tags={CUSTOM_KEY: "growth"}), "summary"),
    ("tag-unknown", lambda ev: EventFilter(tags={"nope": "x"}), "summary"),
    ("tag-80-values", lambda ev: EventFilter(issue_ids=[f"I-{n}" for n in range(80)]), "summary"),
    ("tag-named-and-dict", lambda ev: EventFilter(pr_ids=["P-1"], tags={"prId": "P-1"}), "summary"),
    ("window-day", lambda ev: window(WINDOW_DAY), "summary"),
    ("types-window-day", lambda ev: window(WINDOW_DAY, event_types=["PrMerged"]), "summary"),
    ("types-window-hour", lambda ev: window(WINDOW_HOUR, event_types=TYPES[:3]), "summary"),
    ("types-window-minute", lambda ev: window(WINDOW_MINUTE, event_types=TYPES[3:]), "summary"),
    (
        "types-window-day-and-minute",
        lambda ev: window((BASE + DAY, WINDOW_MINUTE[1]), event_types=["IssueOpened"]),
        "summary",
    ),
    ("start-only-hour", lambda ev: EventFilter(start_time=BASE + 30 * HOUR), "summary"),
    ("end-only-minute", lambda ev: EventFilter(end_time=WINDOW_MINUTE[1]), "summary"),
    (
        "window-iso-plus-five-thirty",  # aligned to minutes in UTC only
        lambda ev: EventFilter(
            start_time="2026-01-06T00:00:00+05:30", end_time="2026-01-07T00:00:00+05:30"
        ),
        "summary",
    ),
    ("window-empty", lambda ev: window((BASE + DAY, BASE + DAY)), "summary"),
    ("window-unaligned", lambda ev: window(WINDOW_ODD), "scan"),
    ("types-window-unaligned", lambda ev: window(WINDOW_ODD, event_types=["Zeta"]), "scan"),
    (
        "window-seconds",
        lambda ev: window((BASE + DAY + timedelta(seconds=30), BASE + 2 * DAY)),
        "scan",
    ),
    (
        "window-on-event-timestamps",
        lambda ev: EventFilter(start_time=ev[10].timestamp, end_time=ev[250].timestamp),
        "scan",
    ),
    ("tag-and-window", lambda ev: window(WINDOW_DAY, providers=["github"]), "scan"),
    ("tag-and-type", lambda ev: EventFilter(providers=["github"], event_types=["Zeta"]), "scan"),
    ("two-tags", lambda ev: EventFilter(providers=["github"], platforms=["ios"]), "scan"),
    (
        "tag-named-and-dict-same-key",
        lambda ev: EventFilter(providers=["github", "gitlab"], tags={"provider": "gitlab"}),
        "scan",
    ),
    ("event-ids", lambda ev: EventFilter(event_ids=[e.event_id for e in ev[:50]]), "scan"),
    (
        "combined",
        lambda ev: window(
            WINDOW_ODD, event_types=TYPES[:6], user_ids=["u1", "u4"], tags={CUSTOM_KEY: "core"}
        ),
        "scan",
    ),
    ("limit", lambda ev: EventFilter(event_types=["IssueOpened"], limit=7), "summary"),
    ("offset", lambda ev: EventFilter(providers=["github"], offset=30), "summary"),
    ("offset-past-end", lambda ev: EventFilter(offset=FIXTURE_SIZE + 1), "summary"),
    ("limit-offset-window", lambda ev: window(WINDOW_DAY, limit=50, offset=170), "summary"),
    ("limit-offset-scan", lambda ev: window(WINDOW_ODD, limit=9, offset=4), "scan"),
    ("limit-zero", lambda ev: EventFilter(limit=0), "summary"),
]


@pytest.mark.parametrize(
    ("build", "path"), [(b, p) for _, b, p in COUNTS], ids=[n for n, _, _ in COUNTS]
)
def test_count_events_matches_reference(loaded: Loaded, build: Builder, path: str) -> None:
    f = build(loaded.events)
    expected = reference(loaded.events, f)
    assert loaded.plain.count_events(f) == len(expected)
    assert loaded.plain.count_events(f) == len(loaded.plain.get_events(f))
    assert loaded.cached.count_events(f) == len(expected)
    # the comparison covers the path it is meant to
    statement = summary_count(Statements(loaded.plain.schema), normalize(f).unpaged())
    assert (statement is not None) == (path == "summary")


# -- aggregate -----------------------------------------------------------------------------

GROUPS: list[tuple[str, str | None]] = [
    ("event_type", None),
    ("tag", "provider"),
    ("tag", CUSTOM_KEY),
    ("tag", "issueId"),
    ("minute", None),
    ("hour", None),
    ("day", None),
]

AGGREGATE_FILTERS: list[tuple[str, Builder]] = [
    ("none", lambda ev: EventFilter()),
    ("types", lambda ev: EventFilter(event_types=["IssueOpened", "PrMerged", "No"])),
    ("window-day", lambda ev: window(WINDOW_DAY)),
    ("window-hour", lambda ev: window(WINDOW_HOUR, event_types=TYPES[2:6])),
    ("window-minute", lambda ev: window(WINDOW_MINUTE)),
    ("window-unaligned", lambda ev: window(WINDOW_ODD)),
    ("start-only-day", lambda ev: EventFilter(start_time=BASE + 2 * DAY)),
    ("end-only-unaligned", lambda ev: EventFilter(end_time=WINDOW_ODD[1])),
    ("window-strings", lambda ev: EventFilter(start_time="2026-01-06T05:00:00+02:00")),
    ("tag", lambda ev: EventFilter(providers=["github"])),
    ("tags-two", lambda ev: EventFilter(tags={CUSTOM_KEY: "core"}, platforms=["web", "ios"])),
    ("tag-window", lambda ev: window(WINDOW_DAY, issue_ids=[f"I-{n}" for n in range(1, 90)])),
    ("event-ids", lambda ev: EventFilter(event_ids=[e.event_id for e in ev[::5]])),
    ("nothing", lambda ev: EventFilter(event_types=["Nope"])),
    (
        "paging-ignored",
        lambda ev: EventFilter(limit=3, offset=2, order_by="type", order_direction="desc"),
    ),
]


@pytest.mark.parametrize(
    "build", [b for _, b in AGGREGATE_FILTERS], ids=[n for n, _ in AGGREGATE_FILTERS]
)
@pytest.mark.parametrize(
    ("group_by", "tag_key"), GROUPS, ids=[f"{g}-{k}" if k else g for g, k in GROUPS]
)
def test_aggregate_matches_reference(
    loaded: Loaded, group_by: Any, tag_key: str | None, build: Builder
) -> None:
    f = build(loaded.events)
    expected = reference_aggregate(loaded.events, f, group_by, tag_key)
    got = loaded.plain.aggregate(f, group_by, tag_key=tag_key)
    assert got == expected
    keys = [row.key for row in got]
    assert keys == sorted(set(keys))
    for row in got:
        assert row.first_timestamp <= row.last_timestamp
        assert row.first_timestamp.utcoffset() == timedelta(0)
        if group_by in ("minute", "hour", "day"):
            assert row.key == bucket_key(row.first_timestamp, group_by)
            assert datetime.fromisoformat(row.key.replace("Z", "+00:00")) <= row.first_timestamp


def test_aggregate_paths(loaded: Loaded) -> None:
    """The aggregate comparisons cover both the summaries and the scans."""
    st = Statements(loaded.plain.schema)
    ev = loaded.events

    def from_summary(f: EventFilter, group_by: Any) -> bool:
        return summary_aggregate(st, normalize(f).unpaged(), group_by) is not None

    filters = dict(AGGREGATE_FILTERS)
    for name, group_by in [
        ("none", "event_type"),
        ("types", "event_type"),
        ("window-day", "event_type"),
        ("window-hour", "event_type"),
        ("window-minute", "minute"),
        ("window-day", "day"),
        ("window-day", "minute"),
        ("start-only-day", "hour"),
        ("none", "day"),
        ("types", "minute"),
    ]:
        assert from_summary(filters[name](ev), group_by), (name, group_by)
    for name, group_by in [
        ("window-unaligned", "event_type"),
        ("window-hour", "day"),
        ("window-minute", "hour"),
        ("tag", "event_type"),
        ("tag", "day"),
        ("event-ids", "hour"),
        ("none", "tag"),
    ]:
        assert not from_summary(filters[name](ev), group_by), (name, group_by)


def test_aggregate_by_tag_leaves_out_events_without_it(loaded: Loaded) -> None:
    rows = loaded.plain.aggregate(group_by="tag", tag_key=CUSTOM_KEY)
    assert [row.key for row in rows] == sorted(TEAMS)
    assert sum(row.count for row in rows) == sum(CUSTOM_KEY in e.tags for e in loaded.events)
    assert sum(row.count for row in rows) < FIXTURE_SIZE
    assert loaded.plain.aggregate(group_by="tag", tag_key="nope") == []
    assert loaded.plain.aggregate(group_by="tag", tag_key="") == []


# -- event types and tags ------------------------------------------------------------------


def test_event_types_and_tags(loaded: Loaded) -> None:
    for store in (loaded.plain, loaded.cached, loaded.cached):
        assert store.get_event_types() == sorted({e.event_type for e in loaded.events})
        tags = store.get_tags()
        assert tags == reference_tags(loaded.events)
        assert list(tags) == sorted(tags)
        for values in tags.values():
            assert values == sorted(set(values))
        assert set(tags) == {"issueId", "prId", "userId", "provider", "platform", CUSTOM_KEY}
    # the answers are copies: changing them changes no later answer
    loaded.cached.get_event_types().append("X")
    loaded.cached.get_tags()["provider"].append("X")
    assert "X" not in loaded.cached.get_event_types()
    assert "X" not in loaded.cached.get_tags()["provider"]


def check_summaries(store: EventStore, events: list[SequencedEvent]) -> None:
    """Everything the summaries answer agrees with the events."""
    assert store.count_events() == len(events) == store.head()
    assert store.get_event_types() == sorted({e.event_type for e in events})
    for event_type in store.get_event_types():
        f = EventFilter(event_types=[event_type])
        assert store.count_events(f) == len(reference(events, f)), event_type
    tags = reference_tags(events)
    assert store.get_tags() == tags
    fields = {"issueId": "issue_ids", "prId": "pr_ids", "provider": "providers"}
    for key, values in tags.items():
        for value in values[:15]:
            f = EventFilter(tags={key: value})
            assert store.count_events(f) == len(reference(events, f)), (key, value)
        if key in fields:
            f = EventFilter(**{fields[key]: values})
            assert store.count_events(f) == len([e for e in events if key in e.tags])
    for f in (EventFilter(), window(WINDOW_DAY), window((BASE, BASE + 40 * DAY))):
        assert store.aggregate(f, "day") == reference_aggregate(events, f, "day")
        assert store.aggregate(f, "event_type") == reference_aggregate(events, f, "event_type")
        assert store.count_events(f) == len(reference(events, f))
    f = window(WINDOW_HOUR, event_types=["IssueOpened", "NewType", "TxKept"])
    assert store.aggregate(f, "hour") == reference_aggregate(events, f, "hour")
    assert store.aggregate(None, "tag", tag_key="provider") == reference_aggregate(
        events, EventFilter(), "tag", "provider"
    )


def _folded(store: EventStore) -> int:
    """The last position the summary tables count (the tail after it is added up at read)."""
    with psycopg.connect(store.dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT folded FROM {}").format(sql.Identifier(store.schema, "summary_state"))
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_summaries_are_exact_with_the_whole_log_unfolded_and_after_folding(
    make_store: Callable[..., EventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads add the unfolded tail to the folded summaries: the answers are the same with every
    event in the tail, once it is folded, and with a new tail on top of folded summaries."""
    store = make_store(cache_size=0)
    monkeypatch.setattr(store, "_fold_due", lambda position: False)
    append_fixture(store)
    events = store.get_events()
    assert _folded(store) == 0
    check_summaries(store, events)
    assert store.fold_summaries() == store.head() == _folded(store)
    check_summaries(store, events)
    late = BASE + 20 * DAY
    store.append_batch(
        [
            DomainEvent("NewType", tags={"provider": "late", "n": str(n)}, timestamp=late)
            for n in range(3)
        ]
    )
    store.append(DomainEvent("IssueOpened", tags={"provider": "late"}, timestamp=late))
    assert _folded(store) == len(events)
    check_summaries(store, store.get_events())
    assert store.fold_summaries() == len(events) + 4
    check_summaries(store, store.get_events())


def test_folds_racing_appends_and_each_other_count_every_event_once(
    make_store: Callable[..., EventStore],
) -> None:
    """Appenders fold as their tail grows, in the background, while another store folds in a
    loop: each event is counted once, whoever folded it."""
    store = make_store(cache_size=0)
    folder = make_store(schema=store.schema, cache_size=0)
    done = threading.Event()
    folds: list[int] = []

    def fold() -> None:
        while not done.is_set():
            folds.append(folder.fold_summaries())

    def append(k: int) -> None:
        for n in range(40):
            if n % 10 == 0:
                store.append_batch(
                    [DomainEvent("Batched", tags={"thread": str(k)}) for _ in range(30)]
                )
            else:
                store.append(DomainEvent("Single", tags={"thread": str(k), "n": str(n % 3)}))

    folding = threading.Thread(target=fold)
    folding.start()
    appenders = [threading.Thread(target=append, args=(k,)) for k in range(4)]
    for t in appenders:
        t.start()
    for t in appenders:
        t.join()
    done.set()
    folding.join()
    assert folds and folds == sorted(folds)
    check_summaries(store, store.get_events())
    store.fold_summaries()
    assert _folded(store) == store.head() == 4 * (36 + 4 * 30)
    check_summaries(store, store.get_events())


def test_an_append_stands_when_no_thread_can_start_to_fold(
    make_store: Callable[..., EventStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter shutdown (an append from an atexit handler, say) no thread can start: the
    append that would fold in the background still returns its position, and the next append
    folds once threads can start again."""
    store = make_store(cache_size=0)
    start = threading.Thread.start

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "tamma-events fold":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    events = [DomainEvent("Bulk", tags={"n": str(n % 3)}) for n in range(300)]
    assert store.append_batch(events) == 300
    assert _folded(store) == 0
    monkeypatch.setattr(threading.Thread, "start", start)
    assert store.append(DomainEvent("Bulk")) == 301
    store._join_fold()
    assert _folded(store) == 301
    check_summaries(store, store.get_events())


def test_summaries_after_failed_writes(make_store: Callable[..., EventStore]) -> None:
    store = make_store(cache_size=0)
    cached = make_store(schema=store.schema)
    append_fixture(store)
    events = store.get_events()
    check_summaries(store, events)
    check_summaries(cached, events)
    later = BASE + 20 * DAY

    def new(event_type: str = "NewType", **kwargs: Any) -> DomainEvent:
        kwargs.setdefault("tags", {"provider": "leaked", "fresh": "1"})
        return DomainEvent(event_type, timestamp=later, **kwargs)

    # a failing condition: one event (the append function), a batch (COPY)
    violated = AppendCondition(Query.of(types=["IssueOpened"]))
    expect_error(APPEND_CONDITION_FAILED, lambda: store.append(new(), violated))
    expect_error(APPEND_CONDITION_FAILED, lambda: store.append_batch([new(), new()], violated))
    expect_error(
        APPEND_CONDITION_FAILED, lambda: store.append_batch([new() for _ in range(5)], violated)
    )
    for s in (store, cached):
        check_summaries(s, events)

    # duplicate event ids: stored already, or given twice
    stored_id = events[10].event_id
    twice = uuid.uuid4()
    for batch in (
        [new(event_id=stored_id)],
        [new(), new(event_id=stored_id)],
        [*(new() for _ in range(4)), new(event_id=stored_id)],
        [new(event_id=twice), new(), new(), new(event_id=twice)],
    ):
        expect_error(DUPLICATE_EVENT, lambda batch=batch: store.append_batch(batch))
    for s in (store, cached):
        check_summaries(s, events)

    # a transaction block that raises is rolled back
    with pytest.raises(RuntimeError, match="abort"), store.transaction() as tx:
        tx.append(new())
        tx.append_batch([new() for _ in range(5)])
        assert len(tx.read()) == len(events) + 6
        raise RuntimeError("abort")
    for s in (store, cached):
        check_summaries(s, events)
    assert "NewType" not in store.get_event_types()
    assert "fresh" not in store.get_tags()

    # a transaction whose failed appends are caught commits only its other appends
    with store.transaction() as tx:
        tx.append(new("TxKept", tags={"provider": "tx"}))
        expect_error(DUPLICATE_EVENT, lambda: tx.append(new("TxDropped", event_id=stored_id)))
        expect_error(
            APPEND_CONDITION_FAILED,
            lambda: tx.append_batch([new("TxDropped") for _ in range(3)], violated),
        )
        tx.append_batch([new("TxKept", tags={"provider": "tx", "n": str(n)}) for n in range(3)])
    after = store.get_events()
    assert len(after) == len(events) + 4
    assert after[: len(events)] == events
    assert {e.event_type for e in after[len(events) :]} == {"TxKept"}
    for s in (store, cached):
        check_summaries(s, after)
    assert store.aggregate(EventFilter(start_time=later), "day") == [
        AggregateRow(bucket_key(later, "day"), 4, later, later)
    ]
    assert store.verify().ok


# -- validation ----------------------------------------------------------------------------

NAIVE = datetime(2026, 1, 6, 12, 0)
TOO_MANY = MAX_FILTER_VALUES + 1

BAD_FILTERS: list[tuple[str, EventFilter, str]] = [
    ("order-by-unknown", EventFilter(order_by="random"), "order_by"),
    ("order-by-case", EventFilter(order_by="Position"), "order_by"),
    ("direction-unknown", EventFilter(order_direction="up"), "order_direction"),
    ("end-before-start", window((BASE + DAY, BASE)), "end_time"),
    (
        "end-before-start-strings",
        EventFilter(start_time="2026-01-06T00:00:00Z", end_time="2026-01-06T01:59:59+02:00"),
        "end_time",
    ),
    ("limit-negative", EventFilter(limit=-1), "limit"),
    ("limit-bool", EventFilter(limit=True), "limit"),
    ("limit-float", EventFilter(limit=2.0), "limit"),
    ("limit-string", EventFilter(limit="5"), "limit"),
    ("offset-negative", EventFilter(offset=-1), "offset"),
    ("offset-bool", EventFilter(offset=False), "offset"),
    ("offset-none", EventFilter(offset=None), "offset"),
    (
        "event-ids-too-many",
        EventFilter(event_ids=[uuid.UUID(int=n) for n in range(TOO_MANY)]),
        "event_ids",
    ),
    ("event-types-too-many", EventFilter(event_types=["T"] * TOO_MANY), "event_types"),
    ("issue-ids-too-many", EventFilter(issue_ids=[str(n) for n in range(TOO_MANY)]), "issue_ids"),
    ("platforms-too-many", EventFilter(platforms=["p"] * TOO_MANY), "platforms"),
    ("start-naive", EventFilter(start_time=NAIVE), "start_time"),
    ("end-naive", EventFilter(end_time=NAIVE), "end_time"),
    ("start-naive-string", EventFilter(start_time="2026-01-06T12:00:00"), "start_time"),
    ("start-unparsable", EventFilter(start_time="yesterday"), "start_time"),
    ("end-unparsable", EventFilter(end_time="2026-13-45T99:00:00Z"), "end_time"),
    ("start-date-out-of-range", EventFilter(start_time="2026-02-30"), "start_time"),
    ("start-number", EventFilter(start_time=1767225600), "start_time"),
    ("event-id-not-uuid", EventFilter(event_ids=["not-a-uuid"]), "event_ids"),
    ("event-id-int", EventFilter(event_ids=[42]), "event_ids"),
    ("event-ids-string", EventFilter(event_ids=str(uuid.UUID(int=7))), "event_ids"),
    ("event-types-non-string", EventFilter(event_types=["A", 3]), "event_types"),
    ("event-types-string", EventFilter(event_types="IssueOpened"), "event_types"),
    ("event-types-none-item", EventFilter(event_types=[None]), "event_types"),
    ("provider-non-string", EventFilter(providers=[b"github"]), "providers"),
    ("type-nul", EventFilter(event_types=["Issue\x00Opened"]), "event_types"),
    ("type-surrogate", EventFilter(event_types=["\ud800"]), "event_types"),
    ("issue-nul", EventFilter(issue_ids=["I-\x00"]), "issue_ids"),
    ("user-surrogate", EventFilter(user_ids=["u\udfff"]), "user_ids"),
    ("pr-nul", EventFilter(pr_ids=["\x00"]), "pr_ids"),
    ("tags-value-nul", EventFilter(tags={"issueId": "I-5\x00"}), "tags"),
    ("tags-value-surrogate", EventFilter(tags={"issueId": "\udc80"}), "tags"),
    ("tags-key-nul", EventFilter(tags={"issue\x00Id": "I-5"}), "tags"),
    ("tags-key-surrogate", EventFilter(tags={"\ud83d": "I-5"}), "tags"),
    ("tags-key-non-string", EventFilter(tags={1: "I-5"}), "tags"),
    ("tags-value-non-string", EventFilter(tags={"issueId": 5}), "tags"),
    ("tags-not-a-dict", EventFilter(tags=[("issueId", "I-5")]), "tags"),
]


def check_untouched(loaded: Loaded) -> None:
    assert loaded.plain.head() == FIXTURE_SIZE
    assert loaded.plain.get_events() == loaded.events
    f = window(WINDOW_HOUR, providers=["github"])
    assert loaded.cached.get_events(f) == reference(loaded.events, f)


@pytest.mark.parametrize(
    ("bad", "field"), [(b, f) for _, b, f in BAD_FILTERS], ids=[n for n, _, _ in BAD_FILTERS]
)
def test_bad_filters_are_refused(loaded: Loaded, bad: EventFilter, field: str) -> None:
    calls: list[Callable[[EventStore], Any]] = [
        lambda s: s.get_events(bad),
        lambda s: s.count_events(bad),
        lambda s: s.aggregate(bad),
        lambda s: s.aggregate(bad, "day"),
        lambda s: s.aggregate(bad, "tag", tag_key="provider"),
    ]
    for store in (loaded.plain, loaded.cached):
        for call in calls:
            error = expect_error(QUERY_ERROR, lambda call=call, store=store: call(store))
            assert error.context["field"] == field, error
            assert error.message
    check_untouched(loaded)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.aggregate(None, "week"), "group_by"),
        (lambda s: s.aggregate(None, "Day"), "group_by"),
        (lambda s: s.aggregate(None, None), "group_by"),
        (lambda s: s.aggregate(None, "tag"), "tag_key"),
        (lambda s: s.aggregate(EventFilter(providers=["github"]), "tag"), "tag_key"),
        (lambda s: s.aggregate(None, "event_type", tag_key="provider"), "tag_key"),
        (lambda s: s.aggregate(None, "day", tag_key="provider"), "tag_key"),
        (lambda s: s.get_events_by_time_range(NAIVE, BASE + DAY), "start_time"),
        (lambda s: s.get_events_by_time_range(BASE, "not a time"), "end_time"),
        (lambda s: s.get_events_by_time_range(BASE + DAY, BASE), "end_time"),
        (lambda s: s.get_events_by_issue_id(7), "issue_ids"),
        (lambda s: s.get_events_by_issue_id("I-\x00"), "issue_ids"),
    ],
    ids=[
        "group-by-unknown",
        "group-by-case",
        "group-by-none",
        "tag-without-key",
        "tag-without-key-filtered",
        "key-with-event-type",
        "key-with-day",
        "range-naive",
        "range-unparsable",
        "range-reversed",
        "issue-id-int",
        "issue-id-nul",
    ],
)
def test_bad_arguments_are_refused(
    loaded: Loaded, call: Callable[[EventStore], Any], field: str
) -> None:
    for store in (loaded.plain, loaded.cached):
        error = expect_error(QUERY_ERROR, lambda store=store: call(store))
        assert error.context["field"] == field, error
    check_untouched(loaded)


@pytest.mark.parametrize(
    "bad",
    [{"event_types": ["IssueOpened"]}, "IssueOpened", 42, Query.of(types=["IssueOpened"])],
    ids=["dict", "str", "int", "query"],
)
def test_only_event_filters_are_accepted(loaded: Loaded, bad: Any) -> None:
    for store in (loaded.plain, loaded.cached):
        for call in (store.get_events, store.count_events, store.aggregate):
            error = expect_error(QUERY_ERROR, lambda call=call: call(bad))
            assert "EventFilter" in error.message
    check_untouched(loaded)


def test_bad_tag_key_of_aggregate_is_refused(loaded: Loaded) -> None:
    for key in ("a\x00b", "\ud800", 5):
        for store in (loaded.plain, loaded.cached):
            error = expect_error(
                QUERY_ERROR, lambda store=store, key=key: store.aggregate(None, "tag", tag_key=key)
            )
            # the error names the argument the caller passed
            assert error.context["field"] == "tag_key", error
    check_untouched(loaded)


# -- hostile keys and values ---------------------------------------------------------------

HOSTILE = [
    "'",
    "''",
    '"',
    "\\",
    "\\'",
    "\\\\'",
    "a;b",
    "; DROP TABLE events; --",
    "'; DELETE FROM head; --",
    "--",
    "-- comment",
    "/* */",
    "*/ SELECT 1 /*",
    "' OR 1=1 --",
    "' OR '1'='1",
    '" OR ""="',
    "$.a[*] ? (@ == 1)",
    "$.**",
    "@@",
    "@>",
    "?",
    "?|",
    "?&",
    "%s",
    "%(x)s",
    "$1",
    "{}",
    '{"a":1}',
    '{"issueId": "I-5"}',
    "[1, 2]",
    "null",
    "true",
    "*",
    "%",
    "_",
    " ",
    "\t\n\r",
    "\u00e9",
    "e\u0301",
    "\U0001f600\U0001f4a9",
    "\u05e9\u05dc\u05d5\u05dd \u202eabc",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "\u65e5\u672c\u8a9e",
    "\ufeffbom",
    "\x01\x1f\x7f",
    "\u2028\u2029",
    "CaseX",
    "casex",
    "k" * 128,
]
LONG_VALUE = "long-" + "ab" * 50_000  # 100k characters that compress
NEVER_STORED = [
    "x' OR 'x'='x",
    "' OR 1=1 -- ",
    "'' OR 1=1 --",
    "$.a[*] ? (@ == 2)",
    '{"a": 1}',
    "\u00e9 ",
    "casey",
    "@",
    "\\\\",
    LONG_VALUE[:-1],
]


def test_hostile_keys_and_values_are_bound(make_store: Callable[..., EventStore]) -> None:
    store = make_store(cache_size=0)
    cached = make_store(schema=store.schema)
    typed: dict[str, int] = {}  # hostile string -> the event with it as type and values
    keyed: dict[str, int] = {}  # hostile string -> the event with it as a tag key
    for start in range(0, len(HOSTILE), 3):
        chunk = HOSTILE[start : start + 3]
        pairs = []
        for n, value in enumerate(chunk, start):
            at = BASE + n * HOUR + timedelta(seconds=n)
            tags = {"k": value, "issueId": value, CUSTOM_KEY: value}
            pairs.append(
                (
                    DomainEvent(value, data={"v": value}, tags=tags, timestamp=at),
                    DomainEvent(
                        "Plain", {"v": value}, {value: "v", "provider": value}, timestamp=at
                    ),
                )
            )
        if start % 2:  # one event at a time: the append function
            for value, (a, b) in zip(chunk, pairs, strict=True):
                typed[value] = store.append(a)
                keyed[value] = store.append(b)
        else:  # in a batch: COPY
            last = store.append_batch([event for pair in pairs for event in pair])
            first = last - 2 * len(chunk) + 1
            for k, value in enumerate(chunk):
                typed[value], keyed[value] = first + 2 * k, first + 2 * k + 1
    long_position = store.append(DomainEvent("Long", tags={"k": LONG_VALUE, LONG_VALUE[:128]: "x"}))
    near = store.append_batch(
        [
            DomainEvent("Plain", tags={"k": "' or 1=1 --"}),
            DomainEvent("Plain", tags={"k": "ab" * 50_000}),
            DomainEvent("' OR 1=1 -- x", tags={"K": "'"}),
        ]
    )
    total = near
    assert total == 2 * len(HOSTILE) + 4
    events = store.get_events()
    assert len(events) == total

    def found(f: EventFilter) -> list[int]:
        got = store.get_events(f)
        assert positions(got) == positions(reference(events, f)), f
        assert store.count_events(f) == len(got)
        return positions(got)

    for value in HOSTILE:
        a, b = typed[value], keyed[value]
        assert found(EventFilter(event_types=[value])) == [a]
        assert found(EventFilter(tags={"k": value})) == [a]
        assert found(EventFilter(tags={CUSTOM_KEY: value, "issueId": value})) == [a]
        assert found(EventFilter(issue_ids=[value])) == [a]
        assert found(EventFilter(issue_ids=[value], tags={"issueId": value})) == [a]
        assert found(EventFilter(providers=[value])) == [b]
        assert found(EventFilter(tags={value: "v"})) == [b]
        assert found(EventFilter(tags={value: "v"}, providers=[value], event_types=["Plain"])) == [
            b
        ]
        assert found(EventFilter(tags={value: value})) == []
        event = store.get_events(EventFilter(event_ids=[events[a - 1].event_id]))[0]
        assert event.event_type == value and event.tags["k"] == value and event.data["v"] == value
        rows = store.aggregate(EventFilter(providers=[value]), "tag", tag_key=value)
        assert [(row.key, row.count) for row in rows] == [("v", 1)]
        rows = cached.aggregate(None, "tag", tag_key=value)
        assert [(row.key, row.count) for row in rows] == [("v", 1)]

    # many values at once: OR'd containments, and the lookup for more than 64
    decoys = [f"{value}'" for value in HOSTILE]
    assert found(EventFilter(issue_ids=HOSTILE)) == sorted(typed.values())
    assert found(EventFilter(issue_ids=[*HOSTILE, *decoys])) == sorted(typed.values())
    assert found(EventFilter(providers=[*decoys, *HOSTILE[:5]])) == sorted(
        keyed[v] for v in HOSTILE[:5]
    )
    assert found(EventFilter(event_types=HOSTILE, order_by="type")) == [
        typed[v] for v in sorted(HOSTILE)
    ]
    found(EventFilter(order_by="type", order_direction="desc"))
    assert found(EventFilter(tags={"k": LONG_VALUE})) == [long_position]
    assert found(EventFilter(tags={LONG_VALUE[:128]: "x"})) == [long_position]
    assert found(EventFilter(event_types=["' OR 1=1 -- x"], tags={"K": "'"})) == [total]

    # strings nobody stored match nothing
    for value in NEVER_STORED:
        for f in (
            EventFilter(tags={"k": value}),
            EventFilter(issue_ids=[value]),
            EventFilter(event_types=[value]),
            EventFilter(tags={value: "v"}),
            EventFilter(providers=[value], event_types=["Plain"]),
        ):
            assert store.get_events(f) == [], f
            assert store.count_events(f) == 0, f
        assert store.aggregate(None, "tag", tag_key=value) == []

    # the summaries are exact
    assert store.get_tags() == cached.get_tags() == reference_tags(events)
    tags = store.get_tags()
    assert tags["k"] == sorted({*HOSTILE, LONG_VALUE, "' or 1=1 --", "ab" * 50_000})
    for value in HOSTILE:
        assert tags[value] == ["v"]
    assert store.get_event_types() == sorted({e.event_type for e in events})
    for group_by, key in (("event_type", None), ("tag", "k"), ("tag", "provider"), ("hour", None)):
        expected = reference_aggregate(events, EventFilter(), group_by, key)
        assert store.aggregate(None, group_by, tag_key=key) == expected
        assert cached.aggregate(None, group_by, tag_key=key) == expected

    # and the log is intact
    assert store.head() == total
    assert store.count_events() == total
    assert len(store.read()) == total
    assert store.get_events() == events
    report = store.verify()
    assert report.ok, report


def test_long_incompressible_tag_value(store: EventStore) -> None:
    """A tag value of 100k characters that do not compress, within the event size limit, is
    stored and found like any other."""
    rnd = random.Random(5)
    value = "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(100_000))
    store.append(DomainEvent("Before", tags={"k": "short"}))
    position = store.append(DomainEvent("Long", tags={"k": value}))
    assert position == 2
    assert positions(store.get_events(EventFilter(tags={"k": value}))) == [2]
    assert store.count_events(EventFilter(tags={"k": value})) == 1
    assert store.get_tags() == {"k": sorted(["short", value])}
    assert [row.count for row in store.aggregate(None, "tag", tag_key="k")] == [1, 1]
    assert store.verify().ok
