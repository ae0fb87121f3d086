"""Reading binary ``COPY ... TO STDOUT``: the pieces both drivers share.

`CopyMessages` gathers psycopg's messages (one per row) into chunks of raw rows; `native_rows`
is the sync driver's native reader, which calls libpq's ``PQgetCopyData`` through the codec's
``read_copy`` (`tamma_events.ops.libpq`), with no Python object per row. The chunks go to the
codec's ``decode_rows`` (`tamma_events.codec.arrow.to_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import psycopg
import psycopg.errors
from psycopg import pq as libpq

from tamma_events.codec.reference import COPY_HEADER, COPY_TRAILER
from tamma_events.errors import StorageError

__all__ = ["MAX_CHUNK_BYTES", "MAX_CHUNK_ROWS", "CopyMessages", "native_rows"]

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


def native_rows(
    conn: psycopg.Connection[Any], functions: tuple[int, int, int], max_rows: int, max_bytes: int
) -> Iterator[tuple[bytes | bytearray, int]]:
    """The rows of the COPY in progress on ``conn``, read by the native ``read_copy``; then
    the command's result, read as psycopg would (its error raised as psycopg's)."""
    from tamma_events._native import read_copy

    first = True
    while True:
        rows, count, status = read_copy(*functions, max_rows, max_bytes, first)
        first = False
        if status == -2:
            message = conn.pgconn.error_message.decode(errors="replace").strip()
            raise psycopg.OperationalError(f"reading the export failed: {message}")
        if status == -1:
            # libpq holds the command's result: read it (and any other) before handing over
            # the last rows, so that the connection is idle even if the caller stops there.
            failure = None
            while (result := conn.pgconn.get_result()) is not None:
                if result.status != libpq.ExecStatus.COMMAND_OK and failure is None:
                    failure = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            if failure is not None:
                raise failure
        if count:
            yield rows, count
        if status == -1:
            return
