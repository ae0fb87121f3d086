"""Hostile input at the Python API and at the HTTP app.

Every bad value, in every field of an event (event_type, event_id, timestamp, tags keys and
values, data and metadata, their keys and values), of a DCB `Query`, of an `EventFilter` and of
the read arguments, must be refused with an `EventStoreError`: ``VALIDATION_FAILED`` for events
(its context naming the event's index and the field), ``QUERY_ERROR`` for queries (naming the
field). Nothing of a refused batch is written (the head and the count stay, the batch's valid
events are absent) and the store keeps serving: a valid append and read work right after. Over
HTTP, a bad request is a 400 carrying the store's error as JSON, never a 500 or a 503, and the
server keeps serving.

The values are the extreme ones: NUL, lone surrogates, bytes that are not UTF-8, NaN and
Infinity (float and Decimal), 10,000-deep nesting, payloads far over ``max_event_bytes``,
integers too long for Python to print, UUID spellings that are not UUIDs, timestamps that fall
outside years 1 to 9999 in UTC, filters of 100,000 values and values of 1 MiB. Text that only
looks like SQL or JSON path (``'; DROP TABLE events; --``, ``$$``, ``$.a[*] ? (@ == 1)``,
``@>``, quotes) is valid: it is stored and matched literally, and nothing else matches it.

This complements test_codec.py (the codec's wording of ordinary bad values), test_atomicity.py
(all or nothing), test_dcb.py and test_queries.py (hostile tag text through reads, conditions
and EventFilter) and test_web.py (malformed requests). The suite runs under both codecs
(``TAMMA_EVENTS_IMPL=native`` and ``python``); the event cases are also given to both codecs
directly, which must refuse them with identical errors.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import reprlib
import socket
import string
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

import httpx
import msgspec
import psycopg
import pytest

from _codec_support import outcome
from _web_support import LiveServer
from tamma_events import (
    APPEND_CONDITION_FAILED,
    QUERY_ERROR,
    VALIDATION_FAILED,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Page,
    Query,
    QueryItem,
    SequencedEvent,
)
from tamma_events.codec.reference import DEFAULT_MAX_EVENT_BYTES
from tamma_events.ops.migrating import drop
from tamma_events.streaming.web import create_app

pytestmark = pytest.mark.timeout(300)

decode_page = msgspec.json.Decoder(Page).decode

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120


def short(value: object) -> str:
    """A repr that stays short, even of a 2 MiB string or a 10,000-deep list."""
    return _short.repr(value)


# -- hostile values ------------------------------------------------------------------------------


def nested(depth: int, kind: str) -> Any:
    """``depth`` lists (or dicts) inside one another around a 0."""
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


DEEP_LIST = nested(10_000, "list")
DEEP_DICT = nested(10_000, "dict")
#: More digits than Python prints (4,300 by default): any message quoting it with repr fails.
BIG_INT = 10**5000
#: Twice the default event size limit.
HUGE_TEXT = "x" * (2 * DEFAULT_MAX_EVENT_BYTES)
MIB_TEXT = "v" * (1 << 20)

HOSTILE: dict[str, Any] = {
    "NUL": "a\x00b",
    "lone high surrogate": "a\ud800b",
    "lone low surrogate": "\udfff",
    "bytes not UTF-8": b"\xff\xfe\xc3(",
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
    "Decimal NaN": Decimal("NaN"),
    "Decimal sNaN": Decimal("sNaN"),
    "Decimal Infinity": Decimal("Infinity"),
    "10000-deep list": DEEP_LIST,
    "10000-deep dict": DEEP_DICT,
    "int of 5001 digits": BIG_INT,
    "2 MiB string": HUGE_TEXT,
}

#: Where a hostile value goes in an event: the field the error must name, and the fields.
PLACES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "event_type": ("event_type", lambda v: {"event_type": v}),
    "event_id": ("event_id", lambda v: {"event_id": v}),
    "timestamp": ("timestamp", lambda v: {"timestamp": v}),
    "tag key": ("tags", lambda v: {"tags": {"ok": "v", v: "x"}}),
    "tag value": ("tags", lambda v: {"tags": {"ok": "v", "k": v}}),
    "data": ("data", lambda v: {"data": v}),
    "data value": ("data", lambda v: {"data": {"x": [1, {"y": v}]}}),
    "data key": ("data", lambda v: {"data": {"x": {v: 1}}}),
    "metadata": ("metadata", lambda v: {"metadata": v}),
    "metadata value": ("metadata", lambda v: {"metadata": {"x": v}}),
    "metadata key": ("metadata", lambda v: {"metadata": {v: 1}}),
}
#: Places where a 2 MiB string is legal text, so that only the size limit refuses the event
#: (that error names no field: it is about the whole event).
SIZED = {"tag value", "data value", "data key", "metadata value", "metadata key"}


def _buildable(place: str, value: Any) -> bool:
    """Whether the value can go there at all (a list or a signalling NaN is no dict key)."""
    try:
        PLACES[place][1](value)
    except TypeError:
        return False
    return True


EVENT_CASES = [
    pytest.param(name, place, id=f"{place}: {name}")
    for name, value in HOSTILE.items()
    for place in PLACES
    if _buildable(place, value)
]


def hostile_event(name: str, place: str) -> tuple[DomainEvent, str | None]:
    """An event holding ``HOSTILE[name]`` at ``place``, and the field its error names."""
    field, build = PLACES[place]
    fields = {"event_type": "Hostile", "timestamp": T0, **build(HOSTILE[name])}
    expected = None if name == "2 MiB string" and place in SIZED else field
    return DomainEvent(**fields), expected


def good(n: int = 0) -> DomainEvent:
    return DomainEvent("Good", {"n": n}, {"batch": "good"}, timestamp=T0)


# -- checks --------------------------------------------------------------------------------------


def refused(call: Callable[[], object], code: str) -> EventStoreError:
    """The `EventStoreError` of ``code`` that ``call`` raises; fails on anything else (another
    exception, another code, or no error at all)."""
    try:
        result = call()
    except EventStoreError as exc:
        assert exc.code == code, f"{exc.code} instead of {code}: {exc.message[:300]}"
        assert isinstance(exc.message, str) and exc.message
        json.dumps(exc.to_dict())  # the error crosses the CLI and HTTP boundaries as JSON
        return exc
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} instead of EventStoreError {code}: {str(exc)[:300]}")
    if hasattr(result, "stop"):  # a subscription that should not have been opened
        result.stop()
    pytest.fail(f"accepted (returned {short(result)}) instead of EventStoreError {code}")


def check_validation_error(
    error: EventStoreError, index: int, event: DomainEvent, field: str | None
) -> None:
    """``error`` refuses ``event`` at ``index`` for ``field`` (None: for its size)."""
    assert error.code == VALIDATION_FAILED
    assert error.message.startswith(f"event {index}: "), error.message[:200]
    assert error.context["index"] == index
    assert error.context["field"] == field, short(error.context)
    if field is None:
        assert error.context["size"] > error.context["limit"] == DEFAULT_MAX_EVENT_BYTES
    if field != "event_id":
        assert error.context["event_id"] == str(event.event_id)


def assert_nothing_written(store: EventStore, head: int, absent: list[DomainEvent]) -> None:
    """The store holds what it held: same head and count, none of ``absent`` stored."""
    assert store.head() == head
    assert store.read(after=head).events == []
    assert store.count_events() == head
    for event in absent:
        assert store.get_event(event.event_id) is None


def assert_serving(store: EventStore) -> None:
    """A valid append and the reads of it work."""
    head = store.head()
    probe = DomainEvent("Probe", {"after": "hostile input"}, {"probe": uuid.uuid4().hex})
    assert store.append(probe) == head + 1
    assert [event.event_id for event in store.read(after=head)] == [probe.event_id]
    stored = store.get_event(probe.event_id)
    assert stored is not None and stored.data == probe.data and stored.position == head + 1
    assert store.get_events(EventFilter(tags=probe.tags)) == [stored]


class SharedStore:
    """One store for the tests that write nothing but probes, replaced when a test left it
    unable to serve (so that one bug does not fail every later test)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.store = self._open()

    def _open(self) -> EventStore:
        store = EventStore(self.dsn, schema=f"hostile_{uuid.uuid4().hex[:12]}")
        store.append_batch([DomainEvent("Seed", {"i": i}, {"seed": str(i)}) for i in range(3)])
        return store

    def check(self) -> None:
        try:
            self.store.read()
            self.store.get_events()
        except Exception:
            self.close()
            self.store = self._open()

    def close(self) -> None:
        self.store.close()
        drop(self.dsn, self.store.schema)


