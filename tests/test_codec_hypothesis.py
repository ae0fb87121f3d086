"""Randomised comparison of the native codec with the pure-Python reference.

Random batches, valid and invalid, must give byte-identical rows (after `prepare` and after
`seal`) or identical errors from ``tamma_events._native`` and ``tamma_events.codec.reference``;
valid batches are also decoded independently of both. ``TAMMA_CODEC_EXAMPLES`` raises the number of
examples per property (default 200) for a deeper run.

Arguments that `seal` refuses (positions beyond int64, a prev_hash that is not 32 bytes) are
covered by dedicated tests in test_codec.py and kept out of the random inputs.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import math
import os
import struct
import uuid
from array import array
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _codec_support import (
    ROW_OVERHEAD,
    depth_of,
    micros_since_2000,
    outcome,
    parse_iso,
    split_fields,
)
from tamma_events.codec import reference as python
from tamma_events.model import DomainEvent, SequencedEvent

# Imported at collection: if the extension does not load, every test here errors.
# Each test calls both codecs itself, whichever one TAMMA_EVENTS_IMPL gives the store: one
# pass is enough.
pytestmark = pytest.mark.codec_neutral

native = importlib.import_module("tamma_events._native")

EXAMPLES = int(os.environ.get("TAMMA_CODEC_EXAMPLES", "200"))
CODEC_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# helpers, independent of the codec


def rows_of(batch: Any) -> list[bytes]:
    offsets = list(batch.offsets)
    assert len(offsets) == batch.count + 1
    assert offsets[0] == 0
    assert offsets[-1] == len(batch.buffer)
    return [bytes(batch.buffer[offsets[i] : offsets[i + 1]]) for i in range(batch.count)]


def assert_same_json(decoded: Any, value: Any) -> None:
    """``decoded`` (from json.loads) is ``value``: tuples come back as lists, and a float may
    come back as the integer it denotes (1e16 as 10000000000000000) or -0.0 as 0.0."""
    if isinstance(value, dict):
        assert type(decoded) is dict
        assert list(decoded) == sorted(value)
        for key, item in value.items():
            assert_same_json(decoded[key], item)
    elif isinstance(value, (list, tuple)):
        assert type(decoded) is list
        assert len(decoded) == len(value)
        for got, item in zip(decoded, value, strict=True):
            assert_same_json(got, item)
    elif type(value) is float:
        assert type(decoded) in (float, int)
        assert float(decoded) == value
    else:
        assert type(decoded) is type(value)
        assert decoded == value


def sorted_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys), f"keys not in canonical order: {keys!r}"
    return dict(pairs)


def is_compact(text: str) -> bool:
    """No whitespace outside JSON strings."""
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in " \t\r\n":
            return False
    return not in_string


def copy_batch(batch: Any) -> python.PreparedBatch:
    return python.PreparedBatch(bytearray(batch.buffer), array("q", batch.offsets))


def check_sealed(rows: Sequence[bytes], first_position: int, prev_hash: bytes) -> bytes:
    """Positions and hash chain of sealed rows, recomputed with struct and hashlib."""
    for i, row in enumerate(rows):
        fields = split_fields(row)
        assert struct.unpack(">q", fields[0]) == (first_position + i,)
        prev_hash = hashlib.sha256(prev_hash + row[:-36]).digest()
        assert fields[7] == prev_hash
    return prev_hash


# ---------------------------------------------------------------------------------------------
# strategies


class NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def __repr__(self) -> str:
        return "NoOffset()"


class StrSubclass(str):
    pass


class IntSubclass(int):
    pass


class CustomEvent(DomainEvent, frozen=True):
    extra: int = 0


SPECIAL = [
    "\x00",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\U0001f600",
    "\U0010ffff",
    "\uffff",
    "é",
    "ß",
    "\u2028",
    '"',
    "\\",
    "\x1f",
    "\x7f",
    "a",
]
HUGE_INTS = [
    INT64_MAX,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**100,
    -(10**300),
    2**4096 - 1,
    -(2**4096 - 1),  # the largest integers allowed (MAX_INT_BITS)
]
ID_POOL = [
    uuid.UUID(int=1),
    uuid.UUID("0190a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"),
    uuid.UUID(int=2**128 - 1),
]

good_char = st.characters(codec="utf-8", exclude_characters="\x00")  # no surrogates
surrogate = st.integers(0xD800, 0xDFFF).map(chr)
good_text = st.text(
    st.one_of(good_char, st.sampled_from(["\U0001f600", "é", '"', "\\", "\x1f", "\u2028"])),
    max_size=10,
)
any_char = st.one_of(good_char, st.sampled_from(SPECIAL), surrogate)
any_text = st.text(any_char, max_size=8)
#: Strings that break a rule: a NUL or a lone surrogate somewhere.
bad_text = st.builds(
    lambda a, bad, b: a + bad + b,
    good_text,
    st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff"]),
    good_text,
)

ints = st.one_of(
    st.integers(min_value=-(2**4096 - 1), max_value=2**4096 - 1), st.sampled_from(HUGE_INTS)
)
finite = st.floats(allow_nan=False, allow_infinity=False)
valid_scalar = st.one_of(st.none(), st.booleans(), ints, finite, good_text)
bad_scalar = st.one_of(
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf]),
    any_text,
    bad_text,
    st.floats(),
    st.sampled_from(
        [
            set(),
            frozenset({1}),
            b"x",
            bytearray(b"y"),
            Decimal("1.5"),
            ID_POOL[0],
            date(2024, 1, 1),
            StrSubclass("s"),
            IntSubclass(3),
            Ellipsis,
            1j,
        ]
    ),
    st.datetimes(),
)
bad_key = st.one_of(
    st.integers(),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.binary(max_size=2),
    st.tuples(st.integers()),
    any_text,
    bad_text,
    st.just(StrSubclass("k")),
)


def containers(children: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> Any:
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    )


valid_json = st.recursive(valid_scalar, lambda c: containers(c, good_text), max_leaves=12)
any_json = st.recursive(
    st.one_of(valid_scalar, bad_scalar),
    lambda c: containers(c, st.one_of(good_text, bad_key)),
    max_leaves=12,
)


@st.composite
def deep_objects(draw: st.DrawFn, max_levels: int, leaves: st.SearchStrategy[Any]) -> Any:
    """An object whose innermost container is at ``levels`` (the object is level 1)."""
    levels = draw(st.one_of(st.integers(60, min(70, max_levels)), st.integers(1, max_levels)))
    # The container kinds repeat a short drawn pattern: d(ict), l(ist), t(uple).
    pattern = draw(st.lists(st.sampled_from("dlt"), min_size=1, max_size=4))
    key = draw(good_text)
    value = draw(leaves)
    for level in range(levels - 1):
        kind = pattern[level % len(pattern)]
        if kind == "d":
            value = {key: value}
        elif kind == "l":
            value = [value]
        else:
            value = (value,)
    obj = draw(st.dictionaries(good_text, valid_json, max_size=2))
    obj[draw(good_text)] = value
    return obj


valid_object = st.one_of(
    st.dictionaries(good_text, valid_json, max_size=4),
    deep_objects(64, valid_scalar),
)


@st.composite
def broken_objects(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid object with one bad value or bad key put in at a random place."""
    bad: Any = draw(
        st.one_of(
            bad_scalar,
            st.builds(lambda k, v: {k: v}, bad_key, valid_scalar),
            deep_objects(70, valid_scalar).map(lambda o: next(iter(o.values()))),
        )
    )
    for kind in draw(st.lists(st.sampled_from("dlt"), max_size=3)):
        siblings = draw(st.lists(valid_json, max_size=2))
        if kind == "d":
            bad = {**{f"s{i}": v for i, v in enumerate(siblings)}, "x": bad}
        elif kind == "l":
            bad = [*siblings, bad]
        else:
            bad = (bad, *siblings)
    obj = draw(st.dictionaries(good_text, valid_json, max_size=3))
    obj[draw(good_text)] = bad
    return obj


