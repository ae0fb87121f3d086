"""Group commit: concurrent appends from the threads of one process share transactions.

The first thread to find no transaction running becomes the leader: it writes its request and
every request queued at that moment (up to a limit of events) in one transaction, while the
others wait. Requests that arrive meanwhile queue up for the next group. When the leader is done
it wakes exactly the members of its group and hands the lead to the oldest queued request, so a
commit costs one wake-up per waiter that is done, not one per waiting thread. Each request keeps
its own condition and gets its own position or error.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import EventStoreError, StorageError

if TYPE_CHECKING:
    from ._pycodec import PreparedBatch
    from .model import AppendCondition, DomainEvent
    from .sql import Check

__all__ = ["AppendRequest", "AsyncGroupCommit", "GroupCommit"]


class AppendRequest:
    """One caller's append: its encoded events, its condition, and, once done, its outcome."""

    __slots__ = (
        "batch",
        "check",
        "condition",
        "done",
        "error",
        "events",
        "first_position",
        "wakeup",
    )

    def __init__(
        self,
        events: list[DomainEvent],
        batch: PreparedBatch,
        condition: AppendCondition | None,
        check: Check | None = None,
    ) -> None:
        self.events = events
        self.batch = batch
        self.condition = condition
        #: The condition as SQL: true when a stored event violates it (see `sql.condition_check`).
        self.check = check
        self.first_position = 0
        self.error: EventStoreError | None = None
        self.done = False
        #: Set when the request is settled, or when its thread is to lead the next group.
        self.wakeup = threading.Event()

    @property
    def count(self) -> int:
        return self.batch.count

    @property
    def last_position(self) -> int:
        return self.first_position + self.batch.count - 1

    def reset(self) -> None:
        """Unsettled again, to be written once more."""
        self.done = False
        self.error = None

    def fail(self, error: EventStoreError) -> None:
        self.error = error
        self.done = True

    def succeed(self, first_position: int) -> None:
        self.first_position = first_position
        self.done = True

    def result(self) -> int:
        """The last position written, or the request's error raised."""
        if self.error is not None:
            raise self.error
        return self.last_position


class GroupCommit:
    """Coalesces concurrent `AppendRequest`s; ``write`` must settle every request it is given."""

    def __init__(self, write: Callable[[list[AppendRequest]], None], max_group_events: int) -> None:
        self._write = write
        self._max_group_events = max_group_events
        self._lock = threading.Lock()
        self._queue: deque[AppendRequest] = deque()
        self._leading = False

    def submit(self, request: AppendRequest) -> int:
        with self._lock:
            follow = self._leading
            if follow:
                self._queue.append(request)
            else:
                self._leading = True
        if follow:
            request.wakeup.wait()
            if request.done:
                return request.result()
            # Not settled: woken to lead, with the lead handed over by the previous leader.
        group = self._take(request)
        try:
            self._write(group)
        except BaseException as exc:
            # `write` settles its requests itself; this is the backstop for the unexpected
            # (an interrupt mid-transaction), so that no caller waits forever.
            for member in group:
                if not member.done:
                    member.fail(_unsettled(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            for member in group:
                if member is not request:
                    member.wakeup.set()
            with self._lock:
                if self._queue:
                    self._queue.popleft().wakeup.set()  # the oldest waiter leads next
                else:
                    self._leading = False
        return request.result()

    def _take(self, leader: AppendRequest) -> list[AppendRequest]:
        """The leader's request and those queued behind it, up to the group's event limit."""
        group = [leader]
        events = leader.count
        with self._lock:
            while self._queue and events + self._queue[0].count <= self._max_group_events:
                request = self._queue.popleft()
                events += request.count
                group.append(request)
        return group


class AsyncGroupCommit:
    """`GroupCommit` for the tasks of one event loop: the first append to find no transaction
    running leads, writing its request and those queued meanwhile (up to the event limit) in
    one transaction; the others await it. A queued task that is cancelled leaves the queue,
    and a leader that is cancelled hands the lead on, so no one waits forever."""

    def __init__(
        self, write: Callable[[list[AppendRequest]], Awaitable[None]], max_group_events: int
    ) -> None:
        self._write = write
        self._max_group_events = max_group_events
        self._queue: deque[tuple[AppendRequest, asyncio.Future[None]]] = deque()
        self._leading = False

    async def submit(self, request: AppendRequest) -> int:
        if self._leading:
            waiter = (request, asyncio.get_running_loop().create_future())
            self._queue.append(waiter)
            try:
                await waiter[1]
            except asyncio.CancelledError:
                if waiter in self._queue:
                    self._queue.remove(waiter)
                elif not waiter[1].cancelled() and not request.done:
                    # Handed the lead (its future completed) as it was cancelled: hand it on.
                    # A waiter taken into a group being written has its future cancelled, and
                    # that group's leader still holds the lead.
                    self._hand_over()
                raise
            if request.done:
                return request.result()
            # Not settled: handed the lead by the previous leader.
        else:
            self._leading = True
        group = [(request, None), *self._take(request.count)]
        members = [member for member, _ in group]
        try:
            await self._write(members)
        except BaseException as exc:
            for member in members:
                if not member.done:
                    member.fail(_unsettled(exc))
            if not isinstance(exc, Exception):
                self._release(group)
                raise
        self._release(group)
        return request.result()

    def _take(self, events: int) -> list[tuple[AppendRequest, asyncio.Future[None] | None]]:
        taken: list[tuple[AppendRequest, asyncio.Future[None] | None]] = []
        while self._queue and events + self._queue[0][0].count <= self._max_group_events:
            member, future = self._queue.popleft()
            events += member.count
            taken.append((member, future))
        return taken

    def _release(self, group: list[tuple[AppendRequest, asyncio.Future[None] | None]]) -> None:
        for _, future in group:
            if future is not None and not future.done():
                future.set_result(None)
        self._hand_over()

    def _hand_over(self) -> None:
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_result(None)  # the oldest waiter leads next
                return
        self._leading = False


def _unsettled(exc: BaseException) -> EventStoreError:
    error = StorageError(f"the group transaction failed: {exc!r}", {"outcome": "unknown"})
    error.__cause__ = exc
    return error
