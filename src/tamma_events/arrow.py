"""Events as Apache Arrow: the export schema, and batches decoded from binary COPY.

An export reads ``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)`` and hands the rows to the codec's
``decode_rows`` (native, or the pure-Python reference), which writes them straight into the
buffers of Arrow arrays: no Python object is made per event. The column types:

- ``position``: int64;
- ``event_id``: the ``arrow.uuid`` extension type (16 bytes, the UUID's own): DuckDB, Polars
  and Parquet's UUID logical type understand it, and it is half the size of text;
- ``event_type``: dictionary-encoded strings (a log has few types);
- ``timestamp``, ``recorded_at``: ``timestamp[us, UTC]``, PostgreSQL's own precision;
- ``tags``: ``map<string, string>``, in the order PostgreSQL's jsonb keeps them;
- ``metadata``, ``data``: the ``arrow.json`` extension type over strings, PostgreSQL's jsonb
  text;
- ``hash``: ``fixed_size_binary(32)``, the event's link in the hash chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import psycopg
import psycopg.errors
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import pq as libpq
from psycopg import sql

from . import _codec
from ._libpq import copy_functions
from ._pycodec import COPY_HEADER, COPY_TRAILER, DecodedRows
from .errors import StorageError

__all__ = [
    "EXPORT_SCHEMA",
    "EXPORT_SELECT",
    "copy_batches",
    "copy_batches_async",
    "copy_rows",
    "parquet_writer",
    "to_batch",
    "write_arrow_file",
    "write_parquet",
]

EXPORT_SCHEMA: Final = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),
        pa.field("event_id", pa.uuid(), nullable=False),
        pa.field("event_type", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("tags", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("metadata", pa.json_(), nullable=False),
        pa.field("data", pa.json_(), nullable=False),
        pa.field("hash", pa.binary(32), nullable=False),
    ]
)

#: The export's columns as a SELECT list, in the order `decode_rows` reads them.
EXPORT_SELECT: Final = sql.SQL(
    'position, event_id, event_type, "timestamp", recorded_at, tags, metadata, data, hash'
)

# A batch's rows are decoded at most this many bytes (or rows) at a time: the int32 offsets of
# its string columns stay far from their limit.
_MAX_BATCH_BYTES: Final = 256 << 20
_MAX_BATCH_ROWS: Final = 1 << 20


def _strings(offsets: bytes, data: bytes) -> pa.Array:
    return pa.Array.from_buffers(
        pa.string(), len(offsets) // 4 - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def to_batch(rows: DecodedRows) -> pa.RecordBatch:
    """The decoded rows as one record batch of `EXPORT_SCHEMA` (zero-copy over their buffers,
    except for the event types' dictionary)."""
    n = rows.num_rows

    def fixed(kind: pa.DataType, values: bytes) -> pa.Array:
        return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(values)])

    tags = pa.MapArray.from_arrays(
        pa.Array.from_buffers(pa.int32(), n + 1, [None, pa.py_buffer(rows.tag_offsets)]),
        _strings(rows.key_offsets, rows.key_data),
        _strings(rows.value_offsets, rows.value_data),
        type=EXPORT_SCHEMA.field("tags").type,
    )
    columns = [
        fixed(pa.int64(), rows.position),
        pa.ExtensionArray.from_storage(pa.uuid(), fixed(pa.binary(16), rows.event_id)),
        _strings(rows.type_offsets, rows.type_data).dictionary_encode(),
        fixed(pa.timestamp("us", tz="UTC"), rows.timestamp),
        fixed(pa.timestamp("us", tz="UTC"), rows.recorded_at),
        tags,
        pa.ExtensionArray.from_storage(
            pa.json_(), _strings(rows.metadata_offsets, rows.metadata_data)
        ),
        pa.ExtensionArray.from_storage(pa.json_(), _strings(rows.data_offsets, rows.data_data)),
        fixed(pa.binary(32), rows.hash),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=EXPORT_SCHEMA)


class _CopyMessages:
    """Collects the messages of a binary COPY out (one per row; the first starts with the
    header, and the trailer comes alone, or after the header when there are no rows) into
    chunks of raw rows, back to back."""

    def __init__(self, max_rows: int = _MAX_BATCH_ROWS, max_bytes: int = _MAX_BATCH_BYTES) -> None:
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


def _copy_out(statement: sql.Composable) -> sql.Composed:
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(statement)


