"""Compaction to Parquet archives, and reading archived events back.

`compact` moves the oldest part of the log (the events recorded before a given time) into
Parquet files of `tamma_events.codec.arrow.EXPORT_SCHEMA`, one per contiguous range of positions, in
this order for each file:

1. write it beside its final name, fsync it, rename it into place and fsync the directory;
2. verify it by reading it back: row count, first and last position, the hash chain from the
   previous archive's last hash through every event, and the file's SHA-256;
3. record it in the manifest (the ``archives`` table);
4. in one transaction, copy each event's id, type, time and tags to ``archived_events`` (which
   keeps DCB conditions and id uniqueness whole), delete the events from the log (the one delete
   the immutability trigger lets through: positions covered by the manifest and indexed in
   ``archived_events``), and mark the manifest row compacted.

A crash at any point leaves every event in the log or in a verified file listed in the
manifest (or both, until step 4 commits). Running `compact` again finishes the job: a file
without a manifest row is written again, a manifest row not yet compacted is verified again and
compacted.

`ArchiveReader` serves the read paths: archived events come back as the same JSON text the log
would have returned, so every read path decodes them the same way.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import msgspec
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql

from tamma_events import codec as _codec
from tamma_events.codec.arrow import EXPORT_SCHEMA, stored_rows, to_batch, write_parquet
from tamma_events.codec.chain import check_rows
from tamma_events.codec.reference import GENESIS_HASH
from tamma_events.errors import StorageError
from tamma_events.ops.drive import copy_rows
from tamma_events.ops.steps import Op, Run
from tamma_events.sql import statements_of

__all__ = [
    "STEPS",
    "ArchiveFile",
    "ArchiveReader",
    "CompactionStep",
    "compact",
    "verify_archives",
]

#: Events per archive file, and per row group inside it (a read of one archived event decodes
#: its row group).
FILE_EVENTS: Final = 1_000_000
ROW_GROUP_EVENTS: Final = 16_384

#: The steps of compacting one file, in order; a fault hook is called after each.
CompactionStep = Literal["written", "verified", "recorded", "compacted"]
STEPS: Final[tuple[CompactionStep, ...]] = ("written", "verified", "recorded", "compacted")

_json = msgspec.json.Encoder()


class ArchiveFile(NamedTuple):
    """One manifest row."""

    first_position: int
    last_position: int
    path: Path
    events: int
    size: int
    sha256: bytes
    prev_hash: bytes
    last_hash: bytes
    compacted: bool


def manifest(
    conn: psycopg.Connection[Any], schema: str, directory: Path | None = None
) -> list[ArchiveFile]:
    """The manifest, in position order. A file missing from the directory it was written to
    is looked for in ``directory`` (archives moved elsewhere)."""
    return _manifest_files(conn.execute(statements_of(schema).manifest).fetchall(), directory)


def _manifest_files(rows: list[Any], directory: Path | None) -> list[ArchiveFile]:
    files = []
    for first, last, where, name, events, size, digest, prev, last_hash, done in rows:
        path = Path(where) / name
        if directory is not None and not path.exists() and (directory / name).exists():
            path = directory / name
        files.append(
            ArchiveFile(
                first,
                last,
                path,
                events,
                size,
                bytes(digest),
                bytes(prev),
                bytes(last_hash),
                done,
            )
        )
    return files


def file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


class _Broken(Exception):
    """An archive file does not hold what its manifest row says."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


def _columns(table: pa.Table) -> dict[str, list[Any]]:
    """The columns of `EXPORT_SCHEMA` rows as Python lists, taken from the arrays' storage
    (converting extension and map values one by one costs several times more): ``event_id``
    as 16 bytes, times as microseconds since the Unix epoch, ``metadata`` and ``data`` as
    JSON text, ``tags`` as dicts."""
    columns: dict[str, list[Any]] = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if isinstance(array, pa.ExtensionArray):
            array = array.storage
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        if pa.types.is_timestamp(array.type):
            array = array.cast(pa.int64())
        if name == "tags":
            keys, values = array.keys.to_pylist(), array.items.to_pylist()
            offsets = array.offsets.to_pylist()
            columns[name] = [
                dict(zip(keys[a:b], values[a:b], strict=True))
                for a, b in itertools.pairwise(offsets)
            ]
        else:
            columns[name] = array.to_pylist()
    return columns