invalid_object = st.one_of(
    st.sampled_from([[], (), None, 0, "{}", collections.OrderedDict(), b"{}"]),
    broken_objects(),
    broken_objects(),
    st.dictionaries(st.one_of(good_text, bad_key), any_json, min_size=1, max_size=4),
    deep_objects(100, st.one_of(valid_scalar, bad_scalar)),
)

tag_key = st.one_of(
    st.text(good_char, min_size=1, max_size=12),
    st.sampled_from(["k", "k" * 128, "é" * 128, "\U0001f600" * 128]),
)
valid_tags = st.dictionaries(tag_key, good_text, max_size=3)
bad_tag_key = st.one_of(
    any_text,
    bad_text,
    st.sampled_from(["", "k" * 129, "\U0001f600" * 129]),
    st.integers(),
    st.none(),
    st.just(StrSubclass("k")),
)
bad_tag_value = st.one_of(
    any_text, bad_text, st.integers(), st.none(), st.just(StrSubclass("v")), st.binary(max_size=2)
)


def with_entry(good: dict[Any, Any], key: Any, value: Any) -> dict[Any, Any]:
    return {**good, key: value}


invalid_tags = st.one_of(
    st.sampled_from([[], None, (), "k=v", collections.OrderedDict(k="v")]),
    st.builds(with_entry, valid_tags, bad_tag_key, good_text),
    st.builds(with_entry, valid_tags, tag_key, bad_tag_value),
    st.builds(with_entry, valid_tags, bad_tag_key, bad_tag_value),
)