@pytest.fixture(scope="module")
def shared_store(pg_dsn: str) -> Iterator[SharedStore]:
    holder = SharedStore(pg_dsn)
    yield holder
    holder.close()


@pytest.fixture
def shared(shared_store: SharedStore) -> Iterator[EventStore]:
    yield shared_store.store
    shared_store.check()


# -- 1. events: every hostile value in every field -------------------------------------------


@pytest.mark.parametrize(("name", "place"), EVENT_CASES)
def test_a_hostile_value_in_any_field_is_refused_and_nothing_is_written(
    shared: EventStore, name: str, place: str
) -> None:
    bad, field = hostile_event(name, place)
    batch = [good(0), good(1), bad, good(3)]
    absent = [e for e in batch if e is not bad or field != "event_id"]
    head = shared.head()
    error = refused(lambda: shared.append_batch(batch), VALIDATION_FAILED)
    check_validation_error(error, 2, bad, field)
    assert_nothing_written(shared, head, absent)
    # Alone, it is event 0.
    check_validation_error(refused(lambda: shared.append(bad), VALIDATION_FAILED), 0, bad, field)
    assert_nothing_written(shared, head, absent)
    assert_serving(shared)


@pytest.mark.parametrize(("name", "place"), EVENT_CASES)
def test_both_codecs_refuse_a_hostile_value_alike(name: str, place: str) -> None:
    native = importlib.import_module("tamma_events._native")
    python = importlib.import_module("tamma_events.codec.reference")
    bad, _ = hostile_event(name, place)
    batch = [good(0), bad]
    expected = outcome(lambda: python.prepare(batch, first_index=5))
    assert expected[0] == "error", short(expected)
    assert outcome(lambda: native.prepare(batch, first_index=5)) == expected


#: Events given as mappings (JSON input) with hostile values, and the field the error names.
MAPPING_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "bytes event_type": ({"event_type": b"\xff\xfe"}, "event_type"),
    "16 bytes as event_id": ({"event_id": b"\xff" * 16}, "event_id"),
    "bytes timestamp": ({"timestamp": b"2026-03-01T12:00:00Z"}, "timestamp"),
    "bytes tag key": ({"tags": {b"\xff": "v"}}, "tags"),
    "bytes tag value": ({"tags": {"k": b"\xff"}}, "tags"),
    "NaN tag value": ({"tags": {"k": math.nan}}, "tags"),
    "bytes in data": ({"data": {"k": b"\xff"}}, "data"),
    "Decimal NaN in metadata": ({"metadata": {"k": Decimal("NaN")}}, "metadata"),
    "10000-deep list as data": ({"data": DEEP_LIST}, "data"),
    "10000-deep dict as data": ({"data": DEEP_DICT}, "data"),
    "int of 5001 digits as a data key": ({"data": {BIG_INT: 1}}, "data"),
    "lone surrogate in timestamp": ({"timestamp": "2026-03-01T12:00:00\ud800"}, "timestamp"),
    "year 0 timestamp": ({"timestamp": "0000-01-01T00:00:00Z"}, "timestamp"),
    "NUL event_type": ({"event_type": "a\x00"}, "event_type"),
}


