"""Doing an operation's steps on a connection.

The operations (`tamma_events.ops.steps`) only describe their I/O; `run_async` in
`tamma_events.ops.drive_async` does it on a ``psycopg.AsyncConnection``, and `run` in
`tamma_events.ops.drive`, generated from that module by ``scripts/async_to_sync.py``, on a
``psycopg.Connection``. Both read ``COPY ... TO STDOUT`` rows with the native codec's
``read_copy`` straight from libpq (`tamma_events.ops.libpq`); the one real difference is how
they wait for the server: the sync reader inside libpq, the async one on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Callable
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

__all__ = ["copy_rows_async", "native_rows_async", "rollback_async", "run_async"]

# `read_copy`'s statuses: no whole row buffered yet (async only), the end, a libpq failure.
_WOULD_BLOCK = 1
_END = -1
_FAILED = -2
if True:  # ASYNC
    #: Chunks of more rows than this the async reader reads in a worker thread: waking on the
    #: event loop for every few rows that arrive cost an export half its speed.
    THREAD_ROWS = 4_096

_T = TypeVar("_T")


async def rollback_async(conn: psycopg.AsyncConnection[Any]) -> None:
    """Leave ``conn`` idle: roll back its transaction, or close it when that fails (its pool
    then replaces it)."""
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        await conn.execute(ROLLBACK)
    except psycopg.Error:
        await conn.close()


async def run_async(conn: psycopg.AsyncConnection[Any], op: Op[_T], *, owned: bool = True) -> _T:
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
                value = await _do_async(step, conn, cur)
            except Exception as exc:
                error = exc
    except BaseException:
        op.close()
        if owned:
            await rollback_async(conn)
        raise
    finally:
        await cur.close()


async def _do_async(
    step: Step, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
) -> Any:
    if isinstance(step, Run):
        await cur.execute(step.query, step.params, prepare=step.prepare)  # type: ignore[arg-type]
        if step.fetch == "all":
            return await cur.fetchall()
        if step.fetch == "last":
            while cur.nextset():
                pass
        return await cur.fetchone() if step.fetch != "none" else None
    if isinstance(step, CopyIn):
        async with cur.copy(step.query) as copy:
            for chunk in step.chunks:
                await copy.write(chunk)
        return None
    if isinstance(step, CopyOut):
        chunks = copy_rows_async(
            conn,
            step.query,
            step.params,
            max_rows=step.max_rows or MAX_CHUNK_ROWS,
            max_bytes=step.max_bytes or MAX_CHUNK_BYTES,
        )
        if step.decode is None:
            return [chunk async for chunk in chunks]
        decode = step.decode
        return [decode(rows, count) async for rows, count in chunks]
    if isinstance(step, Rollback):
        await rollback_async(conn)
        return None
    if isinstance(step, Sleep):
        if True:  # ASYNC
            await asyncio.sleep(step.seconds)
        else:
            time.sleep(step.seconds)
        return None
    raise TypeError(f"not a step: {step!r}")


if True:  # ASYNC

    async def _wait_readable(conn: psycopg.AsyncConnection[Any]) -> None:
        """Wait until ``conn``'s socket has data, then have libpq take it in."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fileno = conn.pgconn.socket

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fileno, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fileno)
        conn.pgconn.consume_input()

    async def _read_in_thread(read: Callable[[], _T]) -> _T:
        """``read()`` (a blocking read of libpq) in a worker thread. When the caller is
        cancelled meanwhile, the read is waited for all the same: the connection must not be
        touched by two threads, and the caller's way out (ending the COPY) touches it."""
        reading = asyncio.get_running_loop().run_in_executor(None, read)
        try:
            return await asyncio.shield(reading)
        except asyncio.CancelledError:
            while not reading.done():
                try:
                    await asyncio.shield(reading)
                except asyncio.CancelledError:
                    pass
                except Exception:
                    break
            raise


