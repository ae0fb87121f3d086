"""The pure-Python reference codec: the readable spec of the native one in ``ext/_native.pyx``.

`prepare` validates a batch of `DomainEvent`s and encodes them as rows of PostgreSQL's binary
COPY format, leaving the position and hash fields blank; `seal` fills in consecutive positions
and the hash chain once the append holds the head lock. Both implementations produce the same
bytes and raise the same `EventStoreError`s; the native one asks `event_error` below to describe
an event it rejected, so every message has exactly one author.

Row layout (network byte order), one per event::

    int16 8                      number of fields
    int32 8    int64 position
    int32 16   uuid event_id
    int32 n    utf-8 event_type
    int32 8    int64 timestamp   microseconds since 2000-01-01 UTC
    int32 n+1  0x01 tags         jsonb: version byte, then canonical JSON
    int32 n+1  0x01 metadata
    int32 n+1  0x01 data
    int32 32   hash              sha256(previous hash || every byte of the row before this field)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final, NamedTuple

import msgspec

from tamma_events.errors import (
    DuplicateEvent,
    EventStoreError,
    StorageError,
    ValidationFailed,
    short_repr,
)
from tamma_events.model import DomainEvent, SequencedEvent

__all__ = [
    "COPY_COLUMNS",
    "COPY_HEADER",
    "COPY_TRAILER",
    "DEFAULT_MAX_EVENT_BYTES",
    "EVENT_COLUMNS",
    "EXPORT_COLUMNS",
    "GENESIS_HASH",
    "MAX_DEPTH",
    "MAX_EVENT_TYPE_LENGTH",
    "MAX_TAG_KEY_LENGTH",
    "DecodedRows",
    "PreparedBatch",
    "Rehashed",
    "canonical",
    "canonical_json",
    "decode_error",
    "decode_events",
    "decode_rows",
    "event_error",
    "json_rows",
    "prepare",
    "read_stored_json",
    "rehash",
    "seal",
    "stored_json_error",
    "stored_row_error",
]

COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER: Final = b"\xff\xff"
COPY_COLUMNS: Final = (
    "position",
    "event_id",
    "event_type",
    "timestamp",
    "tags",
    "metadata",
    "data",
    "hash",
)
#: The hash the first event chains from; also stored in the head row by the first migration.
GENESIS_HASH: Final = hashlib.sha256(b"tamma-events genesis v1").digest()

DEFAULT_MAX_EVENT_BYTES: Final = 1 << 20
MAX_EVENT_TYPE_LENGTH: Final = 255
MAX_TAG_KEY_LENGTH: Final = 128
#: The data or metadata object itself is level 1; a container at level 65 is rejected.
MAX_DEPTH: Final = 64
#: Integers in data and metadata are at most this many bits (about 1,233 decimal digits); far
#: larger ones could not even be printed as JSON by Python's default limits.
MAX_INT_BITS: Final = 4096
_MAX_POSITION: Final = 2**63 - 1

HASH_SIZE: Final = 32
#: Bytes before the position value (field count, position length) and after the hashed part.
POSITION_OFFSET: Final = 6
HASH_FIELD_SIZE: Final = 4 + HASH_SIZE

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=timezone.utc)
_ONE_US: Final = timedelta(microseconds=1)
_ENCODER: Final = msgspec.json.Encoder(order="sorted")
_ROW_START: Final = struct.pack(">hi", len(COPY_COLUMNS), 8) + bytes(8) + struct.pack(">i", 16)
_TIMESTAMP_LENGTH: Final = struct.pack(">i", 8)
_HASH_PLACEHOLDER: Final = struct.pack(">i", HASH_SIZE) + bytes(HASH_SIZE)
_INT32: Final = struct.Struct(">i")
_INT64: Final = struct.Struct(">q")


class PreparedBatch:
    """Encoded rows awaiting their positions and hashes.

    ``buffer`` holds the rows back to back; row ``i`` spans ``offsets[i]:offsets[i + 1]``.
    """

    __slots__ = ("buffer", "count", "offsets")

    def __init__(self, buffer: bytearray, offsets: array[int]) -> None:
        self.buffer = buffer
        self.offsets = offsets
        self.count = len(offsets) - 1

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"PreparedBatch(<{self.count} rows, {len(self.buffer)} bytes>)"


# ---------------------------------------------------------------------------------------------
# errors: the one place that words them


def _fail(
    message: str, index: int, event_id: str | None, field: str | None, **extra: Any
) -> EventStoreError:
    context: dict[str, Any] = {"index": index}
    if event_id is not None:
        context["event_id"] = event_id
    context["field"] = field
    context.update(extra)
    return ValidationFailed(f"event {index}: {message}", context)


def empty_batch_error() -> EventStoreError:
    return ValidationFailed("a batch must contain at least one event", {"count": 0})


def duplicate_in_batch_error(index: int, first_index: int, event_id: uuid.UUID) -> EventStoreError:
    text = str(event_id)
    return DuplicateEvent(
        f"event {index}: event_id {text} appears twice in the batch"
        f" (events {first_index} and {index})",
        {"index": index, "first_index": first_index, "event_id": text, "event_ids": [text]},
    )


def _type_name(value: object) -> str:
    return type(value).__name__


def _quote(key: str) -> str:
    """A key as a JSON string, for messages; \\u escapes where UTF-8 cannot hold it."""
    try:
        return msgspec.json.encode(key).decode()
    except UnicodeEncodeError:
        return json.dumps(key)


def _render_path(field: str, path: list[str | int]) -> str:
    parts = [field]
    for step in path:
        parts.append(f"[{step}]" if isinstance(step, int) else f"[{_quote(step)}]")
    return "".join(parts)


class _Invalid(Exception):
    """Internal: a rule was broken at ``path`` inside the value being checked."""

    def __init__(self, problem: str, path: list[str | int]) -> None:
        self.problem = problem
        self.path = path


def _check_text(value: str, path: list[str | int], what: str) -> None:
    if "\x00" in value:
        raise _Invalid(f"{what} contains a NUL character", path)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{what} contains a lone surrogate", path) from None


def _check_json(value: Any, path: list[str | int], depth: int) -> None:
    kind = type(value)
    if kind is str:
        _check_text(value, path, "string")
    elif kind is dict or kind is list or kind is tuple:
        if depth > MAX_DEPTH:
            raise _Invalid(f"nesting is deeper than {MAX_DEPTH} levels", path)
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise _Invalid(
                        f"object keys must be strings, got {_type_name(key)}",
                        [*path, short_repr(key)],
                    )
                _check_text(key, [*path, key], "key")
                _check_json(item, [*path, key], depth + 1)
        else:
            for i, item in enumerate(value):
                _check_json(item, [*path, i], depth + 1)
    elif kind is float:
        if not math.isfinite(value):
            raise _Invalid(f"{short_repr(value)} is not a JSON number", path)
    elif kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Invalid(f"an integer of {value.bit_length()} bits is over {MAX_INT_BITS}", path)
    elif kind is bool or value is None:
        pass
    else:
        raise _Invalid(f"unsupported type {kind.__name__}", path)


#: Floats from here on are written by msgspec in exponent form, which jsonb turns into integer
#: text ("1e16" comes back as 10000000000000000): they are stored as that integer instead.
FLOAT_EXPONENT_FROM: Final = 1e16


def canonical(value: Any) -> Any:
    """``value`` as jsonb will give it back, for the JSON values jsonb would rewrite: -0.0
    becomes 0.0 and floats of magnitude 1e16 or more become the integer their shortest decimal
    denotes. Returns ``value`` itself when nothing changes (the usual case)."""
    kind = type(value)
    if kind is float:
        if value == 0.0 and math.copysign(1.0, value) < 0:
            return 0.0
        if abs(value) >= FLOAT_EXPONENT_FROM:
            return int(Decimal(repr(value)))
        return value
    if kind is dict:
        items = {key: canonical(item) for key, item in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    if kind is list or kind is tuple:
        converted = [canonical(item) for item in value]
        if all(a is b for a, b in zip(converted, value, strict=True)):
            return value
        return converted
    return value


def _check_tags(tags: Any, index: int, event_id: str | None) -> None:
    if type(tags) is not dict:
        raise _fail(
            f"tags must be a dict of str to str, got {_type_name(tags)}", index, event_id, "tags"
        )
    for key, value in tags.items():
        if type(key) is not str:
            raise _fail(f"tag keys must be str, got {_type_name(key)}", index, event_id, "tags")
        if not 1 <= len(key) <= MAX_TAG_KEY_LENGTH:
            raise _fail(
                f"tag keys must be 1 to {MAX_TAG_KEY_LENGTH} characters, got {len(key)}",
                index,
                event_id,
                "tags",
                path=[key],
            )
        if type(value) is not str:
            raise _fail(
                f"tags[{_quote(key)}] must be a str, got {_type_name(value)}",
                index,
                event_id,
                "tags",
                path=[key],
            )
        try:
            _check_text(key, [key], "tag key")
            _check_text(value, [key], "tag value")
        except _Invalid as bad:
            raise _fail(
                f"{_render_path('tags', bad.path)}: {bad.problem}",
                index,
                event_id,
                "tags",
                path=bad.path,
            ) from None


def _check_object(value: Any, field: str, index: int, event_id: str | None) -> None:
    if type(value) is not dict:
        raise _fail(
            f"{field} must be a JSON object (dict), got {_type_name(value)}", index, event_id, field
        )
    try:
        _check_json(value, [], 1)
    except _Invalid as bad:
        raise _fail(
            f"{_render_path(field, bad.path)}: {bad.problem}", index, event_id, field, path=bad.path
        ) from None


_UUID_TEXT: Final = re.compile(
    r"(?:urn:uuid:)?(\{)?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}(?(1)\})",
    re.ASCII | re.IGNORECASE,
)


def parse_uuid(text: str) -> uuid.UUID:
    """A UUID from its text: 32 hex digits, hyphens where the canonical form puts them or none,
    in braces or after ``urn:uuid:`` at most. ``uuid.UUID`` alone also takes signs,
    underscores, spaces and non-ASCII digits; ids are refused so at every entry point.
    Raises ValueError."""
    if not _UUID_TEXT.fullmatch(text):
        raise ValueError(f"not a UUID: {short_repr(text)}")
    return uuid.UUID(text)


def _event_id_bytes(event: DomainEvent, index: int) -> tuple[bytes, str]:
    event_id: Any = event.event_id
    if isinstance(event_id, uuid.UUID):
        # From its int, as the native codec reads it (a subclass may override bytes).
        return event_id.int.to_bytes(16, "big"), str(uuid.UUID(int=event_id.int))
    if isinstance(event_id, str):
        try:
            parsed = parse_uuid(event_id)
        except ValueError:
            raise _fail(
                f"event_id must be a UUID, got {short_repr(event_id)}", index, None, "event_id"
            ) from None
        return parsed.bytes, str(parsed)
    raise _fail(f"event_id must be a UUID, got {_type_name(event_id)}", index, None, "event_id")


def _timestamp_us(event: DomainEvent, index: int, event_id: str) -> int:
    value: Any = event.timestamp
    if isinstance(value, str):
        try:
            value = msgspec.convert(value, datetime)
        except (msgspec.ValidationError, UnicodeEncodeError):  # the latter: a lone surrogate
            raise _fail(
                f"timestamp must be an ISO-8601 datetime, got {short_repr(value)}",
                index,
                event_id,
                "timestamp",
            ) from None
    elif not isinstance(value, datetime):
        raise _fail(
            f"timestamp must be a datetime, got {_type_name(value)}", index, event_id, "timestamp"
        )
    try:
        offset = value.utcoffset()
    except Exception as exc:  # a tzinfo of the caller's: whatever it raises, it is no zone
        raise _fail(
            f"timestamp's time zone gives no valid offset: {short_repr(exc)}",
            index,
            event_id,
            "timestamp",
        ) from None
    if value.tzinfo is None or offset is None:
        raise _fail("timestamp must be timezone-aware", index, event_id, "timestamp")
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:
        # Stored as UTC, it must be a datetime there too, or it could not be read back.
        raise _fail(
            "timestamp is out of range: in UTC it falls outside the years 1 to 9999",
            index,
            event_id,
            "timestamp",
        ) from None
    micros: int = (utc - _PG_EPOCH) // _ONE_US
    return micros


def _validate_event(event: object, index: int) -> tuple[bytes, str, int]:
    """Check every rule for one event; returns its 16-byte id, the id as text and its
    timestamp in microseconds since 2000-01-01 UTC."""
    if not isinstance(event, DomainEvent):
        raise _fail(f"expected a DomainEvent, got {_type_name(event)}", index, None, None)
    id_bytes, event_id = _event_id_bytes(event, index)

    event_type: Any = event.event_type
    if not isinstance(event_type, str):
        raise _fail(
            f"event_type must be a str, got {_type_name(event_type)}", index, event_id, "event_type"
        )
    # A str subclass is checked and stored as the text it holds (str's own methods), as the
    # native codec reads it: overriding __len__ or encode changes nothing.
    event_type = str.__str__(event_type)
    if not 1 <= len(event_type) <= MAX_EVENT_TYPE_LENGTH:
        raise _fail(
            f"event_type must be 1 to {MAX_EVENT_TYPE_LENGTH} characters, got {len(event_type)}",
            index,
            event_id,
            "event_type",
        )
    try:
        _check_text(event_type, [], "event_type")
    except _Invalid as bad:
        raise _fail(bad.problem, index, event_id, "event_type") from None

    timestamp_us = _timestamp_us(event, index, event_id)

    _check_tags(event.tags, index, event_id)
    _check_object(event.metadata, "metadata", index, event_id)
    _check_object(event.data, "data", index, event_id)
    return id_bytes, event_id, timestamp_us


def size_error(index: int, event_id: bytes, size: int, max_event_bytes: int) -> EventStoreError:
    return _fail(
        f"the event is {size} bytes encoded, over the limit of {max_event_bytes}",
        index,
        str(uuid.UUID(bytes=event_id)),
        None,
        size=size,
        limit=max_event_bytes,
    )


def event_error(event: object, index: int) -> EventStoreError | None:
    """The error that rejects ``event`` at ``index`` of a batch, or None when it is valid."""
    try:
        _validate_event(event, index)
    except EventStoreError as exc:
        return exc
    return None


def prepare(
    events: Sequence[DomainEvent],
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    first_index: int = 0,
) -> PreparedBatch:
    """Validate and encode a batch, or raise `EventStoreError` and encode nothing.

    Every event is checked first, in order (the first bad event, or the second occurrence of an
    ``event_id``, is reported); then the events are encoded and the first one whose row is over
    ``max_event_bytes`` is reported. Errors number events from ``first_index``, for a batch that
    is a chunk of a larger one.
    """
    if not isinstance(events, (list, tuple)):
        events = list(events)
    if not events:
        raise empty_batch_error()
    checked: list[tuple[bytes, int]] = []
    seen: dict[bytes, int] = {}
    for index, event in enumerate(events, first_index):
        id_bytes, _, timestamp_us = _validate_event(event, index)
        first = seen.setdefault(id_bytes, index)
        if first != index:
            raise duplicate_in_batch_error(index, first, uuid.UUID(bytes=id_bytes))
        checked.append((id_bytes, timestamp_us))

    buffer = bytearray()
    offsets = array("q", [0])
    rows = zip(events, checked, strict=True)
    for index, (event, (id_bytes, timestamp_us)) in enumerate(rows, first_index):
        start = len(buffer)
        buffer += _ROW_START
        buffer += id_bytes
        # str's own encode: a subclass's override has no say in what is stored.
        encoded_type = str.encode(event.event_type, "utf-8")
        buffer += _INT32.pack(len(encoded_type))
        buffer += encoded_type
        buffer += _TIMESTAMP_LENGTH
        buffer += _INT64.pack(timestamp_us)
        for value in (event.tags, canonical(event.metadata), canonical(event.data)):
            text = _ENCODER.encode(value)
            buffer += _INT32.pack(len(text) + 1)
            buffer += b"\x01"
            buffer += text
        buffer += _HASH_PLACEHOLDER
        if len(buffer) - start > max_event_bytes:
            raise size_error(index, id_bytes, len(buffer) - start, max_event_bytes)
        offsets.append(len(buffer))
    return PreparedBatch(buffer, offsets)


def _check_seal(batch: PreparedBatch, first_position: int, prev_hash: bytes) -> None:
    """The arguments of `seal`, checked before anything is written."""
    if type(prev_hash) is not bytes or len(prev_hash) != HASH_SIZE:
        raise ValueError(f"prev_hash must be {HASH_SIZE} bytes")
    last = _MAX_POSITION - batch.count + 1
    if type(first_position) is not int or not -_MAX_POSITION - 1 <= first_position <= last:
        raise ValueError(
            f"the positions must fit in 64 bits, got first {short_repr(first_position)}"
        )


def seal(
    batch: PreparedBatch, first_position: int, prev_hash: bytes, *, chain: bool = True
) -> bytes:
    """Write positions ``first_position, first_position + 1, ...`` and the hash chain starting
    from ``prev_hash`` into the rows; returns the last row's hash.

    ``chain=False`` writes the positions only (hashes stay zero): for measuring what the chain
    costs, never for a store.
    """
    _check_seal(batch, first_position, prev_hash)
    buffer = batch.buffer
    offsets = batch.offsets
    for i in range(batch.count):
        start = offsets[i]
        end = offsets[i + 1]
        _INT64.pack_into(buffer, start + POSITION_OFFSET, first_position + i)
        if not chain:
            continue
        prev_hash = hashlib.sha256(prev_hash + buffer[start : end - HASH_FIELD_SIZE]).digest()
        buffer[end - HASH_SIZE : end] = prev_hash
    return prev_hash


def json_rows(batch: PreparedBatch) -> list[list[Any]]:
    """Each encoded row's column values as JSON-ready lists: event_id, event_type, timestamp
    (ISO 8601), then tags, metadata and data as the canonical JSON the row holds."""
    buffer = bytes(batch.buffer)
    offsets = batch.offsets
    rows = []
    for i in range(batch.count):
        at = offsets[i] + 2
        fields: list[bytes] = []
        for _ in range(len(COPY_COLUMNS) - 1):
            (size,) = _INT32.unpack_from(buffer, at)
            fields.append(buffer[at + 4 : at + 4 + size])
            at += 4 + size
        _, event_id, event_type, timestamp, tags, metadata, data = fields
        when = _PG_EPOCH + timedelta(microseconds=_INT64.unpack(timestamp)[0])
        rows.append(
            [
                event_id.hex(),
                event_type.decode("utf-8"),
                when.isoformat(),
                msgspec.Raw(tags[1:]),
                msgspec.Raw(metadata[1:]),
                msgspec.Raw(data[1:]),
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------------
# decoding exports: binary COPY rows into Arrow buffers

#: The columns an export reads, in order (`tamma_events.sql.EXPORT_SELECT` selects them).
EXPORT_COLUMNS: Final = (
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
#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
PG_EPOCH_US: Final = 946_684_800_000_000
_INT16: Final = struct.Struct(">h")
_MAX_OFFSET: Final = 2**31 - 1
_JSON_COLUMNS: Final = ("tags", "metadata", "data")
_FIXED_SIZES: Final = {"position": 8, "event_id": 16, "timestamp": 8, "recorded_at": 8, "hash": 32}


class DecodedRows(NamedTuple):
    """Export rows as the buffers of Arrow arrays (little-endian, no nulls): fixed-width values
    back to back, and variable-width ones as int32 offsets (one more than the values) into
    their UTF-8 bytes. ``tag_offsets`` counts map entries per row; the entries' keys and values
    are ``key_*`` and ``value_*``. Timestamps are microseconds since the Unix epoch."""

    num_rows: int
    position: bytes
    event_id: bytes
    type_offsets: bytes
    type_data: bytes
    timestamp: bytes
    recorded_at: bytes
    tag_offsets: bytes
    key_offsets: bytes
    key_data: bytes
    value_offsets: bytes
    value_data: bytes
    metadata_offsets: bytes
    metadata_data: bytes
    data_offsets: bytes
    data_data: bytes
    hash: bytes


def decode_error(row: int, field: str, problem: str) -> EventStoreError:
    """The one wording of a malformed export row (both decoders raise it)."""
    return StorageError(f"export row {row}: {field} {problem}", {"row": row, "field": field})


class _Column:
    """Offsets and bytes of a variable-width column being decoded."""

    __slots__ = ("data", "offsets")

    def __init__(self) -> None:
        self.offsets = array("i", [0])
        self.data = bytearray()

    def add(self, value: bytes, row: int, field: str) -> None:
        self.data += value
        if len(self.data) > _MAX_OFFSET:
            raise decode_error(row, field, "overflows a 2 GiB batch")
        self.offsets.append(len(self.data))


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its pairs, in order."""