@pytest.mark.parametrize("case", MAPPING_CASES.values(), ids=MAPPING_CASES.keys())
def test_a_hostile_mapping_event_is_refused_naming_its_field(
    shared: EventStore, case: tuple[dict[str, Any], str]
) -> None:
    fields, field = case
    valid_mapping = {"event_type": f"Valid-{uuid.uuid4().hex}"}
    batch: list[Any] = [good(0), valid_mapping, {"event_type": "Hostile", **fields}]
    head = shared.head()
    error = refused(lambda: shared.append_batch(batch), VALIDATION_FAILED)
    assert error.context["index"] == 2
    assert error.message.startswith("event 2: ")
    assert error.context["field"] == field, error.message[:200]
    assert_nothing_written(shared, head, [batch[0]])
    assert shared.get_events(EventFilter(event_types=[valid_mapping["event_type"]])) == []
    assert_serving(shared)


# -- 2. timestamps -------------------------------------------------------------------------------

EAST = timezone(timedelta(hours=5))
WEST = timezone(timedelta(hours=-5))


class RaisingZone(tzinfo):
    """A zone whose offset cannot be had."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        raise RuntimeError("no offset today")


class FarZone(tzinfo):
    """A zone 25 hours off UTC, which datetime refuses."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return timedelta(hours=25)


class IntZone(tzinfo):
    """A zone whose offset is not a timedelta."""

    def utcoffset(self, dt: datetime | None) -> Any:
        return 5


#: Valid datetimes whose instant in UTC lies outside years 1 to 9999: no datetime can hold
#: them in UTC, and PostgreSQL prints them as no ISO 8601 reader accepts ("0001-12-31T19:00:00
#: BC", "10000-01-01T04:00:00").
OUT_OF_RANGE: dict[str, Any] = {
    "year 0 in UTC (datetime)": datetime(1, 1, 1, tzinfo=EAST),
    "year 10000 in UTC (datetime)": datetime(9999, 12, 31, 23, tzinfo=WEST),
    "year 0 in UTC (string)": "0001-01-01T00:00:00+05:00",
    "year 10000 in UTC (string)": "9999-12-31T23:00:00-05:00",
}
BAD_TIMESTAMPS: dict[str, Any] = {
    "year 0": "0000-01-01T00:00:00Z",
    "year 10000": "10000-01-01T00:00:00Z",
    "negative year": "-0001-01-01T00:00:00Z",
    "NUL": "2026-03-01T12:00:00Z\x00",
    "fullwidth digits": "\uff12\uff10\uff12\uff16-03-01T12:00:00Z",
    "offset of 24 hours": "2026-03-01T12:00:00+24:00",
    "empty": "",
    "a zone whose offset raises": datetime(2026, 3, 1, tzinfo=RaisingZone()),
    "a zone 25 hours off": datetime(2026, 3, 1, tzinfo=FarZone()),
    "a zone whose offset is an int": datetime(2026, 3, 1, tzinfo=IntZone()),
}

#: How a batch reaches the server: (batch size, index of the bad event, store options).
PATHS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "append function": (2, 1, {}),  # at most 2 small events: one call of the function
    "COPY": (4, 3, {}),
    "chunked COPY": (5, 3, {"chunk_events": 2}),  # the bad event in the second chunk
    "caller's transaction": (2, 1, {}),
}


def append_by(path: str, store: EventStore, pg_dsn: str, batch: list[DomainEvent]) -> int:
    if path != "caller's transaction":
        return store.append_batch(batch)
    with psycopg.connect(pg_dsn) as conn:
        try:
            return store.append_batch(batch, conn=conn)
        finally:
            conn.commit()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stamp", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
def test_a_timestamp_outside_the_years_1_to_9999_in_utc_is_refused_on_every_path(
    make_store: Callable[..., EventStore], pg_dsn: str, path: str, stamp: Any
) -> None:
    size, index, options = PATHS[path]
    store = make_store(**options)
    store.append_batch([good(0), good(1)])
    batch = [good(10 + i) for i in range(size)]
    batch[index] = bad = DomainEvent("Hostile", timestamp=stamp)
    error = refused(lambda: append_by(path, store, pg_dsn, batch), VALIDATION_FAILED)
    check_validation_error(error, index, bad, "timestamp")
    assert_nothing_written(store, 2, batch)
    assert len(store.get_events()) == 2
    assert_serving(store)


@pytest.mark.parametrize("path", PATHS)
def test_the_first_and_last_instants_of_the_years_1_to_9999_round_trip(
    make_store: Callable[..., EventStore], pg_dsn: str, path: str
) -> None:
    size, _, options = PATHS[path]
    store = make_store(**options)
    first = datetime(1, 1, 1, tzinfo=timezone.utc)
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
    batch = [DomainEvent("Edge", timestamp=first if i % 2 else last) for i in range(size)]
    assert append_by(path, store, pg_dsn, batch) == size
    assert [e.timestamp for e in store.read()] == [e.timestamp for e in batch]
    assert [e.timestamp for e in store.get_events(EventFilter(order_by="timestamp"))] == sorted(
        e.timestamp for e in batch
    )
    assert_serving(store)


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS.values(), ids=BAD_TIMESTAMPS.keys())
def test_a_malformed_timestamp_is_refused(shared: EventStore, stamp: Any) -> None:
    batch = [good(0), good(1), good(2)]
    batch.insert(1, bad := DomainEvent("Hostile", timestamp=stamp))
    head = shared.head()
    error = refused(lambda: shared.append_batch(batch), VALIDATION_FAILED)
    check_validation_error(error, 1, bad, "timestamp")
    assert_nothing_written(shared, head, batch)
    assert_serving(shared)


# -- 3. event ids --------------------------------------------------------------------------------

