"""Fuzzing the codec's entry points with hostile input: the native codec
(``tamma_events._native``) against the pure-Python reference (``tamma_events.codec.reference``).

Encoding: arbitrary hostile Python values (None, bools, integers far past 64 and 4,096 bits,
floats with NaN and infinities, text with NUL and lone surrogates, bytes, Decimals, odd objects
and subclasses that lie about themselves, containers nested up to 10,000 deep, strings of
megabytes) go into every field of events, and into batches with non-events and mappings (as
the store converts them). `prepare` must give identical rows or an identical `EventStoreError`
(code, message, context) from both codecs, and never another exception; rows that were
accepted are then sealed by both (identical bytes and hash chain) and verified by both
`rehash` (every row checks).

Decoding: random bytes, sealed rows damaged byte by byte, and rows whose jsonb fields hold
hostile JSON text (invalid UTF-8, escaped NULs and surrogates, NaN, 10,000-deep nesting,
duplicate keys) go into `decode_rows` (the export reader), `decode_events` (the reader of
events) and `rehash` (the verifier): identical results or identical `EventStoreError`s, never
another exception. A last property gives both
decoders hostile arguments (counts far past the rows, positions past 64 bits, hashes of the
wrong length) and requires that they agree. The native decoders run in a worker process under
Python's debug allocator, so that a write past a buffer, a crash or a hang is reported as the
test's failure ("crash", "hang") instead of corrupting or ending the test run.

test_codec_hypothesis.py compares the codecs on valid and ordinarily invalid batches; this
file is its hostile complement. Every test compares both codecs directly, whatever
``TAMMA_EVENTS_IMPL`` says.

The budget is fixed: ``TAMMA_EVENTS_FUZZ_EXAMPLES`` examples per property (default 60: about
20 seconds for the file on two cores when every property holds; the run that first finds a
failure also spends time shrinking it). Runs are random (not derandomized) and have no
deadline. For a long session (hours; select properties with ``-k``)::

    TAMMA_EVENTS_FUZZ_EXAMPLES=200000 python -m pytest tests/test_fuzz.py -p no:cacheprovider \\
        --timeout 0 -q

Hypothesis saves every failing example under ``.hypothesis/`` and replays it first on the next
run; a failure prints its smallest example (deep and huge values print as `Nest`, `Big`,
`BigInt` and `DeepJson` placeholders, built inside the test).
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from tamma_events.codec import reference as python
from tamma_events.errors import EventStoreError
from tamma_events.model import DomainEvent, SequencedEvent
from tamma_events.ops.appending import as_events

# Imported at collection: if the extension does not load, every test here errors.
native = importlib.import_module("tamma_events._native")
CODECS = (python, native)

EXAMPLES = int(os.environ.get("TAMMA_EVENTS_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
)

#: For the property whose failures may each cost a hang's timeout: failing examples are
#: reported as found, not shrunk.
UNSHRUNK = settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])

INT64_MAX = 2**63 - 1
GENESIS = python.GENESIS_HASH


# ---------------------------------------------------------------------------------------------
# placeholders: huge and deep values are built inside the test, so that Hypothesis prints them
# as a few characters


class Big:
    """A string of ``size`` characters repeating ``text``."""

    def __init__(self, size: int, text: str) -> None:
        self.size, self.text = size, text

    def __repr__(self) -> str:
        return f"Big({self.size}, {self.text!r})"

    def build(self) -> str:
        return (self.text * (self.size // len(self.text) + 1))[: self.size]


class BigInt:
    """``sign * 10**digits + offset``: an integer of more digits than Python prints (past
    4,300, repr raises), built inside the test so that Hypothesis can print the example."""

    def __init__(self, digits: int, sign: int, offset: int) -> None:
        self.digits, self.sign, self.offset = digits, sign, offset

    def __repr__(self) -> str:
        return f"BigInt({self.digits}, {self.sign}, {self.offset})"

    def __hash__(self) -> int:
        return hash((BigInt, self.digits, self.sign, self.offset))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BigInt) and repr(other) == repr(self)

    def build(self) -> int:
        return self.sign * 10**self.digits + self.offset


class Nest:
    """``depth`` containers around ``leaf``, their kinds repeating ``kinds`` (d: a dict,
    l: a list, t: a tuple)."""

    def __init__(self, depth: int, kinds: str, leaf: Any) -> None:
        self.depth, self.kinds, self.leaf = depth, kinds, leaf

    def __repr__(self) -> str:
        return f"Nest({self.depth}, {self.kinds!r}, {self.leaf!r})"

    def build(self) -> Any:
        value = materialize(self.leaf)
        for level in range(self.depth):
            kind = self.kinds[level % len(self.kinds)]
            value = {"k": value} if kind == "d" else [value] if kind == "l" else (value,)
        return value


class Make:
    """An object made inside the test by ``factory`` (Hypothesis itself must not meet it: it
    could not print it)."""

    def __init__(self, name: str, factory: Callable[[], Any]) -> None:
        self.name, self.factory = name, factory

    def __repr__(self) -> str:
        return self.name

    def build(self) -> Any:
        return self.factory()


def materialize(value: Any) -> Any:
    """``value`` with its placeholders built (containers rebuilt as their own type)."""
    if isinstance(value, (Big, BigInt, Nest, Make)):
        return value.build()
    kind = type(value)
    if kind in (list, tuple, ListSub, TupleSub):
        return kind(materialize(item) for item in value)
    if kind in (dict, DictSub):
        return kind({materialize(k): materialize(v) for k, v in value.items()})
    return value


# ---------------------------------------------------------------------------------------------
# odd objects


class StrSub(str):
    """A str subclass that behaves as the str it holds."""

    def __repr__(self) -> str:
        return f"StrSub({str.__repr__(self)})"


class LyingStr(str):
    """A str that lies about its length, what it contains and its UTF-8."""

    def __repr__(self) -> str:
        return f"LyingStr({str.__repr__(self)})"

    def __len__(self) -> int:
        return 5

    def __contains__(self, item: object) -> bool:
        return False

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"lie"


class IntSub(int):
    pass


class FloatSub(float):
    pass


class DictSub(dict):  # type: ignore[type-arg]
    pass


class ListSub(list):  # type: ignore[type-arg]
    pass


class TupleSub(tuple):  # type: ignore[type-arg]
    pass


class BadRepr:
    """An object whose repr raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class BadEq:
    """An object that cannot be compared."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparison")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "BadEq()"


class TwoFacedUUID(uuid.UUID):
    """A UUID whose bytes are not its int."""

    @property
    def bytes(self) -> bytes:  # type: ignore[override]
        return b"\x00" * 16


class DatetimeSub(datetime):
    """A datetime subclass that subtracts wrongly."""

    def __sub__(self, other: Any) -> Any:
        return timedelta(days=1)


class RaisingZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        raise RuntimeError("no offset")

    def __repr__(self) -> str:
        return "RaisingZone()"


class FarZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return timedelta(hours=25)

    def __repr__(self) -> str:
        return "FarZone()"


class IntZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> Any:
        return 5

    def __repr__(self) -> str:
        return "IntZone()"


class NoneZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def __repr__(self) -> str:
        return "NoneZone()"


class CustomEvent(DomainEvent, frozen=True):
    """A DomainEvent subclass (read through its attributes, not its slots)."""

    extra: int = 0


HASHABLE_ODD: list[Any] = [
    Decimal("NaN"),
    Decimal("-Infinity"),
    Decimal("1e999999"),
    Fraction(1, 3),
    1j,
    Ellipsis,
    NotImplemented,
    uuid.UUID(int=7),
    TwoFacedUUID(int=7),
    date(2026, 1, 1),
    time(12, 0),
    timedelta(seconds=1),
    datetime(2026, 1, 1, tzinfo=timezone.utc),
    frozenset({1, "a"}),
    b"\xff\xfe",
    StrSub("k"),
    LyingStr("lie"),
    IntSub(3),
    FloatSub(math.nan),
    TupleSub((1, 2)),
    Make("BadRepr()", BadRepr),
    BadEq(),
    object(),
    type,
    DomainEvent,
    range(3),
]
ODD: list[Any] = [
    *HASHABLE_ODD,
    Decimal("sNaN"),
    bytearray(b"\x00\xff"),
    memoryview(b"ab"),
    {1, 2},
    DictSub(a=1),
    ListSub([1]),
    [math.nan],
    DomainEvent("Nested"),
]

# ---------------------------------------------------------------------------------------------
# strategies: hostile values

surrogate = st.integers(0xD800, 0xDFFF).map(chr)
any_char = st.one_of(
    st.characters(codec="utf-8"),
    surrogate,
    st.sampled_from(["\x00", "\uffff", "\U0010ffff", "\u2028", "\ufeff", '"', "\\"]),
)
good_char = st.characters(codec="utf-8", exclude_characters="\x00")
good_text = st.text(good_char, max_size=10)
hostile_text = st.one_of(
    st.text(any_char, max_size=20),
    st.sampled_from(["", "\x00", "\ud800", "\udfff", "a" * 256, "k" * 129, "é" * 128]),
)
huge_text = st.builds(
    Big,
    st.sampled_from([129, 256, 4096, (1 << 20) - 100, 1 << 20, (2 << 20) + 1]),
    st.sampled_from(["x", "é", "\U0001f600", "\x00", "\ud800", "ab\x00"]),
)
hostile_int = st.one_of(
    st.integers(),
    st.integers(-(2**4200), 2**4200),
    st.sampled_from(
        [
            INT64_MAX,
            2**63,
            -(2**63) - 1,
            2**64,
            2**4096 - 1,
            2**4096,
            -(2**4096),
            10**4299 - 1,
        ]
    ),
    st.builds(
        BigInt,
        st.sampled_from([4299, 4300, 5000, 100_000]),
        st.sampled_from([1, -1]),
        st.integers(-2, 2),
    ),
)
hostile_float = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e16, 1.8e308]),
)
hostile_scalar = st.one_of(
    st.none(),
    st.booleans(),
    hostile_int,
    hostile_float,
    hostile_text,
    st.binary(max_size=8),
    st.sampled_from(ODD),
    huge_text,
)
hashable_key = st.one_of(
    good_text,
    hostile_text,
    hostile_int,
    hostile_float,
    st.none(),
    st.booleans(),
    st.binary(max_size=4),
    st.sampled_from(HASHABLE_ODD),
    huge_text,
    st.tuples(st.integers()),
)
nest = st.builds(
    Nest,
    st.one_of(st.integers(60, 70), st.integers(0, 10_000), st.just(10_000)),
    st.text("dlt", min_size=1, max_size=3),
    st.one_of(hostile_scalar, st.just({})),
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(hashable_key, children, max_size=4),
        st.dictionaries(good_text, children, max_size=4),
        st.dictionaries(good_text, children, max_size=3).map(DictSub),
        st.lists(children, max_size=3).map(ListSub),
        st.lists(children, max_size=3).map(TupleSub),
    )


hostile_json = st.recursive(st.one_of(hostile_scalar, nest), containers, max_leaves=16)
hostile_object = st.one_of(
    st.dictionaries(st.one_of(good_text, hashable_key), hostile_json, max_size=5),
    st.builds(Nest, st.integers(1, 10_000), st.just("d"), hostile_json),
    hostile_json,
)

valid_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=False, allow_infinity=False),
        good_text,
    ),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(good_text, c, max_size=3)),
    max_leaves=8,
)
valid_object = st.dictionaries(good_text, valid_json, max_size=4)

valid_tags = st.dictionaries(st.text(good_char, min_size=1, max_size=12), good_text, max_size=3)
hostile_tags = st.one_of(
    st.dictionaries(st.one_of(hashable_key, good_text), st.one_of(hostile_scalar, good_text)),
    st.dictionaries(good_text, hostile_text, max_size=4).map(DictSub),
    st.builds(lambda k, v: {k: v}, st.text(good_char, min_size=1, max_size=4), huge_text),
    hostile_scalar,
    st.lists(st.tuples(good_text, good_text), max_size=2),
)

valid_type = st.text(good_char, min_size=1, max_size=20)
hostile_type = st.one_of(
    hostile_text,
    hostile_scalar,
    huge_text,
    st.sampled_from([StrSub("Sub"), LyingStr(""), LyingStr("a\x00"), LyingStr("\ud800")]),
    st.text(good_char, min_size=1, max_size=20).map(LyingStr),
)

#: A few ids drawn again and again, so that batches repeat ids.
ID_POOL = [uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)]
valid_id = st.one_of(st.uuids(), st.uuids().map(str), st.sampled_from(ID_POOL))
hostile_id = st.one_of(
    hostile_text,
    hostile_scalar,
    st.binary(min_size=16, max_size=16),
    st.uuids().map(lambda u: "+" + u.hex[1:]),
    st.uuids().map(lambda u: u.hex[:5] + "_" + u.hex[6:]),
    st.uuids().map(lambda u: " " + u.hex[1:]),
    st.uuids().map(lambda u: "{" + u.hex),
    st.uuids().map(lambda u: TwoFacedUUID(int=u.int)),
    st.uuids().map(lambda u: StrSub(str(u))),
    st.uuids().map(lambda u: u.int),
)

utc = timezone.utc
any_offset = st.timedeltas(
    min_value=-timedelta(hours=24) + timedelta(microseconds=1),
    max_value=timedelta(hours=24) - timedelta(microseconds=1),
).map(timezone)
valid_timestamp = st.one_of(
    st.datetimes(timezones=st.just(utc)),
    st.datetimes(timezones=st.just(utc)).map(lambda d: d.isoformat()),
)
iso_like = st.from_regex(
    r"-?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}([T ][0-9]{1,2}:[0-9]{1,2}(:[0-9]{1,2}(\.[0-9]{1,9})?)?)?"
    r"(Z|z|[+-][0-9]{2}(:?[0-9]{2}(:?[0-9]{2})?)?)?",
    fullmatch=True,
)
hostile_timestamp = st.one_of(
    st.datetimes(timezones=st.one_of(st.none(), st.timezones(), any_offset)),
    st.datetimes(max_value=datetime(1, 1, 2), timezones=any_offset),  # year 0 in UTC
    st.datetimes(min_value=datetime(9999, 12, 31), timezones=any_offset),  # year 10000
    st.datetimes(timezones=st.sampled_from([RaisingZone(), FarZone(), IntZone(), NoneZone()])),
    st.datetimes(timezones=st.one_of(st.just(utc), any_offset)).map(
        lambda d: DatetimeSub.combine(d.date(), d.timetz())
    ),
    st.datetimes(timezones=st.one_of(st.just(utc), any_offset)).map(lambda d: d.isoformat()),
    iso_like,
    iso_like.map(lambda s: s + "\x00"),
    hostile_text,
    hostile_scalar,
    st.dates(),
    st.times(),
)

VALID = {
    "event_type": valid_type,
    "event_id": valid_id,
    "timestamp": valid_timestamp,
    "tags": valid_tags,
    "metadata": valid_object,
    "data": valid_object,
}
HOSTILE = {
    "event_type": hostile_type,
    "event_id": hostile_id,
    "timestamp": hostile_timestamp,
    "tags": hostile_tags,
    "metadata": hostile_object,
    "data": hostile_object,
}


def build_event(kind: str, fields: dict[str, Any], draw: st.DrawFn) -> Any:
    if kind == "sequenced":
        return SequencedEvent(
            **fields, position=1, recorded_at=datetime(2026, 1, 1, tzinfo=utc), hash=bytes(32)
        )
    if kind == "custom":
        return CustomEvent(**fields, extra=draw(st.integers()))
    if kind == "mapping":
        return dict(fields)
    return DomainEvent(**fields)


@st.composite
def events_with(draw: st.DrawFn, hostile: tuple[str, ...]) -> Any:
    """An event whose fields named in ``hostile`` are drawn hostile, the others valid."""
    fields = {
        name: draw(HOSTILE[name] if name in hostile and draw(st.integers(0, 4)) else VALID[name])
        for name in VALID
    }
    return build_event(draw(st.sampled_from(["domain", "sequenced", "custom"])), fields, draw)


@st.composite
def batches(draw: st.DrawFn, hostile: tuple[str, ...]) -> list[Any]:
    """One to four events, each with the fields named in ``hostile`` drawn hostile (mostly)."""
    count = draw(st.integers(1, 4))
    return [draw(events_with(hostile)) for _ in range(count)]


@st.composite
def anything_batches(draw: st.DrawFn) -> list[Any]:
    """Items of every kind: events hostile anywhere, mappings (as JSON input gives them, and
    hostile), other objects."""
    items = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["domain", "sequenced", "custom", "mapping", "other"]))
        if kind == "other":
            items.append(draw(st.one_of(hostile_scalar, hostile_json)))
            continue
        hostile = draw(st.lists(st.sampled_from(list(VALID)), max_size=3))
        fields = {name: draw(HOSTILE[name] if name in hostile else VALID[name]) for name in VALID}
        if kind == "mapping":
            dropped = draw(st.lists(st.sampled_from(list(VALID)), max_size=2))
            fields = {k: v for k, v in fields.items() if k not in dropped}
        items.append(build_event(kind, fields, draw))
    return items


# ---------------------------------------------------------------------------------------------
# the comparison


def result_of(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What ``call`` did, comparable between the codecs: ("ok", value), ("error", code,
    message, context), or ("exception", type, text)."""
    try:
        value = call()
    except EventStoreError as exc:
        return ("error", exc.code, exc.message, exc.context)
    except Exception as exc:
        try:
            text = str(exc)[:300]
        except Exception:
            text = "<unprintable>"
        return ("exception", type(exc).__name__, text)
    if isinstance(value, python.PreparedBatch):
        return ("ok", bytes(value.buffer), list(value.offsets), value.count)
    return ("ok", value)