def chain_row_groups(
    parquet: pq.ParquetFile,
    first_position: int,
    prev_hash: bytes,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, bytes]:
    """Recompute the hash chain over the events of an archive's row groups, expected at
    positions ``first_position`` on and chained from ``prev_hash``: natively, as `verify` does
    over the log (`stored_rows` hands ``rehash`` each row group as the log's rows). Returns the
    position after the last event and the last hash; raises `_Broken` at the first mismatch."""
    expected, chain = first_position, prev_hash
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        chain, broken = check_rows(stored_rows(table), table.num_rows, expected, chain)
        if broken is not None:
            raise _Broken(expected + broken.offset, broken.reason)
        expected += table.num_rows
        if progress is not None:
            progress(table.num_rows)
    return expected, chain


def check_file(
    file: ArchiveFile, prev_hash: bytes, progress: Callable[[int], None] | None = None
) -> None:
    """Verify one archive file against its manifest row; raises `_Broken` naming the first
    bad position."""
    try:
        digest = file_sha256(file.path)
    except OSError as exc:
        raise _Broken(file.first_position, f"{file.path} cannot be read: {exc}") from None
    if digest != file.sha256:
        raise _Broken(
            file.first_position,
            f"{file.path.name} (positions {file.first_position}-{file.last_position}) does"
            " not match its SHA-256 in the manifest",
        )
    if file.prev_hash != prev_hash:
        raise _Broken(
            file.first_position,
            f"{file.path.name} does not chain from the previous archive's last hash",
        )
    try:
        with pq.ParquetFile(file.path) as parquet:
            if parquet.metadata.num_rows != file.events:
                raise _Broken(
                    file.first_position,
                    f"{file.path.name} holds {parquet.metadata.num_rows} events, not {file.events}",
                )
            expected, chain = chain_row_groups(parquet, file.first_position, prev_hash, progress)
    except (OSError, pa.ArrowException) as exc:
        raise _Broken(file.first_position, f"{file.path.name} cannot be read: {exc}") from None
    if expected != file.last_position + 1:
        raise _Broken(expected, f"{file.path.name} ends before position {file.last_position}")
    if chain != file.last_hash:
        raise _Broken(file.last_position, f"{file.path.name}'s last hash is not the manifest's")


def verify_archives(
    files: list[ArchiveFile], progress: Callable[[int], None] | None = None
) -> tuple[bytes, int, tuple[int, str] | None]:
    """Verify the compacted archives in order, from the genesis hash: the last hash, how many
    events were checked, and the first break (position, reason) if any."""
    chain = GENESIS_HASH
    checked = 0
    expected = 1
    for file in files:
        if not file.compacted:
            break
        if file.first_position != expected:
            return chain, checked, (expected, f"no archive holds position {expected}")
        try:
            check_file(file, chain, progress)
        except _Broken as broken:
            return chain, checked, (broken.position, broken.reason)
        chain = file.last_hash
        checked += file.events
        expected = file.last_position + 1
    return chain, checked, None


