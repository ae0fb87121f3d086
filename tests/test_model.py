"""A model-based test: a hypothesis state machine drives a real store and a reference model.

The model is a plain list of the events appended so far, each with its position (1, 2, ...),
plus how long the prefix moved to archives is. The ``recorded_at`` and ``hash`` the store gives
an event are learnt once, by reading the append back (they come from the server's clock and the
chain); every later read must return them unchanged, archived or not. Every rule does the same
thing to the store and to the model and asserts that they agree:

- appends of one event and of batches of one to seven (the store is opened with
  ``chunk_events=4``, so a batch goes through the one-round-trip append function, the COPY path
  or the chunked path of large batches), with and without explicit ids and timestamps (at
  various UTC offsets), over a small universe of event types and tags so that queries hit;
- DCB conditions whose ``after`` is the model's last matching position, a read's ``head``, a
  stale position or any position: the model decides whether the append is refused with
  ``APPEND_CONDITION_FAILED`` (and the error's context);
- appends that repeat a stored id (live or archived) or an id of the same batch:
  ``DUPLICATE_EVENT``, naming the ids. A refused append writes nothing. When an append breaks
  two rules at once the model accepts either code (the order of the checks is not documented);
- transactions: several appends, each maybe refused (which leaves the transaction usable), reads
  inside that see the block's own appends, then a commit, or an exception that rolls it back;
- appends, transactions and compactions go through one of two stores on the same schema (as
  two processes would have them: each its own pool, cache and group commit); reads go through
  the first, whose cache and subscription must see the other's writes;
- ``read(query, after, limit, backwards)`` and its ``head``; ``get_events``, ``count_events``,
  ``aggregate``, ``stream_events`` and ``get_page`` walks for `EventFilter`s of ids, types, tag
  fields, tags, time windows (half-open, bounds on the timestamps' own grid so they are hit
  exactly), orders, limits and offsets; a stream or a walk is pinned to the head at its start,
  so events appended while it is read are not in it; ``get_event``; ``get_event_types`` and
  ``get_tags``;
- one subscription at a time (to everything, a `Query` or an `EventFilter`; from the start, the
  head, any position or beyond the head; with a small buffer), consumed by a thread: what it
  delivered must be exactly the model's matching events after its start, in log order, and its
  ``position`` the last one delivered when it stops;
- ``compact_events(before)``, which archives the prefix of the log *recorded* before
  ``before`` (``recorded_at``, not the events' own ``timestamp``: explicit timestamps are in
  2000 and 2100, and some cut-offs fall among them, so a store comparing the wrong column
  disagrees with the model). Afterwards ``get_events``, ``stream_events`` and ``get_page`` read
  the live log unless ``include_archived``, while ``read``, ``get_event``, ``count_events``,
  ``aggregate``, the summaries, subscriptions, conditions and duplicate ids cover the whole
  history (docs/archives.md);
- ``verify()``, with and without the archives: ``ok``, having checked every event it covers;
- two durable consumers (one of every event with a plain handler; one of a query, split into
  partitions by a tag, with a transactional handler that writes a projection table), each run by
  a worker until it is caught up, crashed in the middle of a batch (its handler raises a
  ``BaseException``, as a dying process would stop it), or reset to any position. After a run,
  each partition delivered exactly the model's matching events after its checkpoint, in order;
  after a crash, each checkpoint is where the model allows (only past events handled), a plain
  handler got every event up to it, and the projection holds exactly the committed events: the
  model keeps how many times each position was projected, resets included.

The invariant after every step: ``head()`` is the model's last position. At teardown (of an
example that has not failed already, so that its own failure is the one reported) the whole
history is read and compared once more, the subscription checked, and ``verify()`` must pass.
Each example runs on a schema and an archive directory of its own, dropped afterwards.

The default run is short (the suite runs once per codec): 20 examples of 25 steps. For a longer
search, set the number of examples and of steps per example::

    TAMMA_EVENTS_MODEL_EXAMPLES=500 TAMMA_EVENTS_MODEL_STEPS=60 pytest tests/test_model.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hypothesis
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import drop_schema
from tamma_events import (
    APPEND_CONDITION_FAILED,
    CONSUMER_CONFLICT,
    DUPLICATE_EVENT,
    AggregateRow,
    AppendCondition,
    DomainEvent,
    EventFilter,
    EventStore,
    EventStoreError,
    Query,
    QueryItem,
    SequencedEvent,
    Subscription,
    Transaction,
)
from tamma_events.filters import GroupBy
from tamma_events.stores.consumers import partition_of

#: Examples and steps per example; raise them for a longer search (see the docstring).
EXAMPLES = int(os.environ.get("TAMMA_EVENTS_MODEL_EXAMPLES", "20"))
STEPS = int(os.environ.get("TAMMA_EVENTS_MODEL_STEPS", "25"))

#: How long a subscription may take to deliver what the model expects before the check fails:
#: a bound for a hang (a delivery takes milliseconds), generous for a busy machine.
DELIVERY_TIMEOUT = 60.0

# -- the universe of events ------------------------------------------------------------------

#: Event types, ordered the same in any collation (``order_by="type"``); UNKNOWN is never
#: appended, only asked for.
TYPES = ("Alpha", "Bravo", "Charlie", "Delta")
UNKNOWN_TYPE = "Echo"
TAG_KEYS = ("issueId", "prId", "userId", "provider", "platform", "team")
TAG_VALUES = ("a", "b", "c")
#: The filter fields that name a tag, and the tag (docs/queries.md).
TAG_FIELDS = {
    "issue_ids": "issueId",
    "pr_ids": "prId",
    "user_ids": "userId",
    "providers": "provider",
    "platforms": "platform",
}
FILTER_FIELDS = ("event_ids", "event_types", *TAG_FIELDS, "tags", "window")

UTC = timezone.utc
#: Explicit event timestamps lie on a grid in 2000 and in 2100, far from any ``recorded_at``;
#: windows take their bounds from the same grid. Events without one get the current time.
EPOCHS = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
TIMES = sorted(
    epoch + timedelta(minutes=minute, seconds=second, microseconds=micro)
    for epoch in EPOCHS
    for minute in range(3)
    for second in (0, 30)
    for micro in (0, 1)
)
#: A grid time, in UTC or at another offset (the same instant).
OFFSETS = [timezone(timedelta(hours=hours)) for hours in (0, 5, -7)]
grid_times = st.builds(datetime.astimezone, st.sampled_from(TIMES), st.sampled_from(OFFSETS))

_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), _text)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)
json_objects = st.dictionaries(_text, json_values, max_size=3)
tag_dicts = st.dictionaries(st.sampled_from(TAG_KEYS), st.sampled_from(TAG_VALUES), max_size=3)


@st.composite
def domain_events(draw: st.DrawFn) -> DomainEvent:
    """An event of the universe; its id and timestamp explicit or left to the defaults."""
    fields: dict[str, Any] = {}
    event_id = draw(st.one_of(st.none(), st.uuids()))
    if event_id is not None:
        fields["event_id"] = event_id
    timestamp = draw(st.one_of(st.none(), grid_times))
    if timestamp is not None:
        fields["timestamp"] = timestamp
    return DomainEvent(
        draw(st.sampled_from(TYPES)),
        draw(json_objects),
        draw(tag_dicts),
        draw(json_objects),
        **fields,
    )


batches = st.lists(domain_events(), min_size=1, max_size=6)

query_items = st.builds(
    QueryItem,
    st.lists(st.sampled_from((*TYPES, UNKNOWN_TYPE)), max_size=2, unique=True).map(tuple),
    st.dictionaries(st.sampled_from(TAG_KEYS), st.sampled_from(TAG_VALUES), max_size=2),
)
queries = st.one_of(st.none(), st.builds(Query, st.lists(query_items, max_size=2).map(tuple)))

#: The durable consumers the model drives: name -> (query, the tag key it is split by, its
#: partitions, whether its handler is transactional).
CONSUMERS: dict[str, tuple[Query | None, str | None, int, bool]] = {
    "everything": (None, None, 1, False),
    "alpha-by-issue": (Query.of(types=["Alpha"]), "issueId", 3, True),
}


class _Crash(BaseException):
    """A consumer's worker dying in the middle of a batch."""


