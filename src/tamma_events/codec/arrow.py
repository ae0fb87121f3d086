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

import array
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tamma_events.codec.reference import COPY_COLUMNS, PG_EPOCH_US, DecodedRows

__all__ = [
    "EXPORT_SCHEMA",
    "parquet_writer",
    "stored_rows",
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


# -- archived events as stored rows --------------------------------------------------------------


def _big_endian(values: pa.Array, width: int) -> pa.Array:
    """Integers (int32 or int64) as ``width``-byte big-endian binary values; nulls stay null."""
    numbers = array.array("i" if width == 4 else "q")
    assert numbers.itemsize == width
    start = values.offset * width
    numbers.frombytes(values.buffers()[1][start : start + len(values) * width])
    if sys.byteorder == "little":
        numbers.byteswap()
    ordered = pa.Array.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(numbers)])
    if values.null_count:
        ordered = pc.if_else(pc.is_valid(values), ordered, pa.scalar(None, ordered.type))
    return ordered


#: What a JSON string literal cannot hold as it is.
_NEEDS_ESCAPE: Final = re.compile(rb'["\\\x00-\x1f]')


def _json_strings(strings: pa.Array) -> pa.Array:
    """Strings escaped for the inside of JSON string literals (most need nothing, which one
    scan of their bytes finds)."""
    data = strings.buffers()[2]
    if data is None or not _NEEDS_ESCAPE.search(memoryview(data)):
        return strings
    escaped = pc.replace_substring(pc.replace_substring(strings, "\\", "\\\\"), '"', '\\"')
    for code in range(0x20):
        escaped = pc.replace_substring(escaped, chr(code), f"\\u{code:04x}")
    return escaped


def _plain(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One array of a column's storage: extension types unwrapped, dictionaries decoded."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(values, pa.ExtensionArray):
        values = values.storage
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values


#: A field's length in binary COPY when it is NULL.
_NULL_LENGTH: Final = struct.pack(">i", -1)
_JSONB_VERSION: Final = pa.scalar(b"\x01", pa.large_binary())
_NOTHING: Final = pa.scalar(b"", pa.large_binary())


def stored_rows(table: pa.Table | pa.RecordBatch) -> memoryview:
    """Events of `EXPORT_SCHEMA` (an archive's row group, say) as binary COPY rows of
    `COPY_COLUMNS`, the layout the codec's ``rehash`` reads back from the log: the tags as a
    JSON object, ``metadata`` and ``data`` as their stored jsonb text. Built column by column
    by Arrow's kernels, with no Python object per event. A null value (a damaged file) becomes
    a NULL field, which ``rehash`` reports as the row's."""
    tags = _plain(table.column("tags"))
    pairs = pc.binary_join_element_wise(
        '"', _json_strings(tags.keys), '":"', _json_strings(tags.items), '"', ""
    )
    listed = pa.ListArray.from_arrays(tags.offsets, pairs, mask=pc.is_null(tags))
    parts: list[pa.Array | pa.Scalar] = [pa.scalar(struct.pack(">h", len(COPY_COLUMNS)))]
    for name in COPY_COLUMNS:
        if name == "tags":
            values = pc.binary_join_element_wise("{", pc.binary_join(listed, ","), "}", "")
        else:
            values = _plain(table.column(name))
        if name == "timestamp":
            values = pc.subtract_checked(pc.cast(values, pa.int64()), PG_EPOCH_US)
        if name in ("position", "timestamp"):
            values = _big_endian(values, 8)
        values = pc.cast(values, pa.large_binary())
        if name in ("tags", "metadata", "data"):
            values = pc.binary_join_element_wise(_JSONB_VERSION, values, _NOTHING)
        length = _big_endian(pc.binary_length(values).cast(pa.int32()), 4)
        parts += [pc.fill_null(length, _NULL_LENGTH), pc.fill_null(values, b"")]
    rows = pc.binary_join_element_wise(
        *(pc.cast(part, pa.large_binary()) for part in parts), _NOTHING
    )
    if not len(rows):
        return memoryview(b"")
    ends = memoryview(rows.buffers()[1]).cast("q")
    return memoryview(rows.buffers()[2]).cast("B")[
        ends[rows.offset] : ends[rows.offset + len(rows)]
    ]


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