class ArchiveReader:
    """Reads archived events by position, with the manifest and recently used row groups
    cached (archive files never change)."""

    def __init__(self, schema: str, directory: Path | None = None, cached_groups: int = 8) -> None:
        self.schema = schema
        self.directory = directory
        self._files: list[ArchiveFile] = []
        self._groups: OrderedDict[tuple[Path, int], pa.Table] = OrderedDict()
        self._starts: dict[Path, list[int]] = {}
        self._cached_groups = cached_groups
        self._lock = threading.Lock()

    def _find(self, position: int) -> ArchiveFile | None:
        for file in self._files:
            if file.first_position <= position <= file.last_position and file.compacted:
                return file
        return None

    def _file(self, position: int) -> ArchiveFile:
        file = self._find(position)
        if file is None:
            raise StorageError(
                f"event {position} is neither in the log nor in an archive",
                {"position": position},
            )
        return file

    def _group(self, file: ArchiveFile, position: int) -> tuple[pa.Table, int]:
        """The decoded row group holding ``position``, and the position of its first row."""
        starts = self._starts.get(file.path)
        if starts is None:
            metadata = pq.read_metadata(file.path)
            starts = [file.first_position]
            for group in range(metadata.num_row_groups):
                starts.append(starts[-1] + metadata.row_group(group).num_rows)
            self._starts[file.path] = starts
        group = bisect.bisect_right(starts, position) - 1
        if not 0 <= group < len(starts) - 1:
            raise StorageError(
                f"{file.path.name} does not hold position {position}",
                {"position": position},
            )
        key = (file.path, group)
        table = self._groups.get(key)
        if table is None:
            # Opened for the read and closed: no file handle stays open between reads.
            with pq.ParquetFile(file.path) as parquet:
                table = parquet.read_row_group(group)
            self._groups[key] = table
            while len(self._groups) > self._cached_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return table, starts[group]

    def table(self, positions: Iterable[int]) -> Op[pa.Table]:
        """The archived events at ``positions``, in that order, as `EXPORT_SCHEMA` rows (an
        operation: the manifest is read again when it does not cover them)."""
        wanted = list(positions)
        if any(self._find(position) is None for position in wanted):
            rows = yield Run(statements_of(self.schema).manifest)
            self._files = _manifest_files(rows, self.directory)
        pieces = []
        try:
            with self._lock:
                i = 0
                while i < len(wanted):
                    position = wanted[i]
                    table, first = self._group(self._file(position), position)
                    # A run of consecutive positions in the same row group is one slice.
                    j = i + 1
                    while (
                        j < len(wanted)
                        and wanted[j] == wanted[j - 1] + 1
                        and wanted[j] - first < table.num_rows
                    ):
                        j += 1
                    pieces.append(table.slice(position - first, j - i))
                    i = j
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"an archive file cannot be read: {exc}", {}) from exc
        if not pieces:
            return EXPORT_SCHEMA.empty_table()
        return pa.concat_tables(pieces).combine_chunks()

    def json_texts(self, positions: list[int]) -> Op[list[str]]:
        """The archived events at ``positions`` as the JSON texts the log returns for events
        (`tamma_events.sql.EVENT_JSON`)."""
        table = yield from self.table(positions)
        return json_texts(table)


def json_texts(table: pa.Table) -> list[str]:
    """Events of `EXPORT_SCHEMA` as `tamma_events.sql.EVENT_JSON` texts; ``metadata`` and
    ``data`` are PostgreSQL's own jsonb texts, kept verbatim."""
    c = _columns(table)
    # Times as ISO 8601 in UTC with microseconds, formatted by Arrow for the whole column.
    times = [
        pc.strftime(table.column(name), format="%Y-%m-%dT%H:%M:%SZ").to_pylist()
        for name in ("timestamp", "recorded_at")
    ]
    encode = _json.encode
    return [
        f'{{"position":{position},"event_id":"{_uuid_text(event_id.hex())}",'
        f'"event_type":{encode(event_type).decode()},'
        f'"timestamp":"{ts}","tags":{encode(tags).decode()},'
        f'"metadata":{metadata},"data":{data},"recorded_at":"{recorded}",'
        f'"hash":"{base64.b64encode(digest).decode()}"}}'
        for position, event_id, event_type, ts, tags, metadata, data, recorded, digest in zip(
            c["position"],
            c["event_id"],
            c["event_type"],
            times[0],
            c["tags"],
            c["metadata"],
            c["data"],
            times[1],
            c["hash"],
            strict=True,
        )
    ]


