"""The store's database work, written once for the sync and the async store.

Every operation that talks to PostgreSQL is a generator (an `Op`): it yields the steps it
needs (a statement, a COPY in or out, a rollback, a pause) and is sent each step's result, or
has the step's exception thrown into it. It never touches a connection itself, and a step is
only the description of some I/O: `tamma_events.ops.drive.run` does the steps on a
`psycopg.Connection`, `tamma_events.ops.drive_async.run_async` on a `psycopg.AsyncConnection`
(the first is generated from the second). Decoding what comes back is the operation's job.
This is psycopg's own arrangement (its protocol is generators that a sync and an async waiter
drive), and it is why `tamma_events.stores.aio.AsyncEventStore` has no second copy of the store's
logic: appends, conditions, queries, pages, exports and archives are the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any, Literal, TypeVar

from psycopg import sql

__all__ = ["CopyIn", "CopyOut", "Op", "Rollback", "Rows", "Run", "Sleep", "Step"]

_T = TypeVar("_T")

#: What a `Run` returns: all rows, the first row, nothing, or the first row of the last of
#: several statements sent together.
Rows = Literal["all", "one", "none", "last"]


class Step:
    """One piece of database work an operation asks for."""

    __slots__ = ()


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
        fetch: Rows = "all",
        prepare: bool | None = None,
    ) -> None:
        self.query = query
        self.params = params
        self.fetch = fetch
        self.prepare = prepare


class CopyIn(Step):
    """``COPY ... FROM STDIN`` sending ``chunks`` (consumed as they are sent: they may be
    produced while earlier ones travel)."""

    __slots__ = ("chunks", "query")

    def __init__(self, query: sql.Composed, chunks: Iterable[bytes | bytearray | memoryview]):
        self.query = query
        self.chunks = chunks


class CopyOut(Step):
    """``COPY (query) TO STDOUT (FORMAT BINARY)``; the result is its rows, raw, as a list of
    chunks ``(rows, count)`` (header and trailer dropped) for the codec's ``decode_rows``.

    With ``decode``, the result is the list of ``decode(rows, count)`` of the chunks instead,
    each decoded as soon as it is read: with small chunks (``max_rows`` rows, or ``max_bytes``
    bytes; the driver's defaults when None), the client decodes while the server still sends
    the rows that follow."""

    __slots__ = ("decode", "max_bytes", "max_rows", "params", "query")

    def __init__(
        self,
        query: sql.Composable,
        params: list[Any],
        *,
        decode: Callable[[bytes | bytearray, int], Any] | None = None,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.query = query
        self.params = params
        self.decode = decode
        self.max_rows = max_rows
        self.max_bytes = max_bytes


class Rollback(Step):
    """Leave the connection idle: roll back a transaction in progress (or, if that fails,
    close the connection, so its pool replaces it)."""

    __slots__ = ()


class Sleep(Step):
    """Wait (a replica catching up, say) without holding the event loop."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