def summary(result: tuple[Any, ...]) -> str:
    """A short account of an outcome, for failure messages."""
    return repr(result)[:600]


def assert_same_and_clean(results: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Both codecs did the same, and that is a result or an EventStoreError."""
    reference, got = results
    assert got == reference, f"\nreference: {summary(reference)}\nnative:    {summary(got)}"
    assert reference[0] in ("ok", "error"), f"not an EventStoreError: {summary(reference)}"
    return reference


def prepare_both(
    items: list[Any],
    max_event_bytes: int = python.DEFAULT_MAX_EVENT_BYTES,
    first_index: int = 0,
    *,
    mappings: bool = False,
    first_position: int = 1,
    prev_hash: bytes = GENESIS,
) -> tuple[Any, ...]:
    """Build the items' placeholders, convert mappings as the store does (``mappings``), run
    both codecs' `prepare`; when they accept, seal with both and verify with both."""
    items = [materialize_event(item) for item in items]
    if mappings:
        converted = result_of(lambda: as_events(items))
        assert converted[0] in ("ok", "error"), f"as_events: {summary(converted)}"
        if converted[0] == "error":
            event(f"as_events: {converted[1]}")
            return converted
        items = converted[1]
    results = [
        result_of(lambda codec=codec: codec.prepare(items, max_event_bytes, first_index))
        for codec in CODECS
    ]
    outcome = assert_same_and_clean(results)
    if outcome[0] == "error":
        event(f"error: {outcome[3].get('field') if isinstance(outcome[3], dict) else None}")
        return outcome
    event("ok")
    sealed = []
    for codec in CODECS:
        batch = codec.prepare(items, max_event_bytes, first_index)
        last = codec.seal(batch, first_position, prev_hash)
        sealed.append((bytes(batch.buffer), last))
    assert sealed[0] == sealed[1], "the codecs sealed the same rows differently"
    rows, last = sealed[0]
    checks = [
        result_of(lambda codec=codec: codec.rehash(rows, len(items), first_position, prev_hash))
        for codec in CODECS
    ]
    assert_same_and_clean(checks)
    assert checks[0][1] == python.Rehashed(len(items), last), summary(checks[0])
    return outcome


def materialize_event(item: Any) -> Any:
    """An item with its placeholders built, in every field."""
    if isinstance(item, DomainEvent):
        fields = {f: materialize(getattr(item, f)) for f in item.__struct_fields__}
        return type(item)(**fields)
    return materialize(item)


first_positions = st.integers(-(2**63), INT64_MAX - 8)
hashes = st.binary(min_size=32, max_size=32)


# ---------------------------------------------------------------------------------------------
# properties: encoding


@FUZZ
@given(batch=batches(("data", "metadata")), first_position=first_positions, prev_hash=hashes)
def test_hostile_data_and_metadata(batch: list[Any], first_position: int, prev_hash: bytes) -> None:
    prepare_both(batch, first_position=first_position, prev_hash=prev_hash)


@FUZZ
@given(batch=batches(("tags",)), limit=st.sampled_from([python.DEFAULT_MAX_EVENT_BYTES, 300]))
def test_hostile_tags(batch: list[Any], limit: int) -> None:
    prepare_both(batch, limit)


@FUZZ
@given(batch=batches(("event_type",)), first_index=st.integers(0, 2**40))
def test_hostile_event_types(batch: list[Any], first_index: int) -> None:
    prepare_both(batch, first_index=first_index)


@FUZZ
@given(batch=batches(("event_id",)))
def test_hostile_event_ids(batch: list[Any]) -> None:
    prepare_both(batch)


@FUZZ
@given(batch=batches(("timestamp",)))
def test_hostile_timestamps(batch: list[Any]) -> None:
    prepare_both(batch)


@FUZZ
@given(
    items=anything_batches(),
    limit=st.one_of(st.just(python.DEFAULT_MAX_EVENT_BYTES), st.integers(-10, 2**31)),
    first_index=st.integers(0, 2**40),
)
def test_hostile_batches_and_mappings(items: list[Any], limit: int, first_index: int) -> None:
    prepare_both(items, limit, first_index, mappings=True)


# ---------------------------------------------------------------------------------------------
# strategies: bytes for the decoders


def fields_of(rows: bytes, count: int) -> list[list[bytes]]:
    """The fields of ``count`` well-formed binary COPY rows."""
    out, at = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from(">h", rows, at)
        at += 2
        fields = []
        for _ in range(n):
            (size,) = struct.unpack_from(">i", rows, at)
            fields.append(rows[at + 4 : at + 4 + size])
            at += 4 + size
        out.append(fields)
    return out


def join_rows(rows: list[list[bytes | None]]) -> bytes:
    """Binary COPY rows of these fields (None: NULL)."""
    out = bytearray()
    for fields in rows:
        out += struct.pack(">h", len(fields))
        for value in fields:
            out += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    return bytes(out)


class DeepJson:
    """JSON text nested ``depth`` deep (arrays or objects) around ``inner``."""

    def __init__(self, depth: int, kind: str, inner: bytes) -> None:
        self.depth, self.kind, self.inner = depth, kind, inner

    def __repr__(self) -> str:
        return f"DeepJson({self.depth}, {self.kind!r}, {self.inner!r})"

    def build(self) -> bytes:
        if self.kind == "[":
            return b"[" * self.depth + self.inner + b"]" * self.depth
        return b'{"a":' * self.depth + self.inner + b"}" * self.depth


JSON_ATOMS = [
    b"null",
    b"true",
    b"false",
    b"0",
    b"-0",
    b"-0.0",
    b"1e16",
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"123456789012345678901234567890",
    b"9" * 1300,
    b"9" * 5000,
    b"0.1",
    b"1.",
    b"01",
    b'""',
    b'"a"',
    b'"\\u0000"',
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\\ud83d\\ude00"',
    b'"\\u00e9"',
    b'"\x01"',
    b'"\xff"',
    b'"\xc0\x80"',
    b'"\xed\xa0\x80"',
    b'"\xf4\x90\x80\x80"',
    b'"\\x41"',
    b'"\\',
    b'"',
    b"",
    b" ",
    b"\xef\xbb\xbf{}",
]
json_string = st.one_of(
    st.sampled_from([b'"k"', b'""', b'"\\u0000"', b'"\\ud800"', b'"\xff"', b'"a\\"b"']),
    st.text(any_char, max_size=6).map(
        lambda s: ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"').encode(
            "utf-8", "surrogatepass"
        )
    ),
)
json_space = st.sampled_from([b"", b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x0c", b"\xc2\xa0"])
json_text = st.recursive(
    st.one_of(st.sampled_from(JSON_ATOMS), json_string),
    lambda c: st.one_of(
        st.lists(c, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]"),
        st.lists(st.tuples(json_string, json_space, c), max_size=4).map(
            lambda kvs: b"{" + b",".join(k + s + b":" + v for k, s, v in kvs) + b"}"
        ),
    ),
    max_leaves=10,
)
hostile_json_text = st.one_of(
    json_text,
    st.builds(
        DeepJson,
        st.sampled_from([64, 65, 999, 1000, 10_000]),
        st.sampled_from("[{"),
        st.sampled_from([b"1", b'"x"', b"[]", b"{}"]),
    ),
    st.binary(max_size=40),
    st.tuples(json_text, st.binary(max_size=3), st.integers(0, 50)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
)


def build_json(text: Any) -> bytes:
    return text.build() if isinstance(text, DeepJson) else text


@st.composite
def sealed_rows(draw: st.DrawFn) -> tuple[bytes, int, int, bytes]:
    """Rows as the store holds them (valid events, prepared and sealed by the reference), their
    count, first position and previous hash."""
    count = draw(st.integers(1, 4))
    events = []
    for _ in range(count):
        fields = {name: draw(VALID[name]) for name in VALID}
        fields["event_id"] = draw(st.uuids())
        events.append(DomainEvent(**fields))
    ids = [str(e.event_id) for e in events]
    if len(set(ids)) != len(ids):
        events = events[:1]
    batch = python.prepare(events)
    first_position = draw(first_positions)
    prev_hash = draw(hashes)
    python.seal(batch, first_position, prev_hash)
    return bytes(batch.buffer), len(events), first_position, prev_hash


def to_export(rows: bytes, count: int, recorded_at: bytes) -> bytes:
    """Stored rows as export rows: ``recorded_at`` inserted after the timestamp."""
    return join_rows([[*f[:4], recorded_at, *f[4:]] for f in fields_of(rows, count)])


def to_read(rows: bytes, count: int, recorded_at: bytes, archived: int = -1) -> bytes:
    """Stored rows as a read's rows (`EVENT_COLUMNS`: the hash after the position,
    ``recorded_at`` after the timestamp); row ``archived`` as an archived event's (NULL hash,
    payload and recorded_at; its other fields kept, as `history_rows` has them)."""
    out: list[list[bytes | None]] = []
    for n, f in enumerate(fields_of(rows, count)):
        if n == archived:
            out.append([f[0], None, f[1], f[2], f[3], None, f[4], None, None])
        else:
            out.append([f[0], f[7], f[1], f[2], f[3], recorded_at, f[4], f[5], f[6]])
    return join_rows(out)


#: A damage: where (an offset, taken modulo the length), what (set, insert, delete, cut) and a
#: byte.
damages = st.lists(
    st.tuples(
        st.integers(0),
        st.sampled_from(["set", "insert", "delete", "cut"]),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def damage(data: bytes, edits: list[tuple[int, str, bytes]]) -> bytes:
    out = bytearray(data)
    for at, how, value in edits:
        at %= len(out) + 1
        if how == "set":
            out[at : at + len(value)] = value
        elif how == "insert":
            out[at:at] = value
        elif how == "delete":
            del out[at : at + len(value)]
        else:
            del out[at:]
    return bytes(out)


#: The decoders run in this worker process, with Python's debug allocator (which checks the
#: guard bytes around every block it frees): a write past a buffer, a crash or a hang of the
#: native code is then an outcome of the test ("crash", "hang") instead of a silent corruption
#: or the end of the test run. The reference runs there too, at the same depth of the stack
#: (where a RecursionError strikes depends on it).
WORKER = """
import pickle, struct, sys
from tamma_events import _native
from tamma_events.codec import reference as _pycodec
from tamma_events.errors import EventStoreError
codecs = {"native": _native, "python": _pycodec}
read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
write(b"ready")
sys.stdout.buffer.flush()
while len(header := read(4)) == 4:
    codec, name, args = pickle.loads(read(struct.unpack(">I", header)[0]))
    try:
        result = ("ok", getattr(codecs[codec], name)(*args))
    except EventStoreError as exc:
        result = ("error", exc.code, exc.message, exc.context)
    except Exception as exc:
        result = ("exception", type(exc).__name__, str(exc)[:300])
    data = pickle.dumps(result)
    write(struct.pack(">I", len(data)) + data)
    sys.stdout.buffer.flush()
"""
#: What the worker writes once its imports are done, and how long they may take (pyarrow and
#: the codecs, under the debug allocator, on a busy machine): a bound for a hang.
READY = b"ready"
START_SECONDS = 120.0
#: How long one call may take before it counts as a hang (the inputs are small, so a call takes
#: milliseconds; this is only a bound for a hang, never a timing).
HANG_SECONDS = 60.0


class NativeWorker:
    """A process that runs codec calls one at a time; restarted after a crash or a hang."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr = tempfile.TemporaryFile()

    def _start(self) -> subprocess.Popen[bytes]:
        """A new worker, once it is ready: its start-up is not counted against a call."""
        env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1"}
        self.stderr.seek(0)
        self.stderr.truncate()
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        try:
            ready = self._read(process, len(READY), START_SECONDS)
        except (TimeoutError, EOFError):
            ready = b""
        if ready != READY:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-400:]
            raise AssertionError(f"the codec worker did not start: {ready!r} {tail}")
        return process

    def call(self, codec: str, name: str, *args: Any) -> tuple[Any, ...]:
        """What ``<codec>.<name>(*args)`` did (codec: "native" or "python"), as `result_of`
        says it, or ("crash", how) or ("hang", seconds)."""
        if self.process is None or self.process.poll() is not None:
            self._close_pipes()
            self.process = self._start()
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        data = pickle.dumps((codec, name, args))
        try:
            process.stdin.write(struct.pack(">I", len(data)) + data)
            process.stdin.flush()
            header = self._read(process, 4, HANG_SECONDS)
            size = struct.unpack(">I", header)[0]
            return tuple(pickle.loads(self._read(process, size, HANG_SECONDS)))
        except TimeoutError:
            process.kill()
            process.wait()
            self._close_pipes()
            return ("hang", HANG_SECONDS)
        except (EOFError, BrokenPipeError):
            code = process.wait()
            self._close_pipes()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-400:]
            return ("crash", code, tail)

    @staticmethod
    def _read(process: subprocess.Popen[bytes], size: int, timeout: float) -> bytes:
        """``size`` bytes from the worker; TimeoutError when it sends nothing for ``timeout``
        seconds, EOFError when it exits."""
        assert process.stdout is not None
        out = b""
        while len(out) < size:
            ready, _, _ = select.select([process.stdout], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(process.stdout.fileno(), size - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def _close_pipes(self) -> None:
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(HANG_SECONDS)
        self._close_pipes()
        self.stderr.close()


@pytest.fixture(scope="module")
def worker() -> Iterator[NativeWorker]:
    running = NativeWorker()
    yield running
    running.close()


def both_decoders(worker: NativeWorker, name: str, *args: Any) -> list[tuple[Any, ...]]:
    """The reference's outcome and the native one (both in the worker)."""
    return [worker.call("python", name, *args), worker.call("native", name, *args)]


def decode_both(
    worker: NativeWorker, rows: bytes, count: int, first_position: int, prev_hash: bytes
) -> None:
    """Both export decoders, and both verifiers, do the same, cleanly."""
    outcome = assert_same_and_clean(both_decoders(worker, "decode_rows", rows, count))
    event(f"decode_rows: {outcome[0]}")
    checks = both_decoders(worker, "rehash", rows, count, first_position, prev_hash)
    outcome = assert_same_and_clean(checks)
    event(f"rehash: {outcome[0]} {getattr(outcome[1], 'kind', '') if outcome[0] == 'ok' else ''}")


def read_both(worker: NativeWorker, rows: bytes, count: int) -> None:
    """Both read decoders (`decode_events`) do the same, cleanly: the same events (or
    archived positions), or the same error."""
    outcome = assert_same_and_clean(both_decoders(worker, "decode_events", rows, count))
    event(f"decode_events: {outcome[0]}")


# ---------------------------------------------------------------------------------------------
# properties: decoding


@FUZZ
@given(
    rows=st.binary(max_size=600),
    count=st.integers(0, 6),
    first_position=first_positions,
    prev_hash=hashes,
)
def test_random_bytes_into_the_decoders(
    worker: NativeWorker, rows: bytes, count: int, first_position: int, prev_hash: bytes
) -> None:
    decode_both(worker, rows, count, first_position, prev_hash)
    read_both(worker, rows, count)


@FUZZ
@given(
    stored=sealed_rows(),
    edits=damages,
    recorded_at=st.binary(min_size=8, max_size=8),
    extra=st.integers(-1, 1),
    archived=st.integers(-1, 3),
)
def test_damaged_rows_into_the_decoders(
    worker: NativeWorker,
    stored: tuple[bytes, int, int, bytes],
    edits: list[tuple[int, str, bytes]],
    recorded_at: bytes,
    extra: int,
    archived: int,
) -> None:
    rows, count, first_position, prev_hash = stored
    asked = max(0, count + extra)
    decode_both(worker, damage(rows, edits), asked, first_position, prev_hash)
    exported = to_export(rows, count, recorded_at)
    decode_both(worker, damage(exported, edits), asked, first_position, prev_hash)
    read_both(worker, damage(to_read(rows, count, recorded_at, archived), edits), asked)


@FUZZ
@given(
    stored=sealed_rows(),
    row=st.integers(0, 3),
    texts=st.lists(
        st.tuples(st.sampled_from(["tags", "metadata", "data"]), hostile_json_text),
        min_size=1,
        max_size=3,
    ),
    version=st.sampled_from([b"\x01", b"\x01", b"\x01", b"\x00", b"\x02", b""]),
    recorded_at=st.binary(min_size=8, max_size=8),
    archived=st.integers(-1, 3),
)
def test_hostile_json_into_the_decoders(
    worker: NativeWorker,
    stored: tuple[bytes, int, int, bytes],
    row: int,
    texts: list[tuple[str, Any]],
    version: bytes,
    recorded_at: bytes,
    archived: int,
) -> None:
    rows, count, first_position, prev_hash = stored
    fields: list[list[bytes | None]] = list(fields_of(rows, count))  # type: ignore[arg-type]
    target = fields[row % count]
    for name, text in texts:
        target[{"tags": 4, "metadata": 5, "data": 6}[name]] = version + build_json(text)
    changed = join_rows(fields)
    decode_both(worker, changed, count, first_position, prev_hash)
    exported = to_export(changed, count, recorded_at)
    decode_both(worker, exported, count, first_position, prev_hash)
    read_both(worker, to_read(changed, count, recorded_at, archived), count)


def _three_sealed_rows() -> tuple[bytes, int, int, bytes]:
    stamp = datetime(2026, 1, 1, tzinfo=utc)
    events = [DomainEvent("T", event_id=uuid.UUID(int=n), timestamp=stamp) for n in range(3)]
    batch = python.prepare(events)
    python.seal(batch, 1, GENESIS)
    return bytes(batch.buffer), 3, 1, GENESIS


THREE_ROWS = _three_sealed_rows()


@pytest.mark.parametrize(
    ("name", "args"),
    [
        # 2**62 rows of 17 words: the allocation wraps around to a few bytes, the rows are
        # written past it.
        ("rehash", (THREE_ROWS[0], 2**62, 1, GENESIS)),
        ("decode_rows", (to_export(THREE_ROWS[0], 3, bytes(8)), 2**62)),
        # 8 * (2**60 + 1) bytes wrap around to a negative size: a buffer that never grows.
        ("decode_rows", (b"", 2**60 + 1)),
        ("rehash", (b"", 2**60 + 1, 1, GENESIS)),
        ("decode_events", (to_read(THREE_ROWS[0], 3, bytes(8)), 2**62)),
        ("decode_events", (b"", 2**60 + 1)),
    ],
    ids=[
        "rehash 2**62 rows",
        "decode_rows 2**62 rows",
        "decode_rows 2**60+1 rows",
        "rehash 2**60+1",
        "decode_events 2**62 rows",
        "decode_events 2**60+1 rows",
    ],
)
def test_a_count_whose_buffers_overflow_is_refused_like_the_reference(
    worker: NativeWorker, name: str, args: tuple[Any, ...]
) -> None:
    """Found by `test_hostile_decoder_arguments`: a count whose buffer sizes overflow
    Py_ssize_t. The native decoders must not write past their buffers, nor loop for ever; they
    must do what the reference does (which reads the rows one by one and stops at the first
    that is missing)."""
    reference, got = both_decoders(worker, name, *args)
    assert got[0] not in ("crash", "hang"), summary(got)
    assert got == reference, f"\nreference: {summary(reference)}\nnative:    {summary(got)}"


@UNSHRUNK
@given(
    stored=st.one_of(
        sealed_rows(), st.tuples(st.binary(max_size=64), st.just(0), st.just(1), st.just(GENESIS))
    ),
    # Counts whose buffers overflow Py_ssize_t, or that no allocator can give (2**40 rows);
    # none that can be allocated but would be written through by the debug allocator.
    count=st.one_of(
        st.integers(-3, 8),
        st.sampled_from([2**40, 2**60 + 1, 2**61, 2**62, INT64_MAX]),
        st.none(),
    ),
    first_position=st.one_of(first_positions, st.sampled_from([INT64_MAX, 2**63, -(2**63) - 1])),
    prev_hash=st.one_of(hashes, st.binary(max_size=40)),
    view=st.sampled_from([bytes, bytearray]),
)
def test_hostile_decoder_arguments(
    worker: NativeWorker,
    stored: tuple[bytes, int, int, bytes],
    count: int | None,
    first_position: int,
    prev_hash: bytes,
    view: Callable[[bytes], Any],
) -> None:
    """Counts far past the rows, negative counts, positions past 64 bits, hashes that are not
    32 bytes: both decoders must do the same (the same result, or the same error), and the
    native one must neither crash nor hang."""
    rows, stored_count, _, _ = stored
    n = stored_count if count is None else count
    for name, args in (
        ("decode_rows", (view(rows), n)),
        ("decode_events", (view(rows), n)),
        ("rehash", (view(rows), n, first_position, prev_hash)),
    ):
        results = both_decoders(worker, name, *args)
        assert results[1][0] not in ("crash", "hang"), f"{name}: {summary(results[1])}"
        assert results[0] == results[1], (
            f"{name}:\nreference: {summary(results[0])}\nnative:    {summary(results[1])}"
        )
        event(f"{name}: {results[0][0]} {results[0][1] if results[0][0] != 'ok' else ''}")
