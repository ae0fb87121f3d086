"""The reader of events: the two `decode_events` codecs that turn binary COPY rows
(`EVENT_COLUMNS`) into the `SequencedEvent`s that `read`, `get_page`, `paginate`,
`stream_events` and subscriptions return.

The native decoder must give the pure-Python reference's events and errors, on rows captured
from the server (archived ones too), on a golden row decoded by hand, on every cut of real rows,
on corrupted and hostile rows, and on random valid rows; and the store's reads must return what
`get_events` (which still reads the server's JSON) returns. test_fuzz.py adds random, damaged
and hostile rows under the debug allocator.
"""

from __future__ import annotations

import struct
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from _codec_support import (
    COPY_TRAILER,
    check_cuts_and_miscounts,
    copy_out,
    decode_outcome,
    field,
)
from tamma_events import DomainEvent, EventFilter, EventStore
from tamma_events import _native as native  # no fallback: the tests fail if it did not build
from tamma_events.codec import reference as python
from tamma_events.model import SequencedEvent
from tamma_events.sql import EVENT_SELECT, statements_of

UTC = timezone.utc
#: The read's columns, spelled out independently of the codec.
COLUMNS = (
    "position",
    "hash",
    "event_id",
    "event_type",
    "timestamp",
    "recorded_at",
    "tags",
    "metadata",
    "data",
)
#: Microseconds from 2000-01-01 to 0001-01-01 and to 9999-12-31T23:59:59.999999, both UTC.
FIRST_US = (datetime(1, 1, 1, tzinfo=UTC) - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(
    microseconds=1
)
LAST_US = (
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC) - datetime(2000, 1, 1, tzinfo=UTC)
) // timedelta(microseconds=1)


def both(rows: bytes, count: int) -> tuple[Any, ...]:
    """The decoders' common outcome; fails if they differ."""
    native_outcome = decode_outcome(native.decode_events, rows, count)
    python_outcome = decode_outcome(python.decode_events, rows, count)
    assert native_outcome == python_outcome
    return python_outcome


def make_row(**values: bytes | None) -> bytes:
    """A valid read row, with ``values`` replacing fields by name."""
    defaults: dict[str, bytes | None] = {
        "position": struct.pack(">q", 7),
        "hash": bytes(range(32)),
        "event_id": uuid.UUID(int=42).bytes,
        "event_type": b"IssueCreated",
        "timestamp": struct.pack(">q", 1),
        "recorded_at": struct.pack(">q", 2),
        "tags": b'\x01{"issueId": "I-1"}',
        "metadata": b"\x01{}",
        "data": b'\x01{"n": 1}',
    }
    defaults.update(values)
    return struct.pack(">h", len(COLUMNS)) + b"".join(field(defaults[c]) for c in COLUMNS)


def history(schema: str) -> sql.Composable:
    return sql.SQL("SELECT {} FROM {} ORDER BY position").format(
        EVENT_SELECT, statements_of(schema).history_rows
    )


SERVER_TAGS = [
    {},
    {"issueId": "I-1", "provider": "anthropic"},
    {'q"uote': 'a"b', "back\\slash": "c\\d", "slash/": "/"},
    {"\x01ctrl\x1f": "\n\t\r\x08\x0c\x7f", "sep\u2028": "\u2029"},
    {"\U0001f600": "\U0001f4a9\U00010000\U0010ffff", "é": "ü\ufffd"},
    {"k" * 128: "v" * 300, "x": ""},
]


def server_events() -> list[DomainEvent]:
    """Awkward text, numbers and nesting, and the first and last instants Python can hold."""
    stamps = [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(1600, 2, 29, 12, tzinfo=UTC),
        datetime(2400, 2, 29, 0, 0, 0, 1, tzinfo=UTC),
    ]
    return [
        DomainEvent(
            'Ty"pe\\ \U0001f600' if n % 2 else "IssueCreated",
            {"n": n, "text": 'a"b\\c\u0001\U0001f600', "deep": [[{"x": 1.5}]], "big": 10**30},
            tags,
            {"m": [None, True, -(10**20), 0.1, 1e300]},
            timestamp=stamps[n],
        )
        for n, tags in enumerate(SERVER_TAGS)
    ]


