"""Verifying the hash chain: `verify` walks the log in position order and recomputes it.

Each event's hash is ``sha256(previous hash || canonical row bytes)``, the row bytes being
exactly what the codec encodes for the event at its position (see ``docs/integrity.md``). The
walk re-encodes every stored event with the codec, from what PostgreSQL returns, so any change
to a stored field, a removed, inserted or reordered event, or a log cut short behind the head
shows up as the first position where the chain breaks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psycopg

from tamma_events.checks import whole
from tamma_events.codec.chain import check_rows
from tamma_events.errors import StorageError, ValidationFailed
from tamma_events.ops.archiving import manifest, verify_archives
from tamma_events.ops.drive import copy_rows
from tamma_events.sql import EXPORT_SNAPSHOT, SNAPSHOT, import_snapshot, statements_of

__all__ = ["IntegrityReport", "verify"]

_T = TypeVar("_T")

# Rows are rehashed a chunk at a time: at most ``batch_size`` rows, cut at this many bytes.
_CHUNK_BYTES = 64 << 20


class IntegrityReport(msgspec.Struct, frozen=True):
    """What `verify` found. ``first_bad_position`` is the first position where the chain
    breaks (None when ``ok``); ``checked`` counts the events whose hash was recomputed."""

    ok: bool
    checked: int
    first_bad_position: int | None = None
    reason: str | None = None
    start: int = 1
    end: int = 0


@contextmanager
def _read_ahead(chunks: Generator[_T, None, None]) -> Iterator[Iterator[_T]]:
    """``chunks``, with the next one read by a worker thread while the caller rehashes the
    current one (the native COPY reader waits on the server without the GIL). Leaving the block
    waits for the read in flight, then closes ``chunks``, ending the COPY."""
    with ThreadPoolExecutor(1, thread_name_prefix="tamma-events-verify") as worker:
        reading: Future[_T | None] | None = worker.submit(next, chunks, None)

        def items() -> Iterator[_T]:
            nonlocal reading
            while reading is not None:
                item = reading.result()
                reading = None
                if item is None:
                    return
                reading = worker.submit(next, chunks, None)
                yield item

        try:
            yield items()
        finally:
            if reading is not None:
                try:
                    reading.result()
                except Exception:  # the caller is already leaving; its own error wins
                    pass
            chunks.close()


def _one_stream(
    conn: psycopg.Connection[Any], statement: Any, first: int, last: int, batch_size: int
) -> AbstractContextManager[Iterator[tuple[bytes | bytearray, int]]]:
    """The rows of positions ``first`` to ``last``, in order, by one COPY on ``conn``, in
    chunks of ``batch_size``, the next one read ahead (`_read_ahead`)."""
    return _read_ahead(
        copy_rows(conn, statement, [first, last], max_rows=batch_size, max_bytes=_CHUNK_BYTES)
    )


@contextmanager
def _two_streams(
    conn: psycopg.Connection[Any],
    second: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
    statement: Any,
    first: int,
    last: int,
    batch_size: int,
) -> Iterator[Iterator[tuple[bytes | bytearray, int]]]:
    """The rows of positions ``first`` to ``last``, in order, read as ranges of ``batch_size``
    positions by two COPY streams at once: on ``conn``, and on a ``second()`` connection that
    imports ``conn``'s snapshot, so both read the same log. One stream is bound by the server
    producing its rows; two keep two of its cores busy while the client rehashes. Leaving the
    block waits for the reads in flight. When no second connection can be had (the server's
    connection limit, say), one stream reads the range."""
    row = conn.execute(EXPORT_SNAPSHOT).fetchone()
    assert row is not None
    with ExitStack() as stack:
        other: psycopg.Connection[Any] | None
        try:
            other = stack.enter_context(second())
        except StorageError:
            other = None
        if other is None:
            with _one_stream(conn, statement, first, last, batch_size) as ahead:
                yield ahead
            return
        stack.enter_context(other.transaction())
        other.execute(SNAPSHOT)
        other.execute(import_snapshot(row[0]))
        connections = (conn, other)
        reading: deque[Future[list[tuple[bytes | bytearray, int]]]] = deque()

        def read(at: int, lo: int, hi: int) -> list[tuple[bytes | bytearray, int]]:
            rows = copy_rows(
                connections[at], statement, [lo, hi], max_rows=batch_size, max_bytes=_CHUNK_BYTES
            )
            return list(rows)

        with ThreadPoolExecutor(2, thread_name_prefix="tamma-events-verify") as pool:

            def items() -> Iterator[tuple[bytes | bytearray, int]]:
                lo, turn = first, 0
                while lo <= last or reading:
                    while lo <= last and len(reading) < 2:
                        hi = min(lo + batch_size - 1, last)
                        reading.append(pool.submit(read, turn % 2, lo, hi))
                        lo, turn = hi + 1, turn + 1
                    yield from reading.popleft().result()

            try:
                yield items()
            finally:
                for future in reading:
                    try:
                        future.result()
                    except Exception:  # the caller is already leaving; its own error wins
                        pass


def _break(checked: int, position: int, reason: str, start: int, end: int) -> IntegrityReport:
    return IntegrityReport(False, checked, position, reason, start, end)


def verify(
    conn: psycopg.Connection[Any],
    schema: str,
    start: int | None = None,
    end: int | None = None,
    *,
    batch_size: int = 5_000,
    progress: Callable[[int, int], None] | None = None,
    archives: Path | None = None,
    check_archives: bool = False,
    second: Callable[[], AbstractContextManager[psycopg.Connection[Any]]] | None = None,
) -> IntegrityReport:
    """Verify positions ``start`` to ``end`` (default: the whole log up to the head) in one
    snapshot, with memory bounded by ``batch_size`` events.

    Verifying from ``start`` > 1 trusts the stored hash of event ``start - 1`` as the anchor
    (for the first live event after compaction, the last archived hash in the manifest).
    With ``check_archives``, when the range reaches into the compacted prefix, every archive
    file (in ``archives``, when they were moved) is verified first, whole, from the genesis
    hash; the live log is anchored on the last of them. ``progress(done, total)`` is called
    after every batch. With ``second`` (a connection of its own, for the block it opens), a
    range of more than one batch is read by two COPY streams at once, in the same snapshot.

    An ``end`` past the head stops at the head. A ``start`` past the head, or after ``end``,
    is a mistaken range, not a broken chain: VALIDATION_FAILED naming ``start``.
    """
    for name, bound in (("start", start), ("end", end)):
        if bound is not None:
            whole(bound, name, "a position (an int from 1) or None", low=1)
    if start is not None and end is not None and start > end:
        raise ValidationFailed(
            f"start {start} is after end {end}: the range holds no position",
            {"field": "start", "end": end},
        )
    statements = statements_of(schema)
    with conn.transaction():
        conn.execute(SNAPSHOT)
        head_row = conn.execute(statements.head_row).fetchone()
        genesis_row = conn.execute(statements.genesis).fetchone()
        if head_row is None or genesis_row is None:
            raise StorageError("the head or chain row is missing")
        head, head_hash = int(head_row[0]), bytes(head_row[1])
        if start is not None and start > head:
            # Nothing is stored there yet: a mistaken range, not a broken chain.
            raise ValidationFailed(
                f"start {start} is past the head, position {head}: there is nothing to verify"
                " there yet",
                {"field": "start", "head": head},
            )
        files = [f for f in manifest(conn, schema, archives) if f.compacted]
        archived = files[-1].last_position if files else 0
        first = asked = max(1, start or 1)
        last = head if end is None else min(end, head)
        checked = 0
        if check_archives and files and first <= archived:
            total = max(0, last - first + 1)
            done = [0]

            def step(events: int) -> None:
                done[0] += events
                if progress is not None:
                    progress(done[0], total)

            _, checked, broken = verify_archives(files, step)
            if broken is not None:
                return _break(checked, broken[0], broken[1], first, last)
        if files and first <= archived:
            # Compaction deleted these positions from the log: a row there was written since.
            row = conn.execute(statements.first_position_to, [archived]).fetchone()
            if row is not None and row[0] is not None:
                return _break(
                    checked,
                    int(row[0]),
                    f"event {row[0]} is in the log although its position was compacted",
                    first,
                    last,
                )
        if first <= archived + 1 and files:
            first = archived + 1
            prev_hash = files[-1].last_hash
        elif first == 1:
            prev_hash = bytes(genesis_row[0])
        else:
            row = conn.execute(statements.hash_at, [first - 1]).fetchone()
            if row is None:
                return _break(
                    0, first - 1, f"event {first - 1} (the anchor) is missing", first, last
                )
            prev_hash = bytes(row[0])

        expected = first
        statement = statements.chain_rows
        total = max(0, last - asked + 1)
        source: AbstractContextManager[Iterator[tuple[bytes | bytearray, int]]]
        if second is not None and last - first + 1 > batch_size:
            source = _two_streams(conn, second, statement, first, last, batch_size)
        else:
            source = _one_stream(conn, statement, first, last, batch_size)
        with source as ahead:
            for rows, count in ahead:
                prev_hash, broken = check_rows(rows, count, expected, prev_hash)
                if broken is not None:
                    at = expected + broken.offset
                    return _break(checked + broken.offset, at, broken.reason, first, last)
                checked += count
                expected += count
                if progress is not None:
                    progress(checked, total)
        if expected <= last:
            return _break(
                checked,
                expected,
                f"the log ends at position {expected - 1} but the head is at {head}",
                first,
                last,
            )
        if end is None or end >= head:
            beyond = conn.execute(statements.first_position_after, [head]).fetchone()
            if beyond is not None and beyond[0] is not None:
                return _break(
                    checked,
                    int(beyond[0]),
                    f"event {beyond[0]} lies beyond the head ({head})",
                    first,
                    last,
                )
            if head_hash != prev_hash and head >= first:
                return _break(
                    checked, head, "the head's hash does not match the last event's", first, last
                )
            if head == 0 and head_hash != prev_hash:
                return _break(checked, 0, "the head's hash is not the genesis hash", first, last)
    return IntegrityReport(True, checked, None, None, asked, last)
