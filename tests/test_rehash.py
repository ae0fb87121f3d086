"""`rehash`, the hash chain recomputed over rows read back from PostgreSQL (what `verify` runs
on): the native codec and the pure-Python reference give the same result, or raise the same
error, for the rows a real server returns and for every way those rows can be damaged."""

from __future__ import annotations

import importlib
import os
import struct
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tamma_events import DomainEvent, EventStore
from tamma_events.codec import reference as python
from tamma_events.errors import EventStoreError
from tamma_events.ops.drive import copy_rows
from tamma_events.ops.migrating import drop
from tamma_events.tools.workload import generate_events

EXAMPLES = int(os.environ.get("TAMMA_CODEC_EXAMPLES", "200")) // 2

# Imported at collection: if the extension does not load, every test here errors.
native = importlib.import_module("tamma_events._native")

#: JSON that jsonb prints differently from the codec: key order by length, spaces, numbers
#: rewritten (floats of 1e16 and more, -0.0), escapes, non-ASCII text, big integers.
TRICKY = [
    {"b": 1, "aa": 2, "a": [1.5, -0.0, 1e16, 1.5e300, 5e-324, 0.1, 2**100, -(2**70)]},
    {"text": 'quote " backslash \\ newline \n tab \t bell \x07 é ü 中文 🎉 \u2028'},
    {"nested": {"z": {"y": [[], {}, [None, True, False, ""]]}}, "": "empty key"},
    {"n": 12345678901234567890, "f": 123456.789e-20, "neg": -1.0},
]


@pytest.fixture
def stored(pg_dsn: str) -> Iterator[tuple[bytes, int, bytes]]:
    """Rows read back from a store of generated and tricky events, their count and the head's
    hash."""
    schema = f"rehash_{uuid.uuid4().hex[:8]}"
    events = list(generate_events(300))
    at = datetime(2026, 5, 1, tzinfo=timezone.utc)
    events += [
        DomainEvent("Tricky", data, {"k": f"v{n}", "é": "ü"}, {"m": data}, timestamp=at)
        for n, data in enumerate(TRICKY)
    ]
    try:
        with EventStore(pg_dsn, schema=schema) as store:
            store.append_batch(events[:150])
            store.append_batch(events[150:])
            head_hash = store.read(limit=1, backwards=True).events[0].hash
            with store._pool.connection() as conn:
                chunks = list(
                    copy_rows(
                        conn,
                        sql.SQL(
                            'SELECT position, event_id, event_type, "timestamp", tags, metadata,'
                            " data, hash FROM {} ORDER BY position"
                        ).format(sql.Identifier(schema, "events")),
                        [],
                    )
                )
        assert len(chunks) == 1
        rows, count = chunks[0]
        assert count == len(events)
        yield bytes(rows), count, bytes(head_hash)
    finally:
        drop(pg_dsn, schema)


class StoredRows:
    """The stored rows with a short repr (Hypothesis reports its arguments)."""

    def __init__(self, rows: bytes, count: int) -> None:
        self.rows, self.count = rows, count

    def __repr__(self) -> str:
        return f"StoredRows({self.count} rows, {len(self.rows)} bytes)"


@pytest.fixture
def stored_rows(stored: tuple[bytes, int, bytes]) -> StoredRows:
    return StoredRows(stored[0], stored[1])


def outcome(rows: bytes, count: int, first: int = 1, prev: bytes = python.GENESIS_HASH) -> Any:
    results = []
    for codec in (python, native):
        try:
            results.append(codec.rehash(rows, count, first, prev))
        except EventStoreError as exc:
            results.append(("error", exc.code, exc.message, exc.context))
    assert results[0] == results[1], f"reference {results[0]!r}, native {results[1]!r}"
    return results[0]


def row_starts(rows: bytes, count: int) -> list[int]:
    starts, at = [], 0
    for _ in range(count):
        starts.append(at)
        at += 2
        for _ in range(8):
            (size,) = struct.unpack_from(">i", rows, at)
            at += 4 + size
    return starts


def field_at(rows: bytes, start: int, field: int) -> tuple[int, int]:
    """(offset of the value, its length) of field ``field`` of the row at ``start``."""
    at = start + 2
    for k in range(8):
        (size,) = struct.unpack_from(">i", rows, at)
        if k == field:
            return at + 4, size
        at += 4 + size
    raise AssertionError("no such field")


def test_stored_rows_rehash_to_their_stored_hashes(stored: tuple[bytes, int, bytes]) -> None:
    rows, count, head_hash = stored
    assert outcome(rows, count) == python.Rehashed(count, head_hash)
    # In pieces, each chained from the last: the same chain.
    starts = [*row_starts(rows, count), len(rows)]
    middle = starts[100]
    first_part = outcome(rows[:middle], 100)
    assert first_part.checked == 100
    assert outcome(rows[middle:], count - 100, 101, first_part.last_hash) == python.Rehashed(
        count - 100, head_hash
    )