#: Strings that are not UUIDs. The last five are read as one by Python's uuid.UUID (which
#: strips braces and whitespace and hands the rest to int(..., 16)).
BAD_UUIDS: dict[str, str] = {
    "31 digits": "0" * 31,
    "33 digits": "0" * 33,
    "a g": "0" * 31 + "g",
    "32 NULs": "\x00" * 32,
    "dashes only": "-" * 36,
    "a plus sign": "+" + "0" * 31,
    "an underscore": "0_" + "0" * 30,
    "a leading space": " " + "0" * 31,
    "Arabic-Indic digits": "\u0660" * 32,
    "an unbalanced brace": "{" + "0" * 32,
}


@pytest.mark.parametrize("spelling", BAD_UUIDS.values(), ids=BAD_UUIDS.keys())
def test_a_string_that_is_not_a_uuid_is_no_event_id(shared: EventStore, spelling: str) -> None:
    head = shared.head()
    bad = DomainEvent("Hostile", event_id=spelling)  # type: ignore[arg-type]
    error = refused(lambda: shared.append_batch([good(0), bad]), VALIDATION_FAILED)
    check_validation_error(error, 1, bad, "event_id")
    error = refused(
        lambda: shared.append_batch([{"event_type": "Hostile", "event_id": spelling}]),
        VALIDATION_FAILED,
    )
    assert error.context["index"] == 0
    assert_nothing_written(shared, head, [])
    error = refused(lambda: shared.get_events(EventFilter(event_ids=[spelling])), QUERY_ERROR)
    assert error.context["field"] == "event_ids"
    refused(lambda: shared.get_event(spelling), QUERY_ERROR)
    assert_serving(shared)


# -- 4. DCB queries and conditions ---------------------------------------------------------------

QUERY_VALUES: dict[str, Any] = {
    "NUL": "a\x00b",
    "lone surrogate": "\ud800",
    "bytes not UTF-8": b"\xff\xfe",
    "NaN": math.nan,
    "Decimal sNaN": Decimal("sNaN"),
    "10000-deep list": DEEP_LIST,
    "int of 5001 digits": BIG_INT,
    "None": None,
}
QUERY_PLACES: dict[str, tuple[str, Callable[[Any], Query]]] = {
    "types": ("types", lambda v: Query.of(types=["Seed", v])),
    "tag key": ("tags", lambda v: Query.of(tags={"seed": "0", v: "x"})),
    "tag value": ("tags", lambda v: Query.of(tags={"k": v})),
    "second item": ("tags", lambda v: Query((QueryItem(["Seed"]), QueryItem(tags={"k": v})))),
}
QUERY_CASES = [
    pytest.param(name, place, id=f"{place}: {name}")
    for name, value in QUERY_VALUES.items()
    for place, (_, build) in QUERY_PLACES.items()
    if place != "tag key" or name not in ("Decimal sNaN", "10000-deep list")  # unhashable
]


@pytest.mark.parametrize(("name", "place"), QUERY_CASES)
def test_a_hostile_query_is_a_query_error_and_its_condition_writes_nothing(
    shared: EventStore, name: str, place: str
) -> None:
    query = QUERY_PLACES[place][1](QUERY_VALUES[name])
    head = shared.head()
    refused(lambda: shared.read(query), QUERY_ERROR)
    refused(lambda: shared.read(query, after=1, limit=5, backwards=True), QUERY_ERROR)
    refused(lambda: shared.subscribe(query, after=0), QUERY_ERROR)
    event = DomainEvent("Conditional")
    refused(lambda: shared.append(event, AppendCondition(query, after=head)), QUERY_ERROR)
    refused(lambda: shared.append_batch([good(), event], AppendCondition(query)), QUERY_ERROR)
    assert_nothing_written(shared, head, [event])
    assert_serving(shared)


def test_query_errors_name_the_field(shared: EventStore) -> None:
    """The context of every QUERY_ERROR about a hostile DCB query names its field, as the
    errors of an EventFilter do ({"field": "event_types"}, ...)."""
    unnamed = []
    for case in QUERY_CASES:
        name, place = case.values
        field, build = QUERY_PLACES[str(place)]
        try:
            shared.read(build(QUERY_VALUES[str(name)]))
        except EventStoreError as exc:
            if exc.context.get("field") != field:
                unnamed.append(f"{case.id}: {exc.message[:60]} {short(exc.context)}")
        except Exception:
            pass  # not an EventStoreError at all: reported by the test above
    assert unnamed == [], "\n".join(unnamed)


# -- 5. EventFilter ------------------------------------------------------------------------------

FILTER_VALUES = {k: v for k, v in QUERY_VALUES.items() if k != "None"}
FILTER_PLACES: dict[str, tuple[str, Callable[[Any], EventFilter]]] = {
    "event_types": ("event_types", lambda v: EventFilter(event_types=["Seed", v])),
    "issue_ids": ("issue_ids", lambda v: EventFilter(issue_ids=[v])),
    "providers": ("providers", lambda v: EventFilter(providers=["github", v])),
    "event_ids": ("event_ids", lambda v: EventFilter(event_ids=[v])),
    "tag key": ("tags", lambda v: EventFilter(tags={"seed": "0", v: "x"})),
    "tag value": ("tags", lambda v: EventFilter(tags={"seed": v})),
    "start_time": ("start_time", lambda v: EventFilter(start_time=v)),
    "end_time": ("end_time", lambda v: EventFilter(end_time=v)),
}
FILTER_CASES = [
    pytest.param(name, place, id=f"{place}: {name}")
    for name in FILTER_VALUES
    for place in FILTER_PLACES
    if place != "tag key" or name not in ("Decimal sNaN", "10000-deep list")  # unhashable
]
#: Every call that takes a filter, as far as it validates it.
FILTER_CALLS: dict[str, Callable[[EventStore, EventFilter], object]] = {
    "get_events": lambda s, f: s.get_events(f),
    "count_events": lambda s, f: s.count_events(f),
    "get_page": lambda s, f: s.get_page(f, page_size=2),
    "aggregate": lambda s, f: s.aggregate(f, "tag", tag_key="seed"),
    "stream_events": lambda s, f: s.stream_events(f),
    "export_arrow": lambda s, f: s.export_arrow(f),
    "subscribe": lambda s, f: s.subscribe(f, after=0),
}


