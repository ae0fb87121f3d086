"""One caller's append, as the stores' group commit and the append operations share it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tamma_events.errors import EventStoreError

if TYPE_CHECKING:
    from tamma_events.codec.reference import PreparedBatch
    from tamma_events.model import AppendCondition, DomainEvent
    from tamma_events.sql import Check

__all__ = ["AppendRequest"]


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