valid_type = st.one_of(
    st.text(good_char, min_size=1, max_size=20),
    st.sampled_from(["a", "a" * 255, "\U0001f600" * 255, "é" * 255, StrSubclass("Sub")]),
)
invalid_type = st.one_of(
    st.sampled_from(["", "a" * 256, "\U0001f600" * 256, "a\x00", "\ud800"]),
    st.text(any_char, min_size=1, max_size=8),
    bad_text,
    st.integers(),
    st.none(),
    st.binary(max_size=3),
)

whole_minute_zones = st.builds(
    timezone, st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timedelta(minutes=m))
)
any_fixed_zones = st.builds(
    timezone,
    st.timedeltas(
        min_value=-timedelta(hours=24) + timedelta(microseconds=1),
        max_value=timedelta(hours=24) - timedelta(microseconds=1),
    ),
)
utc_datetimes = st.datetimes(timezones=st.just(timezone.utc))
# A local time a day from either end of the calendar: with its offset, it is still a datetime in
# UTC (one that is not there is refused; test_hostile.py has those).
IN_RANGE = {"min_value": datetime(1, 1, 2), "max_value": datetime(9999, 12, 30)}
valid_datetime = st.one_of(
    utc_datetimes,
    st.datetimes(
        **IN_RANGE, timezones=st.one_of(whole_minute_zones, any_fixed_zones, st.timezones())
    ),
)
valid_iso = st.one_of(
    st.datetimes(**IN_RANGE, timezones=whole_minute_zones).map(lambda d: d.isoformat()),
    utc_datetimes.map(lambda d: d.isoformat().replace("+00:00", "Z")),
)
valid_timestamp = st.one_of(valid_datetime, valid_iso)
invalid_timestamp = st.one_of(
    st.datetimes(),  # naive
    st.datetimes().map(lambda d: d.isoformat()),  # naive string
    st.datetimes(timezones=st.just(NoOffset())),
    st.datetimes(timezones=st.one_of(any_fixed_zones, st.timezones())).map(
        lambda d: d.isoformat()  # offsets with seconds are not ISO-8601 as msgspec reads it
    ),
    st.text(max_size=25),
    st.sampled_from(
        [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-01-01T25:00Z",
            "2024-01-01 00:00:00+00:00",
            "2024-01-01",
            "\ud800",
            "2024-01-01T00:00:00+24:00",
        ]
    ),
    st.integers(),
    st.none(),
    st.dates(),
    st.floats(),
)

