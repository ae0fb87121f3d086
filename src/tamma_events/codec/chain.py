"""Recomputing the hash chain over stored events: one check for the live log (`verify`) and
for archive files (`tamma_events.ops.archiving`).

Both hand the codec's `rehash` the rows as binary COPY of `COPY_COLUMNS` (the live log as the
server sends them, archives converted by `tamma_events.codec.arrow.stored_rows`). Each row is
re-encoded exactly as it was appended and sealed from the previous hash; the first row whose
recomputed hash differs from the stored one breaks the chain.
"""

from __future__ import annotations

from typing import NamedTuple

from tamma_events import codec as _codec
from tamma_events.errors import EventStoreError

__all__ = ["ChainBreak", "break_reason", "check_rows"]


class ChainBreak(NamedTuple):
    """Where a chunk breaks the chain: the row's offset in the chunk (every row before it
    hashed to its stored hash) and why."""

    offset: int
    reason: str


def break_reason(kind: str, position: int, detail: str) -> str:
    """Why the event at ``position`` breaks the chain, for a `rehash` result's ``kind``."""
    if kind == "missing":
        return f"event {position} is missing (the next stored position is {detail})"
    if kind == "encode":
        return f"event {position} cannot be re-encoded: {detail}"
    return f"event {position}'s hash does not match its contents and predecessor"


def check_rows(
    rows: bytes | bytearray | memoryview, count: int, first_position: int, prev_hash: bytes
) -> tuple[bytes, ChainBreak | None]:
    """Rehash ``count`` stored rows expected at positions ``first_position`` on, chained from
    ``prev_hash``: the last hash that matched, and the first break if any (a row whose stored
    values cannot even be read as an event's, such as a hash of the wrong length, breaks the
    chain where it stands)."""
    try:
        result = _codec.rehash(rows, count, first_position, prev_hash)
    except EventStoreError as exc:
        row = exc.context.get("row")
        if not isinstance(row, int):
            raise
        at = first_position + row
        return prev_hash, ChainBreak(
            row, exc.message.replace(f"stored row {row}", f"event {at}", 1)
        )
    if result.failed >= 0:
        at = first_position + result.failed
        return result.last_hash, ChainBreak(
            result.failed, break_reason(result.kind, at, result.detail)
        )
    return result.last_hash, None