# -- the model -------------------------------------------------------------------------------

#: What the model decides of an event: position, id, type, tags, data, metadata, timestamp.
Content = tuple[int, uuid.UUID, str, dict[str, str], dict[str, Any], dict[str, Any], datetime]
#: What is compared of a stored event: its content, ``recorded_at`` and ``hash``.
View = tuple[Content, datetime, bytes]


def content(position: int, event: DomainEvent) -> Content:
    return (
        position,
        uuid.UUID(str(event.event_id)),
        event.event_type,
        dict(event.tags),
        dict(event.data),
        dict(event.metadata),
        event.timestamp,
    )


def views(events: Sequence[SequencedEvent]) -> list[View]:
    return [(content(e.position, e), e.recorded_at, e.hash) for e in events]


@dataclass(frozen=True)
class Recorded:
    """An event of the model: where it is, and when the store recorded it with which chain
    hash (learnt once, when it was appended; every later read must return the same)."""

    position: int
    event: DomainEvent
    recorded_at: datetime
    hash: bytes

    def view(self) -> View:
        return (content(self.position, self.event), self.recorded_at, self.hash)


def query_matches(query: Query | None, event: DomainEvent) -> bool:
    """DCB: the items are OR'd; an item's types are alternatives (any type when empty) and its
    tags must all be carried; no items match every event."""
    if query is None or not query.items:
        return True
    return any(
        (not item.types or event.event_type in item.types)
        and all(event.tags.get(key) == value for key, value in item.tags.items())
        for item in query.items
    )


