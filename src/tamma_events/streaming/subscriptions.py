"""Subscriptions: catch up from a position, then follow the log as events are committed.

Every append moves the store's head in its transaction, and notifies the store's channel with
the new position. One listener per store holds the only LISTEN connection
(`tamma_events.streaming.listen`: a daemon thread, or a task of the async store's loop): it drains
every notification as it arrives (a listener that stops reading would hold up PostgreSQL's
notification queue for the whole server) and counts them as news. A `Subscription` never learns its
events from a notification; it reads them, after the last position it has read, from the store's
pool, whenever there is news:

- Positions are gapless and commit order is position order (the head lock, docs/design.md), so
  reading ``position > p`` again and again never skips and never repeats an event.
- The notification only says when to read. The listener also reads the head itself after
  `HEAD_CHECK_INTERVAL` seconds without one, and after each (re)connection, so an append that
  notified no one delays a read by at most that; the subscriptions themselves only poll while
  the listener is disconnected. One store's subscriptions cost the database one poll, not one
  each.
- The subscription reads at most ``buffer`` events at a time, and only when its consumer has
  taken the previous ones: a slow consumer holds back the reads instead of growing memory.
- A read that fails because the connection dropped is retried, with backoff, from the same
  position, for up to ``retry_for`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import psycopg
import psycopg.errors
from psycopg import sql

from tamma_events.checks import seconds, whole
from tamma_events.errors import EventStoreError, QueryError
from tamma_events.model import SequencedEvent
from tamma_events.ops.failures import outage

__all__ = ["MAX_BUFFER", "ListenerBase", "Subscription"]

logger = logging.getLogger(__name__)

#: The largest ``buffer`` a subscription takes.
MAX_BUFFER = 100_000

#: Seconds of silence on the LISTEN connection after which the listener reads the head itself.
HEAD_CHECK_INTERVAL = 5.0
#: The shortest wait of a subscription, so that no clock rounding makes it spin.
_MIN_WAIT = 0.01
#: Backoff between attempts to reconnect or to read again, doubling from the first to the last.
FIRST_DELAY = 0.05
LAST_DELAY = 2.0

#: Reads the events after a position, at most a number of them: the events, and the position up
#: to which the log has been read (the last event's when the read was cut at the limit, else the
#: head the read saw).
ReadAfter = Callable[[int, int], tuple[list[SequencedEvent], int]]
#: `ReadAfter` as a coroutine (the async store's subscriptions).
AsyncReadAfter = Callable[[int, int], Awaitable[tuple[list[SequencedEvent], int]]]


def position_of(payload: str) -> int | None:
    """The head a notification announces, or None for any other payload (any session may
    notify the channel)."""
    if payload.isascii() and payload.isdigit() and len(payload) <= 19:
        return int(payload)
    return None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ListenerBase:
    """News of appends, and a way to wait for more news: what a store's listener
    (`tamma_events.streaming.listen.Listener`, a thread, or
    `tamma_events.streaming.listen_async.AsyncListener`, a task) tells its subscriptions.
    ``channel`` and ``head`` are statements returning the channel to listen on and the current head.
    """

    def __init__(self, channel: sql.Composed, head: sql.Composed) -> None:
        self._channel_statement = channel
        self._head_statement = head
        self._cond = threading.Condition()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._seen = 0
        self._news = 0
        # (head, monotonic time) of recent announcements, for the subscriptions' lag.
        self._announced: deque[tuple[int, float]] = deque(maxlen=1024)
        self._closing = threading.Event()
        #: Whether the LISTEN connection is up.
        self.connected = False
        #: How many times the connection was lost and opened again.
        self.reconnects = 0
        #: The error that last broke or refused the connection, if any.
        self.last_error: BaseException | None = None

    @property
    def seen(self) -> int:
        """The newest head position announced (or read by the listener)."""
        return self._seen

    @property
    def news(self) -> int:
        """How many times the listener has had news: a notification, a (re)connection, or a
        head it read that differs from the last one announced. Subscriptions read when it
        moves, whatever the payloads say: a notification is only ever a reason to read, so a
        stray one (any session may notify the channel) costs one read at most."""
        return self._news

    def _lost(self, exc: Exception, delay: float) -> bool:
        """Note why the connection failed; whether to connect again (after ``delay``)."""
        if self._closing.is_set():
            return False
        self.last_error = exc
        if isinstance(exc, psycopg.errors.UndefinedFunction):
            # A schema from before notifications (opened with migrate=False): nothing will
            # ever be announced. Subscriptions poll on their own.
            logger.error(
                "tamma-events listener: %s; the schema needs migrating for notifications;"
                " subscriptions fall back to polling",
                exc,
            )
            return False
        self.reconnects += 1
        logger.warning("tamma-events listener: %s; reconnecting in %.2f s", exc, delay)
        return True

    def announce(self, position: int | None, *, always: bool = False) -> None:
        """Record news of the head at ``position`` (None: unknown) and wake the waiters; a head
        read by the listener itself (not ``always``) is news only when it differs from the
        last one."""
        with self._cond:
            if not always and position == self._seen:
                return
            if position is not None:
                if position > self._seen:
                    self._announced.append((position, time.monotonic()))
                self._seen = position
            self._news += 1
        self.wake_all()

    def behind_since(self, position: int) -> float | None:
        """When (``time.monotonic()``) the first head beyond ``position`` was announced, as
        far as the recent announcements tell; None when none is beyond it."""
        with self._cond:
            for head, at in self._announced:
                if head > position:
                    return at
        return None

    def wake_all(self) -> None:
        """Wake every waiter, to check its own condition again."""
        with self._cond:
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # its loop is closed; the waiter is gone
                pass

    def _ready(self, beyond: int | None, done: Callable[[], bool]) -> bool:
        return (beyond is not None and self._news > beyond) or done()

    def wait(self, beyond: int | None, timeout: float, done: Callable[[], bool]) -> None:
        """Block until `news` moves beyond ``beyond`` (None: only the other two), ``done()``,
        or ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready(beyond, done), timeout)

    async def wait_async(
        self, beyond: int | None, timeout: float, done: Callable[[], bool]
    ) -> None:
        """`wait` for a coroutine: the event loop keeps running meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future: asyncio.Future[None] = loop.create_future()
            waiter = (loop, future)
            with self._cond:
                if self._ready(beyond, done):
                    return
                self._async_waiters.add(waiter)
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(future, remaining)
                except asyncio.TimeoutError:
                    return
            finally:
                with self._cond:
                    self._async_waiters.discard(waiter)


def check_subscription_options(buffer: int, poll_interval: float, retry_for: float) -> None:
    """QUERY_ERROR naming the first option out of range."""
    whole(
        buffer,
        "buffer",
        f"an int between 1 and {MAX_BUFFER}",
        low=1,
        high=MAX_BUFFER,
        error=QueryError,
    )
    for name, value in (("poll_interval", poll_interval), ("retry_for", retry_for)):
        seconds(value, name, "a positive finite number of seconds", error=QueryError)


class Subscription:
    """The events after a position, then each event as it is committed, in log order.

    Iterate it (``for event in subscription`` or ``async for``); `position` is the last
    position delivered, the ``after`` to resume from. `stop` (or `close`, or leaving its
    ``with`` block) ends the iteration, from any thread. Made by `EventStore.subscribe`.
    """

    def __init__(
        self,
        fetch: ReadAfter,
        listener: ListenerBase,
        *,
        after: int,
        buffer: int,
        poll_interval: float,
        retry_for: float,
        on_close: Callable[[Subscription], None] | None = None,
        fetch_async: AsyncReadAfter | None = None,
    ) -> None:
        self._fetch = fetch
        self._fetch_async = fetch_async
        self._listener = listener
        self._limit = buffer
        self._poll_interval = poll_interval
        self._retry_for = retry_for
        self._on_close = on_close
        self._position = after
        self._read_up_to = after
        # The listener's `news` when the last read began: newer news is a reason to read.
        self._news_read = -1
        self._buffer: deque[SequencedEvent] = deque()
        # Read at once: the subscription starts by catching up.
        self._more = True
        self._next_poll = 0.0
        self._stopped = threading.Event()
        self._fill_lock = threading.Lock()
        self._failing_since: float | None = None
        self._delay = FIRST_DELAY
        #: How many reads failed for a lost connection and were tried again.
        self.retries = 0

    @property
    def position(self) -> int:
        """The position of the last event delivered (the ``after`` it started from before)."""
        return self._position

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """End the subscription: the iteration stops at its next step (a waiting one at once).
        Safe to call from any thread, and more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._listener.wake_all()
        if self._on_close is not None:
            self._on_close(self)

    close = stop

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> SequencedEvent:
        if self._fetch_async is not None:
            raise TypeError("a subscription of the async store is iterated with `async for`")
        while True:
            if self._stopped.is_set():
                self._buffer.clear()
                raise StopIteration
            if self._buffer:
                return self._take()
            if self._due():
                if not self._fill():
                    self._listener.wait(None, self._delay, self._stopped.is_set)
                continue
            self._listener.wait(self._news_read, self._wait_time(), self._stopped.is_set)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SequencedEvent:
        while True:
            if self._stopped.is_set():
                self._buffer.clear()
                raise StopAsyncIteration
            if self._buffer:
                return self._take()
            if self._due():
                if self._fetch_async is not None:
                    filled = await self._fill_async()
                else:
                    # The read blocks on the database, so it runs in a worker thread.
                    filled = await asyncio.to_thread(self._fill)
                if not filled:
                    await self._listener.wait_async(None, self._delay, self._stopped.is_set)
                continue
            await self._listener.wait_async(
                self._news_read, self._wait_time(), self._stopped.is_set
            )

    def _take(self) -> SequencedEvent:
        event = self._buffer.popleft()
        self._position = event.position
        return event

    def _due(self) -> bool:
        """Whether to read now: more is known to be there, the listener has had news since the
        last read began, or the listener is down and ``poll_interval`` has passed since the
        last read."""
        return (
            self._more
            or self._listener.news > self._news_read
            or (not self._listener.connected and time.monotonic() >= self._next_poll)
        )

    def _wait_time(self) -> float:
        """How long to wait before `_due` may have changed without a wake-up."""
        if self._listener.connected:
            # Woken by an announcement, a disconnection or stop(); the bound is a safety net.
            return HEAD_CHECK_INTERVAL
        return max(self._next_poll - time.monotonic(), _MIN_WAIT)

    def _fill(self) -> bool:
        """Read the next events into the buffer. False when the read failed for a lost
        connection and should be tried again after ``self._delay``; raises when it failed
        otherwise, or for longer than ``retry_for``."""
        with self._fill_lock:
            if self._stopped.is_set():
                return True
            news = self._listener.news
            try:
                events, read_up_to = self._fetch(self._read_up_to, self._limit)
            except EventStoreError as exc:
                return self._failed(exc)
            self._filled(news, events, read_up_to)
            return True

    async def _fill_async(self) -> bool:
        """`_fill` with the async store's fetch (one task iterates a subscription)."""
        if self._stopped.is_set() or self._fetch_async is None:
            return True
        news = self._listener.news
        try:
            events, read_up_to = await self._fetch_async(self._read_up_to, self._limit)
        except EventStoreError as exc:
            return self._failed(exc)
        self._filled(news, events, read_up_to)
        return True

    def _failed(self, exc: EventStoreError) -> bool:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._delay = FIRST_DELAY
        else:
            self._delay = min(self._delay * 2, LAST_DELAY)
        if not outage(exc) or now - self._failing_since >= self._retry_for:
            self.stop()
            raise exc
        self.retries += 1
        logger.warning(
            "tamma-events subscription: reading after %d failed (%s); retrying",
            self._read_up_to,
            exc.message,
        )
        return False

    def _filled(self, news: int, events: list[SequencedEvent], read_up_to: int) -> None:
        self._failing_since = None
        self._news_read = news
        if self._stopped.is_set():
            return
        self._buffer.extend(events)
        self._more = len(events) >= self._limit
        self._read_up_to = max(self._read_up_to, read_up_to)
        self._next_poll = time.monotonic() + self._poll_interval