# ---------------------------------------------------------------------------------------------
# rows from the server


def test_decoders_agree_on_rows_from_the_server(store: EventStore, pg_dsn: str) -> None:
    store.append_batch(server_events())
    store.append_batch([DomainEvent("T", {"n": n}, {"k": str(n % 3)}) for n in range(50)])
    with psycopg.connect(pg_dsn) as conn:
        rows, count = copy_out(conn, history(store.schema))
    assert count == 56
    decoded = native.decode_events(rows, count)
    assert decoded == python.decode_events(rows, count)
    assert native.decode_events(bytearray(rows), count) == decoded
    assert python.decode_events(memoryview(rows), count) == decoded
    # read independently of both decoders: the server's JSON, decoded by msgspec
    assert decoded == store.get_events()
    assert all(type(event) is SequencedEvent for event in decoded)
    assert [event.timestamp.tzinfo for event in decoded] == [UTC] * count


def test_archived_rows_decode_to_their_positions(
    store: EventStore, pg_dsn: str, tmp_path: Path
) -> None:
    store.append_batch([DomainEvent("T", {"n": n}, {"k": str(n % 3)}) for n in range(20)])
    cut = store.get_events()[-1].recorded_at + timedelta(microseconds=1)
    while datetime.now(UTC) <= cut:  # the next append is recorded after the cut
        time.sleep(0.001)
    store.append_batch([DomainEvent("T", {"n": n}, {"k": str(n % 3)}) for n in range(20, 30)])
    assert store.compact_events(cut, archive_dir=tmp_path) == 20
    with psycopg.connect(pg_dsn) as conn:
        rows, count = copy_out(conn, history(store.schema))
    assert count == 30
    decoded = both(rows, count)
    assert decoded[0] == "ok"
    events = decoded[1]
    assert events[:20] == list(range(1, 21))
    assert events[20:] == store.get_events()
    # and the store's reads fill them in from the archive files
    everything = store.get_events(include_archived=True)
    assert store.read().events == everything
    assert list(store.stream_events(include_archived=True, batch_size=7)) == everything
    assert store.get_page(page_size=30, include_archived=True).events == everything


def test_decoders_agree_on_every_cut_and_miscount_of_server_rows(
    store: EventStore, pg_dsn: str
) -> None:
    store.append_batch(server_events()[2:5])
    with psycopg.connect(pg_dsn) as conn:
        rows, count = copy_out(conn, history(store.schema))
    assert count == 3
    check_cuts_and_miscounts(both, rows, count, COLUMNS, python.stored_row_error)
    assert both(b"", 0) == ("ok", [])


# ---------------------------------------------------------------------------------------------
# a golden row, decoded by hand


def test_a_golden_row() -> None:
    row = make_row(
        position=struct.pack(">q", 2**63 - 1),
        event_id=bytes.fromhex("0123456789abcdeffedcba9876543210"),
        event_type="Ünïcode ✓".encode(),
        # 2026-03-01T12:34:56.789012Z and 2000-01-01T00:00:00.000001Z
        timestamp=struct.pack(">q", 825_683_696_789_012),
        recorded_at=struct.pack(">q", 1),
        tags=b'\x01{"a": "1", "issueId": "I-\\u00e9"}',
        metadata=b'\x01{"m": [1, 2.5, null, true]}',
        data=b'\x01{"nested": {"deep": "x\\n"}}',
    )
    expected = SequencedEvent(
        "Ünïcode ✓",
        {"nested": {"deep": "x\n"}},
        {"a": "1", "issueId": "I-é"},
        {"m": [1, 2.5, None, True]},
        uuid.UUID("01234567-89ab-cdef-fedc-ba9876543210"),
        datetime(2026, 3, 1, 12, 34, 56, 789_012, tzinfo=UTC),
        position=2**63 - 1,
        recorded_at=datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        hash=bytes(range(32)),
    )
    assert both(row, 1) == ("ok", [expected])
    # an archived event's row: its position; the fields after the hash are only framed
    archived = make_row(hash=None, recorded_at=None, metadata=None, data=None)
    assert both(archived + row, 2) == ("ok", [7, expected])
    odd = make_row(hash=None, event_id=b"short", tags=b"not json", timestamp=None)
    assert both(odd, 1) == ("ok", [7])


