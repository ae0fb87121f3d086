"""The store's LISTEN connection: a task here, a thread in the sync store.

`tamma_events.streaming.listen_async.AsyncListener` is the async store's, a task of its event loop;
`tamma_events.streaming.listen.Listener`, generated from it by ``scripts/async_to_sync.py``, is the
sync store's, a daemon thread. Both drain every notification as it arrives and announce it to the
subscriptions (`tamma_events.streaming.subscriptions.ListenerBase`); after `HEAD_CHECK_INTERVAL`
seconds of silence they read the head themselves. They differ in how they wait: the task awaits
psycopg's ``notifies``; the thread sleeps in ``select`` on the connection and on a socket `close`
writes to, so that closing the store does not wait for the silence to end.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from tamma_events.sql import listen
from tamma_events.streaming.subscriptions import (
    FIRST_DELAY,
    HEAD_CHECK_INTERVAL,
    LAST_DELAY,
    ListenerBase,
    position_of,
)

__all__ = ["AsyncListener"]


class AsyncListener(ListenerBase):
    """The store's LISTEN connection: news of appends (see `tamma_events.streaming.subscriptions`).

    ``connect`` opens a connection in autocommit mode; ``channel`` and ``head`` are statements
    returning the channel to listen on and the current head. `start` starts the listener (a
    task of the running event loop, or a thread); it reconnects, with backoff, whenever the
    connection fails, and after each (re)connection it reads the head, so what committed while
    it was away is announced too.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        channel: sql.Composed,
        head: sql.Composed,
    ) -> None:
        super().__init__(channel, head)
        self._connect = connect
        if True:  # ASYNC
            self._task: asyncio.Task[None] | None = None
        else:
            # `close` writes to this pair to wake the thread from its wait on the connection.
            self._wake_r, self._wake_w = socket.socketpair()
            self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening (the async store's listener on the running event loop)."""
        if True:  # ASYNC
            if self._task is None and not self._closing.is_set():
                self._task = asyncio.get_running_loop().create_task(
                    self._run(), name="tamma-events-listener"
                )
        else:
            with self._cond:
                if self._thread is None and not self._closing.is_set():
                    self._thread = threading.Thread(
                        target=self._run, name="tamma-events-listener", daemon=True
                    )
                    self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening and close the connection; waiters wake up. The thread is waited for
        up to ``timeout`` seconds; the task ends at its next step (`aclose` waits for it)."""
        if self._closing.is_set():
            return
        self._closing.set()
        if True:  # ASYNC
            self.wake_all()
            if self._task is not None:
                self._task.cancel()
        else:
            self._wake_w.send(b"x")
            self.wake_all()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
            self._wake_w.close()
            if thread is None or not thread.is_alive():
                self._wake_r.close()

    if True:  # ASYNC

        async def aclose(self) -> None:
            """`close`, then wait for the task to end."""
            task = self._task
            self.close()
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = FIRST_DELAY
        while not self._closing.is_set():
            try:
                async with await self._connect() as conn:
                    cur = await conn.execute(self._channel_statement)
                    row = await cur.fetchone()
                    channel = str(row[0]) if row else ""
                    await conn.execute(listen(channel))
                    cur = await conn.execute(self._head_statement)
                    row = await cur.fetchone()
                    self.connected = True
                    delay = FIRST_DELAY
                    self.announce(int(row[0]) if row else 0, always=True)
                    while not self._closing.is_set():
                        await self._hear(conn, channel)
            except asyncio.CancelledError:
                break
            except Exception as exc:
                if not self._lost(exc, delay):
                    break
            finally:
                self.connected = False
                # Waiting subscriptions read on their own while the listener is away.
                self.wake_all()
            if True:  # ASYNC
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    break
            else:
                self._closing.wait(delay)
            delay = min(delay * 2, LAST_DELAY)

    async def _hear(self, conn: psycopg.AsyncConnection[Any], channel: str) -> None:
        """Announce the notifications that arrive; after `HEAD_CHECK_INTERVAL` seconds of
        silence, read the head: the store's one fallback poll, for appends that notified no
        one (triggers disabled for a restore, or a pooler that does not pass notifications on),
        and a check that a silent connection is still there."""
        if True:  # ASYNC
            heard = False
            async for note in conn.notifies(timeout=HEAD_CHECK_INTERVAL, stop_after=1):
                heard = True
                if note.channel == channel:
                    self.announce(position_of(note.payload), always=True)
            if heard:
                return
        else:
            for note in conn.notifies(timeout=0):
                if note.channel == channel:
                    self.announce(position_of(note.payload), always=True)
            # Sleep until the server sends something or `close` wakes us.
            ready, _, _ = select.select(
                [conn.fileno(), self._wake_r.fileno()], [], [], HEAD_CHECK_INTERVAL
            )
            if self._wake_r.fileno() in ready:
                self._wake_r.recv(64)
                return
            if ready:
                return
        cur = await conn.execute(self._head_statement)
        row = await cur.fetchone()
        self.announce(int(row[0]) if row else 0)