if True:  # ASYNC

    async def native_rows_async(
        conn: psycopg.AsyncConnection[Any],
        functions: tuple[int, int, int],
        max_rows: int,
        max_bytes: int,
    ) -> AsyncGenerator[tuple[bytes | bytearray, int], None]:
        """The rows of the COPY in progress on ``conn``, read by the native ``read_copy`` (see
        `tamma_events.ops.libpq`); then the command's result, read as psycopg would (its
        error raised as psycopg's).

        The sync reader waits inside libpq, without the GIL. The async one reads chunks of
        more than `THREAD_ROWS` rows (exports) the same way, in a worker thread; smaller ones
        (pages, streams) it takes as libpq receives them, waiting for the socket on the event
        loop. A task cancelled meanwhile leaves the connection as psycopg's way out of the
        COPY expects it."""
        chunks = _copy_data_async(conn, functions, max_rows, max_bytes)
        try:
            async for chunk in chunks:
                yield chunk
        except asyncio.CancelledError:
            _settle(conn)
            raise
        finally:
            await chunks.aclose()

else:

    def native_rows_async(
        conn: psycopg.AsyncConnection[Any],
        functions: tuple[int, int, int],
        max_rows: int,
        max_bytes: int,
    ) -> AsyncGenerator[tuple[bytes | bytearray, int], None]:
        """The rows of the COPY in progress on ``conn``, read by the native ``read_copy`` (see
        `tamma_events.ops.libpq`) without the GIL, waiting inside libpq; then the command's
        result, read as psycopg would (its error raised as psycopg's)."""
        return _copy_data_async(conn, functions, max_rows, max_bytes)


if True:  # ASYNC

    def _settle(conn: psycopg.AsyncConnection[Any]) -> None:
        """After a read cancelled: when libpq is already past the COPY's data (the reader took
        its end), take the command's result, which follows at once, so that psycopg's way out
        finds the COPY over rather than cancelling one libpq no longer has. A COPY still
        sending is left to psycopg, which cancels it and reads the rest."""
        pgconn = conn.pgconn
        if pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return
        try:
            taken, _ = pgconn.get_copy_data(1)
        except psycopg.OperationalError:  # "no COPY in progress": the reader took its end
            taken = -1
        if taken < 0:
            while pgconn.get_result() is not None:
                pass


async def _copy_data_async(
    conn: psycopg.AsyncConnection[Any],
    functions: tuple[int, int, int],
    max_rows: int,
    max_bytes: int,
) -> AsyncGenerator[tuple[bytes | bytearray, int], None]:
    """`native_rows_async`'s reading."""
    from tamma_events._native import read_copy

    first = True
    while True:
        if True:  # ASYNC
            if max_rows > THREAD_ROWS:
                rows, count, status = await _read_in_thread(
                    functools.partial(read_copy, *functions, max_rows, max_bytes, first)
                )
            else:
                rows, count, status = read_copy(*functions, max_rows, max_bytes, first, True)
        else:
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
                if True:  # ASYNC
                    while conn.pgconn.is_busy():
                        await _wait_readable(conn)
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
        if True:  # ASYNC
            if status == _WOULD_BLOCK:
                await _wait_readable(conn)


async def copy_rows_async(
    conn: psycopg.AsyncConnection[Any],
    statement: sql.Composable,
    params: list[Any],
    *,
    max_rows: int = MAX_CHUNK_ROWS,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> AsyncGenerator[tuple[bytes | bytearray, int], None]:
    """Run ``COPY (statement) TO STDOUT (FORMAT BINARY)`` and yield its rows raw, as chunks
    ``(rows, count)`` of at most ``max_rows`` rows, cut once ``max_bytes`` are gathered
    (header and trailer dropped).

    With the native codec, the rows are read by its ``read_copy`` straight from libpq (see
    `tamma_events.ops.libpq`); otherwise through psycopg's ``Copy``, a message per row."""
    messages = CopyMessages(max_rows, max_bytes)
    async with conn.cursor() as cur, cur.copy(copy_out(statement), params) as copy:
        functions = copy_functions(conn) if _codec.IMPL == "native" else None
        if functions is not None:
            async for rows in native_rows_async(conn, functions, max_rows, max_bytes):
                yield rows
            return
        async for message in copy:
            if (chunk := messages.add(message)) is not None:
                yield chunk
    if (chunk := messages.flush()) is not None:
        yield chunk