# ---------------------------------------------------------------------------------------------
# corrupted and hostile rows: the same error from both

ROW = make_row()
NOT_FLAT = "are not an object of strings"
NOT_OBJECT = "is not a JSON object"
OUT_OF_RANGE = "is out of the range of Python's datetime"

#: (rows, count, row, field, problem): what is wrong, and how both decoders must say it.
CORRUPTED: dict[str, tuple[bytes, int, int, str, str]] = {
    "no bytes": (b"", 1, 0, "row", "is cut short"),
    "cut in a length word": (ROW[:4], 1, 0, "position", "is cut short"),
    "cut in the data": (ROW[:-1], 1, 0, "data", "is cut short"),
    "one row short": (ROW, 2, 1, "row", "is cut short"),
    "a row too many": (ROW + ROW, 1, 1, "row", "follows the last expected row"),
    "8 fields": (struct.pack(">h", 8) + ROW[2:], 1, 0, "row", "has 8 fields, not 9"),
    "the trailer": (COPY_TRAILER, 1, 0, "row", "has -1 fields, not 9"),
    **{f"NULL {c}": (make_row(**{c: None}), 1, 0, c, "is NULL") for c in COLUMNS if c != "hash"},
    "position of 4 bytes": (make_row(position=bytes(4)), 1, 0, "position", "has 4 bytes, not 8"),
    "hash of 31 bytes": (make_row(hash=bytes(31)), 1, 0, "hash", "has 31 bytes, not 32"),
    "event_id of 17 bytes": (
        make_row(event_id=bytes(17)),
        1,
        0,
        "event_id",
        "has 17 bytes, not 16",
    ),
    "recorded_at of 9 bytes": (
        make_row(recorded_at=bytes(9)),
        1,
        0,
        "recorded_at",
        "has 9 bytes, not 8",
    ),
    "event_type not UTF-8": (
        make_row(event_type=b"\xff"),
        1,
        0,
        "event_type",
        "is not UTF-8",
    ),
    "event_type a lone surrogate": (
        make_row(event_type=b"\xed\xa0\x80"),
        1,
        0,
        "event_type",
        "is not UTF-8",
    ),
    "tags of jsonb version 2": (
        make_row(tags=b"\x02{}"),
        1,
        0,
        "tags",
        "is not jsonb version 1",
    ),
    "data without a version": (make_row(data=b""), 1, 0, "data", "is not jsonb version 1"),
    "a tag of a number": (make_row(tags=b'\x01{"a": 1}'), 1, 0, "tags", NOT_FLAT),
    "tags an array": (make_row(tags=b'\x01["a"]'), 1, 0, "tags", NOT_FLAT),
    "tags not UTF-8": (make_row(tags=b'\x01{"a": "\xff"}'), 1, 0, "tags", NOT_FLAT),
    "two objects in one field": (make_row(tags=b"\x01{}, {}"), 1, 0, "tags", NOT_FLAT),
    "metadata a string": (make_row(metadata=b'\x01"m"'), 1, 0, "metadata", NOT_OBJECT),
    "data null": (make_row(data=b"\x01null"), 1, 0, "data", NOT_OBJECT),
    "data cut": (make_row(data=b'\x01{"a": '), 1, 0, "data", NOT_OBJECT),
    "data nested too deeply": (
        make_row(data=b'\x01{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        1,
        0,
        "data",
        NOT_OBJECT,
    ),
    "a timestamp before year 1": (
        make_row(timestamp=struct.pack(">q", FIRST_US - 1)),
        1,
        0,
        "timestamp",
        OUT_OF_RANGE,
    ),
    "a timestamp after year 9999": (
        make_row(timestamp=struct.pack(">q", LAST_US + 1)),
        1,
        0,
        "timestamp",
        OUT_OF_RANGE,
    ),
    "infinity": (
        make_row(recorded_at=struct.pack(">q", 2**63 - 1)),
        1,
        0,
        "recorded_at",
        OUT_OF_RANGE,
    ),
    "minus infinity": (
        make_row(timestamp=struct.pack(">q", -(2**63))),
        1,
        0,
        "timestamp",
        OUT_OF_RANGE,
    ),
    "an archived row's field cut short": (
        make_row(hash=None)[:-3],
        1,
        0,
        "data",
        "is cut short",
    ),
    "a bad second row after a good one": (
        ROW + make_row(metadata=b"\x01[]"),
        2,
        1,
        "metadata",
        NOT_OBJECT,
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTED))
def test_decoders_raise_the_same_error(name: str) -> None:
    rows, count, row, column, problem = CORRUPTED[name]
    assert both(rows, count) == ("error", python.stored_row_error(row, column, problem))


def test_the_first_and_last_instants_python_holds_are_read() -> None:
    rows = make_row(timestamp=struct.pack(">q", FIRST_US)) + make_row(
        timestamp=struct.pack(">q", LAST_US)
    )
    result = both(rows, 2)
    assert [event.timestamp for event in result[1]] == [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ]


def test_arguments_out_of_contract() -> None:
    assert both(ROW, -1) == ("exception", "ValueError", "count must not be negative")
    assert both(ROW, 2**63)[0:2] == ("exception", "OverflowError")


# ---------------------------------------------------------------------------------------------
# random valid rows

texts = st.text(max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)


def _json(value: Any) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(-(2**63), 2**63 - 1),
            st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
            st.binary(min_size=16, max_size=16),
            texts,
            st.integers(FIRST_US, LAST_US),
            st.integers(FIRST_US, LAST_US),
            st.dictionaries(texts, texts, max_size=4),
            st.dictionaries(texts, json_values, max_size=3),
            st.dictionaries(texts, json_values, max_size=3),
        ),
        max_size=6,
    )
)
def test_decoders_agree_on_random_valid_rows(rows: list[tuple[Any, ...]]) -> None:
    data = b""
    expected: list[Any] = []
    for position, digest, event_id, kind, at, recorded, tags, metadata, payload in rows:
        data += make_row(
            position=struct.pack(">q", position),
            hash=digest,
            event_id=event_id,
            event_type=kind.encode("utf-8", "surrogatepass"),
            timestamp=struct.pack(">q", at),
            recorded_at=None if digest is None else struct.pack(">q", recorded),
            tags=b"\x01" + _json(tags),
            metadata=None if digest is None else b"\x01" + _json(metadata),
            data=None if digest is None else b"\x01" + _json(payload),
        )
        expected.append(position if digest is None else None)
    result = both(data, len(rows))
    if any(0xD800 <= ord(c) < 0xE000 for row in rows for c in row[3]):
        assert result[0] == "error"  # a lone surrogate is not UTF-8
        return
    assert result[0] == "ok"
    for got, want, row in zip(result[1], expected, rows, strict=True):
        if want is not None:
            assert got == want
            continue
        assert got.position == row[0]
        assert got.hash == row[1]
        assert got.event_id == uuid.UUID(bytes=row[2])
        assert got.event_type == row[3]
        assert got.tags == row[6]
        assert got.metadata == row[7]
        assert got.data == row[8]
        assert got.timestamp == datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=row[4])


# ---------------------------------------------------------------------------------------------
# the store's reads


def test_every_read_returns_what_get_events_returns(store: EventStore) -> None:
    store.append_batch(server_events())
    store.append_batch(
        [DomainEvent("T" if n % 2 else "U", {"n": n}, {"k": str(n % 3)}) for n in range(40)]
    )
    everything = store.get_events()
    assert store.read().events == everything
    assert store.read(limit=10, after=3).events == everything[3:13]
    assert store.read(backwards=True, limit=5).events == everything[::-1][:5]
    walked = [event for page in store.paginate(page_size=7) for event in page]
    assert walked == everything
    assert list(store.stream_events(batch_size=9)) == everything
    typed = EventFilter(event_types=["U"], order_by="timestamp", order_direction="desc")
    assert list(store.stream_events(typed, batch_size=4)) == store.get_events(typed)
    assert store.get_page(typed, page_size=100).events == store.get_events(typed)
