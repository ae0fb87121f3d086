"""Helpers shared by the codec tests, independent of both codecs: they read the documented row
layout with struct and the standard library only."""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql

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


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"


def copy_out(conn: psycopg.Connection[Any], statement: sql.Composable) -> tuple[bytes, int]:
    """The rows of ``COPY (statement) TO STDOUT (FORMAT BINARY)``, read through psycopg,
    without header and trailer, and their count."""
    copy_statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(statement)
    with conn.cursor() as cur, cur.copy(copy_statement) as copy:
        messages = [bytes(message) for message in copy]
    assert messages[0][: len(COPY_HEADER)] == COPY_HEADER
    messages[0] = messages[0][len(COPY_HEADER) :]
    assert messages[-1] == COPY_TRAILER
    rows = messages[:-1]
    return b"".join(rows), len(rows)


def decode_outcome(
    decoder: Callable[[bytes, int], Any], rows: bytes, count: int
) -> tuple[Any, ...]:
    """What a decoder of COPY rows did, comparable between the codecs: its result, or its error
    (EventStoreError compares code, message and context), or any other exception."""
    try:
        return ("ok", decoder(rows, count))
    except EventStoreError as exc:
        return ("error", exc)
    except Exception as exc:
        return ("exception", type(exc).__name__, str(exc))


def field(value: bytes | None) -> bytes:
    """One binary COPY field: its length (-1 for NULL) and its bytes."""
    return struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value


def check_cuts_and_miscounts(
    both: Callable[[bytes, int], tuple[Any, ...]],
    rows: bytes,
    count: int,
    columns: tuple[str, ...],
    error: Callable[[int, str, str], EventStoreError],
) -> None:
    """``both`` (the two codecs' common decoding outcome) reports every cut of ``rows`` as
    the row and field cut short, every one of them somewhere, and a count off by one as the
    row missing or the row too many; the rows twice over decode."""
    seen: set[tuple[int, str]] = set()
    for cut in range(len(rows)):
        result = both(rows[:cut], count)
        assert result[0] == "error"
        failure = result[1]
        assert failure.code == "STORAGE_ERROR"
        assert failure.message.endswith("is cut short")
        seen.add((failure.context["row"], failure.context["field"]))
    assert seen == {(r, f) for r in range(count) for f in ("row", *columns)}
    assert both(rows, count - 1) == (
        "error",
        error(count - 1, "row", "follows the last expected row"),
    )
    assert both(rows, count + 1) == ("error", error(count, "row", "is cut short"))
    assert both(rows + rows, 2 * count)[0] == "ok"
