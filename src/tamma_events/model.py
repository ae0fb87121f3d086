"""The store's value types, as msgspec Structs.

`DomainEvent` is what producers append; `SequencedEvent` is what readers get back (the event plus
its global `position`, `recorded_at` and chain `hash`). `Query`, `QueryItem` and `AppendCondition`
are the DCB types of the dcb.events specification.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, overload

import msgspec

__all__ = [
    "AppendCondition",
    "DomainEvent",
    "Projection",
    "Query",
    "QueryItem",
    "ReadResult",
    "SequencedEvent",
    "Snapshot",
    "new_event_id",
    "utcnow",
    "uuid7",
]

_UUID7_RAND_BITS = 74


def _uuid_slow(value: int) -> uuid.UUID:
    return uuid.UUID(int=value)


def _uuid_fast(
    value: int,
    _new: Any = object.__new__,
    _set: Any = object.__setattr__,
    _unknown: uuid.SafeUUID = uuid.SafeUUID.unknown,
) -> uuid.UUID:
    # What uuid.UUID(int=value) makes, without its argument parsing (the bulk of its cost).
    made: uuid.UUID = _new(uuid.UUID)
    _set(made, "int", value)
    _set(made, "is_safe", _unknown)
    return made


try:
    _uuid_from_int = _uuid_fast if _uuid_fast(2**127 + 5) == _uuid_slow(2**127 + 5) else _uuid_slow
except (AttributeError, TypeError):  # another Python's UUID layout
    _uuid_from_int = _uuid_slow


class _Entropy:
    """Random bits from the OS, fetched 4 KiB at a time; forgotten in a forked child, which
    must not reuse its parent's."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        if hasattr(os, "register_at_fork"):  # not on Windows, where nothing forks
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0

    def take10(self) -> int:
        with self._lock:
            if self._at + 10 > len(self._pool):
                self._pool = os.urandom(self._SIZE)
                self._at = 0
            at = self._at
            self._at = at + 10
            return int.from_bytes(self._pool[at : at + 10], "big")


_entropy = _Entropy()


def uuid7(ms: int, rand: int) -> uuid.UUID:
    """The UUIDv7 (RFC 9562) of a Unix time in milliseconds and 74 random bits."""
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 62) << 64
        | 0b10 << 62
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    return _uuid_from_int(value)


