# WARNING: generated from src/tamma_events/stores/group_async.py by scripts/async_to_sync.py.
# DO NOT CHANGE! Change the original file instead, then run the script.
"""Group commit: concurrent appends share transactions.

`tamma_events.stores.group_async.AsyncGroupCommit` serves the tasks of one event loop;
`tamma_events.stores.group.GroupCommit`, generated from it by ``scripts/async_to_sync.py``, the
threads of one process.

The first append to find no transaction running becomes the leader: it writes its request and
every request queued at that moment (up to a limit of events) in one transaction, while the
others wait. Requests that arrive meanwhile queue up for the next group. When the leader is done
it wakes exactly the members of its group and hands the lead to the oldest queued request, so a
commit costs one wake-up per waiter that is done, not one per waiting thread. Each request keeps
its own condition and gets its own position or error.

A thread waits on a ``threading.Event``; a task on a future, and a task that is cancelled while
it waits leaves the queue, or, handed the lead as it was cancelled, hands it on, so no one
waits forever.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

from tamma_events.errors import EventStoreError, StorageError
from tamma_events.ops.request import AppendRequest

__all__ = ["GroupCommit"]

# What a queued append waits on: set when it is settled, or when it is to lead.
_Waiter: TypeAlias = threading.Event

_Member = tuple[AppendRequest, "_Waiter | None"]


class GroupCommit:
    """Coalesces concurrent `AppendRequest`s; ``write`` must settle every request it is given."""

    def __init__(self, write: Callable[[list[AppendRequest]], None], max_group_events: int) -> None:
        self._write = write
        self._max_group_events = max_group_events
        # Guards the queue and the lead between threads (a loop's tasks never contend for it).
        self._lock = threading.Lock()
        self._queue: deque[tuple[AppendRequest, _Waiter]] = deque()
        self._leading = False

    def submit(self, request: AppendRequest) -> int:
        """Append ``request``, in a group; its last position, or its error raised."""
        waiter = _waiter()  # made before the lock, which the other appends are waiting for
        with self._lock:
            follow = self._leading
            if follow:
                self._queue.append((request, waiter))
            else:
                self._leading = True
        if follow:
            waiter.wait()
            if request.done:
                return request.result()
            # Not settled: woken to lead, with the lead handed over by the previous leader.
        group: list[_Member] = [(request, None), *self._take(request.count)]
        members = [member for member, _ in group]
        try:
            self._write(members)
        except BaseException as exc:
            # `write` settles its requests itself; this is the backstop for the unexpected
            # (an interrupt mid-transaction), so that no caller waits forever.
            for member in members:
                if not member.done:
                    member.fail(_unsettled(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            for _, member_waiter in group:
                if member_waiter is not None:
                    _wake(member_waiter)
            self._hand_over()
        return request.result()

    def _take(self, events: int) -> list[_Member]:
        """The requests queued behind the leader's, up to the group's event limit."""
        taken: list[_Member] = []
        with self._lock:
            while self._queue and events + self._queue[0][0].count <= self._max_group_events:
                member, waiter = self._queue.popleft()
                events += member.count
                taken.append((member, waiter))
        return taken

    def _hand_over(self) -> None:
        """Wake the oldest waiter to lead next, or leave the lead free."""
        with self._lock:
            while self._queue:
                _, waiter = self._queue.popleft()
                if _wake(waiter):
                    return
            self._leading = False


def _waiter() -> _Waiter:
    return threading.Event()


def _wake(waiter: _Waiter) -> bool:
    """Wake ``waiter``; whether it was still waiting (a cancelled task's future is not)."""
    waiter.set()
    return True


def _unsettled(exc: BaseException) -> EventStoreError:
    error = StorageError(f"the group transaction failed: {exc!r}", {"outcome": "unknown"})
    error.__cause__ = exc
    return error
