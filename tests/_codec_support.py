"""Helpers shared by the codec tests, independent of both codecs: they read the documented row
layout with struct and the standard library only."""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from tamma_events.errors import EventStoreError

#: Row bytes besides event_type and the three JSON texts (see _pycodec's layout).
ROW_OVERHEAD = 2 + 8 * 4 + 8 + 16 + 8 + 3 + 32


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """What a prepare did, comparable between implementations: the rows, or the error
    (EventStoreError compares code, message and context), or any other exception by type and
    arguments."""
    try:
        batch = fn()
    except EventStoreError as exc:
        return ("error", exc)
    except Exception as exc:
        return ("exception", type(exc).__name__, exc.args)
    return ("ok", bytes(batch.buffer), list(batch.offsets), batch.count)


def split_fields(row: bytes) -> list[bytes]:
    """The values of one binary COPY row, checking its field count and length words."""
    (count,) = struct.unpack_from(">h", row, 0)
    assert count == 8
    fields = []
    at = 2
    for _ in range(count):
        (size,) = struct.unpack_from(">i", row, at)
        assert size >= 0
        fields.append(row[at + 4 : at + 4 + size])
        at += 4 + size
    assert at == len(row), "the row has bytes after its 8 fields"
    return fields


def parse_iso(text: str) -> datetime:
    """An ISO-8601 string parsed by the standard library (which reads "Z" only from 3.11)."""
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def micros_since_2000(value: datetime) -> int:
    """Microseconds from 2000-01-01 UTC, by calendar arithmetic on the local wall time."""
    offset = value.utcoffset()
    assert offset is not None
    days = value.toordinal() - date(2000, 1, 1).toordinal()
    local = ((days * 24 + value.hour) * 60 + value.minute) * 60 + value.second
    offset_us = (offset.days * 86400 + offset.seconds) * 1_000_000 + offset.microseconds
    return local * 1_000_000 + value.microsecond - offset_us


def depth_of(value: Any) -> int:
    """Nesting depth: a scalar is 0, a container one more than its deepest item."""
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0
