"""Recomputing the hash chain over stored events: one check for the live log (`verify`) and
for archive files (`tamma_events.ops.archiving`).

Each stored event is re-encoded by the codec exactly as it was appended and sealed from the
previous hash; the first event whose recomputed hash differs from the stored one breaks the
chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from tamma_events import codec as _codec
from tamma_events.codec.reference import HASH_SIZE
from tamma_events.errors import EventStoreError
from tamma_events.model import DomainEvent

__all__ = ["ChainBreak", "first_break"]

# Re-encoding must never reject what was stored for size: the limit is the writer's policy.
_NO_SIZE_LIMIT: Final = 1 << 62


class ChainBreak(NamedTuple):
    """Where a batch breaks the chain: the event's offset in the batch, why, and whether the
    events before it were hashed (False when the batch could not be re-encoded at all)."""

    offset: int
    reason: str
    hashed: bool


def first_break(
    events: list[DomainEvent], first_position: int, prev_hash: bytes, stored: Sequence[bytes]
) -> ChainBreak | None:
    """The first of ``events`` (at positions ``first_position`` on, chained from
    ``prev_hash``) whose recomputed hash is not its ``stored`` one; None when all match."""
    try:
        prepared = _codec.prepare(events, _NO_SIZE_LIMIT)
    except EventStoreError as exc:
        index = int(exc.context.get("index", 0))
        return ChainBreak(
            index,
            f"event {first_position + index} cannot be re-encoded: {exc.message}",
            False,
        )
    _codec.seal(prepared, first_position, prev_hash)
    buffer, offsets = prepared.buffer, prepared.offsets
    for i, hash_ in enumerate(stored):
        if bytes(buffer[offsets[i + 1] - HASH_SIZE : offsets[i + 1]]) != bytes(hash_):
            return ChainBreak(
                i,
                f"event {first_position + i}'s hash does not match its contents and predecessor",
                True,
            )
    return None
