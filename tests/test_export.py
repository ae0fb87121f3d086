"""Exports: `EventStore.export_arrow` and `EventStore.export_parquet`, the `EXPORT_SCHEMA` they
share, and the two `decode_rows` codecs that turn binary COPY rows into Arrow buffers.

An export must hold what the API returns for the same filter, field by field and in the same
order; DuckDB must read it (the reader and the Parquet file) and answer as the store does; and
the native decoder must give the pure-Python reference's buffers and errors, byte for byte, on
rows captured from the server, on hand-made and random rows, and on corrupted ones.
"""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
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
from tamma_events import DomainEvent, EventFilter, EventStore, EventStoreError
from tamma_events import _native as native  # no fallback: the tests fail if it did not build
from tamma_events.codec import reference as python
from tamma_events.codec.arrow import EXPORT_SCHEMA, to_batch
from tamma_events.codec.reference import DecodedRows
from tamma_events.model import SequencedEvent

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)
TYPES = ("IssueCreated", "PrOpened", "LlmCallCompleted")

#: Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 (10,957 days).
PG_EPOCH_US = 10_957 * 86_400 * 1_000_000
COLUMNS = (
    "position",
    "event_id",
    "event_type",
    "timestamp",
    "recorded_at",
    "tags",
    "metadata",
    "data",
    "hash",
)

Decoder = Callable[[bytes, int], DecodedRows]
DECODERS: dict[str, Decoder] = {"native": native.decode_rows, "python": python.decode_rows}


# ---------------------------------------------------------------------------------------------
# helpers


def _events(count: int) -> list[DomainEvent]:
    """Types, tags and timestamps that repeat (so orders by time and type have ties); every
    fourth event has no issueId."""
    events = []
    for n in range(count):
        tags = {"provider": ("anthropic", "openai")[n % 2]}
        if n % 4:
            tags["issueId"] = f"I-{n % 5}"
        events.append(
            DomainEvent(
                TYPES[n % 3],
                {"n": n, "nested": {"list": [n, str(n), None, n % 2 == 0]}},
                tags,
                {"trace": f"t{n}"},
                timestamp=BASE + timedelta(minutes=(n * 7) % 40, microseconds=n % 3),
            )
        )
    return events


def _jsonb_order(keys: Sequence[str]) -> list[str]:
    """jsonb's key order: shorter UTF-8 first, then bytewise."""
    return sorted(keys, key=lambda k: (len(k.encode()), k.encode()))


def assert_export_is(table: pa.Table, events: Sequence[SequencedEvent]) -> None:
    """``table`` is an export holding ``events``, in their order, field by field."""
    assert table.schema.equals(EXPORT_SCHEMA)
    rows = table.to_pylist()
    assert [row["position"] for row in rows] == [e.position for e in events]
    for row, event in zip(rows, events, strict=True):
        assert isinstance(row["event_id"], uuid.UUID)
        assert row["event_id"] == event.event_id
        assert row["event_type"] == event.event_type
        assert row["timestamp"] == event.timestamp
        assert row["timestamp"].utcoffset() == timedelta(0)
        assert row["recorded_at"] == event.recorded_at
        assert dict(row["tags"]) == event.tags
        assert [key for key, _ in row["tags"]] == _jsonb_order(list(event.tags))
        assert msgspec.json.decode(row["metadata"]) == event.metadata
        assert msgspec.json.decode(row["data"]) == event.data
        assert row["hash"] == event.hash


def _positions(table: pa.Table) -> list[int]:
    return [int(p) for p in table.column("position").to_pylist()]


def copy_rows(dsn: str, schema: str) -> tuple[bytes, int]:
    """The events table as binary COPY rows, without header and trailer, and their count."""
    statement = sql.SQL("SELECT {} FROM {} ORDER BY position").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS), sql.Identifier(schema, "events")
    )
    with psycopg.connect(dsn) as conn:
        return copy_out(conn, statement)


def both(rows: bytes, count: int) -> tuple[Any, ...]:
    """The decoders' common outcome; fails if they differ."""
    native_outcome = decode_outcome(native.decode_rows, rows, count)
    python_outcome = decode_outcome(python.decode_rows, rows, count)
    assert native_outcome == python_outcome
    return python_outcome


def make_row(**values: bytes | None) -> bytes:
    """A valid export row, with ``values`` replacing fields by name."""
    defaults: dict[str, bytes | None] = {
        "position": struct.pack(">q", 7),
        "event_id": uuid.UUID(int=42).bytes,
        "event_type": b"IssueCreated",
        "timestamp": struct.pack(">q", 1),
        "recorded_at": struct.pack(">q", 2),
        "tags": b'\x01{"issueId": "I-1"}',
        "metadata": b"\x01{}",
        "data": b'\x01{"n": 1}',
        "hash": bytes(range(32)),
    }
    assert set(values) <= set(defaults)
    defaults.update(values)
    return struct.pack(">h", 9) + b"".join(field(defaults[c]) for c in COLUMNS)


def _int32s(buffer: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(buffer) // 4}i", buffer))


def _strings(offsets: bytes, data: bytes) -> list[bytes]:
    ends = _int32s(offsets)
    return [data[ends[i] : ends[i + 1]] for i in range(len(ends) - 1)]


# ---------------------------------------------------------------------------------------------
# export_arrow is what the API returns

# Text with what JSON must escape, and what it may or must not: quotes, backslashes, control
# characters, the slash, the line separators JavaScript dislikes, non-BMP characters.
NASTY = ['"', "\\", "/", "\x01", "\x1f", "\x7f", "\n", "\t", "\u2028", "é", "\U0001f600", "\ufffd"]
text_char = st.one_of(
    st.characters(codec="utf-8", exclude_characters="\x00"),  # no NUL, no surrogates
    st.sampled_from(NASTY),
)
tag_text = st.text(text_char, max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tag_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(tag_text, children, max_size=3)
    ),
    max_leaves=10,
)


@pytest.fixture
def fixed_pool_store(make_store: Callable[..., EventStore]) -> EventStore:
    """A store whose pool never opens a connection once it is open: psycopg_pool draws each
    new connection's lifetime from the `random` module, which Hypothesis refuses to see used
    (from any thread) while it draws an example."""
    return make_store(min_connections=4, max_connections=4)