def _uuid_text(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- compaction --------------------------------------------------------------------------------


def _range_to_archive(conn: psycopg.Connection[Any], schema: str, before: datetime) -> int:
    """The last position of the prefix of the log recorded before ``before``."""
    row = conn.execute(statements_of(schema).prefix_before, [before]).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _write_file(
    conn: psycopg.Connection[Any],
    schema: str,
    directory: Path,
    first: int,
    last: int,
    row_group_size: int,
) -> Path:
    statement = statements_of(schema).export_range
    path = directory / f"events-{first:020d}-{last:020d}.parquet"
    step = row_group_size * 4

    def batches() -> Iterable[pa.RecordBatch]:
        for start in range(first, last + 1, step):
            end = min(start + step - 1, last)
            yield from copy_batches(conn, statement, [start, end])

    reader = pa.RecordBatchReader.from_batches(EXPORT_SCHEMA, batches())
    written = write_parquet(reader, path, row_group_size=row_group_size)
    if written != last - first + 1:
        path.unlink(missing_ok=True)
        raise StorageError(
            f"the log holds {written} events at positions {first}-{last}, not {last - first + 1}",
            {"first_position": first, "last_position": last},
        )
    return path


def compact(
    conn: psycopg.Connection[Any],
    schema: str,
    before: datetime,
    directory: Path,
    *,
    file_events: int = FILE_EVENTS,
    row_group_size: int = ROW_GROUP_EVENTS,
    progress: Callable[[int, int], None] | None = None,
    fault: Callable[[CompactionStep, int, int], None] | None = None,
) -> int:
    """Archive the events recorded before ``before`` (see the module's docstring); returns how
    many events left the log. ``progress(done, total)`` follows the events archived;
    ``fault(step, first, last)`` is called after each step of each file (tests use it to stop
    a compaction half-way)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    moved = 0
    # The manifest's unfinished rows first: their files were verified once; verify again.
    files = manifest(conn, schema)
    chain = GENESIS_HASH
    for file in files:
        if not file.compacted:
            check_pending(file, chain)
            moved += _delete(conn, schema, file)
            if fault is not None:
                fault("compacted", file.first_position, file.last_position)
        chain = file.last_hash
    archived = files[-1].last_position if files else 0
    target = _range_to_archive(conn, schema, before)
    total = max(0, target - archived)
    done = 0
    first = archived + 1
    while first <= target:
        last = min(first + file_events - 1, target)
        path = _write_file(conn, schema, directory, first, last, row_group_size)
        if fault is not None:
            fault("written", first, last)
        size = path.stat().st_size
        last_hash = _read_last_hash(path)
        file = ArchiveFile(
            first, last, path, last - first + 1, size, file_sha256(path), chain, last_hash, False
        )
        check_pending(file, chain)
        if fault is not None:
            fault("verified", first, last)
        conn.execute(
            statements_of(schema).record_archive,
            [
                first,
                last,
                path.name,
                str(directory),
                file.events,
                size,
                file.sha256,
                chain,
                last_hash,
            ],
        )
        if fault is not None:
            fault("recorded", first, last)
        moved += _delete(conn, schema, file)
        if fault is not None:
            fault("compacted", first, last)
        chain = last_hash
        done += file.events
        if progress is not None:
            progress(done, total)
        first = last + 1
    return moved


def _read_last_hash(path: Path) -> bytes:
    with pq.ParquetFile(path) as parquet:
        group = parquet.read_row_group(parquet.num_row_groups - 1, columns=["hash"])
    return bytes(group.column("hash")[-1].as_py())


def check_pending(file: ArchiveFile, prev_hash: bytes) -> None:
    """Verify a file before its events leave the log; STORAGE_ERROR when it fails."""
    try:
        check_file(file, prev_hash)
    except _Broken as broken:
        raise StorageError(
            f"archive {file.path.name} failed verification: {broken.reason}",
            {
                "first_position": file.first_position,
                "last_position": file.last_position,
                "position": broken.position,
            },
        ) from None


def _delete(conn: psycopg.Connection[Any], schema: str, file: ArchiveFile) -> int:
    """Step 4: index the file's events, delete them from the log, mark the row compacted."""
    statements = statements_of(schema)
    with conn.transaction():
        # The summaries count the archived events too: fold the tail before it leaves the log.
        row = conn.execute(statements.fold_everything).fetchone()
        if row is None or row[0] < file.last_position:
            raise StorageError(
                "the query summaries could not be folded before compacting (is the session"
                " READ COMMITTED and read-write?); nothing was deleted",
                {"first_position": file.first_position, "last_position": file.last_position},
            )
        conn.execute(statements.index_archived, [file.first_position, file.last_position])
        deleted = conn.execute(
            statements.delete_range, [file.first_position, file.last_position]
        ).rowcount
        if deleted != file.events:
            raise StorageError(
                f"the log held {deleted} of the {file.events} events archived in"
                f" {file.path.name}; nothing was deleted",
                {"first_position": file.first_position, "last_position": file.last_position},
            )
        conn.execute(statements.mark_compacted, [file.first_position])
    return deleted


def copy_batches(
    conn: psycopg.Connection[Any], statement: sql.Composable, params: list[Any]
) -> Iterator[pa.RecordBatch]:
    """Run ``COPY (statement) TO STDOUT (FORMAT BINARY)``, whose columns are `EXPORT_SELECT`,
    and yield its rows as record batches (several when they exceed a few hundred MB)."""
    for rows, count in copy_rows(conn, statement, params):
        yield to_batch(_codec.decode_rows(rows, count))