@pytest.mark.parametrize(("name", "place"), FILTER_CASES)
def test_a_hostile_filter_is_a_query_error_naming_its_field(
    shared: EventStore, name: str, place: str
) -> None:
    field, build = FILTER_PLACES[place]
    event_filter = build(FILTER_VALUES[name])
    head = shared.head()
    for call_name, call in FILTER_CALLS.items():
        error = refused(lambda call=call: call(shared, event_filter), QUERY_ERROR)
        assert error.context.get("field") == field, (call_name, error.message[:200])
    assert_nothing_written(shared, head, [])
    assert_serving(shared)


# -- 6. read arguments ---------------------------------------------------------------------------

ARG_VALUES: dict[str, Any] = {
    "2**63": 2**63,
    "int of 5001 digits": BIG_INT,
    "NaN": math.nan,
    "Decimal NaN": Decimal("NaN"),
    "10000-deep list": DEEP_LIST,
    "bytes not UTF-8": b"\xff\xfe",
    "lone surrogate": "\ud800",
}
ARG_CALLS: dict[str, Callable[[EventStore, Any], object]] = {
    "read(after)": lambda s, v: s.read(after=v),
    "read(limit)": lambda s, v: s.read(limit=v),
    "get_page(page_size)": lambda s, v: s.get_page(page_size=v),
    "get_page(token)": lambda s, v: s.get_page(token=v),
    "stream_events(batch_size)": lambda s, v: s.stream_events(batch_size=v),
    "subscribe(after)": lambda s, v: s.subscribe(after=v),
    "get_event(event_id)": lambda s, v: s.get_event(v),
    "AppendCondition(after)": lambda s, v: s.append(
        DomainEvent("Conditional"), AppendCondition(Query(), after=v)
    ),
}


@pytest.mark.parametrize("value", ARG_VALUES.values(), ids=ARG_VALUES.keys())
@pytest.mark.parametrize("call", ARG_CALLS.values(), ids=ARG_CALLS.keys())
def test_a_hostile_read_argument_is_a_query_error(
    shared: EventStore, call: Callable[[EventStore, Any], object], value: Any
) -> None:
    head = shared.head()
    refused(lambda: call(shared, value), QUERY_ERROR)
    assert_nothing_written(shared, head, [])
    assert_serving(shared)


# -- 7. oversized filters ------------------------------------------------------------------------

MANY_TYPES = [f"T{n}" for n in range(100_000)]
#: More tag pairs than PostgreSQL takes columns in a select list (1,664).
TAG_PAIRS = {f"k{n}": "v" for n in range(2_000)}


def seed_ids(store: EventStore) -> list[uuid.UUID]:
    return [e.event_id for e in store.read(Query.of(types=["Seed"]))]


def nothing(store: EventStore) -> list[Any]:
    return []


def zero(store: EventStore) -> int:
    return 0


#: (what is asked, the answer) for a question far larger than any real one: the store answers
#: it exactly, or refuses it as a QUERY_ERROR; never a STORAGE_ERROR or another exception.
OVERSIZED: dict[str, tuple[Callable[[EventStore], object], Callable[[EventStore], object]]] = {
    "read: a Query of 100,000 types": (
        lambda s: [e.event_id for e in s.read(Query.of(types=[*MANY_TYPES, "Seed"]))],
        seed_ids,
    ),
    "read: a Query of 70,000 items": (
        lambda s: [
            e.event_id
            for e in s.read(Query([QueryItem(["Seed"], {"seed": str(n)}) for n in range(70_000)]))
        ],
        seed_ids,
    ),
    "read: a Query item of 100,000 tags": (
        lambda s: s.read(Query.of(tags={f"k{n}": "v" for n in range(100_000)})).events,
        nothing,
    ),
    "read: a 1 MiB tag value": (
        lambda s: s.read(Query.of(tags={"seed": MIB_TEXT})).events,
        nothing,
    ),
    "read: a 1 MiB type": (lambda s: s.read(Query.of(types=[MIB_TEXT])).events, nothing),
    "get_events: 2,000 tags": (lambda s: s.get_events(EventFilter(tags=TAG_PAIRS)), nothing),
    "get_page: 2,000 tags": (lambda s: s.get_page(EventFilter(tags=TAG_PAIRS)).events, nothing),
    "count_events: 2,000 tags": (lambda s: s.count_events(EventFilter(tags=TAG_PAIRS)), zero),
    "stream_events: 2,000 tags": (
        lambda s: list(s.stream_events(EventFilter(tags=TAG_PAIRS))),
        nothing,
    ),
    "aggregate: 2,000 tags": (lambda s: s.aggregate(EventFilter(tags=TAG_PAIRS)), nothing),
    "get_events: a 1 MiB tag value": (
        lambda s: s.get_events(EventFilter(tags={"seed": MIB_TEXT})),
        nothing,
    ),
    "get_events: a 1 MiB issue id": (
        lambda s: s.get_events(EventFilter(issue_ids=[MIB_TEXT])),
        nothing,
    ),
    "count_events: a 1 MiB event type": (
        lambda s: s.count_events(EventFilter(event_types=[MIB_TEXT])),
        zero,
    ),
}


@pytest.mark.parametrize("case", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_an_oversized_question_is_answered_exactly_or_refused(
    shared: EventStore,
    case: tuple[Callable[[EventStore], object], Callable[[EventStore], object]],
) -> None:
    ask, answer = case
    head = shared.head()
    try:
        got = ask(shared)
    except EventStoreError as exc:
        assert exc.code == QUERY_ERROR, f"{exc.code}: {exc.message[:300]}"
        assert exc.context.get("field"), short(exc.context)
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} instead of an answer or a QUERY_ERROR: {str(exc)[:300]}")
    else:
        assert got == answer(shared)
    assert_nothing_written(shared, head, [])
    assert_serving(shared)


