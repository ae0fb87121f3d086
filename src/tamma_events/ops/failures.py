"""What a failure of psycopg or the pool means for the store: the connection was lost (the
operation may run again on another), or the statement failed (it may not)."""

from __future__ import annotations

import psycopg
from psycopg_pool import PoolClosed, PoolTimeout

from tamma_events.errors import STORAGE_ERROR, EventStoreError

__all__ = ["connection_lost", "outage"]

#: SQLSTATEs of a session the server ended: admin_shutdown, crash_shutdown, cannot_connect_now.
_ENDED = frozenset({"57P01", "57P02", "57P03"})


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection (not the statement) failed: the session was ended
    or the link broke, or no connection could be had. A statement timeout, a deadlock or a
    closed pool is not."""
    if isinstance(exc, PoolClosed):
        return False
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    sqlstate = exc.sqlstate
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _ENDED


def outage(exc: BaseException) -> bool:
    """Whether ``exc`` is the database or the network failing, not a statement: a lost
    connection, raised by psycopg or the pool, or reported by the store (a `StorageError`
    caused by one). Worth waiting out and trying again."""
    if isinstance(exc, EventStoreError):
        return (
            exc.code == STORAGE_ERROR
            and exc.__cause__ is not None
            and connection_lost(exc.__cause__)
        )
    return connection_lost(exc)