def copy_rows(
    conn: psycopg.Connection[Any],
    statement: sql.Composable,
    params: list[Any],
    *,
    max_rows: int = _MAX_BATCH_ROWS,
    max_bytes: int = _MAX_BATCH_BYTES,
) -> Generator[tuple[bytes | bytearray, int], None, None]:
    """Run ``COPY (statement) TO STDOUT (FORMAT BINARY)`` and yield its rows raw, as chunks
    ``(rows, count)`` of at most ``max_rows`` rows, cut once ``max_bytes`` are gathered
    (header and trailer dropped).

    With the native codec, the rows are read by its ``read_copy`` straight from libpq (see
    `tamma_events._libpq`); otherwise through psycopg's ``Copy``, a message per row."""
    messages = _CopyMessages(max_rows, max_bytes)
    with conn.cursor() as cur, cur.copy(_copy_out(statement), params) as copy:
        functions = copy_functions(conn) if _codec.IMPL == "native" else None
        if functions is not None:
            yield from _native_rows(conn, functions, max_rows, max_bytes)
            return
        for message in copy:
            if (chunk := messages.add(message)) is not None:
                yield chunk
    if (chunk := messages.flush()) is not None:
        yield chunk


def copy_batches(
    conn: psycopg.Connection[Any], statement: sql.Composable, params: list[Any]
) -> Iterator[pa.RecordBatch]:
    """Run ``COPY (statement) TO STDOUT (FORMAT BINARY)``, whose columns are `EXPORT_SELECT`,
    and yield its rows as record batches (several when they exceed a few hundred MB)."""
    for rows, count in copy_rows(conn, statement, params):
        yield to_batch(_codec.decode_rows(rows, count))


async def copy_batches_async(
    conn: psycopg.AsyncConnection[Any], statement: sql.Composable, params: list[Any]
) -> list[pa.RecordBatch]:
    """`copy_batches` on an async connection, through psycopg's ``AsyncCopy`` (the event
    loop runs between messages)."""
    messages = _CopyMessages()
    batches = []
    async with conn.cursor() as cur, cur.copy(_copy_out(statement), params) as copy:
        async for message in copy:
            if (chunk := messages.add(message)) is not None:
                batches.append(to_batch(_codec.decode_rows(*chunk)))
    if (chunk := messages.flush()) is not None:
        batches.append(to_batch(_codec.decode_rows(*chunk)))
    return batches


def _native_rows(
    conn: psycopg.Connection[Any], functions: tuple[int, int, int], max_rows: int, max_bytes: int
) -> Iterator[tuple[bytes, int]]:
    """The rows of the COPY in progress on ``conn``, read by the native ``read_copy``; then
    the command's result, read as psycopg would (its error raised as psycopg's)."""
    from ._native import read_copy

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


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in the directory ``path`` durable (a no-op where the
    platform cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; once the block ends, the file is synced,
    renamed over ``path`` and the directory synced, so ``path`` holds the whole file or its
    old content. When the block fails, the temporary file is removed."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


@contextmanager
def parquet_writer(
    path: str | os.PathLike[str],
    schema: pa.Schema,
    *,
    compression: str = "zstd",
    row_group_size: int = 131_072,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Callable[[pa.RecordBatch], int]]:
    """A function writing record batches to the Parquet file ``path`` (`atomic_file`); it
    returns how many rows were written so far, and calls ``progress`` with that."""
    written = 0
    with (
        atomic_file(path) as temporary,
        pq.ParquetWriter(temporary, schema, compression=compression) as writer,
    ):

        def write(batch: pa.RecordBatch) -> int:
            nonlocal written
            writer.write_batch(batch, row_group_size=row_group_size)
            written += int(batch.num_rows)
            if progress is not None:
                progress(written)
            return written

        yield write


def write_parquet(
    reader: pa.RecordBatchReader,
    path: str | os.PathLike[str],
    *,
    compression: str = "zstd",
    row_group_size: int = 131_072,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``reader``'s batches to the Parquet file ``path`` (`atomic_file`); returns how
    many rows were written."""
    written = 0
    with parquet_writer(
        path,
        reader.schema,
        compression=compression,
        row_group_size=row_group_size,
        progress=progress,
    ) as write:
        for batch in reader:
            written = write(batch)
    return written


def write_arrow_file(
    reader: pa.RecordBatchReader,
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``reader``'s batches to the Arrow IPC file ``path`` (`atomic_file`); returns how
    many rows were written."""
    written = 0
    with atomic_file(path) as temporary, pa.OSFile(str(temporary), "wb") as sink:
        with pa.ipc.new_file(sink, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
                written += batch.num_rows
                if progress is not None:
                    progress(written)
    return written