def _as_time(value: datetime | str | None) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def filter_matches(event_filter: EventFilter | None, event: DomainEvent) -> bool:
    """docs/queries.md: fields AND'd, values of a list OR'd, an empty list no constraint, the
    window half-open on ``timestamp``."""
    f = event_filter
    if f is None:
        return True
    if f.event_ids and event.event_id not in {uuid.UUID(str(i)) for i in f.event_ids}:
        return False
    if f.event_types and event.event_type not in f.event_types:
        return False
    for field, key in TAG_FIELDS.items():
        values = getattr(f, field)
        if values and event.tags.get(key) not in values:
            return False
    if f.tags and any(event.tags.get(key) != value for key, value in f.tags.items()):
        return False
    start, end = _as_time(f.start_time), _as_time(f.end_time)
    if start is not None and event.timestamp < start:
        return False
    return end is None or event.timestamp < end


def apply_filter(event_filter: EventFilter | None, records: list[Recorded]) -> list[Recorded]:
    """The matching records in the filter's order (ties by position, in the same direction),
    after its offset, at most its limit."""
    f = event_filter or EventFilter()
    chosen = [r for r in records if filter_matches(f, r.event)]
    if f.order_by == "timestamp":
        chosen.sort(key=lambda r: (r.event.timestamp, r.position))
    elif f.order_by == "type":
        chosen.sort(key=lambda r: (r.event.event_type, r.position))
    if f.order_direction == "desc":
        chosen.reverse()
    chosen = chosen[f.offset :]
    return chosen if f.limit is None else chosen[: f.limit]


def bucket(event: DomainEvent, group_by: GroupBy, tag_key: str | None) -> str | None:
    """The `aggregate` key of an event (None: left out, for want of the tag)."""
    if group_by == "event_type":
        return event.event_type
    if group_by == "tag":
        assert tag_key is not None
        return event.tags.get(tag_key)
    at = event.timestamp.astimezone(UTC)
    at = at.replace(second=0, microsecond=0)
    if group_by in ("hour", "day"):
        at = at.replace(minute=0)
    if group_by == "day":
        at = at.replace(hour=0)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


Selector = Query | EventFilter | None


def selector_matches(selector: Selector, event: DomainEvent) -> bool:
    if isinstance(selector, EventFilter):
        return filter_matches(selector, event)
    return query_matches(selector, event)


class Model:
    """The log as a list (``log[i]`` at position i + 1) and the archived prefix's length."""

    def __init__(self) -> None:
        self.log: list[Recorded] = []
        self.archived = 0
        #: Each consumer's checkpoint per partition (absent: never run, or reset never).
        self.checkpoints: dict[str, dict[int, int]] = {}
        #: How many times the transactional consumer projected each position.
        self.projected: Counter[int] = Counter()

    def pending_for(self, name: str) -> dict[int, list[int]]:
        """The positions consumer ``name`` has yet to deliver, per partition, in order."""
        query, key, partitions, _ = CONSUMERS[name]
        checkpoints = self.checkpoints.get(name, {})
        pending: dict[int, list[int]] = {p: [] for p in range(partitions)}
        for r in self.log:
            if not query_matches(query, r.event):
                continue
            partition = partition_of(r.event, key, partitions)  # type: ignore[arg-type]
            if r.position > checkpoints.get(partition, 0):
                pending[partition].append(r.position)
        return pending

    @property
    def head(self) -> int:
        return len(self.log)

    @property
    def ids(self) -> set[uuid.UUID]:
        return {r.event.event_id for r in self.log}

    def live(self) -> list[Recorded]:
        return self.log[self.archived :]

    def history(self, pending: Sequence[DomainEvent] = ()) -> list[tuple[int, DomainEvent]]:
        """Every event with its position, then ``pending`` (a transaction's appends so far)
        at the positions after the head."""
        return [(r.position, r.event) for r in self.log] + [
            (self.head + 1 + i, event) for i, event in enumerate(pending)
        ]

    def last_match(self, query: Query | None, pending: Sequence[DomainEvent] = ()) -> int:
        """The last position matching ``query`` (0 when none does)."""
        return max(
            (p for p, event in self.history(pending) if query_matches(query, event)), default=0
        )

    def refusals(
        self,
        events: Sequence[DomainEvent],
        condition: AppendCondition | None,
        pending: Sequence[DomainEvent] = (),
    ) -> set[str]:
        """The error codes this append deserves (none: it is written)."""
        codes: set[str] = set()
        ids = [e.event_id for e in events]
        known = self.ids | {e.event_id for e in pending}
        if len(set(ids)) < len(ids) or known.intersection(ids):
            codes.add(DUPLICATE_EVENT)
        if condition is not None:
            after = condition.after or 0
            query = condition.fail_if_events_match
            if self.last_match(query, pending) > after:
                codes.add(APPEND_CONDITION_FAILED)
        return codes

    def compaction_end(self, before: datetime) -> int:
        """The last position `compact_events(before)` archives: the live events before the
        first one recorded at or after ``before`` (docs/archives.md)."""
        recorded = [r.position for r in self.live() if r.recorded_at >= before]
        return min(recorded) - 1 if recorded else self.head


# -- the subscription's consumer -------------------------------------------------------------