@pytest.mark.parametrize("stored", [False, True], ids=["no match", "a match"])
def test_a_condition_of_100000_types_decides_exactly(shared: EventStore, stored: bool) -> None:
    types = [*MANY_TYPES, "Seed"] if stored else MANY_TYPES
    event = DomainEvent("Conditional")
    head = shared.head()
    condition = AppendCondition(Query.of(types=types))
    if stored:
        refused(lambda: shared.append(event, condition), APPEND_CONDITION_FAILED)
        assert_nothing_written(shared, head, [event])
    else:
        assert shared.append(event, condition) == head + 1
    assert_serving(shared)


def test_a_stored_tag_value_of_300_kib_is_found_exactly(store: EventStore) -> None:
    value = "t" * (300 << 10)
    events = [
        DomainEvent("Big", tags={"big": value}),
        DomainEvent("Big", tags={"big": value[:-1]}),
        DomainEvent("Big", tags={"big": value + "t"}),
    ]
    store.append_batch(events)
    for n, event in enumerate(events):
        tags = event.tags
        assert [e.event_id for e in store.read(Query.of(tags=tags))] == [event.event_id]
        assert [e.event_id for e in store.get_events(EventFilter(tags=tags))] == [event.event_id]
        assert store.count_events(EventFilter(tags=tags)) == 1
        refused(
            lambda tags=tags: store.append(DomainEvent("X"), AppendCondition(Query.of(tags=tags))),
            APPEND_CONDITION_FAILED,
        )
        assert store.head() == 3, n
    assert store.get_events(EventFilter(tags={"big": MIB_TEXT})) == []
    assert store.verify().ok


# -- 8. SQL and JSON path text is just text ------------------------------------------------------

LITERALS = [
    "'; DROP TABLE events; --",
    "$$",
    "$tag$ '$tag$",
    "'",
    "''",
    '"',
    "\\",
    '\\"',
    "$.a[*] ? (@ == 1)",
    "$.**",
    "@>",
    "<@",
    "?|",
    "%s",
    "%(k)s",
    "%%",
    "a%",
    "a_",
    "ab",
    "*",
    '{"k": "v"}',
    "null",
    " ",
    "",
]
TYPE_LITERALS = [text for text in LITERALS if text]
#: Tag keys (none holds a colon, so that ``tag=key:value`` can name each over HTTP).
TAG_KEYS = ["k", "issueId", "'; DROP TABLE events; --", "$$", "@>", '"', "$.a[*] ? (@ == 1)", "%s"]