def test_a_changed_value_breaks_the_chain_there(stored: tuple[bytes, int, bytes]) -> None:
    rows, count, _ = stored
    start = row_starts(rows, count)[42]
    at, size = field_at(rows, start, 6)  # data
    text = rows[at + 1 : at + size]
    digit = next(i for i, c in enumerate(text) if chr(c).isdigit())
    changed = bytearray(rows)
    changed[at + 1 + digit] = ord("1") if text[digit] != ord("1") else ord("2")
    result = outcome(bytes(changed), count)
    assert (result.checked, result.failed, result.kind) == (42, 42, "hash")


def test_a_gap_in_positions_is_reported_as_missing(stored: tuple[bytes, int, bytes]) -> None:
    rows, count, _ = stored
    start = row_starts(rows, count)[7]
    at, _ = field_at(rows, start, 0)
    changed = bytearray(rows)
    struct.pack_into(">q", changed, at, 99)
    result = outcome(bytes(changed), count)
    assert (result.checked, result.failed, result.kind, result.detail) == (7, 7, "missing", "99")


@pytest.mark.parametrize(
    ("field", "text", "problem"),
    [
        (4, b'{"a": 1}', "tags"),  # a tag value that is not a string
        (6, b"[1, 2]", "data"),  # data that is not an object
        (5, b'{"a": ' * 70 + b"1" + b"}" * 70, "metadata"),  # metadata beyond the nesting limit
        (6, b'{"a": tru}', "cannot be read"),  # not JSON at all
    ],
)
def test_json_the_codec_cannot_encode_is_reported(
    stored: tuple[bytes, int, bytes], field: int, text: bytes, problem: str
) -> None:
    rows, count, _ = stored
    start = row_starts(rows, count)[3]
    at, size = field_at(rows, start, field)
    changed = rows[: at - 4] + struct.pack(">i", len(text) + 1) + b"\x01" + text + rows[at + size :]
    result = outcome(changed, count)
    assert (result.checked, result.failed, result.kind) == (3, 3, "encode")
    assert problem in result.detail


@pytest.mark.parametrize(
    "damage",
    [
        lambda rows, start: rows[: start + 1],  # cut inside the field count
        lambda rows, start: rows[:start] + b"\x00\x07" + rows[start + 2 :],  # 7 fields
        lambda rows, start: rows[:-5],  # the last hash cut short
        lambda rows, start: rows + b"\x00",  # a byte after the last row
        lambda rows, start: rows[: start + 2] + b"\xff\xff\xff\xff" + rows[start + 14 :],  # NULL
        lambda rows, start: rows[: start + 2] + b"\x00\x00\x00\x04" + rows[start + 6 :],  # size
    ],
)
def test_malformed_rows_raise_the_same_storage_error(
    stored: tuple[bytes, int, bytes], damage: Any
) -> None:
    rows, count, _ = stored
    start = row_starts(rows, count)[5]
    result = outcome(damage(rows, start), count)
    assert result[0] == "error" and result[1] == "STORAGE_ERROR"
    assert "stored row" in result[2]


def test_a_wrong_jsonb_version_is_malformed(stored: tuple[bytes, int, bytes]) -> None:
    rows, count, _ = stored
    at, _ = field_at(rows, row_starts(rows, count)[9], 5)
    changed = bytearray(rows)
    changed[at] = 2
    result = outcome(bytes(changed), count)
    assert result[0] == "error" and result[3] == {"row": 9, "field": "metadata"}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    damage=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_any_damage_gives_the_same_outcome(
    stored_rows: StoredRows, damage: list[tuple[int, int]]
) -> None:
    rows, count = stored_rows.rows, stored_rows.count
    starts = row_starts(rows, count)
    whole = 40  # the first 40 rows
    changed = bytearray(rows[: starts[whole]])
    for at, value in damage:
        changed[at % len(changed)] = value
    outcome(bytes(changed), whole)


def test_json_fields_that_would_shift_the_batch_are_read_one_by_one(
    stored: tuple[bytes, int, bytes],
) -> None:
    """Tags "{...}, {...}" and metadata and data "[{}" and "{}]" make an array of the right
    length with every later value shifted; each field must be read as itself."""
    rows, count, _ = stored
    start = row_starts(rows, count)[3]
    texts = {4: b'{"k": "v"}, {"k": "w"}', 5: b"[{}", 6: b"{}]"}
    changed = rows
    for field in (6, 5, 4):  # from the last, so earlier offsets stay valid
        at, size = field_at(changed, start, field)
        text = texts[field]
        changed = (
            changed[: at - 4]
            + struct.pack(">i", len(text) + 1)
            + b"\x01"
            + text
            + changed[at + size :]
        )
    result = outcome(changed, count)
    assert (result.checked, result.failed, result.kind) == (3, 3, "encode")
    assert "cannot be read" in result.detail