def new_event_id() -> uuid.UUID:
    """A new time-ordered UUIDv7.

    Ids made one after another sort together, so the unique index on ``event_id`` is written at
    its right edge instead of at random pages.
    """
    rand = _entropy.take10() >> (80 - _UUID7_RAND_BITS)
    return uuid7(time.time_ns() // 1_000_000, rand)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


class DomainEvent(msgspec.Struct, frozen=True):
    """An event to append.

    ``event_type`` is 1-255 characters; ``tags`` maps tag keys (1-128 characters) to string
    values (for example ``issueId``, ``prId``, ``userId``, ``provider``, ``platform``); ``data``
    and ``metadata`` are JSON objects. ``event_id`` defaults to a new UUIDv7 and ``timestamp`` to
    now in UTC; an ISO-8601 string with an offset is accepted for ``timestamp`` and a UUID string
    for ``event_id``. Give events their ids before the first attempt so that a retried append is
    recognised as a duplicate instead of stored twice.

    Validation happens when the event is appended, in one native call per batch.
    """

    event_type: str
    data: dict[str, Any] = {}
    tags: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    event_id: uuid.UUID = msgspec.field(default_factory=new_event_id)
    timestamp: datetime = msgspec.field(default_factory=utcnow)


class SequencedEvent(DomainEvent, frozen=True, kw_only=True, gc=False):
    """A stored event: the `DomainEvent` plus where and when the store put it.

    ``position`` is global and gapless, in commit order, starting at 1. ``hash`` links the event
    to its predecessor (see ``docs/integrity.md``).

    Events are read by the thousand, so they are kept out of Python's cycle collector
    (msgspec's ``gc=False``): its collections do not traverse them (pages of 1000 were read
    in 1.63-1.68 times a bare COPY's time with it, 1.86-2.09 without). An event is frozen; the
    one cycle it could be part of is one made through its dicts (an event put into its own
    ``data``), which would then never be freed.
    """

    position: int
    recorded_at: datetime
    hash: bytes


class QueryItem(msgspec.Struct, frozen=True):
    """Matches an event whose type is one of ``types`` (any type when empty) and which carries
    every pair of ``tags`` (any tags when empty)."""

    types: Sequence[str] = ()
    tags: dict[str, str] = {}

    def matches(self, event_type: str, tags: dict[str, str]) -> bool:
        """Whether an event with this type and these tags matches the item."""
        if self.types and event_type not in self.types:
            return False
        for key, value in self.tags.items():
            if tags.get(key) != value:
                return False
        return True


class Query(msgspec.Struct, frozen=True):
    """A DCB query: its items are OR'd; a query with no items matches every event."""

    items: Sequence[QueryItem] = ()

    @classmethod
    def all(cls) -> Query:
        """The query that matches every event."""
        return cls(())

    @classmethod
    def of(cls, *, types: Iterable[str] = (), tags: dict[str, str] | None = None) -> Query:
        """A query of one item, for the common case."""
        return cls((QueryItem(tuple(types), dict(tags or {})),))

    def matches(self, event_type: str, tags: dict[str, str]) -> bool:
        """Whether an event with this type and these tags matches the query."""
        if not self.items:
            return True
        return any(item.matches(event_type, tags) for item in self.items)


class AppendCondition(msgspec.Struct, frozen=True):
    """The append fails, writing nothing, when an event matching ``fail_if_events_match`` exists
    at a position greater than ``after`` (at any position when ``after`` is None)."""

    fail_if_events_match: Query
    after: int | None = None


class ReadResult(Sequence[SequencedEvent]):
    """The events a read returned, in the order asked for, and the ``head`` to use as the next
    ``after`` of an `AppendCondition` built from this read."""

    __slots__ = ("events", "head")

    events: list[SequencedEvent]
    head: int | None

    def __init__(self, events: list[SequencedEvent], head: int | None) -> None:
        self.events = events
        self.head = head

    @overload
    def __getitem__(self, index: int) -> SequencedEvent: ...
    @overload
    def __getitem__(self, index: slice) -> list[SequencedEvent]: ...
    def __getitem__(self, index: int | slice) -> SequencedEvent | list[SequencedEvent]:
        return self.events[index]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[SequencedEvent]:
        return iter(self.events)

    def __repr__(self) -> str:
        return f"ReadResult(<{len(self.events)} events>, head={self.head!r})"


class Snapshot(msgspec.Struct, frozen=True):
    """A state folded from the log up to position ``version``, saved under ``aggregate_id``."""

    aggregate_id: str
    version: int
    state: Any
    created_at: datetime


class Projection(msgspec.Struct, frozen=True):
    """What `EventStore.project` folded: the ``state``, and the ``head`` it is current at (the
    ``after`` of an `AppendCondition` for a decision taken on it)."""

    state: Any
    head: int


class TypeStats(msgspec.Struct, frozen=True):
    """How many events of one type the history holds, and when the first and last were
    recorded (their ``timestamp``)."""

    event_type: str
    count: int
    first_timestamp: datetime
    last_timestamp: datetime


class StoreStats(msgspec.Struct, frozen=True):
    """What `EventStore.stats` reports about a store.

    ``events`` counts the whole history (live and archived); the log is gapless, so it is also
    the head. ``table_bytes`` is the space the schema's tables and indexes take in PostgreSQL,
    ``archive_bytes`` that of the Parquet archives. ``event_types`` is sorted by count, largest
    first."""

    schema: str
    schema_version: int
    server_version: str
    codec: str
    head: int
    events: int
    live_events: int
    archived_events: int
    archive_files: int
    archive_bytes: int
    table_bytes: int
    tag_keys: int
    tag_values: int
    first_timestamp: datetime | None
    last_timestamp: datetime | None
    event_types: list[TypeStats]