class Literals:
    """A store holding one event per literal type and one per (key, value) pair, and a server."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.store = EventStore(dsn, schema=f"literal_{uuid.uuid4().hex[:12]}")
        typed = [DomainEvent(t, {"t": t}, {"kind": "typed"}, {"m": t}) for t in TYPE_LITERALS]
        pairs = list(itertools.product(TAG_KEYS, LITERALS))
        tagged = [DomainEvent("Tagged", {"k": k, "v": v}, {k: v}) for k, v in pairs]
        self.store.append_batch(typed + tagged)
        stored = self.store.read().events
        self.typed = dict(zip(TYPE_LITERALS, stored[: len(typed)], strict=True))
        self.tagged = dict(zip(pairs, stored[len(typed) :], strict=True))
        self.head = len(stored)
        self.server = LiveServer(create_app(self.store, heartbeat=0.2))
        self.url = self.server.url

    def close(self) -> None:
        self.server.stop()
        self.store.close()
        drop(self.dsn, self.store.schema)


@pytest.fixture(scope="module")
def literals(pg_dsn: str) -> Iterator[Literals]:
    holder = Literals(pg_dsn)
    yield holder
    holder.close()


def ids(events: Any) -> list[uuid.UUID]:
    return [event.event_id for event in events]


def test_sql_and_json_path_text_is_stored_literally(literals: Literals) -> None:
    store = literals.store
    for text, event in literals.typed.items():
        assert (event.event_type, event.data, event.metadata) == (text, {"t": text}, {"m": text})
    for (key, value), event in literals.tagged.items():
        assert (event.tags, event.data) == ({key: value}, {"k": key, "v": value})
    assert set(TYPE_LITERALS) <= set(store.get_event_types())
    tags = store.get_tags()
    for key in TAG_KEYS:
        assert tags[key] == sorted(LITERALS)
    assert store.verify().ok


def test_sql_and_json_path_types_match_only_themselves_in_dcb_reads_and_conditions(
    literals: Literals,
) -> None:
    store = literals.store
    for text, event in literals.typed.items():
        assert ids(store.read(Query.of(types=[text]))) == [event.event_id], text
        both = Query.of(types=[text], tags={"kind": "typed"})
        assert ids(store.read(both)) == [event.event_id], text
        refused(
            lambda q=both, p=event.position: store.append(
                DomainEvent("Never"), AppendCondition(q, after=p - 1)
            ),
            APPEND_CONDITION_FAILED,
        )
    for (key, value), event in literals.tagged.items():
        query = Query((QueryItem(["Tagged"], {key: value}), QueryItem(["nothing"])))
        assert ids(store.read(query)) == [event.event_id], (key, value)
    assert store.head() == literals.head


@pytest.mark.parametrize("direction", ["asc", "desc"])
def test_pages_in_type_order_carry_sql_and_json_path_types_in_their_tokens(
    literals: Literals, direction: str
) -> None:
    store = literals.store
    event_filter = EventFilter(tags={"kind": "typed"}, order_by="type", order_direction=direction)  # type: ignore[arg-type]
    expected = store.get_events(event_filter)
    assert sorted(e.event_type for e in expected) == sorted(TYPE_LITERALS)
    walked: list[SequencedEvent] = []
    token: str | None = None
    while True:
        page = store.get_page(event_filter, page_size=2, token=token)
        walked += page.events
        if page.next_token is None:
            break
        token = page.next_token
    assert walked == expected
    # The same walk over HTTP.
    walked = []
    query = {"tag": "kind:typed", "order_by": "type", "order_direction": direction}
    with http_client(literals.url) as client:
        token = None
        while True:
            params = {**query, "page_size": "3", **({"token": token} if token else {})}
            response = client.get("/events", params=params)
            assert response.status_code == 200, response.text
            page = decode_page(response.content)
            walked += page.events
            token = page.next_token
            if token is None:
                break
    assert walked == expected


def test_sql_and_json_path_text_matches_only_itself_over_http(literals: Literals) -> None:
    with http_client(literals.url) as client:

        def found(params: dict[str, str]) -> list[uuid.UUID]:
            response = client.get("/events", params=params)
            assert response.status_code == 200, (params, response.text)
            return [uuid.UUID(event["event_id"]) for event in response.json()["events"]]

        for text, event in literals.typed.items():
            assert found({"type": text}) == [event.event_id], text
        for (key, value), event in literals.tagged.items():
            assert found({"tag": f"{key}:{value}"}) == [event.event_id], (key, value)
            if key == "issueId":
                assert found({"issue_id": value}) == [event.event_id], value
        assert found({"type": "'; DROP TABLE events; -- "}) == []
        assert found({"tag": "k:%"}) == []
        health = client.get("/health").json()
    assert health["status"] == "ok" and health["head"] == literals.head


STREAMED = ["'; DROP TABLE events; --", "$.a[*] ? (@ == 1)", '"', "%", "$$"]


def test_sql_and_json_path_text_filters_streams_literally(store: EventStore) -> None:
    """Over the HTTP stream and a DCB subscription, a literal filter delivers exactly its
    events: the one stored, then a new one, and none of the near misses between them."""
    decoys = [f"{text}x" for text in STREAMED] + ["x", "", "*", "a%", "ab"]
    store.append_batch([DomainEvent("Decoy", tags={"k": text}) for text in decoys])
    targets = {text: store.append(DomainEvent("Target", tags={"k": text})) for text in STREAMED}
    server = LiveServer(create_app(store, heartbeat=0.2))
    try:
        for text, position in targets.items():
            with SseFrames(server.url, [("tag", f"k:{text}"), ("after", "0")]) as frames:
                assert next(frames) == ("start", "0")
                marker = store.append(DomainEvent("Marker", tags={"k": text}))
                got = [next(frames), next(frames)]
                assert got == [("Target", str(position)), ("Marker", str(marker))], text
            with store.subscribe(Query.of(tags={"k": text}), after=0) as subscription:
                again = store.append(DomainEvent("Again", tags={"k": text}))
                delivered = [next(subscription).position for _ in range(3)]
                assert delivered == [position, marker, again], text
    finally:
        server.stop()
    assert_serving(store)


# -- 9. hostile requests over HTTP ---------------------------------------------------------------

EVENTS = "/events"
STREAM = "/events/stream"
READ_TIMEOUT = 60.0


def http_client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=READ_TIMEOUT, trust_env=False)


class SseFrames:
    """``GET /events/stream`` on its own connection, yielding (event type, id) per frame and
    ("start", id) for the opening id-only frame; heartbeats skipped."""

    def __init__(self, base: str, params: list[tuple[str, str]]) -> None:
        self.client = http_client(base)
        self.response = self.client.send(
            self.client.build_request("GET", STREAM, params=params), stream=True
        )
        assert self.response.status_code == 200, self.response.read()[:300]

    def __enter__(self) -> Iterator[tuple[str, str]]:
        return self._frames()

    def _frames(self) -> Iterator[tuple[str, str]]:
        fields: dict[str, str] = {}
        for line in self.response.iter_lines():
            if line == "":
                if "id" in fields:
                    yield fields.get("event", "start"), fields["id"]
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    def __exit__(self, *exc: object) -> None:
        self.response.close()
        self.client.close()


class Served:
    """A store of 3 events behind a server, for the bad requests: each must leave both as
    they were."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.store = EventStore(dsn, schema=f"hostile_http_{uuid.uuid4().hex[:8]}")
        self.store.append_batch(
            [
                DomainEvent("A", tags={"k": "v", "issueId": "I-1"}),
                DomainEvent("\ufffd", tags={"k": "\ufffd", "issueId": "\ufffd"}),
                DomainEvent("\ufffd\ufffd\ufffd", tags={"k": "\ufffd\ufffd\ufffd"}),
            ]
        )
        self.server = LiveServer(create_app(self.store, heartbeat=0.2))
        self.url = self.server.url

    def close(self) -> None:
        self.server.stop()
        self.store.close()
        drop(self.dsn, self.store.schema)


@pytest.fixture(scope="module")
def served(pg_dsn: str) -> Iterator[Served]:
    holder = Served(pg_dsn)
    yield holder
    holder.close()