#: The ids of the pool in every accepted spelling: drawing from it makes duplicates.
POOL_SPELLINGS = [
    form for u in ID_POOL for form in (u, str(u), str(u).upper(), u.hex, "{" + str(u) + "}", u.urn)
]
#: Mostly fresh ids.
valid_event_id = st.one_of(
    st.uuids(),
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex.upper()),
    st.uuids().map(lambda u: u.urn),
    st.sampled_from(POOL_SPELLINGS),
)
invalid_event_id = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.none(),
    st.binary(max_size=16),
    st.sampled_from(ID_POOL).map(lambda u: str(u)[:-1]),
    st.sampled_from(ID_POOL).map(lambda u: str(u) + "0"),
    st.sampled_from(ID_POOL).map(lambda u: u.bytes),
    st.sampled_from(ID_POOL).map(lambda u: u.int),
)
non_events = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.builds(dict),
    st.just(DomainEvent),
    st.builds(lambda: {"event_type": "x", "data": {}}),
)

#: The fields a broken event may break; data, metadata and tags have the most rules.
FIELDS = (
    "item",
    "event_id",
    "event_type",
    "timestamp",
    "tags",
    "tags",
    "metadata",
    "metadata",
    "data",
    "data",
    "data",
)
VALID = {
    "event_id": valid_event_id,
    "event_type": valid_type,
    "timestamp": valid_timestamp,
    "tags": valid_tags,
    "metadata": valid_object,
    "data": valid_object,
}
INVALID = {
    "event_id": invalid_event_id,
    "event_type": invalid_type,
    "timestamp": invalid_timestamp,
    "tags": invalid_tags,
    "metadata": invalid_object,
    "data": invalid_object,
}


def build_event(draw: st.DrawFn, fields: dict[str, Any]) -> DomainEvent:
    kind = draw(st.sampled_from(["domain", "sequenced", "custom"]))
    if kind == "sequenced":
        return SequencedEvent(
            **fields,
            position=draw(st.integers(1, INT64_MAX)),
            recorded_at=draw(utc_datetimes),
            hash=draw(st.binary(min_size=32, max_size=32)),
        )
    if kind == "custom":
        return CustomEvent(**fields, extra=draw(st.integers()))
    return DomainEvent(**fields)


@st.composite
def any_items(draw: st.DrawFn) -> Any:
    """An item of a batch: mostly valid events, some with one or two broken fields, some not
    events at all."""
    faults = draw(
        st.one_of(
            st.just(()),
            st.just(()),
            st.just(()),
            st.lists(st.sampled_from(FIELDS), min_size=1, max_size=2, unique=True),
        )
    )
    if "item" in faults:
        return draw(non_events)
    fields = {name: draw(INVALID[name] if name in faults else VALID[name]) for name in VALID}
    return build_event(draw, fields)


@st.composite
def valid_batches(draw: st.DrawFn) -> list[DomainEvent]:
    count = draw(st.integers(1, 6))
    ids = draw(st.lists(st.uuids(), min_size=count, max_size=count, unique=True))
    events = []
    for event_id in ids:
        fields = {name: draw(VALID[name]) for name in VALID}
        fields["event_id"] = draw(
            st.sampled_from([event_id, str(event_id), event_id.hex.upper(), event_id.urn])
        )
        events.append(build_event(draw, fields))
    return events