def _tag_pairs(text: bytes, row: int) -> list[tuple[bytes, bytes]]:
    """The pairs of a flat JSON object of strings, in order, every pair kept (jsonb has no
    duplicate keys; should a row have some, the map shows them all)."""
    try:
        pairs = json.loads(text.decode("utf-8"), object_pairs_hook=_Pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        pairs = None
    if type(pairs) is not _Pairs or any(type(v) is not str for _, v in pairs):
        raise decode_error(row, "tags", "are not an object of strings")
    try:
        return [(k.encode(), v.encode()) for k, v in pairs]
    except UnicodeEncodeError:
        raise decode_error(row, "tags", "are not an object of strings") from None


def _fields(
    view: memoryview | bytes,
    count: int,
    columns: tuple[str, ...],
    sizes: dict[str, int],
    error: Callable[[int, str, str], EventStoreError],
    marker: str | None = None,
) -> Iterator[tuple[int, str, int, int]]:
    """The fields of ``count`` binary COPY rows of ``columns`` in ``view``, as ``(row, field,
    start, length)``, each row's own start first (as ``(row, "", start, 0)``), their framing
    checked on the way: cut short, NULL, a fixed size in ``sizes`` not met, jsonb (tags,
    metadata, data) not of version 1, bytes after the last row. ``error(row, field, problem)``
    words the first problem.

    With a ``marker`` column, a row where it is NULL is an archived event's: its later fields
    are only framed (any may be NULL), and come with the length -1, as NULLs do."""
    size = len(view)
    at = 0
    for row in range(count):
        if at + 2 > size:
            raise error(row, "row", "is cut short")
        (fields,) = _INT16.unpack_from(view, at)
        if fields != len(columns):
            raise error(row, "row", f"has {fields} fields, not {len(columns)}")
        yield row, "", at, 0
        at += 2
        skipped = False
        for field in columns:
            if at + 4 > size:
                raise error(row, field, "is cut short")
            (length,) = _INT32.unpack_from(view, at)
            at += 4
            if length < 0 and field == marker:
                skipped = True
            elif length < 0 and not skipped:
                raise error(row, field, "is NULL")
            if length < 0:
                yield row, field, at, -1
                continue
            if at + length > size:
                raise error(row, field, "is cut short")
            if skipped:
                yield row, field, at, -1
                at += length
                continue
            expected = sizes.get(field)
            if expected is not None and length != expected:
                raise error(row, field, f"has {length} bytes, not {expected}")
            if field in _JSON_COLUMNS and (length < 1 or view[at] != 1):
                raise error(row, field, "is not jsonb version 1")
            yield row, field, at, length
            at += length
    if at != size:
        raise error(count, "row", "follows the last expected row")


def decode_rows(rows: bytes | bytearray | memoryview, count: int) -> DecodedRows:
    """Decode ``count`` binary COPY rows of `EXPORT_COLUMNS` (no header, no trailer).

    Raises ``STORAGE_ERROR`` naming the row (0-based in ``rows``) and field for anything but
    exactly ``count`` well-formed rows."""
    if not -(2**63) <= count < 2**63:  # the native function's argument checks, in its words
        raise OverflowError("Python int too large to convert to C ssize_t")
    if count < 0:
        raise ValueError("count must not be negative")
    view = memoryview(rows).cast("B")
    fixed: dict[str, bytearray] = {name: bytearray() for name in _FIXED_SIZES}
    positions = array("q")
    times = {"timestamp": array("q"), "recorded_at": array("q")}
    types, keys, values, metadata, data = _Column(), _Column(), _Column(), _Column(), _Column()
    tag_offsets = array("i", [0])
    for row, field, at, length in _fields(view, count, EXPORT_COLUMNS, _FIXED_SIZES, decode_error):
        if not field:
            continue
        value = bytes(view[at : at + length])
        if field == "position":
            positions.append(_INT64.unpack(value)[0])
        elif field in times:
            (moment,) = _INT64.unpack(value)
            if not -(2**62) < moment < 2**62:
                raise decode_error(row, field, "is not a finite time")
            times[field].append(moment + PG_EPOCH_US)
        elif field in fixed:
            fixed[field] += value
        elif field == "event_type":
            types.add(value, row, field)
        elif field == "tags":
            for key, tag in _tag_pairs(value[1:], row):
                keys.add(key, row, field)
                values.add(tag, row, field)
            tag_offsets.append(len(keys.offsets) - 1)
        else:
            (metadata if field == "metadata" else data).add(value[1:], row, field)
    return DecodedRows(
        count,
        positions.tobytes(),
        bytes(fixed["event_id"]),
        types.offsets.tobytes(),
        bytes(types.data),
        times["timestamp"].tobytes(),
        times["recorded_at"].tobytes(),
        tag_offsets.tobytes(),
        keys.offsets.tobytes(),
        bytes(keys.data),
        values.offsets.tobytes(),
        bytes(values.data),
        metadata.offsets.tobytes(),
        bytes(metadata.data),
        data.offsets.tobytes(),
        bytes(data.data),
        bytes(fixed["hash"]),
    )


# ---------------------------------------------------------------------------------------------
# reading: binary COPY rows into the events readers get

#: The columns a read takes, in order (`tamma_events.sql.EVENT_SELECT` selects them). A row
#: whose ``hash`` is NULL is an archived event's (`tamma_events.sql.Statements.history_rows`):
#: only its position is read, and its event is read from its archive file.
EVENT_COLUMNS: Final = (
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
_EVENT_SIZES: Final = {
    "position": 8,
    "hash": HASH_SIZE,
    "event_id": 16,
    "timestamp": 8,
    "recorded_at": 8,
}
#: The decoders of the jsonb columns (the native decoder calls these very ones).
decode_tags: Final = msgspec.json.Decoder(dict[str, str]).decode
decode_object: Final = msgspec.json.Decoder(dict[str, Any]).decode
_DECODE_FAILURES: Final = (msgspec.MsgspecError, ValueError, RecursionError)


def _read_time(view: bytes, at: int, row: int, field: str) -> datetime:
    (moment,) = _INT64.unpack_from(view, at)
    try:
        return _PG_EPOCH + timedelta(microseconds=moment)
    except OverflowError:
        raise stored_row_error(row, field, "is out of the range of Python's datetime") from None


def _read_json(text: bytes, row: int, field: str) -> Any:
    try:
        if field == "tags":
            return decode_tags(text)
        return decode_object(text)
    except _DECODE_FAILURES:
        what = "are not an object of strings" if field == "tags" else "is not a JSON object"
        raise stored_row_error(row, field, what) from None


def decode_events(rows: bytes | bytearray | memoryview, count: int) -> list[SequencedEvent | int]:
    """Decode ``count`` binary COPY rows of `EVENT_COLUMNS` (no header, no trailer) into the
    events readers get; an archived event's row (its ``hash`` NULL) becomes its position, an
    int, for the caller to read from its archive.

    Raises ``STORAGE_ERROR`` naming the row (0-based in ``rows``) and field for anything but
    exactly ``count`` well-formed rows, or a value no event can hold."""
    if not -(2**63) <= count < 2**63:  # the native function's argument checks, in its words
        raise OverflowError("Python int too large to convert to C ssize_t")
    if count < 0:
        raise ValueError("count must not be negative")
    view = bytes(rows)
    events: list[SequencedEvent | int] = []
    values: dict[str, Any] = {}
    fields = _fields(view, count, EVENT_COLUMNS, _EVENT_SIZES, stored_row_error, "hash")
    for row, field, at, length in fields:
        if field == "position":
            values = {"position": _INT64.unpack_from(view, at)[0]}
            continue
        if length >= 0:
            if field == "hash":
                values["hash"] = view[at : at + length]
            elif field == "event_id":
                values["event_id"] = uuid.UUID(bytes=view[at : at + length])
            elif field == "event_type":
                try:
                    values["event_type"] = view[at : at + length].decode("utf-8")
                except UnicodeDecodeError:
                    raise stored_row_error(row, field, "is not UTF-8") from None
            elif field in ("timestamp", "recorded_at"):
                values[field] = _read_time(view, at, row, field)
            elif field:
                values[field] = _read_json(view[at + 1 : at + length], row, field)
        if field == "data":
            if "hash" in values:
                events.append(SequencedEvent(**values))
            else:
                events.append(values["position"])
    return events


# ---------------------------------------------------------------------------------------------
# verifying: the hash chain recomputed over rows read back from the store


class Rehashed(NamedTuple):
    """What `rehash` found in a chunk of stored rows: ``checked`` rows from its start whose
    hashes match, chained to ``last_hash`` (the ``prev_hash`` given when none); and, when a row
    breaks the chain, its offset ``failed`` (-1 when none does) and ``kind``:

    - ``"missing"``: its position is not the next one (``detail``: the position it holds);
    - ``"encode"``: its JSON cannot be encoded as the codec encodes events (``detail``: why);
    - ``"hash"``: its stored hash is not the hash of its contents and predecessor."""

    checked: int
    last_hash: bytes
    failed: int = -1
    kind: str = ""
    detail: str = ""


_STORED_SIZES: Final = {"position": 8, "event_id": 16, "timestamp": 8, "hash": HASH_SIZE}


def stored_row_error(row: int, field: str, problem: str) -> EventStoreError:
    """The one wording of a malformed stored row read back for verifying (both codecs)."""
    return StorageError(f"stored row {row}: {field} {problem}", {"row": row, "field": field})


def stored_json_error(tags: Any, metadata: Any, data: Any, index: int) -> str | None:
    """Why JSON read back from the store cannot be encoded as `prepare` encodes events (its
    wording of the rule), or None when it can."""
    try:
        _check_tags(tags, index, None)
        _check_object(metadata, "metadata", index, None)
        _check_object(data, "data", index, None)
    except EventStoreError as exc:
        # Worded for a batch ("event <index>: ..."); the caller names the position.
        return exc.message.removeprefix(f"event {index}: ")
    return None


def read_stored_json(text: bytes) -> tuple[Any, str | None]:
    """One jsonb value as PostgreSQL prints it, decoded; or None and why it cannot be."""
    try:
        return msgspec.json.decode(text), None
    except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: invalid UTF-8
        return None, f"its stored JSON cannot be read: {exc}"
    except RecursionError:
        return None, "its stored JSON cannot be read: it is nested too deeply"


def canonical_json(text: bytes, tags: bool = False) -> bytes | None:
    """One stored jsonb field's text (an object) as the codec encodes it: decoded, made
    `canonical` (metadata and data) and encoded with sorted keys, as `rehash` does; None when
    the codec would refuse it (as tags when ``tags``). The native codec's ``canonical_json``
    gives these bytes, or None for text it leaves to msgspec."""
    value, problem = read_stored_json(text)
    if problem is not None:
        return None
    if tags:
        problem = stored_json_error(value, {}, {}, 0)
    else:
        problem = stored_json_error({}, value, {}, 0)
    if problem is not None:
        return None
    return _ENCODER.encode(value if tags else canonical(value))


def _stored_spans(view: bytes, count: int) -> list[list[tuple[int, int]]]:
    """Each row's fields as (start, length) spans of ``view``; the row itself first."""
    rows: list[list[tuple[int, int]]] = []
    for _, field, at, length in _fields(view, count, COPY_COLUMNS, _STORED_SIZES, stored_row_error):
        if not field:
            rows.append([])
        rows[-1].append((at, length))
    return rows


def rehash(
    rows: bytes | bytearray | memoryview, count: int, first_position: int, prev_hash: bytes
) -> Rehashed:
    """Recompute the hash chain over ``count`` binary COPY rows of `COPY_COLUMNS` read back
    from the store (jsonb as PostgreSQL prints it), expected at positions ``first_position``
    on, chained from ``prev_hash``.

    Each row's JSON is decoded and encoded again as `prepare` encodes it (canonical, keys
    sorted); the other fields are hashed as stored, which is how `prepare` lays them out. So a
    row hashes to its stored hash exactly when its contents and predecessor are those that
    were sealed. Malformed rows raise ``STORAGE_ERROR`` naming the row and field."""
    # The native function's argument checks, in its order and words (a C ssize_t, a C int64,
    # then its own checks), so that both refuse out-of-contract arguments alike.
    if not -(2**63) <= count < 2**63:
        raise OverflowError("Python int too large to convert to C ssize_t")
    if not -(2**63) <= first_position < 2**63:
        raise OverflowError("Python int too large to convert to C long")
    if len(prev_hash) != HASH_SIZE:
        raise ValueError("prev_hash must be 32 bytes")
    if count < 0:
        raise ValueError("count must not be negative")
    view = bytes(rows)
    spans = _stored_spans(view, count)
    limit, kind, detail = count, "", ""
    for i, row in enumerate(spans):
        (position,) = _INT64.unpack_from(view, row[1][0])
        if position != first_position + i:
            limit, kind, detail = i, "missing", str(position)
            break
    values: list[tuple[Any, Any, Any]] = []
    for i in range(limit):
        decoded = []
        for at, length in spans[i][5:8]:
            value, problem = read_stored_json(view[at + 1 : at + length])
            if problem is not None:
                break
            decoded.append(value)
        else:
            problem = stored_json_error(decoded[0], decoded[1], decoded[2], i)
        if problem is not None:
            limit, kind, detail = i, "encode", problem
            break
        tags, metadata, data = decoded
        values.append((tags, canonical(metadata), canonical(data)))
    for i in range(limit):
        row = spans[i]
        encoded = bytearray(view[row[0][0] : row[5][0] - 4])  # field count through timestamp
        for value in values[i]:
            text = _ENCODER.encode(value)
            encoded += _INT32.pack(len(text) + 1) + b"\x01" + text
        digest = hashlib.sha256(prev_hash + encoded).digest()
        at, length = row[8]
        if digest != view[at : at + length]:
            return Rehashed(i, prev_hash, i, "hash")
        prev_hash = digest
    if kind:
        return Rehashed(limit, prev_hash, limit, kind, detail)
    return Rehashed(count, prev_hash)