def assert_still_serving(served: Served) -> None:
    """Nothing was written, no subscription is left open, and every route still answers."""
    with http_client(served.url) as client:
        deadline = time.monotonic() + READ_TIMEOUT
        while True:
            health = client.get("/health")
            assert health.status_code == 200
            if health.json()["subscriptions"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert health.json() == {"status": "ok", "head": 3, "subscriptions": 0, "consumers": []}
        page = client.get("/events")
        assert page.status_code == 200
        assert [e["position"] for e in page.json()["events"]] == [1, 2, 3]
    with SseFrames(served.url, [("after", "2")]) as frames:
        assert next(frames) == ("start", "2")
        assert next(frames)[1] == "3"


_keys = ["".join(pair) for pair in itertools.product(string.ascii_letters, repeat=2)]
#: 1,700 distinct tags in a URL of 13.6 kB (uvicorn reads request heads up to 16 kB).
MANY_TAGS = "&".join(f"tag={key}:" for key in _keys[:1_700])

#: (route, raw query string, headers, the parameter the 400 names; None: any)
BAD_REQUESTS: dict[str, tuple[str, str, dict[str, str], str | None]] = {
    "NUL in provider": (EVENTS, "provider=a%00b", {}, "provider"),
    "NUL in a tag key": (STREAM, "tag=k%00:v", {}, "tag"),
    "NUL in start_time": (EVENTS, "start_time=2026-01-01T00:00:00Z%00", {}, "start_time"),
    "NUL in after": (STREAM, "after=1%00", {}, "after"),
    "NUL in page_size": (EVENTS, "page_size=1%00", {}, "page_size"),
    "NUL in token": (EVENTS, "token=%00", {}, "token"),
    "NUL in order_by": (EVENTS, "order_by=type%00", {}, "order_by"),
    "NUL as a parameter name": (STREAM, "%00=1", {}, None),
    "invalid UTF-8 in type": (EVENTS, "type=%ff", {}, "type"),
    "invalid UTF-8 in type, stream": (STREAM, "type=%ff&after=0", {}, "type"),
    "invalid UTF-8 in a tag value": (EVENTS, "tag=k:%c3%28", {}, "tag"),
    "invalid UTF-8 in a tag key": (STREAM, "tag=%ff:v&after=0", {}, "tag"),
    "invalid UTF-8 in issue_id": (EVENTS, "issue_id=%80", {}, "issue_id"),
    "overlong NUL in type": (EVENTS, "type=%c0%80", {}, "type"),
    "invalid UTF-8 in event_id": (EVENTS, "event_id=%ff", {}, "event_id"),
    "invalid UTF-8 in after": (STREAM, "after=%ff", {}, "after"),
    "invalid UTF-8 in page_size": (EVENTS, "page_size=%ff", {}, "page_size"),
    "invalid UTF-8 in token": (EVENTS, "token=%ff%fe", {}, "token"),
    "invalid UTF-8 in start_time": (STREAM, "start_time=%ff", {}, "start_time"),
    "invalid UTF-8 as a parameter name": (EVENTS, "%ff=1", {}, None),
    "encoded lone surrogate in type": (EVENTS, "type=%ed%a0%80", {}, "type"),
    "encoded lone surrogate in a tag": (STREAM, "tag=k:%ed%bf%bf&after=0", {}, "tag"),
    "after of 5,000 digits": (STREAM, "after=" + "9" * 5000, {}, "after"),
    "after in Arabic-Indic digits": (STREAM, "after=%d9%a1", {}, "after"),
    "after in fullwidth digits": (STREAM, "after=%ef%bc%91", {}, "after"),
    "after with a plus sign": (STREAM, "after=%2B1", {}, "after"),
    "after with a space": (STREAM, "after=%201", {}, "after"),
    "after in SQL": (STREAM, "after=1%3B%20DROP%20TABLE%20events", {}, "after"),
    "Last-Event-ID of 5,000 digits": (STREAM, "", {"Last-Event-ID": "9" * 5000}, "Last-Event-ID"),
    "Last-Event-ID in JSON path": (STREAM, "", {"Last-Event-ID": "$.a[*]"}, "Last-Event-ID"),
    "page_size of 5,000 digits": (EVENTS, "page_size=" + "9" * 5000, {}, "page_size"),
    "page_size of 2**63": (EVENTS, "page_size=9223372036854775808", {}, "page_size"),
    "token of 12,000 characters": (EVENTS, "token=" + "A" * 12_000, {}, "token"),
    "token in SQL": (EVENTS, "token=%27%3B%20DROP%20TABLE%20events%3B%20--", {}, "token"),
    "start_time in year 0": (EVENTS, "start_time=0000-01-01T00:00:00Z", {}, "start_time"),
    "end_time past year 9999": (EVENTS, "end_time=9999-12-31T23:59:59-23:59", {}, "end_time"),
    "1,700 tags": (EVENTS, MANY_TAGS, {}, "tag"),
    "1,700 tags, stream": (STREAM, MANY_TAGS + "&after=0", {}, "tag"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_hostile_request_is_a_400_with_the_error_as_json(
    served: Served, case: tuple[str, str, dict[str, str], str | None]
) -> None:
    route, query, headers, field = case
    url = f"{served.url}{route}" + (f"?{query}" if query else "")
    with http_client(served.url) as client:
        with client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            kind = response.headers.get("content-type", "")
            body = response.read() if status != 200 or route == EVENTS else b"<a stream>"
    assert status == 400, f"{status} {kind}: {body[:300]!r}"
    assert kind == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "context"}
    assert error["code"] == "QUERY_ERROR" and error["message"]
    if field is not None:
        assert error["context"]["field"] == field, error
    assert_still_serving(served)


LONG_TYPE = "x" * 12_000


@pytest.mark.parametrize("route", [EVENTS, STREAM])
def test_a_long_but_valid_value_is_answered(served: Served, route: str) -> None:
    """A type of 12,000 characters names no stored event (types have at most 255): an empty
    page, or a stream that delivers nothing but the events appended that match."""
    with http_client(served.url) as client:
        if route == EVENTS:
            response = client.get(EVENTS, params={"type": LONG_TYPE})
            assert response.status_code == 200, response.text[:300]
            assert response.json() == {"events": [], "next_token": None}
        else:
            with SseFrames(served.url, [("type", LONG_TYPE), ("after", "0")]) as frames:
                assert next(frames) == ("start", "0")
    assert_still_serving(served)


def raw_request(url: str, target: bytes) -> bytes:
    """The status line and head of the answer to a GET of ``target``, sent as raw bytes (no
    client would send a request line of a megabyte)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT) as sock:
        try:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            # The server answered and closed before reading all that was sent (how soon
            # depends on the machine): its answer is already in this socket's receive queue.
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # the server may close before reading all that was sent
    return received


@pytest.mark.parametrize("route", [EVENTS, STREAM])
def test_a_request_of_a_megabyte_is_refused_and_the_server_keeps_serving(
    served: Served, route: str
) -> None:
    """A 1 MiB query string never reaches the app: uvicorn refuses a request head that large
    with its own 400 (plain text)."""
    answer = raw_request(served.url, route.encode() + b"?type=" + b"x" * (1 << 20))
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert_still_serving(served)