class Follower:
    """A subscription consumed by a thread into a list."""

    def __init__(self, subscription: Subscription, selector: Selector, after: int) -> None:
        self.subscription = subscription
        self.selector = selector
        self.after = after
        self.received: list[SequencedEvent] = []
        self.error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._consume, name="model-follower", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        try:
            for event in self.subscription:
                with self._changed:
                    self.received.append(event)
                    self._changed.notify_all()
        except BaseException as exc:  # reported by the next check
            self.error = exc
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[SequencedEvent]:
        """What was delivered once at least ``count`` events were (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.received) < count and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    break
                self._changed.wait(left)
            return list(self.received)

    def stop(self) -> None:
        self.subscription.stop()
        self._thread.join(60.0)
        assert not self._thread.is_alive(), "the subscription did not stop"


# -- the state machine -----------------------------------------------------------------------


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


class StoreMachine(RuleBasedStateMachine):
    """One fresh store and one empty model per example; see the module docstring."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.archive_dir = Path(tempfile.mkdtemp(prefix="tamma-model-"))
        self.store = EventStore(
            dsn,
            schema=f"t_{uuid.uuid4().hex[:12]}",
            chunk_events=4,
            # All opened at once: a pool growing in its worker threads draws jitter from the
            # `random` module while hypothesis draws, which it reports as a strategy using it.
            min_connections=4,
            max_connections=4,
            archive_dir=self.archive_dir,
        )
        # A second store on the same schema, as another process would open it: its own pool,
        # cache and group commit. Some appends and compactions go through it; the reads go
        # through the first, whose cache and subscription must see them.
        try:
            self.other = EventStore(
                dsn,
                schema=self.store.schema,
                migrate=False,
                chunk_events=4,
                min_connections=2,
                max_connections=2,
                archive_dir=self.archive_dir,
            )
        except BaseException:
            self.store.close()
            raise
        self.model = Model()
        self.follower: Follower | None = None
        self.consumed = f'"{self.store.schema}".consumed'
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {self.consumed} (position bigint NOT NULL)")

    # -- helpers ---------------------------------------------------------------------------

    def writer(self, data: st.DataObject) -> EventStore:
        """The store to append or compact through: the one that reads, or the other."""
        other = data.draw(st.booleans(), label="through the other store")
        return self.other if other else self.store

    def draw_condition(
        self,
        data: st.DataObject,
        pending: Sequence[DomainEvent] = (),
        tx: Transaction | None = None,
    ) -> AppendCondition | None:
        """No condition, or a query with an ``after`` that is current or stale (in a
        transaction ``tx`` that has appended ``pending`` so far)."""
        kind = data.draw(
            st.sampled_from(["none", "unbounded", "last_match", "read_head", "stale", "any"]),
            label="condition",
        )
        if kind == "none":
            return None
        query = data.draw(queries, label="condition query") or Query()
        last = self.model.last_match(query, pending)
        after: int | None
        if kind == "unbounded":
            after = None
        elif kind == "last_match":
            after = last
        elif kind == "read_head":  # the DCB way: read, decide, append after the read's head
            after = (tx or self.store).read(query).head
            assert after == self.model.head + len(pending)
        elif kind == "stale":
            after = data.draw(st.integers(0, max(last - 1, 0)), label="stale after")
        else:
            after = data.draw(st.integers(0, self.model.head + len(pending) + 2), label="after")
        return AppendCondition(query, after)

    def draw_filter(
        self, data: st.DataObject, *, ordered: bool = True, paged: bool = True
    ) -> EventFilter:
        """A filter on at most two fields (so that it matches something), maybe ordered and
        paged."""
        fields = data.draw(
            st.lists(st.sampled_from(FILTER_FIELDS), max_size=2, unique=True), label="fields"
        )
        kwargs: dict[str, Any] = {}
        for field in fields:
            if field == "event_ids":
                known = [r.event.event_id for r in self.model.log]
                some = st.one_of(st.sampled_from(known), st.uuids()) if known else st.uuids()
                ids = data.draw(st.lists(some, max_size=3), label="event_ids")
                as_text = data.draw(st.booleans(), label="ids as text")
                kwargs[field] = [str(i) for i in ids] if as_text else ids
            elif field == "event_types":
                kwargs[field] = data.draw(
                    st.lists(st.sampled_from((*TYPES, UNKNOWN_TYPE)), max_size=2), label=field
                )
            elif field in TAG_FIELDS:
                kwargs[field] = data.draw(st.lists(st.sampled_from(TAG_VALUES), max_size=2))
            elif field == "tags":
                kwargs[field] = data.draw(tag_dicts, label="tags")
            else:
                bounds = st.one_of(st.none(), grid_times)
                start, end = data.draw(st.tuples(bounds, bounds), label="window")
                if start is not None and end is not None and end < start:
                    start, end = end, start
                as_text = data.draw(st.booleans(), label="window as text")
                kwargs["start_time"] = start.isoformat() if as_text and start else start
                kwargs["end_time"] = end.isoformat() if as_text and end else end
        if ordered:
            kwargs["order_by"] = data.draw(st.sampled_from(["position", "timestamp", "type"]))
            kwargs["order_direction"] = data.draw(st.sampled_from(["asc", "desc"]))
        if paged:
            kwargs["limit"] = data.draw(st.one_of(st.none(), st.integers(0, 5)), label="limit")
            kwargs["offset"] = data.draw(st.integers(0, 3), label="offset")
        return EventFilter(**kwargs)

    def check_refusal(
        self,
        exc: EventStoreError,
        expected: set[str],
        events: Sequence[DomainEvent],
        condition: AppendCondition | None,
        pending: Sequence[DomainEvent] = (),
    ) -> None:
        """The store refused an append: so must the model, with the same code and context."""
        hypothesis.event(f"append refused: {exc.code}" + (" (in a transaction)" if pending else ""))
        assert expected, f"the model accepts the append the store refused: {exc!r}"
        assert exc.code in expected, f"{exc!r}, expected one of {sorted(expected)}"
        if exc.code == APPEND_CONDITION_FAILED:
            assert condition is not None
            assert exc.context["after"] == condition.after, exc.context
            assert exc.context["head"] == self.model.head + len(pending), exc.context
        if exc.code == DUPLICATE_EVENT and expected == {DUPLICATE_EVENT}:
            ids = [e.event_id for e in events]
            known = self.model.ids | {e.event_id for e in pending}
            named = {uuid.UUID(i) for i in exc.context["event_ids"]}
            repeated = {i for i in ids if ids.count(i) > 1}
            if repeated:
                assert named and named <= repeated | known, (exc.context, repeated)
            else:
                assert named == known.intersection(ids), exc.context

    def record(self, first: int, events: Sequence[DomainEvent]) -> None:
        """Read back what was just written at positions ``first``.. and add it to the model
        with its ``recorded_at`` (one transaction's events share one) and ``hash``."""
        stored = self.store.read(after=first - 1).events
        expected = [content(first + i, event) for i, event in enumerate(events)]
        assert [content(e.position, e) for e in stored] == expected
        assert len({e.recorded_at for e in stored}) == 1, [e.recorded_at for e in stored]
        self.model.log += [
            Recorded(e.position, event, e.recorded_at, e.hash)
            for e, event in zip(stored, events, strict=True)
        ]

    def append(
        self,
        store: EventStore,
        events: list[DomainEvent],
        condition: AppendCondition | None,
        single: bool,
    ) -> None:
        expected = self.model.refusals(events, condition)
        head = self.model.head
        try:
            if single:
                assert len(events) == 1
                position = store.append(events[0], condition)
            else:
                position = store.append_batch(events, condition)
        except EventStoreError as exc:
            self.check_refusal(exc, expected, events, condition)
            return
        hypothesis.event(f"append accepted: {'one event' if single else 'a batch'}")
        assert not expected, f"the store accepted an append the model refuses ({expected})"
        assert position == head + len(events)
        self.record(head + 1, events)

    def check_subscription(self, timeout: float = DELIVERY_TIMEOUT) -> None:
        follower = self.follower
        assert follower is not None
        expected = [
            r.view()
            for r in self.model.log
            if r.position > follower.after and selector_matches(follower.selector, r.event)
        ]
        received = follower.wait_for(len(expected), timeout)
        hypothesis.event(f"subscription delivered {'some' if received else 'no'} events")
        assert follower.error is None, f"the subscription failed: {follower.error!r}"
        assert views(received) == expected

    # -- appends ---------------------------------------------------------------------------

    @rule(event=domain_events(), data=st.data())
    def append_one(self, event: DomainEvent, data: st.DataObject) -> None:
        self.append(self.writer(data), [event], self.draw_condition(data), single=True)

    @rule(events=batches, data=st.data())
    def append_batch(self, events: list[DomainEvent], data: st.DataObject) -> None:
        self.append(self.writer(data), events, self.draw_condition(data), single=False)

    @rule(events=batches, data=st.data())
    def append_a_duplicate(self, events: list[DomainEvent], data: st.DataObject) -> None:
        """A batch holding the id of a stored event (maybe archived) or one id twice:
        DUPLICATE_EVENT, unless its condition fails first."""
        if self.model.head and data.draw(st.booleans(), label="a stored id"):
            source = data.draw(st.sampled_from(self.model.log), label="stored").event
        else:
            source = data.draw(st.sampled_from(events), label="repeated")
        again = DomainEvent(
            data.draw(st.sampled_from(TYPES)), tags=data.draw(tag_dicts), event_id=source.event_id
        )
        at = data.draw(st.integers(0, len(events)), label="at")
        events = [*events[:at], again, *events[at:]]
        condition = self.draw_condition(data)
        self.append(self.writer(data), events, condition, single=len(events) == 1)

    @rule(data=st.data(), roll_back=st.booleans())
    def append_in_transaction(self, data: st.DataObject, roll_back: bool) -> None:
        """Appends in one transaction, each accepted or refused as the model says (a refused
        one leaves the block usable), all committed together, or none when it raises."""
        head = self.model.head
        pending: list[DomainEvent] = []
        try:
            with self.writer(data).transaction() as tx:
                for _ in range(data.draw(st.integers(1, 3), label="appends")):
                    events = data.draw(batches, label="batch")
                    condition = self.draw_condition(data, pending, tx)
                    expected = self.model.refusals(events, condition, pending)
                    try:
                        position = tx.append_batch(events, condition)
                    except EventStoreError as exc:
                        self.check_refusal(exc, expected, events, condition, pending)
                        continue
                    assert not expected, f"accepted an append the model refuses ({expected})"
                    assert position == head + len(pending) + len(events)
                    pending += events
                inside = tx.read(after=head)
                assert [content(e.position, e) for e in inside] == [
                    content(head + 1 + i, e) for i, e in enumerate(pending)
                ]
                assert inside.head == (head + len(pending) if pending else head)
                if roll_back:
                    raise _Rollback
        except _Rollback:
            pass
        if pending and not roll_back:
            self.record(head + 1, pending)
        assert self.store.head() == self.model.head

    # -- reads -----------------------------------------------------------------------------

    @rule(
        query=queries,
        data=st.data(),
        limit=st.one_of(st.none(), st.integers(0, 4)),
        backwards=st.booleans(),
    )
    def read(
        self, query: Query | None, data: st.DataObject, limit: int | None, backwards: bool
    ) -> None:
        """`read` covers the whole history, archived events included."""
        after = data.draw(st.one_of(st.none(), st.integers(0, self.model.head + 1)), label="after")
        matching = [
            r for r in self.model.log if r.position > (after or 0) and query_matches(query, r.event)
        ]
        if backwards:
            matching.reverse()
        if limit is not None:
            matching = matching[:limit]
        result = self.store.read(query, after=after, limit=limit, backwards=backwards)
        assert views(result.events) == [r.view() for r in matching]
        if limit is None:
            assert result.head == self.model.head
        else:  # the newest position returned: the `after` of a decision on what was read
            assert result.head == max((r.position for r in matching), default=None)

    @rule(data=st.data(), include_archived=st.booleans())
    def get_events(self, data: st.DataObject, include_archived: bool) -> None:
        event_filter = self.draw_filter(data)
        records = self.model.log if include_archived else self.model.live()
        got = self.store.get_events(event_filter, include_archived=include_archived)
        assert views(got) == [r.view() for r in apply_filter(event_filter, records)]

    @rule(data=st.data())
    def count_events(self, data: st.DataObject) -> None:
        """Counted over the whole history (the summaries keep archived events)."""
        event_filter = self.draw_filter(data, ordered=False)
        expected = len(apply_filter(event_filter, self.model.log))
        assert self.store.count_events(event_filter) == expected

    @rule(
        data=st.data(),
        batch_size=st.integers(1, 3),
        include_archived=st.booleans(),
        interleave=st.booleans(),
    )
    def stream_events(
        self, data: st.DataObject, batch_size: int, include_archived: bool, interleave: bool
    ) -> None:
        """A stream is pinned to the head when it starts: events appended while it is read
        (``interleave``, after its first event) are not in it."""
        event_filter = self.draw_filter(data)
        records = self.model.log if include_archived else self.model.live()
        expected = [r.view() for r in apply_filter(event_filter, records)]
        got: list[SequencedEvent] = []
        for streamed in self.store.stream_events(
            event_filter, batch_size=batch_size, include_archived=include_archived
        ):
            got.append(streamed)
            if interleave and len(got) == 1:
                self.append(self.other, data.draw(batches, label="meanwhile"), None, single=False)
        assert views(got) == expected

    @rule(
        data=st.data(),
        page_size=st.integers(1, 3),
        include_archived=st.booleans(),
        interleave=st.booleans(),
    )
    def paginate(
        self, data: st.DataObject, page_size: int, include_archived: bool, interleave: bool
    ) -> None:
        """A walk of pages (`get_page` and its tokens) returns each event stored at its first
        page once, whatever is appended meanwhile (``interleave``, after the first page)."""
        event_filter = self.draw_filter(data, paged=False)
        records = self.model.log if include_archived else self.model.live()
        expected = [r.view() for r in apply_filter(event_filter, records)]
        page = self.store.get_page(
            event_filter, page_size=page_size, include_archived=include_archived
        )
        pages = [page.events]
        if interleave:
            self.append(self.other, data.draw(batches, label="meanwhile"), None, single=False)
        while page.next_token is not None:
            page = self.store.get_page(
                event_filter,
                page_size=page_size,
                token=page.next_token,
                include_archived=include_archived,
            )
            pages.append(page.events)
        assert all(len(p) <= page_size for p in pages)
        assert all(pages[1:]) and (pages[0] or len(pages) == 1), [len(p) for p in pages]
        assert views([e for p in pages for e in p]) == expected

    @rule(data=st.data())
    def get_event(self, data: st.DataObject) -> None:
        """Any stored event by its id, live or archived; None for an unknown id."""
        known = [r.event.event_id for r in self.model.log]
        event_id = data.draw(
            st.one_of(st.sampled_from(known), st.uuids()) if known else st.uuids(), label="id"
        )
        found = self.store.get_event(event_id)
        records = [r for r in self.model.log if r.event.event_id == event_id]
        if records:
            assert found is not None and views([found]) == [records[0].view()]
        else:
            assert found is None

    @rule(data=st.data(), group_by=st.sampled_from(["event_type", "tag", "minute", "hour", "day"]))
    def aggregate(self, data: st.DataObject, group_by: GroupBy) -> None:
        """Per type, tag value or UTC bucket over the whole history: count, first and last
        timestamp, sorted by key; the filter's order, limit and offset do not apply."""
        event_filter = self.draw_filter(data)
        tag_key = None
        if group_by == "tag":
            tag_key = data.draw(st.sampled_from(TAG_KEYS), label="tag_key")
        groups: dict[str, list[datetime]] = {}
        for r in self.model.log:
            if not filter_matches(event_filter, r.event):
                continue
            key = bucket(r.event, group_by, tag_key)
            if key is not None:
                groups.setdefault(key, []).append(r.event.timestamp)
        expected = [
            AggregateRow(key, len(times), min(times), max(times))
            for key, times in sorted(groups.items())
        ]
        assert self.store.aggregate(event_filter, group_by, tag_key=tag_key) == expected

    @rule()
    def summaries(self) -> None:
        """Types and tags stored, over the whole history, sorted."""
        events = [r.event for r in self.model.log]
        assert self.store.get_event_types() == sorted({e.event_type for e in events})
        tags: dict[str, set[str]] = {}
        for stored in events:
            for key, value in stored.tags.items():
                tags.setdefault(key, set()).add(value)
        assert self.store.get_tags() == {key: sorted(values) for key, values in tags.items()}

    # -- subscriptions ---------------------------------------------------------------------

    @precondition(lambda self: self.follower is None)
    @rule(data=st.data(), buffer=st.integers(1, 4))
    def subscribe(self, data: st.DataObject, buffer: int) -> None:
        kind = data.draw(st.sampled_from(["all", "query", "filter"]), label="subscribe to")
        selector: Selector = None
        if kind == "query":
            selector = data.draw(queries, label="query")
        elif kind == "filter":
            selector = self.draw_filter(data, ordered=False, paged=False)
        start = data.draw(st.sampled_from(["start", "head", "any", "beyond"]), label="from")
        after: int | None = None
        if start == "head":
            after = self.model.head
        elif start == "any":
            after = data.draw(st.integers(0, self.model.head), label="after")
        elif start == "beyond":  # the events up to there, appended later, are skipped
            after = self.model.head + data.draw(st.integers(1, 3), label="beyond the head")
        subscription = self.store.subscribe(selector, after=after, buffer=buffer)
        self.follower = Follower(subscription, selector, after or 0)
        self.check_subscription()

    @precondition(lambda self: self.follower is not None)
    @rule()
    def follow(self) -> None:
        self.check_subscription()

    @precondition(lambda self: self.follower is not None)
    @rule()
    def unsubscribe(self) -> None:
        follower = self.follower
        assert follower is not None
        self.check_subscription()
        follower.stop()
        delivered = follower.received
        assert follower.subscription.position == (
            delivered[-1].position if delivered else follower.after
        )
        self.follower = None

    # -- durable consumers -----------------------------------------------------------------

    def run_consumer(
        self, name: str, batch_size: int, crash_at: int | None
    ) -> tuple[dict[int, list[int]], bool]:
        """Run a worker of consumer ``name`` until it is caught up, or until its handler has
        been given ``crash_at`` events; what each partition delivered, and whether it crashed."""
        query, key, partitions, transactional = CONSUMERS[name]
        delivered: dict[int, list[int]] = {p: [] for p in range(partitions)}
        given = [0]

        def take(events: list[SequencedEvent]) -> None:
            for event in events:
                partition = partition_of(event, key, partitions)
                assert all(partition_of(e, key, partitions) == partition for e in events)
                given[0] += 1
                if crash_at is not None and given[0] >= crash_at:
                    raise _Crash()
                delivered[partition].append(event.position)

        def project(events: list[SequencedEvent], tx: Transaction) -> None:
            take(events)
            for event in events:
                tx.connection.execute(f"INSERT INTO {self.consumed} VALUES (%s)", [event.position])

        consumer = self.store.consumer(
            name,
            query,
            partition_by=key,
            partitions=partitions,
            batch_size=batch_size,
            lease_time=5,
        )
        try:
            if transactional:
                consumer.run(project, transactional=True, until_idle=True)
            else:
                consumer.run(take, until_idle=True)
        except _Crash:
            return delivered, True
        return delivered, False

    def stored_checkpoints(self, name: str) -> dict[int, int]:
        (state,) = self.store.consumers(name)
        assert [w for w in state.workers] == []  # the worker left, even by a crash
        return {p.partition: p.position for p in state.partitions}

    def check_projection(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(f"SELECT position FROM {self.consumed}").fetchall()
        assert Counter(int(row[0]) for row in rows) == self.model.projected

    @rule(name=st.sampled_from(sorted(CONSUMERS)), batch_size=st.integers(1, 4))
    def consume(self, name: str, batch_size: int) -> None:
        """Each partition delivers exactly its matching events after its checkpoint, in order,
        and ends at the head."""
        pending = self.model.pending_for(name)
        delivered, crashed = self.run_consumer(name, batch_size, None)
        assert not crashed
        assert delivered == pending
        _, _, partitions, transactional = CONSUMERS[name]
        assert self.stored_checkpoints(name) == dict.fromkeys(range(partitions), self.model.head)
        self.model.checkpoints[name] = dict.fromkeys(range(partitions), self.model.head)
        if transactional:
            self.model.projected.update(p for positions in pending.values() for p in positions)
        self.check_projection()

    @rule(
        name=st.sampled_from(sorted(CONSUMERS)),
        batch_size=st.integers(1, 4),
        crash_at=st.integers(1, 6),
    )
    def crash_in_a_batch(self, name: str, batch_size: int, crash_at: int) -> None:
        """A worker dies in the middle of a batch: each checkpoint moved only past events its
        handler was done with; a plain handler got all of those, in order; the projection holds
        exactly the committed ones."""
        pending = self.model.pending_for(name)
        delivered, crashed = self.run_consumer(name, batch_size, crash_at)
        hypothesis.event(f"consumer {name}: {'crashed' if crashed else 'caught up first'}")
        _, _, partitions, transactional = CONSUMERS[name]
        stored = self.stored_checkpoints(name)
        before = self.model.checkpoints.get(name, {})
        for partition in range(partitions):
            done = [p for p in pending[partition] if p <= stored[partition]]
            assert delivered[partition][: len(done)] == done
            if crashed:
                assert before.get(partition, 0) <= stored[partition] <= self.model.head
            else:
                assert stored[partition] == self.model.head
            if transactional:
                self.model.projected.update(done)
        self.model.checkpoints[name] = stored
        self.check_projection()

    @rule(name=st.sampled_from(sorted(CONSUMERS)), data=st.data())
    def reset_consumer(self, name: str, data: st.DataObject) -> None:
        """A reset sets every checkpoint (the events after it come again); one of a consumer
        never run is refused."""
        to = data.draw(st.integers(0, self.model.head), label="reset to")
        _, _, partitions, _ = CONSUMERS[name]
        if name not in self.model.checkpoints:
            with pytest.raises(EventStoreError) as refused:
                self.store.reset_consumer(name, to=to)
            assert refused.value.code == CONSUMER_CONFLICT
            return
        assert self.store.reset_consumer(name, to=to) == partitions
        self.model.checkpoints[name] = dict.fromkeys(range(partitions), to)
        assert self.stored_checkpoints(name) == self.model.checkpoints[name]

    # -- compaction and integrity ----------------------------------------------------------

    @precondition(lambda self: self.model.head > self.model.archived)
    @rule(data=st.data(), file_events=st.integers(2, 5), as_text=st.booleans())
    def compact(self, data: st.DataObject, file_events: int, as_text: bool) -> None:
        """Archive the prefix recorded before a cut-off: before every event, after every one,
        at one's ``recorded_at`` or just after it; some cut-offs fall among the event
        timestamps, which must not matter."""
        kind = data.draw(
            st.sampled_from(["past", "future", "at", "at", "just_after", "just_after"]),
            label="cut",
        )
        if kind == "past":
            before = TIMES[3]
        elif kind == "future":
            before = datetime.now(UTC) + timedelta(days=1)
        else:
            live = self.model.live()
            before = data.draw(st.sampled_from(live), label="cut at").recorded_at
            if kind == "just_after":
                before += timedelta(microseconds=1)
        end = max(self.model.compaction_end(before), self.model.archived)
        moved = self.writer(data).compact_events(
            before.isoformat() if as_text else before,
            archive_dir=self.archive_dir,
            file_events=file_events,
        )
        hypothesis.event(f"compaction: {'some' if moved else 'no'} events moved, cut {kind}")
        assert moved == end - self.model.archived
        self.model.archived = end
        live_views = [r.view() for r in self.model.live()]
        assert views(self.store.get_events()) == live_views
        assert views(self.store.get_events(include_archived=True)) == [
            r.view() for r in self.model.log
        ]

    @rule(include_archived=st.booleans())
    def verify(self, include_archived: bool) -> None:
        report = self.store.verify(include_archived=include_archived)
        assert report.ok, report
        assert report.first_bad_position is None
        checked = self.model.head if include_archived else self.model.head - self.model.archived
        assert report.checked == checked, report

    @invariant()
    def head_is_the_last_position(self) -> None:
        assert self.store.head() == self.model.head

    def teardown(self) -> None:
        try:
            # Only for an example that has not failed already: its failure is the one to see.
            if sys.exc_info()[1] is None:
                assert views(self.store.read().events) == [r.view() for r in self.model.log]
                if self.follower is not None:
                    self.check_subscription()
                report = self.store.verify()
                assert report.ok and report.checked == self.model.head, report
        finally:
            try:
                if self.follower is not None:
                    self.follower.stop()
                self.store.close()
                self.other.close()
            finally:
                drop_schema(self.dsn, self.store.schema)
                shutil.rmtree(self.archive_dir, ignore_errors=True)


def test_the_store_agrees_with_the_model(pg_dsn: str) -> None:
    class OnTheTestServer(StoreMachine):
        def __init__(self) -> None:
            super().__init__(pg_dsn)

    run_state_machine_as_test(
        OnTheTestServer,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
