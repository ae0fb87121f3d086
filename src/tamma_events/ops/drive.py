# WARNING: generated from src/tamma_events/ops/drive_async.py by scripts/async_to_sync.py.
# DO NOT CHANGE! Change the original file instead, then run the script.
"""Doing an operation's steps on a connection.

The operations (`tamma_events.ops.steps`) only describe their I/O; `run_async` in
`tamma_events.ops.drive_async` does it on a ``psycopg.AsyncConnection``, and `run` in
`tamma_events.ops.drive`, generated from that module by ``scripts/async_to_sync.py``, on a
``psycopg.Connection``. Both read ``COPY ... TO STDOUT`` rows with the native codec's
``read_copy`` straight from libpq (`tamma_events.ops.libpq`); the one real difference is how
they wait for the server: the sync reader inside libpq, the async one on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, TypeVar

import psycopg
from psycopg import pq, sql

from tamma_events import codec as _codec
from tamma_events.ops.copy import (
    MAX_CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    CopyMessages,
)
from tamma_events.ops.libpq import copy_functions
from tamma_events.ops.steps import CopyIn, CopyOut, Op, Rollback, Run, Sleep, Step
from tamma_events.sql import ROLLBACK, copy_out

__all__ = ["copy_rows", "native_rows", "rollback", "run"]

# `read_copy`'s statuses: no whole row buffered yet (async only), the end, a libpq failure.
_WOULD_BLOCK = 1
_END = -1
_FAILED = -2
_T = TypeVar("_T")


def rollback(conn: psycopg.Connection[Any]) -> None:
    """Leave ``conn`` idle: roll back its transaction, or close it when that fails (its pool
    then replaces it)."""
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute(ROLLBACK)
    except psycopg.Error:
        conn.close()


def run(conn: psycopg.Connection[Any], op: Op[_T], *, owned: bool = True) -> _T:
    """Drive ``op`` on ``conn``. On a failure the operation does not handle, a transaction it
    left open on an ``owned`` connection (the store's, not a caller's) is rolled back."""
    cur = conn.cursor()
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                step = op.send(value) if error is None else op.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value = error = None
            try:
                value = _do(step, conn, cur)
            except Exception as exc:
                error = exc
    except BaseException:
        op.close()
        if owned:
            rollback(conn)
        raise
    finally:
        cur.close()


def _do(step: Step, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> Any:
    if isinstance(step, Run):
        cur.execute(step.query, step.params, prepare=step.prepare)  # type: ignore[arg-type]
        if step.fetch == "all":
            return cur.fetchall()
        if step.fetch == "last":
            while cur.nextset():
                pass
        return cur.fetchone() if step.fetch != "none" else None
    if isinstance(step, CopyIn):
        with cur.copy(step.query) as copy:
            for chunk in step.chunks:
                copy.write(chunk)
        return None
    if isinstance(step, CopyOut):
        chunks = copy_rows(
            conn,
            step.query,
            step.params,
            max_rows=step.max_rows or MAX_CHUNK_ROWS,
            max_bytes=step.max_bytes or MAX_CHUNK_BYTES,
        )
        if step.decode is None:
            return [chunk for chunk in chunks]
        decode = step.decode
        return [decode(rows, count) for rows, count in chunks]
    if isinstance(step, Rollback):
        rollback(conn)
        return None
    if isinstance(step, Sleep):
        time.sleep(step.seconds)
        return None
    raise TypeError(f"not a step: {step!r}")


def native_rows(
    conn: psycopg.Connection[Any],
    functions: tuple[int, int, int],
    max_rows: int,
    max_bytes: int,
) -> Generator[tuple[bytes | bytearray, int], None, None]:
    """The rows of the COPY in progress on ``conn``, read by the native ``read_copy`` (see
    `tamma_events.ops.libpq`) without the GIL, waiting inside libpq; then the command's
    result, read as psycopg would (its error raised as psycopg's)."""
    return _copy_data(conn, functions, max_rows, max_bytes)


def _copy_data(
    conn: psycopg.Connection[Any],
    functions: tuple[int, int, int],
    max_rows: int,
    max_bytes: int,
) -> Generator[tuple[bytes | bytearray, int], None, None]:
    """`native_rows`'s reading."""
    from tamma_events._native import read_copy

    first = True
    while True:
        rows, count, status = read_copy(*functions, max_rows, max_bytes, first)
        # The header comes with the first row (or with the trailer, when there are none, and
        # then no row follows): once a row is read, or the data ends, it is behind us.
        first = first and not count and status == _WOULD_BLOCK
        if status == _FAILED:
            message = conn.pgconn.error_message.decode(errors="replace").strip()
            raise psycopg.OperationalError(f"reading the export failed: {message}")
        if status == _END:
            # libpq holds the command's result: read it (and any other) before handing over
            # the last rows, so that the connection is idle even if the caller stops there.
            failure = None
            while True:
                result = conn.pgconn.get_result()
                if result is None:
                    break
                if result.status != pq.ExecStatus.COMMAND_OK and failure is None:
                    failure = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
            if failure is not None:
                raise failure
        if count:
            yield rows, count
        if status == _END:
            return


def copy_rows(
    conn: psycopg.Connection[Any],
    statement: sql.Composable,
    params: list[Any],
    *,
    max_rows: int = MAX_CHUNK_ROWS,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> Generator[tuple[bytes | bytearray, int], None, None]:
    """Run ``COPY (statement) TO STDOUT (FORMAT BINARY)`` and yield its rows raw, as chunks
    ``(rows, count)`` of at most ``max_rows`` rows, cut once ``max_bytes`` are gathered
    (header and trailer dropped).

    With the native codec, the rows are read by its ``read_copy`` straight from libpq (see
    `tamma_events.ops.libpq`); otherwise through psycopg's ``Copy``, a message per row."""
    messages = CopyMessages(max_rows, max_bytes)
    with conn.cursor() as cur, cur.copy(copy_out(statement), params) as copy:
        functions = copy_functions(conn) if _codec.IMPL == "native" else None
        if functions is not None:
            for rows in native_rows(conn, functions, max_rows, max_bytes):
                yield rows
            return
        for message in copy:
            if (chunk := messages.add(message)) is not None:
                yield chunk
    if (chunk := messages.flush()) is not None:
        yield chunk
