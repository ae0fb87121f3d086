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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.parquet as pq

from tamma_events.codec.reference import DecodedRows

__all__ = [
    "EXPORT_SCHEMA",
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