@st.composite
def domain_events(draw: st.DrawFn) -> DomainEvent:
    return DomainEvent(
        draw(st.text(text_char, min_size=1, max_size=20)),
        draw(st.dictionaries(tag_text, json_values, max_size=3)),
        draw(st.dictionaries(st.text(text_char, min_size=1, max_size=12), tag_text, max_size=4)),
        draw(st.dictionaries(tag_text, json_values, max_size=2)),
        timestamp=draw(
            st.datetimes(
                min_value=datetime(1, 1, 2),
                max_value=datetime(9999, 12, 30),
                timezones=st.sampled_from(
                    [timezone.utc, timezone(timedelta(hours=-3)), timezone(timedelta(hours=5.5))]
                ),
            )
        ),
    )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(domain_events(), min_size=1, max_size=4), batch_size=st.sampled_from([1, 3]))
def test_export_equals_the_api(
    fixed_pool_store: EventStore, batch: list[DomainEvent], batch_size: int
) -> None:
    # One store for every example: each appends, then the whole log is compared.
    store = fixed_pool_store
    last = store.append_batch(batch)
    table = store.export_arrow(batch_size=batch_size).read_all()
    assert_export_is(table, store.get_events())
    assert _positions(table)[-len(batch) :] == list(range(last - len(batch) + 1, last + 1))
    new = table.slice(table.num_rows - len(batch)).to_pylist()
    for row, original in zip(new, batch, strict=True):
        assert row["event_id"] == original.event_id
        assert row["event_type"] == original.event_type
        assert row["timestamp"] == original.timestamp
        assert dict(row["tags"]) == original.tags


FILTERS = [
    None,
    EventFilter(event_types=["PrOpened"]),
    EventFilter(event_types=["PrOpened", "IssueCreated"], order_by="timestamp"),
    EventFilter(
        event_types=["PrOpened", "LlmCallCompleted"],
        order_by="timestamp",
        order_direction="desc",
        limit=23,
        offset=4,
    ),
    EventFilter(issue_ids=["I-2", "I-3"], providers=["openai"]),
    EventFilter(start_time=BASE + timedelta(minutes=5), end_time=BASE + timedelta(minutes=30)),
    EventFilter(order_by="timestamp", order_direction="desc", tags={"issueId": "I-1"}),
    EventFilter(order_by="type", order_direction="desc", limit=21),
    EventFilter(order_direction="desc", limit=14, offset=5),
    EventFilter(order_by="timestamp", limit=50, offset=13),
    EventFilter(offset=59),
]


@pytest.mark.parametrize("event_filter", FILTERS)
def test_export_follows_the_filter_and_its_order(
    store: EventStore, event_filter: EventFilter | None
) -> None:
    store.append_batch(_events(60))
    expected = store.get_events(event_filter)
    assert expected, "every filter here matches something"
    for batch_size in (1, 7, 65_536):
        reader = store.export_arrow(event_filter, batch_size=batch_size)
        assert reader.schema.equals(EXPORT_SCHEMA)
        batches = list(reader)
        assert all(0 < b.num_rows <= batch_size for b in batches)
        assert_export_is(pa.Table.from_batches(batches, schema=EXPORT_SCHEMA), expected)


@pytest.mark.parametrize(
    "event_filter",
    [
        None,
        EventFilter(event_types=["PrOpened"]),
        EventFilter(order_by="timestamp", order_direction="desc", limit=5),
    ],
)
def test_an_empty_store_exports_no_rows(
    store: EventStore, event_filter: EventFilter | None
) -> None:
    reader = store.export_arrow(event_filter, batch_size=7)
    assert reader.schema.equals(EXPORT_SCHEMA)
    table = reader.read_all()
    assert table.num_rows == 0
    assert table.schema.equals(EXPORT_SCHEMA)


@pytest.mark.parametrize(
    "event_filter",
    [
        EventFilter(event_types=["Nothing"]),
        EventFilter(issue_ids=["I-404"]),
        EventFilter(start_time=BASE - timedelta(days=2), end_time=BASE - timedelta(days=1)),
        EventFilter(offset=30),
    ],
)
def test_a_filter_that_matches_nothing_exports_no_rows(
    store: EventStore, event_filter: EventFilter
) -> None:
    store.append_batch(_events(30))
    table = store.export_arrow(event_filter, batch_size=7).read_all()
    assert table.num_rows == 0
    assert table.schema.equals(EXPORT_SCHEMA)
    assert store.get_events(event_filter) == []


def test_export_is_pinned_to_the_head_it_started_at(store: EventStore) -> None:
    store.append_batch(_events(30))
    reader = store.export_arrow(batch_size=4)
    first = reader.read_next_batch()
    store.append_batch(_events(10))  # committed while the export is open
    rest = reader.read_all()
    assert _positions(pa.Table.from_batches([first])) + _positions(rest) == list(range(1, 31))
    assert store.head() == 40


def test_no_connection_is_held_between_batches(make_store: Callable[..., EventStore]) -> None:
    # With a single connection, a call made while the export is open would wait for the pool
    # (and fail after pool_timeout) if the export kept that connection.
    store = make_store(max_connections=1, min_connections=1, pool_timeout=5)
    store.append_batch(_events(25))
    seen = [
        (_positions(pa.Table.from_batches([b])), store.head())
        for b in store.export_arrow(batch_size=10)
    ]
    assert seen == [(list(range(1, 11)), 25), (list(range(11, 21)), 25), (list(range(21, 26)), 25)]