any_batches = st.lists(any_items(), max_size=6)
limits = st.one_of(
    st.just(python.DEFAULT_MAX_EVENT_BYTES), st.integers(0, 1000), st.integers(100, 400)
)
first_indexes = st.one_of(st.just(0), st.integers(0, 2**40))
positions = st.integers(-(2**63), INT64_MAX - 16)
hashes = st.binary(min_size=32, max_size=32)


# ---------------------------------------------------------------------------------------------
# properties


def seal_both_and_compare(
    native_batch: Any, python_batch: Any, first_position: int, prev_hash: bytes
) -> None:
    """Seal with both implementations (and each one's batch with the other's seal): identical
    bytes and last hash, and a chain that hashlib recomputes."""
    crossed_native = copy_batch(python_batch)
    crossed_python = copy_batch(native_batch)
    last_native = native.seal(native_batch, first_position, prev_hash)
    last_python = python.seal(python_batch, first_position, prev_hash)
    assert last_native == last_python
    assert bytes(native_batch.buffer) == bytes(python_batch.buffer)
    assert native.seal(crossed_native, first_position, prev_hash) == last_python
    assert python.seal(crossed_python, first_position, prev_hash) == last_python
    assert (
        bytes(crossed_native.buffer) == bytes(crossed_python.buffer) == bytes(python_batch.buffer)
    )
    assert check_sealed(rows_of(python_batch), first_position, prev_hash) == last_python


@CODEC_SETTINGS
@given(
    events=any_batches,
    max_event_bytes=limits,
    first_index=first_indexes,
    first_position=positions,
    prev_hash=hashes,
)
def test_prepare_and_seal_agree(
    events: list[Any],
    max_event_bytes: int,
    first_index: int,
    first_position: int,
    prev_hash: bytes,
) -> None:
    expected = outcome(lambda: python.prepare(events, max_event_bytes, first_index))
    got = outcome(lambda: native.prepare(events, max_event_bytes, first_index))
    assert got == expected
    if expected[0] == "error":
        err = expected[1]
        event(f"error {err.code} {err.context.get('field')}")
        if "index" in err.context:
            assert first_index <= err.context["index"] < first_index + len(events)
        return
    event(expected[0])
    if expected[0] == "ok":
        seal_both_and_compare(
            native.prepare(events, max_event_bytes, first_index),
            python.prepare(events, max_event_bytes, first_index),
            first_position,
            prev_hash,
        )


@CODEC_SETTINGS
@given(
    before=st.lists(st.uuids(), max_size=2, unique=True),
    field=st.sampled_from(["data", "metadata", "tags"]),
    broken=st.one_of(broken_objects(), invalid_tags),
    first_index=first_indexes,
)
def test_broken_values_agree(
    before: list[uuid.UUID], field: str, broken: Any, first_index: int
) -> None:
    """One bad value somewhere in an otherwise valid batch: the same error from both."""
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
    events = [DomainEvent("T", event_id=u, timestamp=stamp) for u in before]
    events.append(DomainEvent("T", event_id=ID_POOL[0], timestamp=stamp, **{field: broken}))
    expected = outcome(lambda: python.prepare(events, first_index=first_index))
    assert outcome(lambda: native.prepare(events, first_index=first_index)) == expected
    if expected[0] == "error":
        assert expected[1].context["index"] == first_index + len(before)
        event(expected[1].message.split(": ")[-1][:30])
    else:
        event(expected[0])


