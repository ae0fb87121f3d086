"""Reading binary ``COPY ... TO STDOUT``: the pieces both drivers share.

`CopyMessages` gathers psycopg's messages (one per row) into chunks of raw rows, when the
native reader (`tamma_events.ops.drive_async.native_rows_async`, which calls libpq's
``PQgetCopyData`` through the codec's ``read_copy``) cannot be used. The chunks go to the
codec's ``decode_rows`` (`tamma_events.codec.arrow.to_batch`) or ``decode_events``.
"""

from __future__ import annotations

from typing import Final

from tamma_events.codec.reference import COPY_HEADER, COPY_TRAILER
from tamma_events.errors import StorageError

__all__ = ["MAX_CHUNK_BYTES", "MAX_CHUNK_ROWS", "CopyMessages"]

# A chunk holds at most this many bytes (or rows): the int32 offsets of the string columns
# decoded from it stay far from their limit.
MAX_CHUNK_BYTES: Final = 256 << 20
MAX_CHUNK_ROWS: Final = 1 << 20


class CopyMessages:
    """Collects the messages of a binary COPY out (one per row; the first starts with the
    header, and the trailer comes alone, or after the header when there are no rows) into
    chunks of raw rows, back to back."""

    def __init__(self, max_rows: int = MAX_CHUNK_ROWS, max_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.pending = bytearray()
        self.count = 0
        self.header = True
        self.max_rows = max_rows
        self.max_bytes = max_bytes

    def add(self, message: memoryview | bytes | bytearray) -> tuple[bytearray, int] | None:
        """Take one message; a chunk ``(rows, count)`` when enough rows have gathered."""
        if self.header:
            if bytes(message[: len(COPY_HEADER)]) != COPY_HEADER:
                raise StorageError("the export's COPY header is not valid")
            message = message[len(COPY_HEADER) :]
            self.header = False
        if len(message) == 2 and bytes(message) == COPY_TRAILER:
            return None
        self.pending += message
        self.count += 1
        if len(self.pending) >= self.max_bytes or self.count >= self.max_rows:
            return self.flush()
        return None

    def flush(self) -> tuple[bytearray, int] | None:
        """The rows gathered and not yet returned (None when there are none)."""
        if not self.count:
            return None
        chunk = (self.pending, self.count)
        self.pending = bytearray()
        self.count = 0
        return chunk
