"""The store's database work, written once for the sync and the async store.

Every operation that talks to PostgreSQL is a generator (an `Op`): it yields the steps it
needs (a statement, a COPY in or out, a rollback) and is sent each step's result, or has the
step's exception thrown into it. It never touches a connection itself. `run` drives an
operation on a `psycopg.Connection`, `run_async` on a `psycopg.AsyncConnection`; the two are
the only places where sync and async differ, and each step knows how to do itself both ways.
This is psycopg's own arrangement (its protocol is generators that a sync and an async waiter
drive), and it is why `tamma_events.aio.AsyncEventStore` has no second copy of the store's
logic: appends, conditions, queries, pages, exports and archives are the same code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Iterable
from typing import Any, Literal, TypeVar

import psycopg
import pyarrow as pa
from psycopg import pq, sql

__all__ = ["CopyIn", "CopyOut", "Op", "Rollback", "Run", "Sleep", "Step", "run", "run_async"]

_T = TypeVar("_T")

Fetch = Literal["all", "one", "none", "last"]


class Step:
    """One piece of database work an operation asks for."""

    __slots__ = ()

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> Any:
        raise NotImplementedError

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> Any:
        raise NotImplementedError


#: An operation: yields `Step`s, is sent their results, returns its own.
Op = Generator[Step, Any, _T]


class Run(Step):
    """Execute a statement; the result is its rows (``fetch="all"``), its first row
    (``"one"``), nothing (``"none"``), or the first row of the last of several statements
    sent together in the simple protocol (``"last"``).

    Filter statements pass ``prepare=False``: a plan made for the actual values (a selective
    tag or a whole provider) is worth the planning time, where a generic plan can be orders of
    magnitude off."""

    __slots__ = ("fetch", "params", "prepare", "query")

    def __init__(
        self,
        query: sql.Composable | str | bytes,
        params: Any = None,
        *,
        fetch: Fetch = "all",
        prepare: bool | None = None,
    ) -> None:
        self.query = query
        self.params = params
        self.fetch = fetch
        self.prepare = prepare

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> Any:
        cur.execute(self.query, self.params, prepare=self.prepare)  # type: ignore[arg-type]
        if self.fetch == "all":
            return cur.fetchall()
        if self.fetch == "last":
            while cur.nextset():
                pass
        return cur.fetchone() if self.fetch != "none" else None

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> Any:
        await cur.execute(self.query, self.params, prepare=self.prepare)  # type: ignore[arg-type]
        if self.fetch == "all":
            return await cur.fetchall()
        if self.fetch == "last":
            while cur.nextset():
                pass
        return await cur.fetchone() if self.fetch != "none" else None


class CopyIn(Step):
    """``COPY ... FROM STDIN`` sending ``chunks`` (consumed as they are sent: they may be
    produced while earlier ones travel)."""

    __slots__ = ("chunks", "query")

    def __init__(self, query: sql.Composed, chunks: Iterable[bytes | bytearray | memoryview]):
        self.query = query
        self.chunks = chunks

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        with cur.copy(self.query) as copy:
            for chunk in self.chunks:
                copy.write(chunk)

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> None:
        async with cur.copy(self.query) as copy:
            for chunk in self.chunks:
                await copy.write(chunk)


class CopyOut(Step):
    """``COPY (statement) TO STDOUT (FORMAT BINARY)`` of `tamma_events.arrow.EXPORT_SELECT`
    rows; the result is a list of record batches."""

    __slots__ = ("params", "query")

    def __init__(self, query: sql.Composable, params: list[Any]) -> None:
        self.query = query
        self.params = params

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> list[pa.RecordBatch]:
        from .arrow import copy_batches

        return list(copy_batches(conn, self.query, self.params))

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> list[pa.RecordBatch]:
        from .arrow import copy_batches_async

        return await copy_batches_async(conn, self.query, self.params)


class Rollback(Step):
    """Leave the connection idle: roll back a transaction in progress (or, if that fails,
    close the connection, so its pool replaces it)."""

    __slots__ = ()

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        rollback(conn)

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> None:
        await rollback_async(conn)


class Sleep(Step):
    """Wait (a replica catching up, say) without holding the event loop."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def sync(self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any]) -> None:
        time.sleep(self.seconds)

    async def run_async(
        self, conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any]
    ) -> None:
        await asyncio.sleep(self.seconds)


def rollback(conn: psycopg.Connection[Any]) -> None:
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


async def rollback_async(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn.closed or conn.info.transaction_status == pq.TransactionStatus.IDLE:
        return
    try:
        await conn.execute("ROLLBACK")
    except psycopg.Error:
        await conn.close()


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
                value = step.sync(conn, cur)
            except Exception as exc:
                error = exc
    except BaseException:
        op.close()
        if owned:
            rollback(conn)
        raise
    finally:
        cur.close()


async def run_async(conn: psycopg.AsyncConnection[Any], op: Op[_T], *, owned: bool = True) -> _T:
    """`run` for an async connection."""
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
                value = await step.run_async(conn, cur)
            except Exception as exc:
                error = exc
    except BaseException:
        op.close()
        if owned:
            await rollback_async(conn)
        raise
    finally:
        await cur.close()
