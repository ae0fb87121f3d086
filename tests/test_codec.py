"""The COPY codec, without a database: golden bytes, the error contract, the hash chain.

Every test that takes the ``codec`` fixture runs against both implementations, the native
extension (``tamma_events._native``) and the pure-Python reference
(``tamma_events.codec.reference``), so both are held to the same hand-checked expectations. See
test_codec_hypothesis.py for the randomised comparison of the two.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
import os
import struct
import subprocess
import sys
import uuid
from array import array
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from types import ModuleType
from typing import Any

import pytest

from _codec_support import (
    ROW_OVERHEAD,
    depth_of,
    micros_since_2000,
    outcome,
    parse_iso,
    split_fields,
)
from tamma_events.codec import reference as _pycodec
from tamma_events.errors import DUPLICATE_EVENT, VALIDATION_FAILED, EventStoreError
from tamma_events.model import DomainEvent, SequencedEvent

IMPLEMENTATIONS = [
    pytest.param("tamma_events._native", id="native"),
    pytest.param("tamma_events.codec.reference", id="python"),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """One implementation of the codec; importing the native one must work (no fallback)."""
    return importlib.import_module(request.param)


@pytest.fixture
def both() -> tuple[ModuleType, ModuleType]:
    return (
        importlib.import_module("tamma_events._native"),
        importlib.import_module("tamma_events.codec.reference"),
    )


# ---------------------------------------------------------------------------------------------
# helpers, written independently of the codec


#: The hash of the empty chain, as documented: sha256 of a fixed text.
GENESIS = hashlib.sha256(b"tamma-events genesis v1").digest()
#: PostgreSQL's binary COPY signature, flags word and header-extension length.
PG_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(4) + bytes(4)
PG_COPY_TRAILER = b"\xff\xff"
#: Bytes of a row besides its event_type and JSON texts: field count, 8 length words, position,
#: uuid, timestamp, 3 jsonb version bytes and the hash.


def row_size(
    event_type: str = "Thing", tags: str = "{}", metadata: str = "{}", data: str = "{}"
) -> int:
    """The encoded size of a row with this event_type and these JSON texts."""
    return ROW_OVERHEAD + sum(len(s.encode()) for s in (event_type, tags, metadata, data))


T0 = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def uid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def ev(n: int = 1, **fields: Any) -> DomainEvent:
    """A valid event with a fixed id and time, with ``fields`` replaced."""
    fields.setdefault("event_type", "Thing")
    fields.setdefault("event_id", uid(n))
    fields.setdefault("timestamp", T0)
    return DomainEvent(**fields)


def rows_of(buffer: bytes | bytearray, offsets: Sequence[int]) -> list[bytes]:
    return [bytes(buffer[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]


def check_offsets(batch: Any, count: int) -> None:
    assert batch.count == count == len(batch)
    offsets = list(batch.offsets)
    assert len(offsets) == count + 1
    assert offsets[0] == 0
    assert offsets[-1] == len(batch.buffer)
    assert all(a < b for a, b in itertools.pairwise(offsets))
    for row in rows_of(batch.buffer, offsets):
        split_fields(row)


def chain(prev: bytes, rows: Sequence[bytes]) -> list[bytes]:
    """The hash of each row: sha256(previous hash || the row up to its hash field)."""
    hashes = []
    for row in rows:
        prev = hashlib.sha256(prev + row[: -(4 + 32)]).digest()
        hashes.append(prev)
    return hashes


def error_of(fn: Callable[[], object]) -> EventStoreError:
    with pytest.raises(EventStoreError) as info:
        fn()
    return info.value


def validation_error(codec: ModuleType, events: Any, **kwargs: Any) -> EventStoreError:
    err = error_of(lambda: codec.prepare(events, **kwargs))
    assert err.code == VALIDATION_FAILED
    return err


# ---------------------------------------------------------------------------------------------
# golden bytes

GOLDEN_EVENTS = (
    DomainEvent(
        event_type="IssueOpened",
        event_id=uuid.UUID("0190a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"),
        timestamp=datetime(
            2024, 2, 29, 23, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
        ),
        tags={"prId": "7", "issueId": "42"},
        metadata={"z": 1, "a": None},
        data={
            "title": 'Grüße "q" \\ \U0001f389',
            "labels": ["bug", "ünï"],
            "nested": {"b": [1, 2.5, {"c": True}], "a": -0.1},
            "count": 3,
        },
    ),
    DomainEvent(
        event_type="Kommentar-hinzugefügt",
        event_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
        timestamp="2000-01-01T00:00:00.000001-08:00",  # type: ignore[arg-type]
        tags={"userId": "u-ß"},
        metadata={},
        # Keys sort by code point: U+FFFF before the astral U+1F600 (not UTF-16 order).
        data={"\U0001f600": 1, "\uffff": 2, "é": 3, "A": [], "\n": "\x1f"},
    ),
    DomainEvent(
        event_type="x",
        event_id=uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff"),
        timestamp=datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
    ),
)

#: Worked out by hand from the layout in _pycodec's docstring:
#: 2024-02-29 23:30:15.123456+05:30 is 18:00:15.123456 UTC, 8766 + 59 = 8825 days after
#: 2000-01-01 (six leap years 2000-2020, then Jan + Feb 1-28); the ISO string is 8 h + 1 us after
#: the epoch; the last event is 1 us before it.
GOLDEN_MICROS = (
    (8825 * 86400 + 18 * 3600 + 15) * 1_000_000 + 123456,
    8 * 3600 * 1_000_000 + 1,
    -1,
)

#: The canonical JSON of (tags, metadata, data) of each event: compact, keys sorted.
GOLDEN_JSON = (
    (
        '{"issueId":"42","prId":"7"}',
        '{"a":null,"z":1}',
        '{"count":3,"labels":["bug","ünï"],"nested":{"a":-0.1,"b":[1,2.5,{"c":true}]},'
        '"title":"Grüße \\"q\\" \\\\ \U0001f389"}',
    ),
    (
        '{"userId":"u-ß"}',
        "{}",
        '{"\\n":"\\u001f","A":[],"é":3,"\uffff":2,"\U0001f600":1}',
    ),
    ("{}", "{}", "{}"),
)

GOLDEN_HEADER = "5047434f50590aff0d0a000000000000000000"
GOLDEN_ROWS = (
    (
        "0008"
        "00000008"
        "0000000000000001"
        "00000010"
        "0190a3c45e6f7a8b9c0d1e2f3a4b5c6d"
        "0000000b"
        "49737375654f70656e6564"
        "00000008"
        "0002b587ccd4ac00"
        "0000001c"
        "017b2269737375654964223a223432222c2270724964223a2237227d"
        "00000011"
        "017b2261223a6e756c6c2c227a223a317d"
        "00000070"
        "017b22636f756e74223a332c226c6162656c73223a5b22627567222c22c3bc6ec3af225d"
        "2c226e6573746564223a7b2261223a2d302e312c2262223a5b312c322e352c7b2263223a"
        "747275657d5d7d2c227469746c65223a224772c3bcc39f65205c22715c22205c5c20f09f"
        "8e89227d"
        "00000020"
        "06010ab931192f9e51e7069a82e282b9476243579706cb6600d6d9b6c7ad9261"
    ),
    (
        "0008"
        "00000008"
        "0000000000000002"
        "00000010"
        "00000000000040008000000000000001"
        "00000016"
        "4b6f6d6d656e7461722d68696e7a75676566c3bc6774"
        "00000008"
        "00000006b49d2001"
        "00000012"
        "017b22757365724964223a22752dc39f227d"
        "00000003"
        "017b7d"
        "0000002f"
        "017b225c6e223a225c7530303166222c2241223a5b5d2c22c3a9223a332c22efbfbf223a"
        "322c22f09f9880223a317d"
        "00000020"
        "030fc4e3481ccf73ba05ec3d6e37ecc519e3dd521b56c01a2f5aa8bdc25dc5d4"
    ),
    (
        "0008"
        "00000008"
        "0000000000000003"
        "00000010"
        "ffffffffffffffffffffffffffffffff"
        "00000001"
        "78"
        "00000008"
        "ffffffffffffffff"
        "00000003"
        "017b7d"
        "00000003"
        "017b7d"
        "00000003"
        "017b7d"
        "00000020"
        "5257eca66262b79cf88169e4e8f5c57e47ae0dc7e9f9be6a583658f5122c1b62"
    ),
)
GOLDEN_TRAILER = "ffff"
GOLDEN_LAST_HASH = "5257eca66262b79cf88169e4e8f5c57e47ae0dc7e9f9be6a583658f5122c1b62"


def golden_stream() -> bytes:
    return bytes.fromhex(GOLDEN_HEADER + "".join(GOLDEN_ROWS) + GOLDEN_TRAILER)


def test_golden_literal_follows_the_documented_layout() -> None:
    """The golden rows, decoded field by field and checked against independently computed
    values, so that the literal is not merely what the reference happened to produce."""
    assert bytes.fromhex(GOLDEN_HEADER) == PG_COPY_HEADER
    assert bytes.fromhex(GOLDEN_TRAILER) == PG_COPY_TRAILER
    prev = GENESIS
    for i, (event, hex_row) in enumerate(zip(GOLDEN_EVENTS, GOLDEN_ROWS, strict=True)):
        row = bytes.fromhex(hex_row)
        assert row[:2] == b"\x00\x08"
        position, event_id, event_type, timestamp, tags, metadata, data, row_hash = split_fields(
            row
        )
        assert struct.unpack(">q", position) == (i + 1,)
        assert event_id == event.event_id.bytes
        assert event_type == event.event_type.encode("utf-8")
        assert struct.unpack(">q", timestamp) == (GOLDEN_MICROS[i],)
        stamp = event.timestamp
        if isinstance(stamp, str):
            stamp = parse_iso(stamp)
        assert micros_since_2000(stamp) == GOLDEN_MICROS[i]
        assert (stamp - datetime(2000, 1, 1, tzinfo=timezone.utc)) // timedelta(
            microseconds=1
        ) == GOLDEN_MICROS[i]
        for value, field, text in zip(
            (event.tags, event.metadata, event.data),
            (tags, metadata, data),
            GOLDEN_JSON[i],
            strict=True,
        ):
            assert field == b"\x01" + text.encode("utf-8")
            assert json.loads(text) == value
            assert text == json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            )
        assert len(row_hash) == 32
        assert row_hash == hashlib.sha256(prev + row[: len(row) - 36]).digest()
        prev = row_hash
    assert prev.hex() == GOLDEN_LAST_HASH


def test_constants_match_the_documentation() -> None:
    assert _pycodec.GENESIS_HASH == GENESIS
    assert _pycodec.COPY_HEADER == PG_COPY_HEADER
    assert _pycodec.COPY_TRAILER == PG_COPY_TRAILER
    assert _pycodec.COPY_COLUMNS == (
        "position",
        "event_id",
        "event_type",
        "timestamp",
        "tags",
        "metadata",
        "data",
        "hash",
    )


def test_golden_stream(codec: ModuleType) -> None:
    batch = codec.prepare(list(GOLDEN_EVENTS))
    check_offsets(batch, 3)
    expected_rows = [bytes.fromhex(r) for r in GOLDEN_ROWS]
    assert [len(r) for r in rows_of(batch.buffer, batch.offsets)] == [len(r) for r in expected_rows]
    # Before sealing: positions and hashes are blank, everything else is final.
    for row, expected in zip(rows_of(batch.buffer, batch.offsets), expected_rows, strict=True):
        blank = expected[:6] + bytes(8) + expected[14:-32] + bytes(32)
        assert row == blank
    last = codec.seal(batch, 1, _pycodec.GENESIS_HASH)
    assert last.hex() == GOLDEN_LAST_HASH
    stream = _pycodec.COPY_HEADER + bytes(batch.buffer) + _pycodec.COPY_TRAILER
    assert stream == golden_stream()


def test_golden_stream_is_deterministic_and_independent_of_the_sealer(
    both: tuple[ModuleType, ModuleType],
) -> None:
    """Prepared by one implementation and sealed by the other: still the golden bytes."""
    native, python = both
    for preparer, sealer in ((native, python), (python, native)):
        batch = preparer.prepare(list(GOLDEN_EVENTS))
        assert sealer.seal(batch, 1, GENESIS).hex() == GOLDEN_LAST_HASH
        assert PG_COPY_HEADER + bytes(batch.buffer) + PG_COPY_TRAILER == golden_stream()


# ---------------------------------------------------------------------------------------------
# which implementation loaded


def test_expected_implementation_loaded() -> None:
    """Fails when the native codec was expected but the package fell back to Python."""
    import tamma_events
    from tamma_events import codec as _codec

    if os.environ.get("TAMMA_EVENTS_IMPL") == "python":
        assert tamma_events.__impl__ == "python"
        assert _codec.prepare is _pycodec.prepare
        assert _codec.seal is _pycodec.seal
    else:
        assert tamma_events.__impl__ == "native"
        import tamma_events._native as native

        assert _codec.prepare is native.prepare
        assert _codec.seal is native.seal


def run_python(code: str, impl: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TAMMA_EVENTS_IMPL", None)
    if impl is not None:
        env["TAMMA_EVENTS_IMPL"] = impl
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_bogus_implementation_name_fails_to_import() -> None:
    result = run_python("import tamma_events", "bogus")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "TAMMA_EVENTS_IMPL must be 'native' or 'python', not 'bogus'" in result.stderr


PRINT_IMPL = (
    "import tamma_events, tamma_events.codec as c, tamma_events.codec.reference as p\n"
    "print(tamma_events.__impl__, c.prepare is p.prepare, c.seal is p.seal)"
)


def test_python_implementation_can_be_forced() -> None:
    result = run_python(PRINT_IMPL, "python")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "True", "True"]


def test_native_implementation_can_be_forced() -> None:
    result = run_python(PRINT_IMPL, "native")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["native", "False", "False"]


BLOCK_NATIVE = "import sys\nsys.modules['tamma_events._native'] = None\n"


def test_forced_native_without_the_extension_raises() -> None:
    result = run_python(BLOCK_NATIVE + "import tamma_events", "native")
    assert result.returncode != 0
    assert "TAMMA_EVENTS_IMPL=native but the native codec" in result.stderr


def test_unforced_without_the_extension_falls_back_to_python() -> None:
    result = run_python(BLOCK_NATIVE + PRINT_IMPL, None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "True", "True"]


# ---------------------------------------------------------------------------------------------
# successful encoding


def test_prepare_offsets_match_buffer(codec: ModuleType) -> None:
    events = [ev(i, data={"n": "x" * i}) for i in range(1, 6)]
    batch = codec.prepare(events)
    check_offsets(batch, 5)
    for i, row in enumerate(rows_of(batch.buffer, batch.offsets), 1):
        fields = split_fields(row)
        assert fields[0] == bytes(8)
        assert fields[1] == uid(i).bytes
        assert fields[6] == b"\x01" + json.dumps({"n": "x" * i}).replace(" ", "").encode()
        assert fields[7] == bytes(32)
        assert len(row) == row_size(data='{"n":"' + "x" * i + '"}')


def test_prepare_accepts_any_sequence(codec: ModuleType) -> None:
    events = (ev(1), ev(2))
    assert bytes(codec.prepare(events).buffer) == bytes(codec.prepare(list(events)).buffer)


@pytest.mark.parametrize(
    "event_id",
    [
        "00000000-0000-0000-0000-00000000abcd",
        "0000000000000000000000000000ABCD",
        "{00000000-0000-0000-0000-00000000abcd}",
        "urn:uuid:00000000-0000-0000-0000-00000000abcd",
    ],
)
def test_event_id_as_string(codec: ModuleType, event_id: str) -> None:
    batch = codec.prepare([ev(event_id=event_id)])
    assert split_fields(bytes(batch.buffer))[1] == (0xABCD).to_bytes(16, "big")


@pytest.mark.parametrize(
    ("timestamp", "micros"),
    [
        (datetime(2000, 1, 1, tzinfo=timezone.utc), 0),
        ("2000-01-01T00:00:00Z", 0),
        ("2000-01-01T01:00:00+01:00", 0),
        ("2000-01-01T00:00:00.500000-00:30", 1_800_500_000),
        (datetime(2000, 1, 1, tzinfo=timezone(timedelta(hours=-23, minutes=-59))), 86_340_000_000),
        (datetime(1, 1, 1, tzinfo=timezone.utc), -63_082_281_600_000_000),
        (datetime.max.replace(tzinfo=timezone.utc), 252_455_615_999_999_999),
        # The earliest instant an hour east of UTC (one earlier is year 0 in UTC: refused).
        (datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), -63_082_281_600_000_000),
    ],
)
def test_timestamp_encoding(codec: ModuleType, timestamp: Any, micros: int) -> None:
    if isinstance(timestamp, datetime):
        assert micros_since_2000(timestamp) == micros
    else:
        assert micros_since_2000(parse_iso(timestamp)) == micros
    batch = codec.prepare([ev(timestamp=timestamp)])
    assert struct.unpack(">q", split_fields(bytes(batch.buffer))[3]) == (micros,)


def test_timestamp_in_a_named_zone(codec: ModuleType) -> None:
    from zoneinfo import ZoneInfo

    stamp = datetime(2024, 7, 1, 12, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # CEST, +02:00
    batch = codec.prepare([ev(timestamp=stamp)])
    expected = micros_since_2000(datetime(2024, 7, 1, 10, 0, tzinfo=timezone.utc))
    assert struct.unpack(">q", split_fields(bytes(batch.buffer))[3]) == (expected,)


def test_json_values(codec: ModuleType) -> None:
    data = {
        "big": 2**64,
        "neg": -(2**63) - 1,
        "huge": 10**100,
        "tuple": (1, "a", None),
        "bools": [True, False],
        "astral": "\U0010ffff\U0001f600",
        "sep": "\u2028",
        "float": 1e300,
        "zero": -0.0,
    }
    batch = codec.prepare([ev(data=data)])
    text = split_fields(bytes(batch.buffer))[6]
    assert text[:1] == b"\x01"
    decoded = json.loads(text[1:])
    assert list(decoded) == sorted(data)
    # Floats are compared as numbers: the encoding may write 1e300 as the integer it denotes
    # and -0.0 as 0.0 (as jsonb would give them back).
    floats = {"float", "zero"}
    assert {k: v for k, v in decoded.items() if k not in floats} == {
        **{k: v for k, v in data.items() if k not in floats},
        "tuple": [1, "a", None],
    }
    assert float(decoded["float"]) == 1e300
    assert float(decoded["zero"]) == 0.0


@pytest.mark.parametrize("length", [1, 255])
def test_event_type_length_limits_accepted(codec: ModuleType, length: int) -> None:
    event_type = "\U0001f600" * length  # counted in characters, not bytes
    batch = codec.prepare([ev(event_type=event_type)])
    assert split_fields(bytes(batch.buffer))[2] == event_type.encode()


@pytest.mark.parametrize("length", [1, 128])
def test_tag_key_length_limits_accepted(codec: ModuleType, length: int) -> None:
    tags = {"é" * length: ""}
    batch = codec.prepare([ev(tags=tags)])
    assert json.loads(split_fields(bytes(batch.buffer))[4][1:]) == tags


def test_sequenced_event_is_encoded_as_its_domain_event(codec: ModuleType) -> None:
    fields: dict[str, Any] = {
        "event_type": "T",
        "data": {"a": 1},
        "tags": {"k": "v"},
        "metadata": {"m": [1]},
        "event_id": uid(7),
        "timestamp": T0,
    }
    sequenced = SequencedEvent(**fields, position=99, recorded_at=T0, hash=b"\x01" * 32)
    assert bytes(codec.prepare([sequenced]).buffer) == bytes(
        codec.prepare([DomainEvent(**fields)]).buffer
    )


def test_domain_event_subclass_is_accepted(codec: ModuleType) -> None:
    class Custom(DomainEvent, frozen=True):
        extra: int = 0

    fields: dict[str, Any] = {"event_type": "T", "event_id": uid(3), "timestamp": T0}
    assert bytes(codec.prepare([Custom(**fields, extra=5)]).buffer) == bytes(
        codec.prepare([DomainEvent(**fields)]).buffer
    )


# ---------------------------------------------------------------------------------------------
# nesting depth: the data object itself is level 1


def nest(levels: int, kind: str) -> Any:
    """An object whose innermost container sits at level ``levels`` (the object is level 1)."""
    value: Any = 0
    for _ in range(levels - 1):
        if kind == "dict":
            value = {"k": value}
        elif kind == "list":
            value = [value]
        else:
            value = (value,)
    return {"k": value}


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
@pytest.mark.parametrize("field", ["data", "metadata"])
def test_depth_64_accepted(codec: ModuleType, kind: str, field: str) -> None:
    value = nest(64, kind)
    assert depth_of(value) == 64
    batch = codec.prepare([ev(**{field: value})])
    column = 6 if field == "data" else 5
    decoded = json.loads(split_fields(bytes(batch.buffer))[column][1:])
    assert depth_of(decoded) == 64


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
@pytest.mark.parametrize("field", ["data", "metadata"])
def test_depth_65_rejected(codec: ModuleType, kind: str, field: str) -> None:
    value = nest(65, kind)
    assert depth_of(value) == 65
    err = validation_error(codec, [ev(4, **{field: value})])
    path: list[Any] = ["k"] + (["k"] * 63 if kind == "dict" else [0] * 63)
    assert err.context == {"index": 0, "event_id": str(uid(4)), "field": field, "path": path}
    assert "nesting is deeper than 64 levels" in err.message


def test_empty_containers_count_as_levels(codec: ModuleType) -> None:
    batch = codec.prepare([ev(data={"k": nest(63, "list"), "e": [[]]})])  # depth 64
    assert json.loads(split_fields(bytes(batch.buffer))[6][1:])["e"] == [[]]
    value: Any = []
    for _ in range(63):
        value = [value]
    err = validation_error(codec, [ev(data={"k": value})])  # the innermost [] is level 65
    assert err.context["path"] == ["k"] + [0] * 63


# ---------------------------------------------------------------------------------------------
# the error contract


def test_empty_batch(codec: ModuleType) -> None:
    err = validation_error(codec, [])
    assert err == EventStoreError(
        VALIDATION_FAILED, "a batch must contain at least one event", {"count": 0}
    )


class NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


class StrKey(str):
    pass


class IntSubclass(int):
    pass


ID = uid(0xE1)
SID = str(ID)

#: (label, event, context after index, text the message must contain)
FIELD_RULES: list[tuple[str, Any, dict[str, Any], str]] = [
    ("not an event", {"event_type": "x"}, {"field": None}, "expected a DomainEvent, got dict"),
    ("none", None, {"field": None}, "expected a DomainEvent, got NoneType"),
    ("id garbage", ev(event_id="not-a-uuid"), {"field": "event_id"}, "'not-a-uuid'"),
    ("id int", ev(event_id=5), {"field": "event_id"}, "event_id must be a UUID, got int"),
    ("id bytes", ev(event_id=ID.bytes), {"field": "event_id"}, "got bytes"),
    ("id none", ev(event_id=None), {"field": "event_id"}, "got NoneType"),
    ("type int", ev(0xE1, event_type=3), {"event_id": SID, "field": "event_type"}, "got int"),
    ("type empty", ev(0xE1, event_type=""), {"event_id": SID, "field": "event_type"}, "got 0"),
    (
        "type 256",
        ev(0xE1, event_type="a" * 256),
        {"event_id": SID, "field": "event_type"},
        "event_type must be 1 to 255 characters, got 256",
    ),
    ("type NUL", ev(0xE1, event_type="a\x00"), {"event_id": SID, "field": "event_type"}, "NUL"),
    (
        "type surrogate",
        ev(0xE1, event_type="a\ud800"),
        {"event_id": SID, "field": "event_type"},
        "lone surrogate",
    ),
    (
        "timestamp naive",
        ev(0xE1, timestamp=datetime(2024, 1, 1)),
        {"event_id": SID, "field": "timestamp"},
        "timezone-aware",
    ),
    (
        "timestamp naive string",
        ev(0xE1, timestamp="2024-01-01T00:00:00"),
        {"event_id": SID, "field": "timestamp"},
        "timezone-aware",
    ),
    (
        "timestamp no offset",
        ev(0xE1, timestamp=datetime(2024, 1, 1, tzinfo=NoOffset())),
        {"event_id": SID, "field": "timestamp"},
        "timezone-aware",
    ),
    (
        "timestamp garbage",
        ev(0xE1, timestamp="yesterday"),
        {"event_id": SID, "field": "timestamp"},
        "ISO-8601 datetime, got 'yesterday'",
    ),
    (
        "timestamp month 13",
        ev(0xE1, timestamp="2024-13-01T00:00:00Z"),
        {"event_id": SID, "field": "timestamp"},
        "ISO-8601",
    ),
    (
        "timestamp int",
        ev(0xE1, timestamp=0),
        {"event_id": SID, "field": "timestamp"},
        "timestamp must be a datetime, got int",
    ),
    (
        "timestamp date",
        ev(0xE1, timestamp=date(2024, 1, 1)),
        {"event_id": SID, "field": "timestamp"},
        "got date",
    ),
    ("tags list", ev(0xE1, tags=[]), {"event_id": SID, "field": "tags"}, "got list"),
    ("tags none", ev(0xE1, tags=None), {"event_id": SID, "field": "tags"}, "got NoneType"),
    ("tag key int", ev(0xE1, tags={1: "v"}), {"event_id": SID, "field": "tags"}, "got int"),
    (
        "tag key str subclass",
        ev(0xE1, tags={StrKey("k"): "v"}),
        {"event_id": SID, "field": "tags"},
        "tag keys must be str, got StrKey",
    ),
    (
        "tag key empty",
        ev(0xE1, tags={"": "v"}),
        {"event_id": SID, "field": "tags", "path": [""]},
        "1 to 128 characters, got 0",
    ),
    (
        "tag key 129",
        ev(0xE1, tags={"k" * 129: "v"}),
        {"event_id": SID, "field": "tags", "path": ["k" * 129]},
        "got 129",
    ),
    (
        "tag value int",
        ev(0xE1, tags={"k": 1}),
        {"event_id": SID, "field": "tags", "path": ["k"]},
        'tags["k"] must be a str, got int',
    ),
    (
        "tag value none",
        ev(0xE1, tags={"k": None}),
        {"event_id": SID, "field": "tags", "path": ["k"]},
        "got NoneType",
    ),
    (
        "tag key NUL",
        ev(0xE1, tags={"k\x00": "v"}),
        {"event_id": SID, "field": "tags", "path": ["k\x00"]},
        "tag key contains a NUL",
    ),
    (
        "tag value NUL",
        ev(0xE1, tags={"k": "\x00"}),
        {"event_id": SID, "field": "tags", "path": ["k"]},
        "tag value contains a NUL",
    ),
    (
        "tag value surrogate",
        ev(0xE1, tags={"k": "\udfff"}),
        {"event_id": SID, "field": "tags", "path": ["k"]},
        "tag value contains a lone surrogate",
    ),
]

JSON_RULES: list[tuple[str, Any, Any, str]] = [
    ("not a dict: list", [], None, "must be a JSON object (dict), got list"),
    ("not a dict: none", None, None, "got NoneType"),
    ("not a dict: tuple", (), None, "got tuple"),
    ("int key", {1: "v"}, ["1"], "object keys must be strings, got int"),
    ("none key", {"a": {None: 1}}, ["a", "None"], "got NoneType"),
    ("str subclass key", {StrKey("k"): 1}, ["'k'"], "got StrKey"),
    ("NUL key", {"a\x00": 1}, ["a\x00"], "key contains a NUL character"),
    ("NUL string", {"a": ["x", "b\x00"]}, ["a", 1], "string contains a NUL character"),
    ("surrogate string", {"a": {"b": "\ud800"}}, ["a", "b"], "string contains a lone surrogate"),
    ("nan", {"a": [1.0, math.nan]}, ["a", 1], "nan is not a JSON number"),
    ("inf", {"a": math.inf}, ["a"], "inf is not a JSON number"),
    ("-inf", {"a": (-math.inf,)}, ["a", 0], "-inf is not a JSON number"),
    ("set", {"a": {1}}, ["a"], "unsupported type set"),
    ("bytes", {"a": b"x"}, ["a"], "unsupported type bytes"),
    ("datetime", {"a": T0}, ["a"], "unsupported type datetime"),
    ("decimal", {"a": Decimal(1)}, ["a"], "unsupported type Decimal"),
    ("uuid", {"a": ID}, ["a"], "unsupported type UUID"),
    ("str subclass value", {"a": StrKey("v")}, ["a"], "unsupported type StrKey"),
    ("int subclass value", {"a": [True, IntSubclass(1)]}, ["a", 1], "unsupported type IntSubclass"),
    ("object", {"a": [True, object()]}, ["a", 1], "unsupported type object"),
]


@pytest.mark.parametrize(
    ("label", "event", "context", "text"), FIELD_RULES, ids=[r[0] for r in FIELD_RULES]
)
@pytest.mark.parametrize("position", [0, 2])
def test_field_rules(
    codec: ModuleType, label: str, event: Any, context: dict[str, Any], text: str, position: int
) -> None:
    events: list[Any] = [ev(100), ev(101)]
    events.insert(position, event)
    err = validation_error(codec, events)
    assert err.context == {"index": position, **context}, label
    assert err.message.startswith(f"event {position}: ")
    assert text in err.message


@pytest.mark.parametrize(
    ("label", "value", "path", "text"), JSON_RULES, ids=[r[0] for r in JSON_RULES]
)
@pytest.mark.parametrize("field", ["metadata", "data"])
def test_json_rules(
    codec: ModuleType, label: str, value: Any, path: Any, text: str, field: str
) -> None:
    err = validation_error(codec, [ev(1), ev(0xE1, **{field: value})])
    expected: dict[str, Any] = {"index": 1, "event_id": SID, "field": field}
    if path is not None:
        expected["path"] = path
    assert err.context == expected, label
    assert err.message.startswith("event 1: ")
    assert text in err.message
    if path is not None:
        # The message names the place: data["a"][1]
        rendered = field + "".join(
            f"[{p}]" if isinstance(p, int) else f"[{json.dumps(p)}]" for p in path
        )
        assert f"{rendered}: " in err.message


def test_first_bad_event_is_reported(codec: ModuleType) -> None:
    events = [ev(1), ev(2, event_type=""), ev(3, data={"a": math.nan})]
    assert validation_error(codec, events).context["index"] == 1


def test_first_broken_rule_of_an_event_is_reported(codec: ModuleType) -> None:
    event = ev(event_id="bad", event_type="", timestamp="bad", data=[])
    assert validation_error(codec, [event]).context["field"] == "event_id"
    event = ev(event_type="", timestamp="bad", data=[])
    assert validation_error(codec, [event]).context["field"] == "event_type"
    event = ev(timestamp="bad", tags=[], data=[])
    assert validation_error(codec, [event]).context["field"] == "timestamp"
    event = ev(tags=[], metadata=[], data=[])
    assert validation_error(codec, [event]).context["field"] == "tags"
    event = ev(metadata=[], data=[])
    assert validation_error(codec, [event]).context["field"] == "metadata"


def test_duplicate_in_batch(codec: ModuleType) -> None:
    dup = uuid.UUID("12345678-1234-5678-1234-567812345678")
    events = [ev(1), ev(event_id=dup), ev(2), ev(event_id=str(dup).upper(), event_type="Other")]
    err = error_of(lambda: codec.prepare(events))
    text = str(dup)
    assert err == EventStoreError(
        DUPLICATE_EVENT,
        f"event 3: event_id {text} appears twice in the batch (events 1 and 3)",
        {"index": 3, "first_index": 1, "event_id": text, "event_ids": [text]},
    )


def test_validation_error_before_later_duplicate(codec: ModuleType) -> None:
    # An invalid event before the second occurrence is reported, not the duplicate.
    events = [ev(1), ev(2, event_type=""), ev(1)]
    assert validation_error(codec, events).context["index"] == 1
    # A duplicate before an invalid event is reported first.
    events = [ev(1), ev(1), ev(2, event_type="")]
    assert error_of(lambda: codec.prepare(events)).code == DUPLICATE_EVENT


def test_validation_error_before_size_error(codec: ModuleType) -> None:
    events = [ev(1, data={"a": "x" * 1000}), ev(2, event_type="")]
    err = validation_error(codec, events, max_event_bytes=row_size() + 10)
    assert err.context["field"] == "event_type"


def test_size_limit_exact(codec: ModuleType) -> None:
    event = ev(9, data={"a": "é" * 40})
    size = row_size(data='{"a":"' + "é" * 40 + '"}')
    assert size == ROW_OVERHEAD + 5 + 2 + 2 + 88
    batch = codec.prepare([event], max_event_bytes=size)
    assert len(batch.buffer) == size
    err = validation_error(codec, [ev(1), event], max_event_bytes=size - 1)
    assert err == EventStoreError(
        VALIDATION_FAILED,
        f"event 1: the event is {size} bytes encoded, over the limit of {size - 1}",
        {"index": 1, "event_id": str(uid(9)), "field": None, "size": size, "limit": size - 1},
    )


def test_size_limit_reports_first_oversized(codec: ModuleType) -> None:
    events = [ev(1), ev(2, data={"a": "x" * 50}), ev(3, data={"a": "x" * 500})]
    err = validation_error(codec, events, max_event_bytes=row_size() + 20)
    assert err.context["index"] == 1
    assert err.context["size"] == row_size(data='{"a":"' + "x" * 50 + '"}')


def test_default_size_limit(codec: ModuleType) -> None:
    limit = 1 << 20
    assert _pycodec.DEFAULT_MAX_EVENT_BYTES == limit
    filler = limit - row_size(data='{"a":""}')
    assert len(codec.prepare([ev(data={"a": "x" * filler})]).buffer) == limit
    err = validation_error(codec, [ev(data={"a": "x" * (filler + 1)})])
    assert err.context["size"] == limit + 1
    assert err.context["limit"] == limit


@pytest.mark.parametrize("first_index", [0, 7, 1000])
def test_first_index_numbers_errors(codec: ModuleType, first_index: int) -> None:
    err = validation_error(codec, [ev(1), ev(2, tags={"k": 1})], first_index=first_index)
    assert err.context["index"] == first_index + 1
    assert err.message.startswith(f"event {first_index + 1}: ")

    err = validation_error(codec, [None], first_index=first_index)
    assert err.context == {"index": first_index, "field": None}

    err = error_of(lambda: codec.prepare([ev(1), ev(2), ev(1)], first_index=first_index))
    assert err.code == DUPLICATE_EVENT
    assert err.context["index"] == first_index + 2
    assert err.context["first_index"] == first_index

    err = validation_error(
        codec,
        [ev(1), ev(2, data={"a": "x" * 99})],
        max_event_bytes=row_size() + 10,
        first_index=first_index,
    )
    assert err.context["index"] == first_index + 1

    err = validation_error(codec, [ev(1), ev(2, timestamp="nope")], first_index=first_index)
    assert err.context == {"index": first_index + 1, "event_id": str(uid(2)), "field": "timestamp"}


def test_first_index_does_not_change_bytes(codec: ModuleType) -> None:
    events = [ev(1), ev(2)]
    assert bytes(codec.prepare(events, first_index=50).buffer) == bytes(
        codec.prepare(events).buffer
    )


def test_errors_are_json_serialisable(codec: ModuleType) -> None:
    for event in (ev(data={"a": {"b": [1, math.nan]}}), ev(tags={"k" * 129: "v"}), None):
        err = validation_error(codec, [event])
        assert json.loads(json.dumps(err.to_dict())) == err.to_dict()


def test_errors_agree_between_implementations(both: tuple[ModuleType, ModuleType]) -> None:
    """Every rule above gives exactly the same error from both implementations."""
    native, python = both
    cases: list[list[Any]] = [[]]
    cases += [[ev(100), rule[1]] for rule in FIELD_RULES]
    cases += [[ev(1), ev(0xE1, data=rule[1])] for rule in JSON_RULES]
    cases += [[ev(1), ev(1)], [ev(1, data=nest(65, "tuple"))]]
    for events in cases:
        expected = outcome(lambda events=events: python.prepare(events, first_index=3))
        assert expected[0] == "error"
        assert outcome(lambda events=events: native.prepare(events, first_index=3)) == expected


# ---------------------------------------------------------------------------------------------
# sealing and the hash chain


@pytest.mark.parametrize("prev_hash", [b"", bytes(31), bytes(33), GENESIS + b"\x00"])
def test_seal_rejects_wrong_length_prev_hash(codec: ModuleType, prev_hash: bytes) -> None:
    batch = codec.prepare([ev(1)])
    before = bytes(batch.buffer)
    with pytest.raises(ValueError, match="prev_hash must be 32 bytes"):
        codec.seal(batch, 1, prev_hash)
    assert bytes(batch.buffer) == before


def test_first_event_chains_from_genesis(codec: ModuleType) -> None:
    batch = codec.prepare([ev(1, data={"a": 1})])
    last = codec.seal(batch, 1, GENESIS)
    row = bytes(batch.buffer)
    assert last == hashlib.sha256(GENESIS + row[:-36]).digest()
    assert row[-32:] == last
    assert row[-36:-32] == struct.pack(">i", 32)
    assert struct.unpack_from(">q", row, 6) == (1,)


@pytest.mark.parametrize("first_position", [1, 2, 1000, 2**62])
def test_seal_positions_and_chain(codec: ModuleType, first_position: int) -> None:
    events = [ev(i, data={"i": i}) for i in range(1, 6)]
    batch = codec.prepare(events)
    prev = hashlib.sha256(b"some earlier event").digest()
    last = codec.seal(batch, first_position, prev)
    rows = rows_of(batch.buffer, batch.offsets)
    hashes = chain(prev, rows)
    assert last == hashes[-1]
    for i, (row, digest) in enumerate(zip(rows, hashes, strict=True)):
        fields = split_fields(row)
        assert struct.unpack(">q", fields[0]) == (first_position + i,)
        assert fields[7] == digest


def test_two_batches_equal_one(codec: ModuleType) -> None:
    events = [ev(i, data={"i": i}, tags={"t": str(i)}) for i in range(1, 8)]
    whole = codec.prepare(events)
    whole_last = codec.seal(whole, 10, GENESIS)

    first = codec.prepare(events[:3])
    second = codec.prepare(events[3:], first_index=3)
    middle = codec.seal(first, 10, GENESIS)
    assert middle == rows_of(whole.buffer, whole.offsets)[2][-32:]
    second_last = codec.seal(second, 13, middle)
    assert second_last == whole_last
    assert bytes(first.buffer) + bytes(second.buffer) == bytes(whole.buffer)


def test_resealing_gives_the_same_bytes(codec: ModuleType) -> None:
    batch = codec.prepare([ev(1), ev(2)])
    last = codec.seal(batch, 5, GENESIS)
    sealed = bytes(batch.buffer)
    assert codec.seal(batch, 5, GENESIS) == last
    assert bytes(batch.buffer) == sealed
    # A retry at other positions rewrites positions and hashes.
    other = codec.seal(batch, 6, GENESIS)
    assert other != last
    assert struct.unpack_from(">q", batch.buffer, 6) == (6,)


def test_seal_a_batch_built_by_hand(codec: ModuleType) -> None:
    batch = _pycodec.PreparedBatch(bytearray(), array("q", [0]))
    assert codec.seal(batch, 1, GENESIS) == GENESIS  # nothing to seal: the chain is unchanged


# ---------------------------------------------------------------------------------------------
# disagreements and contract breaks found while writing these tests (see the report); each test
# states the behaviour both implementations should share.


class StrSubclass(str):
    pass


def test_str_subclass_event_type(both: tuple[ModuleType, ModuleType]) -> None:
    """A str subclass as event_type is encoded like the str (found while writing these tests:
    the native codec required exactly str and then raised AssertionError, as the reference
    accepted the event)."""
    native, python = both
    events = [ev(1, event_type=StrSubclass("Thing"))]
    expected = outcome(lambda: python.prepare([ev(1, event_type="Thing")]))
    assert expected[0] == "ok"
    assert outcome(lambda: python.prepare(events)) == expected
    assert outcome(lambda: native.prepare(events)) == expected


SURROGATE_KEYS = [
    ("data key", ev(0xE1, data={"\ud800": 1}), "data", ["\ud800"], "key contains a lone"),
    (
        "metadata key",
        ev(0xE1, metadata={"a": {"b\udc00": None}}),
        "metadata",
        ["a", "b\udc00"],
        "key contains a lone",
    ),
    ("tag key", ev(0xE1, tags={"\ud800": "v"}), "tags", ["\ud800"], "tag key contains a lone"),
    (
        "tag key with int value",
        ev(0xE1, tags={"k\ud800": 1}),
        "tags",
        ["k\ud800"],
        "must be a str, got int",
    ),
]


@pytest.mark.parametrize(
    ("label", "event", "field", "path", "text"), SURROGATE_KEYS, ids=[c[0] for c in SURROGATE_KEYS]
)
def test_lone_surrogate_key_is_a_validation_error(
    codec: ModuleType, label: str, event: DomainEvent, field: str, path: list[str], text: str
) -> None:
    """A key holding a lone surrogate is reported like any other broken rule (found while
    writing these tests: wording the error json-encoded the key with msgspec, which raised
    UnicodeEncodeError instead of EventStoreError)."""
    err = validation_error(codec, [event])
    assert err.context == {"index": 0, "event_id": SID, "field": field, "path": path}, label
    assert text in err.message
    json.dumps(err.to_dict())  # the context is still JSON-serialisable (with \u escapes)


def test_integer_over_max_int_bits_is_a_validation_error(codec: ModuleType) -> None:
    """Integers are limited to MAX_INT_BITS (msgspec could not even print one of more than 4300
    digits); the largest allowed one is encoded exactly."""
    for big in (2**4096, -(2**4096), 10**5000):
        err = error_of(lambda big=big: codec.prepare([ev(1, data={"n": [1, big]})]))
        assert isinstance(err, EventStoreError)
        assert err.code == VALIDATION_FAILED
        assert err.context["index"] == 0
        assert err.context["path"] == ["n", 1]
    batch = codec.prepare([ev(1, data={"n": 2**4096 - 1})])
    text = split_fields(bytes(batch.buffer))[6]
    assert text == b'\x01{"n":' + str(2**4096 - 1).encode() + b"}"


def test_size_error_and_unprintable_int_same_outcome(both: tuple[ModuleType, ModuleType]) -> None:
    """Every rule is checked before any size: both report event 1's integer, not event 0's size."""
    native, python = both
    events = [ev(1, data={"a": "x" * 200}), ev(2, data={"n": 10**5000})]
    limit = row_size() + 50
    assert outcome(lambda: native.prepare(events, max_event_bytes=limit)) == outcome(
        lambda: python.prepare(events, max_event_bytes=limit)
    )


def test_seal_position_overflow_same_outcome(both: tuple[ModuleType, ModuleType]) -> None:
    """Positions are int64: sealing past 2**63 - 1 raises ValueError in both, before any row
    is touched."""
    results = []
    for codec in both:
        batch = _pycodec.prepare([ev(1), ev(2)])
        before = bytes(batch.buffer)
        with pytest.raises(ValueError, match="64 bits"):
            codec.seal(batch, 2**63 - 1, GENESIS)
        assert bytes(batch.buffer) == before
        try:
            codec.seal(batch, 2**63 - 1, GENESIS)
        except Exception as exc:
            results.append(("raised", type(exc).__name__))
        else:
            positions = [
                struct.unpack(">q", split_fields(row)[0])[0]
                for row in rows_of(batch.buffer, batch.offsets)
            ]
            # If sealing succeeds, every position must be the one asked for.
            assert positions == [2**63 - 1, 2**63], f"{codec.__name__} wrote {positions}"
            results.append(("ok", positions))
    assert results[0] == results[1]


def test_seal_prev_hash_types_same_outcome(both: tuple[ModuleType, ModuleType]) -> None:
    """Both take prev_hash as bytes only, and refuse a bytearray the same way."""
    native, python = both
    results = []
    for codec in (native, python):
        batch = _pycodec.prepare([ev(1)])
        try:
            results.append(("ok", codec.seal(batch, 1, bytearray(GENESIS)), bytes(batch.buffer)))
        except Exception as exc:
            results.append(("raised", type(exc).__name__))
    assert results[0] == results[1]