def test_archived_events_are_exported_with_include_archived(
    make_store: Callable[..., EventStore], tmp_path: Path
) -> None:
    store = make_store(archive_dir=tmp_path)
    store.append_batch(_events(30))
    moment = datetime.now(timezone.utc) + timedelta(seconds=1)
    assert store.compact_events(moment, file_events=8) == 30
    store.append_batch(_events(12))  # appended after the compaction: live
    assert _positions(store.export_arrow().read_all()) == list(range(31, 43))
    for event_filter in (
        None,
        EventFilter(order_by="timestamp", order_direction="desc", limit=20, offset=3),
        EventFilter(event_types=["PrOpened"], order_by="type"),
    ):
        table = store.export_arrow(event_filter, batch_size=7, include_archived=True).read_all()
        assert_export_is(table, store.get_events(event_filter, include_archived=True))


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": 10**6}, "batch_size"),
        ({"event_filter": EventFilter(order_by="size")}, "order_by"),  # type: ignore[arg-type]
        ({"event_filter": EventFilter(limit=-1)}, "limit"),
    ],
)
def test_bad_arguments_fail_at_the_call(
    store: EventStore, kwargs: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(EventStoreError) as raised:
        store.export_arrow(**kwargs)  # no read: the call itself raises
    assert raised.value.code == "QUERY_ERROR"
    assert raised.value.context["field"] == field_name


# ---------------------------------------------------------------------------------------------
# DuckDB reads the reader and the Parquet file

WINDOW = (BASE + timedelta(minutes=5), BASE + timedelta(minutes=30))
#: DuckDB predicates and the filters that ask the same question.
QUESTIONS: list[tuple[str, list[Any], EventFilter]] = [
    ("true", [], EventFilter()),
    ("event_type = ?", ["PrOpened"], EventFilter(event_types=["PrOpened"])),
    ("tags['issueId'] = ?", ["I-2"], EventFilter(issue_ids=["I-2"])),
    (
        '"timestamp" >= ? AND "timestamp" < ?',
        list(WINDOW),
        EventFilter(start_time=WINDOW[0], end_time=WINDOW[1]),
    ),
    (
        'event_type IN (?, ?) AND tags[\'issueId\'] = ? AND "timestamp" >= ? AND "timestamp" < ?',
        ["PrOpened", "IssueCreated", "I-1", *WINDOW],
        EventFilter(
            event_types=["PrOpened", "IssueCreated"],
            issue_ids=["I-1"],
            start_time=WINDOW[0],
            end_time=WINDOW[1],
        ),
    ),
]


def _ask_duckdb(
    con: duckdb.DuckDBPyConnection, source: Callable[[], str], store: EventStore
) -> None:
    """Every question of QUESTIONS, asked of the table ``source()`` names, answered as the store
    answers it: the count, and the positions in timestamp order."""
    for predicate, params, event_filter in QUESTIONS:
        expected = store.count_events(event_filter)
        assert expected > 0
        found = con.execute(f"SELECT count(*) FROM {source()} WHERE {predicate}", params)
        assert found.fetchall() == [(expected,)], predicate
        ordered = con.execute(
            f"SELECT position FROM {source()} WHERE {predicate}"
            ' ORDER BY "timestamp" DESC, position DESC',
            params,
        ).fetchall()
        by_time = msgspec.structs.replace(
            event_filter, order_by="timestamp", order_direction="desc"
        )
        assert [p for (p,) in ordered] == [e.position for e in store.get_events(by_time)]


def test_duckdb_reads_the_record_batch_reader(store: EventStore) -> None:
    store.append_batch(_events(60))
    con = duckdb.connect()
    # DuckDB finds a reader by its variable's name; each reader is read once.
    reader = store.export_arrow(batch_size=7)
    types = con.execute(
        "SELECT typeof(position), typeof(event_id), typeof(event_type), typeof(timestamp),"
        " typeof(tags), typeof(data), typeof(metadata), typeof(hash) FROM reader LIMIT 1"
    ).fetchall()
    assert types == [
        (
            "BIGINT",
            "UUID",
            "VARCHAR",
            "TIMESTAMP WITH TIME ZONE",
            "MAP(VARCHAR, VARCHAR)",
            "JSON",
            "JSON",
            "BLOB",
        )
    ]
    reader = store.export_arrow(batch_size=7)
    ids = con.execute("SELECT event_id FROM reader ORDER BY position").fetchall()
    assert [i for (i,) in ids] == [e.event_id for e in store.get_events()]
    reader = store.export_arrow(batch_size=7)  # noqa: F841
    total = con.execute("SELECT sum(CAST(data->>'$.n' AS INTEGER)) FROM reader").fetchall()
    assert total == [(sum(range(60)),)]

    def fresh() -> str:
        con.register("events", store.export_arrow(batch_size=7))
        return "events"

    _ask_duckdb(con, fresh, store)


def test_duckdb_reads_the_parquet_file(store: EventStore, tmp_path: Path) -> None:
    store.append_batch(_events(60))
    path = tmp_path / "events.parquet"
    assert store.export_parquet(None, path, batch_size=16, row_group_size=20) == 60
    con = duckdb.connect()
    source = f"read_parquet('{path}')"
    types = con.execute(
        f"SELECT typeof(event_id), typeof(data), typeof(metadata), typeof(timestamp),"
        f" typeof(tags) FROM {source} LIMIT 1"
    ).fetchall()
    assert types == [("UUID", "JSON", "JSON", "TIMESTAMP WITH TIME ZONE", "MAP(VARCHAR, VARCHAR)")]
    ids = con.execute(f"SELECT event_id FROM {source} ORDER BY position").fetchall()
    assert [i for (i,) in ids] == [e.event_id for e in store.get_events()]
    _ask_duckdb(con, lambda: source, store)


# ---------------------------------------------------------------------------------------------
# export_parquet


def test_export_parquet_writes_what_export_arrow_returns(store: EventStore, tmp_path: Path) -> None:
    store.append_batch(_events(60))
    path = tmp_path / "events.parquet"
    calls: list[int] = []
    written = store.export_parquet(
        None, path, batch_size=25, row_group_size=10, progress=calls.append
    )
    assert written == 60
    assert calls == [25, 50, 60]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet"]
    metadata = pq.ParquetFile(path).metadata
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sum(groups) == 60
    assert max(groups) <= 10
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    table = pq.read_table(path)
    assert table.schema.equals(EXPORT_SCHEMA)
    assert table.to_pylist() == store.export_arrow().read_all().to_pylist()
    assert_export_is(table, store.get_events())


def test_export_parquet_follows_the_filter(store: EventStore, tmp_path: Path) -> None:
    store.append_batch(_events(60))
    event_filter = EventFilter(
        event_types=["PrOpened", "IssueCreated"],
        order_by="timestamp",
        order_direction="desc",
        limit=30,
        offset=2,
    )
    path = tmp_path / "some.parquet"
    calls: list[int] = []
    written = store.export_parquet(
        event_filter, path, compression="snappy", batch_size=7, progress=calls.append
    )
    expected = store.get_events(event_filter)
    assert written == len(expected) == 30
    assert calls == [7, 14, 21, 28, 30]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "SNAPPY"
    assert_export_is(pq.read_table(path), expected)


def test_export_parquet_of_nothing_writes_an_empty_file(store: EventStore, tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    calls: list[int] = []
    assert store.export_parquet(None, path, progress=calls.append) == 0
    assert calls == []
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(EXPORT_SCHEMA)


def test_export_parquet_into_a_missing_directory_raises_and_leaves_nothing(
    store: EventStore, tmp_path: Path
) -> None:
    store.append_batch(_events(10))
    with pytest.raises(FileNotFoundError):
        store.export_parquet(None, tmp_path / "missing" / "events.parquet")
    assert list(tmp_path.iterdir()) == []


def test_export_parquet_failing_midway_leaves_the_old_file_and_no_temporary(
    store: EventStore, tmp_path: Path
) -> None:
    store.append_batch(_events(30))
    path = tmp_path / "events.parquet"
    path.write_bytes(b"the previous export")

    class Interrupted(Exception):
        pass

    seen: list[int] = []

    def progress(done: int) -> None:
        seen.append(done)
        if done >= 20:
            raise Interrupted

    with pytest.raises(Interrupted):
        store.export_parquet(None, path, batch_size=10, progress=progress)
    assert seen == [10, 20]
    assert path.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet"]
    # and a complete run replaces it
    assert store.export_parquet(None, path, batch_size=10) == 30
    assert_export_is(pq.read_table(path), store.get_events())


# ---------------------------------------------------------------------------------------------
# decode_rows: the two codecs agree on rows from the server


SERVER_TAGS = [
    {},
    {"issueId": "I-1", "provider": "anthropic"},
    {'q"uote': 'a"b', "back\\slash": "c\\d", "slash/": "/"},
    {"\x01ctrl\x1f": "\n\t\r\x08\x0c\x7f", "sep\u2028": "\u2029"},
    {"\U0001f600": "\U0001f4a9\U00010000\U0010ffff", "é": "ü\ufffd"},
    {"k" * 128: "v" * 300, "x": ""},
    {"u\\u0041": "not an escape: \\u0041", "\U0001f600": "\ud7ff\ue000\uffff"},
]


def _server_events() -> list[DomainEvent]:
    return [
        DomainEvent(
            TYPES[n % 3] if n % 2 else 'Ty"pe\\ \U0001f600',
            {"n": n, "text": 'a"b\\c\u0001\U0001f600', "deep": [[{"x": 1.5}]]},
            tags,
            {"m": [None, True, -(10**20)]},
            timestamp=datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=timezone.utc)
            + timedelta(days=n * 3000, microseconds=n),
        )
        for n, tags in enumerate(SERVER_TAGS)
    ]


def test_decoders_agree_on_rows_from_the_server(store: EventStore, pg_dsn: str) -> None:
    store.append_batch(_server_events())
    store.append_batch(_events(40))
    rows, count = copy_rows(pg_dsn, store.schema)
    assert count == 47
    decoded = native.decode_rows(rows, count)
    assert decoded == python.decode_rows(rows, count)
    assert native.decode_rows(bytearray(rows), count) == decoded
    assert python.decode_rows(memoryview(rows), count) == decoded
    # read independently of both decoders
    events = store.get_events()
    tag_ends = _int32s(decoded.tag_offsets)
    keys = _strings(decoded.key_offsets, decoded.key_data)
    values = _strings(decoded.value_offsets, decoded.value_data)
    for i, event in enumerate(events):
        pairs = list(
            zip(
                keys[tag_ends[i] : tag_ends[i + 1]],
                values[tag_ends[i] : tag_ends[i + 1]],
                strict=True,
            )
        )
        assert {k.decode(): v.decode() for k, v in pairs} == event.tags
        assert len(pairs) == len(event.tags)
    assert [t.decode() for t in _strings(decoded.type_offsets, decoded.type_data)] == [
        e.event_type for e in events
    ]
    assert list(struct.unpack(f"<{count}q", decoded.position)) == list(range(1, 48))
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    stamps = struct.unpack(f"<{count}q", decoded.timestamp)
    assert [epoch + timedelta(microseconds=us) for us in stamps] == [e.timestamp for e in events]
    # and the batch made of them is what the store exports
    assert to_batch(decoded).to_pylist() == store.export_arrow().read_all().to_pylist()


def test_decoders_agree_on_every_cut_and_miscount_of_server_rows(
    store: EventStore, pg_dsn: str
) -> None:
    store.append_batch(_server_events()[2:5])
    rows, count = copy_rows(pg_dsn, store.schema)
    assert count == 3
    check_cuts_and_miscounts(both, rows, count, COLUMNS, python.decode_error)


# ---------------------------------------------------------------------------------------------
# decode_rows: identical errors on corrupted rows

ROW = make_row()
INFINITY = struct.pack(">q", 2**63 - 1)
MINUS_INFINITY = struct.pack(">q", -(2**63))
NOT_FLAT = "are not an object of strings"

#: (rows, count, row, field, problem): what is wrong, and how both decoders must say it.
CORRUPTED: dict[str, tuple[bytes, int, int, str, str]] = {
    "no bytes": (b"", 1, 0, "row", "is cut short"),
    "one byte": (ROW[:1], 1, 0, "row", "is cut short"),
    "cut in a length word": (ROW[:4], 1, 0, "position", "is cut short"),
    "cut in a value": (ROW[:10], 1, 0, "position", "is cut short"),
    "cut in the hash": (ROW[:-1], 1, 0, "hash", "is cut short"),
    "cut in the second row": (ROW + ROW[:40], 2, 1, "event_type", "is cut short"),
    "one row short": (ROW, 2, 1, "row", "is cut short"),
    "a length past the end": (
        ROW[:2] + struct.pack(">i", 2**31 - 1) + ROW[6:],
        1,
        0,
        "position",
        "is cut short",
    ),
    "8 fields": (struct.pack(">h", 8) + ROW[2:], 1, 0, "row", "has 8 fields, not 9"),
    "10 fields": (struct.pack(">h", 10) + ROW[2:], 1, 0, "row", "has 10 fields, not 9"),
    "-1 fields (the trailer)": (COPY_TRAILER, 1, 0, "row", "has -1 fields, not 9"),
    "negative length": (ROW[:2] + struct.pack(">i", -2) + ROW[6:], 1, 0, "position", "is NULL"),
    **{f"NULL {c}": (make_row(**{c: None}), 1, 0, c, "is NULL") for c in COLUMNS},
    "NULL in the second row": (ROW + make_row(hash=None), 2, 1, "hash", "is NULL"),
    "position of 4 bytes": (make_row(position=bytes(4)), 1, 0, "position", "has 4 bytes, not 8"),
    "event_id of 15 bytes": (
        make_row(event_id=bytes(15)),
        1,
        0,
        "event_id",
        "has 15 bytes, not 16",
    ),
    "event_id as text": (
        make_row(event_id=str(uuid.UUID(int=1)).encode()),
        1,
        0,
        "event_id",
        "has 36 bytes, not 16",
    ),
    "timestamp of 9 bytes": (make_row(timestamp=bytes(9)), 1, 0, "timestamp", "has 9 bytes, not 8"),
    "recorded_at of 0 bytes": (
        make_row(recorded_at=b""),
        1,
        0,
        "recorded_at",
        "has 0 bytes, not 8",
    ),
    "hash of 31 bytes": (make_row(hash=bytes(31)), 1, 0, "hash", "has 31 bytes, not 32"),
    "hash of 33 bytes": (make_row(hash=bytes(33)), 1, 0, "hash", "has 33 bytes, not 32"),
    "infinite timestamp": (make_row(timestamp=INFINITY), 1, 0, "timestamp", "is not a finite time"),
    "-infinite timestamp": (
        make_row(timestamp=MINUS_INFINITY),
        1,
        0,
        "timestamp",
        "is not a finite time",
    ),
    "infinite recorded_at": (
        make_row(recorded_at=INFINITY),
        1,
        0,
        "recorded_at",
        "is not a finite time",
    ),
    "timestamp at 2**62": (
        make_row(timestamp=struct.pack(">q", 2**62)),
        1,
        0,
        "timestamp",
        "is not a finite time",
    ),
    "timestamp at -2**62": (
        make_row(timestamp=struct.pack(">q", -(2**62))),
        1,
        0,
        "timestamp",
        "is not a finite time",
    ),
    "jsonb version 2 tags": (make_row(tags=b"\x02{}"), 1, 0, "tags", "is not jsonb version 1"),
    "jsonb version 0 metadata": (
        make_row(metadata=b"\x00{}"),
        1,
        0,
        "metadata",
        "is not jsonb version 1",
    ),
    "jsonb data as text": (make_row(data=b"{}"), 1, 0, "data", "is not jsonb version 1"),
    "empty jsonb data": (make_row(data=b""), 1, 0, "data", "is not jsonb version 1"),
    "tags: an array": (make_row(tags=b"\x01[1]"), 1, 0, "tags", NOT_FLAT),
    "tags: a string": (make_row(tags=b'\x01"a"'), 1, 0, "tags", NOT_FLAT),
    "tags: null": (make_row(tags=b"\x01null"), 1, 0, "tags", NOT_FLAT),
    "tags: nothing": (make_row(tags=b"\x01"), 1, 0, "tags", NOT_FLAT),
    "tags: a number value": (make_row(tags=b'\x01{"a": 1}'), 1, 0, "tags", NOT_FLAT),
    "tags: a null value": (make_row(tags=b'\x01{"a": null}'), 1, 0, "tags", NOT_FLAT),
    "tags: a nested value": (make_row(tags=b'\x01{"a": {"b": "c"}}'), 1, 0, "tags", NOT_FLAT),
    "tags: an array value": (make_row(tags=b'\x01{"a": ["b"]}'), 1, 0, "tags", NOT_FLAT),
    "tags: escape \\x": (make_row(tags=b'\x01{"a": "\\x41"}'), 1, 0, "tags", NOT_FLAT),
    "tags: short \\u": (make_row(tags=b'\x01{"a": "\\u12"}'), 1, 0, "tags", NOT_FLAT),
    "tags: \\u not hex": (make_row(tags=b'\x01{"a": "\\u12g4"}'), 1, 0, "tags", NOT_FLAT),
    "tags: lone high surrogate": (make_row(tags=b'\x01{"a": "\\ud800"}'), 1, 0, "tags", NOT_FLAT),
    "tags: lone high surrogate key": (
        make_row(tags=b'\x01{"\\ud800x": "a"}'),
        1,
        0,
        "tags",
        NOT_FLAT,
    ),
    "tags: lone low surrogate": (make_row(tags=b'\x01{"a": "\\udc00"}'), 1, 0, "tags", NOT_FLAT),
    "tags: two high surrogates": (
        make_row(tags=b'\x01{"a": "\\ud800\\ud800"}'),
        1,
        0,
        "tags",
        NOT_FLAT,
    ),
    "tags: raw control character": (make_row(tags=b'\x01{"a": "\x01"}'), 1, 0, "tags", NOT_FLAT),
    "tags: unterminated string": (make_row(tags=b'\x01{"a": "b}'), 1, 0, "tags", NOT_FLAT),
    "tags: trailing backslash": (make_row(tags=b'\x01{"a": "b\\'), 1, 0, "tags", NOT_FLAT),
    "tags: unclosed": (make_row(tags=b'\x01{"a": "b"'), 1, 0, "tags", NOT_FLAT),
    "tags: trailing comma": (make_row(tags=b'\x01{"a": "b",}'), 1, 0, "tags", NOT_FLAT),
    "tags: missing colon": (make_row(tags=b'\x01{"a" "b"}'), 1, 0, "tags", NOT_FLAT),
    "tags: unquoted key": (make_row(tags=b'\x01{a: "b"}'), 1, 0, "tags", NOT_FLAT),
    "tags: single quotes": (make_row(tags=b"\x01{'a': 'b'}"), 1, 0, "tags", NOT_FLAT),
    "tags: trailing garbage": (make_row(tags=b'\x01{"a": "b"} x'), 1, 0, "tags", NOT_FLAT),
    "tags: two objects": (make_row(tags=b"\x01{}{}"), 1, 0, "tags", NOT_FLAT),
    "tags: vertical tab": (make_row(tags=b"\x01\x0b{}"), 1, 0, "tags", NOT_FLAT),
    "tags in the second row": (ROW + make_row(tags=b'\x01{"a": 1}'), 2, 1, "tags", NOT_FLAT),
    "a trailing byte": (ROW + b"\x00", 1, 1, "row", "follows the last expected row"),
    "a trailing row": (ROW + ROW, 1, 1, "row", "follows the last expected row"),
    "a trailer": (ROW + COPY_TRAILER, 1, 1, "row", "follows the last expected row"),
    "bytes for no rows": (ROW, 0, 0, "row", "follows the last expected row"),
}


@pytest.mark.parametrize("case", list(CORRUPTED))
def test_decoders_reject_corrupted_rows_alike(case: str) -> None:
    rows, count, row, field_name, problem = CORRUPTED[case]
    expected = EventStoreError(
        "STORAGE_ERROR",
        f"export row {row}: {field_name} {problem}",
        {"row": row, "field": field_name},
    )
    assert expected == python.decode_error(row, field_name, problem)
    for name, decoder in DECODERS.items():
        with pytest.raises(EventStoreError) as raised:
            decoder(rows, count)
        assert raised.value == expected, name


@pytest.mark.parametrize(
    "tags",
    [
        b"\x01{}",
        b"\x01 { } ",
        b'\x01 \t\r\n{ "a" :\t"b" ,\n"c":"d" }\r\n',
        b'\x01{"a": "\\"\\\\\\/\\b\\f\\n\\r\\t"}',
        b'\x01{"\\u00E9\\u00e9": "\\uD83D\\uDE00\\ud83d\\ude00"}',
        b'\x01{"a": "\\u0000"}',
        b'\x01{"": ""}',
        b'\x01{"a": "\x7f\xc3\xa9\xf0\x9f\x98\x80"}',
    ],
)
def test_decoders_accept_the_edges_of_flat_json_alike(tags: bytes) -> None:
    result = both(make_row(tags=tags), 1)
    assert result[0] == "ok"
    decoded: DecodedRows = result[1]
    expected = json.loads(tags[1:].decode())
    keys = [k.decode() for k in _strings(decoded.key_offsets, decoded.key_data)]
    values = [v.decode() for v in _strings(decoded.value_offsets, decoded.value_data)]
    assert dict(zip(keys, values, strict=True)) == expected
    assert keys == list(expected)
    assert _int32s(decoded.tag_offsets) == [0, len(expected)]


def test_decoding_no_rows_gives_empty_buffers() -> None:
    empty = DecodedRows(
        0,
        b"",
        b"",
        bytes(4),
        b"",
        b"",
        b"",
        bytes(4),
        bytes(4),
        b"",
        bytes(4),
        b"",
        bytes(4),
        b"",
        bytes(4),
        b"",
        b"",
    )
    assert both(b"", 0) == ("ok", empty)
    assert to_batch(empty).num_rows == 0


# ---------------------------------------------------------------------------------------------
# decode_rows: random valid rows


def _u_escape(code: int, upper: bool) -> str:
    def unit(u: int) -> str:
        return f"\\u{u:04X}" if upper else f"\\u{u:04x}"

    if code < 0x10000:
        return unit(code)
    code -= 0x10000
    return unit(0xD800 + (code >> 10)) + unit(0xDC00 + (code & 0x3FF))


SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
SPACES = ["", "", " ", "\t", "\n", "\r\n ", "  "]


def _json_string(text: str, rnd: random.Random) -> str:
    """``text`` as a JSON string, each character written raw, as a short escape or as \\u
    (either case of hex digits, surrogate pairs beyond the BMP), at random."""
    out = ['"']
    for ch in text:
        pick = rnd.random()
        if ch in SHORT_ESCAPES and pick < 0.5:
            out.append(SHORT_ESCAPES[ch])
        elif ch not in '"\\' and ord(ch) >= 0x20 and pick < 0.7:
            out.append(ch)
        else:
            out.append(_u_escape(ord(ch), upper=rnd.random() < 0.5))
    out.append('"')
    return "".join(out)


def _json_object(tags: dict[str, str], style: str, rnd: random.Random) -> bytes:
    if style == "ascii":
        return json.dumps(tags, ensure_ascii=True).encode()
    if style == "utf-8":
        return json.dumps(tags, ensure_ascii=False, separators=(",", ":")).encode()

    def gap() -> str:
        return rnd.choice(SPACES)

    items = [
        f"{gap()}{_json_string(k, rnd)}{gap()}:{gap()}{_json_string(v, rnd)}{gap()}"
        for k, v in tags.items()
    ]
    return f"{gap()}{{{','.join(items) or gap()}}}{gap()}".encode()


any_char = st.one_of(
    st.characters(codec="utf-8"),  # NUL and every control character included; no surrogates
    st.sampled_from(NASTY),
)


@st.composite
def export_rows(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A valid export row and the values it holds."""
    rnd = draw(st.randoms(use_true_random=False))
    values: dict[str, Any] = {
        "position": draw(st.integers(-(2**63), 2**63 - 1)),
        "event_id": draw(st.binary(min_size=16, max_size=16)),
        "event_type": draw(st.text(any_char, max_size=10)),
        "timestamp": draw(st.integers(-(2**62) + 1, 2**62 - 1)),
        "recorded_at": draw(st.integers(-(2**62) + 1, 2**62 - 1)),
        "tags": draw(
            st.dictionaries(
                st.text(any_char, max_size=8), st.text(any_char, max_size=8), max_size=5
            )
        ),
        "metadata": json.dumps(
            draw(st.dictionaries(st.text(any_char, max_size=4), st.integers(), max_size=2)),
            ensure_ascii=False,
        ),
        "data": json.dumps(
            draw(st.lists(st.text(any_char, max_size=4), max_size=3)), ensure_ascii=False
        ),
        "hash": draw(st.binary(min_size=32, max_size=32)),
    }
    style = draw(st.sampled_from(["ascii", "utf-8", "mixed"]))
    row = make_row(
        position=struct.pack(">q", values["position"]),
        event_id=values["event_id"],
        event_type=values["event_type"].encode(),
        timestamp=struct.pack(">q", values["timestamp"]),
        recorded_at=struct.pack(">q", values["recorded_at"]),
        tags=b"\x01" + _json_object(values["tags"], style, rnd),
        metadata=b"\x01" + values["metadata"].encode(),
        data=b"\x01" + values["data"].encode(),
        hash=values["hash"],
    )
    return row, values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(export_rows(), min_size=1, max_size=4))
def test_decoders_agree_on_random_rows(rows: list[tuple[bytes, dict[str, Any]]]) -> None:
    buffer = b"".join(row for row, _ in rows)
    result = both(buffer, len(rows))
    assert result[0] == "ok"
    decoded: DecodedRows = result[1]
    originals = [values for _, values in rows]
    n = len(rows)
    assert decoded.num_rows == n
    assert struct.unpack(f"<{n}q", decoded.position) == tuple(v["position"] for v in originals)
    assert decoded.event_id == b"".join(v["event_id"] for v in originals)
    assert decoded.hash == b"".join(v["hash"] for v in originals)
    for name in ("timestamp", "recorded_at"):
        got = struct.unpack(f"<{n}q", getattr(decoded, name))
        assert got == tuple(v[name] + PG_EPOCH_US for v in originals)
    types = _strings(decoded.type_offsets, decoded.type_data)
    assert [t.decode() for t in types] == [v["event_type"] for v in originals]
    for name in ("metadata", "data"):
        texts = _strings(getattr(decoded, f"{name}_offsets"), getattr(decoded, f"{name}_data"))
        assert [t.decode() for t in texts] == [v[name] for v in originals]
    ends = _int32s(decoded.tag_offsets)
    keys = [k.decode() for k in _strings(decoded.key_offsets, decoded.key_data)]
    values = [v.decode() for v in _strings(decoded.value_offsets, decoded.value_data)]
    for i, original in enumerate(originals):
        pairs = list(zip(keys[ends[i] : ends[i + 1]], values[ends[i] : ends[i + 1]], strict=True))
        assert pairs == list(original["tags"].items())


ascii_text = st.text(st.characters(max_codepoint=0x7F), max_size=8)


@st.composite
def ascii_rows(draw: st.DrawFn) -> bytes:
    """An export row of ASCII bytes only (so damaging it with ASCII cannot make invalid UTF-8),
    with at most one tag (so it cannot make a duplicate key): see the last tests of this file.
    Its timestamps may be out of range."""

    def ascii_bytes(size: int) -> bytes:
        return bytes(b & 0x7F for b in draw(st.binary(min_size=size, max_size=size)))

    return make_row(
        position=ascii_bytes(8),
        event_id=ascii_bytes(16),
        event_type=draw(ascii_text).encode(),
        timestamp=ascii_bytes(8),
        recorded_at=ascii_bytes(8),
        tags=b"\x01"
        + json.dumps(draw(st.dictionaries(ascii_text, ascii_text, max_size=1))).encode(),
        metadata=b"\x01" + json.dumps(draw(st.dictionaries(ascii_text, ascii_text))).encode(),
        data=b"\x01" + json.dumps(draw(ascii_text)).encode(),
        hash=ascii_bytes(32),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(ascii_rows(), min_size=1, max_size=2),
    at=st.integers(0),
    byte=st.integers(0, 0x7F),
)
def test_decoders_agree_on_damaged_random_rows(rows: list[bytes], at: int, byte: int) -> None:
    # One byte replaced anywhere, or the rows cut short there: whatever the outcome, both
    # decoders give it, and it is the rows or an EventStoreError.
    data = b"".join(rows)
    at %= len(data)
    for damaged in (data[:at] + bytes([byte]) + data[at + 1 :], data[:at]):
        assert both(damaged, len(rows))[0] in ("ok", "error")


# ---------------------------------------------------------------------------------------------
# decode_rows: a golden row, decoded by hand

GOLDEN_ROWS = (
    # row 0
    b"\x00\x09"  # 9 fields
    b"\x00\x00\x00\x08"
    b"\x00\x00\x00\x00\x00\x00\x00\x01"  # position 1
    b"\x00\x00\x00\x10"
    b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff"
    b"\x00\x00\x00\x02"
    b"Ab"  # event_type
    b"\x00\x00\x00\x08"
    b"\xff\xfc\xa2\xfe\xc4\xc8\x20\x00"  # timestamp: -946684800000000 us
    b"\x00\x00\x00\x08"
    b"\x00\x00\x00\x00\x00\x00\x00\x01"  # recorded_at: 2000-01-01 + 1 us
    b"\x00\x00\x00\x1d"
    b'\x01{"a": "b", "k": "v\\n\\u00e9"}'  # tags, 29 bytes
    b"\x00\x00\x00\x03"
    b"\x01{}"  # metadata
    b"\x00\x00\x00\x0b"
    b'\x01{"x": [1]}'  # data, 11 bytes
    b"\x00\x00\x00\x20"
    + bytes(range(32))  # hash
    # row 1
    + b"\x00\x09"
    b"\x00\x00\x00\x08"
    b"\xff\xff\xff\xff\xff\xff\xff\xff"  # position -1
    b"\x00\x00\x00\x10" + b"\xff" * 16 + b"\x00\x00\x00\x00"  # event_type ""
    b"\x00\x00\x00\x08"
    b"\x00\x00\x00\x00\x00\x00\x00\x00"  # timestamp: 2000-01-01
    b"\x00\x00\x00\x08"
    b"\x00\x00\x00\x01\x00\x00\x00\x00"  # recorded_at: 2**32 us
    b"\x00\x00\x00\x03"
    b"\x01{}"  # tags
    b"\x00\x00\x00\x03"
    b"\x01[]"  # metadata
    b"\x00\x00\x00\x04"
    b'\x01"s"'  # data
    b"\x00\x00\x00\x20" + b"\xab" * 32
)

GOLDEN = DecodedRows(
    num_rows=2,
    position=bytes.fromhex("0100000000000000ffffffffffffffff"),
    event_id=bytes.fromhex("00112233445566778899aabbccddeeff") + b"\xff" * 16,
    type_offsets=bytes.fromhex("000000000200000002000000"),
    type_data=b"Ab",
    # 946684800000000 = 0x00035d013b37e000 (the Unix time of 2000-01-01), little-endian
    timestamp=bytes.fromhex("000000000000000000e0373b015d0300"),
    # 0x00035d013b37e001, and 0x00035d013b37e000 + 0x0000000100000000 = 0x00035d023b37e000
    recorded_at=bytes.fromhex("01e0373b015d030000e0373b025d0300"),
    tag_offsets=bytes.fromhex("000000000200000002000000"),
    key_offsets=bytes.fromhex("000000000100000002000000"),
    key_data=b"ak",
    value_offsets=bytes.fromhex("000000000100000005000000"),
    value_data=b"bv\n\xc3\xa9",
    metadata_offsets=bytes.fromhex("000000000200000004000000"),
    metadata_data=b"{}[]",
    data_offsets=bytes.fromhex("000000000a0000000d000000"),
    data_data=b'{"x": [1]}"s"',
    hash=bytes(range(32)) + b"\xab" * 32,
)


@pytest.mark.parametrize("name", list(DECODERS))
def test_golden_rows_decode_to_known_buffers(name: str) -> None:
    assert DECODERS[name](GOLDEN_ROWS, 2) == GOLDEN
    table = pa.Table.from_batches([to_batch(GOLDEN)])
    assert table.to_pylist() == [
        {
            "position": 1,
            "event_id": uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"),
            "event_type": "Ab",
            "timestamp": datetime(1970, 1, 1, tzinfo=timezone.utc),
            "recorded_at": datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc),
            "tags": [("a", "b"), ("k", "v\né")],
            "metadata": "{}",
            "data": '{"x": [1]}',
            "hash": bytes(range(32)),
        },
        {
            "position": -1,
            "event_id": uuid.UUID(int=2**128 - 1),
            "event_type": "",
            "timestamp": datetime(2000, 1, 1, tzinfo=timezone.utc),
            "recorded_at": datetime(2000, 1, 1, 1, 11, 34, 967_296, tzinfo=timezone.utc),
            "tags": [],
            "metadata": "[]",
            "data": '"s"',
            "hash": b"\xab" * 32,
        },
    ]


# ---------------------------------------------------------------------------------------------
# decode_rows: contract violations found while writing these tests (they fail until fixed)


NOT_UTF8_TAGS = [
    b'\x01{"a": "\xff"}',  # not UTF-8 at all
    b'\x01{"\xc3": "b"}',  # a sequence cut short, in a key
    b'\x01{"a": "\xc0\x80"}',  # an overlong NUL
    b'\x01{"a": "\xed\xa0\x80"}',  # a surrogate, encoded
]


@pytest.mark.parametrize("name", list(DECODERS))
def test_tags_that_are_not_utf8_are_a_storage_error(name: str) -> None:
    # Arrow strings must be UTF-8. Today the reference lets msgspec's UnicodeDecodeError
    # escape (it catches msgspec.DecodeError only), and the native decoder copies the bytes
    # into the key and value buffers unchecked.
    for tags in NOT_UTF8_TAGS:
        with pytest.raises(EventStoreError) as raised:
            DECODERS[name](make_row(tags=tags), 1)
        assert raised.value == python.decode_error(0, "tags", NOT_FLAT), tags


def test_duplicate_tag_keys_decode_alike() -> None:
    # Today the reference keeps the last pair of a repeated key (a dict), the native decoder
    # every pair. PostgreSQL's jsonb never repeats a key, but the two must still agree.
    assert both(make_row(tags=b'\x01{"a": "1", "a": "2"}'), 1)[0] == "ok"


# -- the native COPY reader ------------------------------------------------------------------


def _export_statement(schema: str, where: str = "TRUE") -> sql.Composed:
    return sql.SQL(
        'SELECT position, event_id, event_type, "timestamp", recorded_at, tags, metadata, data,'
        " hash FROM {} WHERE " + where + " ORDER BY position"
    ).format(sql.Identifier(schema, "events"))


def test_the_native_reader_is_used_and_reads_what_psycopg_reads(
    store: EventStore, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tamma_events.ops import archiving, drive
    from tamma_events.ops import libpq as _libpq

    store.append_batch(_events(300))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # The functions found are libpq's own for this connection.
        functions = _libpq.copy_functions(conn)
        assert functions is not None and functions[0] == conn.pgconn.pgconn_ptr
        monkeypatch.setattr(archiving._codec, "IMPL", "native")
        native_table = pa.Table.from_batches(
            list(archiving.copy_batches(conn, _export_statement(store.schema), [])), EXPORT_SCHEMA
        )
        monkeypatch.setattr(drive, "copy_functions", lambda _: None)
        psycopg_table = pa.Table.from_batches(
            list(archiving.copy_batches(conn, _export_statement(store.schema), [])), EXPORT_SCHEMA
        )
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert native_table.num_rows == 300
    assert native_table.equals(psycopg_table)
    assert_export_is(native_table, store.get_events())


@pytest.mark.parametrize("reader", ["native", "psycopg"])
def test_an_error_after_rows_were_sent_raises_and_leaves_the_connection_usable(
    store: EventStore, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    from tamma_events.ops import archiving, drive

    store.append_batch(_events(50))
    monkeypatch.setattr(archiving._codec, "IMPL", "native")
    if reader == "psycopg":
        monkeypatch.setattr(drive, "copy_functions", lambda _: None)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # Rows 1 to 39 are sent before position 40 divides by zero.
        statement = _export_statement(store.schema, "1 / (position - 40) IS NOT NULL")
        with pytest.raises(psycopg.errors.DivisionByZero):
            list(archiving.copy_batches(conn, statement, []))
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert (
            sum(
                b.num_rows
                for b in archiving.copy_batches(conn, _export_statement(store.schema), [])
            )
            == 50
        )