@CODEC_SETTINGS
@given(
    events=valid_batches(),
    first_position=positions,
    prev_hash=hashes,
    split=st.integers(0, 6),
)
def test_valid_batches_encode_as_documented(
    events: list[DomainEvent], first_position: int, prev_hash: bytes, split: int
) -> None:
    native_batch = native.prepare(events)
    python_batch = python.prepare(events)
    assert bytes(native_batch.buffer) == bytes(python_batch.buffer)
    assert list(native_batch.offsets) == list(python_batch.offsets)
    rows = rows_of(python_batch)
    assert len(rows) == len(events)
    for event_, row in zip(events, rows, strict=True):
        fields = split_fields(row)
        assert fields[0] == bytes(8)
        assert fields[1] == uuid.UUID(str(event_.event_id)).bytes
        assert fields[2] == event_.event_type.encode("utf-8")
        stamp: Any = event_.timestamp
        if isinstance(stamp, str):
            stamp = parse_iso(stamp)
        assert struct.unpack(">q", fields[3]) == (micros_since_2000(stamp),)
        for value, field in zip(
            (event_.tags, event_.metadata, event_.data), fields[4:7], strict=True
        ):
            assert field[:1] == b"\x01"
            assert is_compact(field[1:].decode("utf-8"))
            assert_same_json(json.loads(field[1:], object_pairs_hook=sorted_pairs), value)
        assert fields[7] == bytes(32)
        assert len(row) == ROW_OVERHEAD + len(fields[2]) + sum(len(f) - 1 for f in fields[4:7])

    seal_both_and_compare(native_batch, python_batch, first_position, prev_hash)

    # Sealing the batch in two consecutive parts gives the same rows and last hash.
    split = min(split, len(events))
    whole = bytes(python_batch.buffer)
    last = python.seal(python_batch, first_position, prev_hash)
    for codec in (native, python):
        parts = [events[:split], events[split:]]
        sealed = b""
        chain_hash = prev_hash
        position = first_position
        for index, part in ((0, parts[0]), (split, parts[1])):
            if not part:
                continue
            batch = codec.prepare(part, first_index=index)
            chain_hash = codec.seal(batch, position, chain_hash)
            position += len(part)
            sealed += bytes(batch.buffer)
        assert sealed == whole
        assert chain_hash == last


@CODEC_SETTINGS
@given(events=valid_batches(), data=st.data())
def test_size_limit_reports_first_oversized_event(events: list[DomainEvent], data: Any) -> None:
    sizes = [len(row) for row in rows_of(python.prepare(events))]
    limit = data.draw(st.integers(min(sizes) - 2, max(sizes) + 1), label="limit")
    first_index = data.draw(first_indexes, label="first_index")
    over = [i for i, size in enumerate(sizes) if size > limit]
    for codec in (native, python):
        result = outcome(lambda codec=codec: codec.prepare(events, limit, first_index))
        if not over:
            assert result[0] == "ok"
            assert len(result[1]) == sum(sizes)
        else:
            assert result[0] == "error"
            err = result[1]
            assert err.context["index"] == first_index + over[0]
            assert err.context["size"] == sizes[over[0]]
            assert err.context["limit"] == limit


@CODEC_SETTINGS
@given(obj=deep_objects(90, valid_scalar), field=st.sampled_from(["data", "metadata"]))
def test_depth_limit(obj: dict[str, Any], field: str) -> None:
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)
    events = [DomainEvent("T", event_id=ID_POOL[0], timestamp=stamp, **{field: obj})]
    depth = depth_of(obj)
    for codec in (native, python):
        result = outcome(lambda codec=codec: codec.prepare(events))
        if depth <= 64:
            assert result[0] == "ok"
        else:
            assert result[0] == "error"
            assert "nesting is deeper than 64 levels" in result[1].message
            assert result[1].context["field"] == field


@CODEC_SETTINGS
@given(stamps=st.lists(st.one_of(utc_datetimes, valid_datetime, valid_iso), min_size=1, max_size=8))
def test_timestamps(stamps: list[Any]) -> None:
    events = [
        DomainEvent("T", event_id=uuid.UUID(int=i), timestamp=s) for i, s in enumerate(stamps)
    ]
    expected = [micros_since_2000(parse_iso(s) if isinstance(s, str) else s) for s in stamps]
    for codec in (native, python):
        rows = rows_of(codec.prepare(events))
        assert [struct.unpack(">q", split_fields(r)[3])[0] for r in rows] == expected
