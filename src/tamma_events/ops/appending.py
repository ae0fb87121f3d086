"""Appending: validating and encoding a batch, checking its condition under the head lock,
and writing it (by the append function, or by binary COPY), alone, in a group, or in a
caller's transaction."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import msgspec
import psycopg
import psycopg.errors

from tamma_events import codec as _codec
from tamma_events.codec.reference import COPY_HEADER, COPY_TRAILER, PreparedBatch, json_rows
from tamma_events.errors import (
    AppendConditionFailed,
    DuplicateEvent,
    EventStoreError,
    StorageError,
    ValidationFailed,
    storage_error,
)
from tamma_events.model import (
    AppendCondition,
    DomainEvent,
)
from tamma_events.ops.request import AppendRequest
from tamma_events.ops.state import StoreState
from tamma_events.ops.steps import CopyIn, Op, Rollback, Run
from tamma_events.sql import (
    COMMIT,
    PRIMARY_LSN,
    RELEASE_SAVEPOINT,
    ROLLBACK,
    ROLLBACK_TO_SAVEPOINT,
    SAVEPOINT,
    Check,
    condition_check,
)

_T = TypeVar("_T")
_S = TypeVar("_S")


_EVENT_ID_CONSTRAINT = "events_event_id_key"


# COPY data is handed to psycopg in slices of this size, so libpq sends while we slice.
_COPY_SLICE = 1 << 20


# Groups up to these sizes are written by the append function in one round trip, committing as
# the statement ends, so the head lock is held only while the server runs it. A single append
# takes a quarter less time than by lock, check, COPY and commit; 16 threads' groups (about nine
# events each) ran as fast as by COPY in the same runs (within the noise), with one round trip.
_FUNCTION_MAX_EVENTS = 256


_FUNCTION_MAX_BYTES = 256 << 10


#: An append that ends this many events past the summaries' folded position folds them, after
#: its commit and outside the head lock, in the background (sql/schema/0010_baseline.sql): the
#: tail that reads add up stays short, and each fold is worth its transaction.
FOLD_EVENTS = 256


def as_events(events: Iterable[DomainEvent | dict[str, Any]]) -> list[DomainEvent]:
    """The batch as a list; mappings (from JSON input) are converted to `DomainEvent`s."""
    batch = list(events)
    for index, event in enumerate(batch):
        if isinstance(event, dict):
            if isinstance(event.get("event_id"), (bytes, bytearray, memoryview)):
                # msgspec would take 16 bytes for a UUID; a DomainEvent refuses them.
                raise ValidationFailed(
                    f"event {index}: event_id must be a UUID, got bytes",
                    {"index": index, "field": "event_id"},
                )
            try:
                batch[index] = msgspec.convert(event, DomainEvent)
            except (msgspec.ValidationError, UnicodeEncodeError, RecursionError) as exc:
                raise ValidationFailed(
                    f"event {index}: {_conversion_problem(exc)}",
                    {"index": index, "field": _conversion_field(exc, event)},
                ) from None
    return batch  # type: ignore[return-value]


def _conversion_problem(exc: Exception) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return "a string holds a lone surrogate"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


_FIELD_IN_PATH = re.compile(r"at `\$\.([a-z_]+)")


def _conversion_field(exc: Exception, event: dict[Any, Any]) -> str | None:
    """The field of a mapping event that msgspec could not convert: from the path in its
    message, else the first text field that cannot be UTF-8 (what makes msgspec raise
    UnicodeEncodeError while parsing a time or an id)."""
    match = _FIELD_IN_PATH.search(str(exc)) if isinstance(exc, msgspec.ValidationError) else None
    if match:
        return match[1]
    for field in ("tags", "metadata", "data"):  # msgspec names no path for a bad key
        value = event.get(field)
        if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
            return field
    if isinstance(exc, UnicodeEncodeError):
        for field in ("timestamp", "event_id", "event_type"):
            value = event.get(field)
            if isinstance(value, str) and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return field
    return None


def _condition_error(condition: AppendCondition, head: int) -> EventStoreError:
    after = condition.after
    where = "in the store" if after is None else f"after position {after}"
    return AppendConditionFailed(
        f"an event matching the append condition exists {where}; nothing was written",
        {"after": after, "head": head},
    )


def _violated_in_group(condition: AppendCondition, earlier: list[AppendRequest]) -> bool:
    """Whether events accepted earlier in the same transaction violate ``condition``."""
    after = condition.after or 0
    query = condition.fail_if_events_match
    for request in earlier:
        for offset, event in enumerate(request.events):
            if request.first_position + offset > after and query.matches(
                event.event_type, event.tags
            ):
                return True
    return False


def _text_array(values: Iterable[str]) -> str:
    """``values`` as a PostgreSQL text[] literal: each element quoted, so none is NULL."""
    quoted = (value.replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return "{" + ",".join(f'"{value}"' for value in quoted) + "}"


def _condition_document(condition: AppendCondition | None) -> dict[str, Any] | None:
    """A (validated) condition as the append function takes it (its types as a text[]
    literal, which the function casts without running a query)."""
    if condition is None:
        return None
    items: list[dict[str, Any]] = []
    for item in condition.fail_if_events_match.items:
        if not item.types and not item.tags:
            items = []  # an item matching everything: so does the query
            break
        entry: dict[str, Any] = {"types": _text_array(item.types)}
        if item.tags:
            entry["tags"] = item.tags
        items.append(entry)
    return {"after": condition.after or 0, "items": items}


def _accept(requests: list[AppendRequest], head: int, verdicts: list[bool]) -> list[AppendRequest]:
    """Settle the requests whose condition is violated (by a stored event, per ``verdicts``,
    one per conditional request, or by an event accepted earlier in the same transaction);
    give the others consecutive positions after ``head``."""
    violated = iter(verdicts)
    accepted: list[AppendRequest] = []
    position = head
    for request in requests:
        condition = request.condition
        if condition is not None:
            if next(violated) or _violated_in_group(condition, accepted):
                # The head this check saw: the stored one, and the group's accepted events.
                request.fail(_condition_error(condition, position))
                continue
        request.first_position = position + 1
        position += request.count
        accepted.append(request)
    return accepted


def _slices(buffer: bytearray) -> Iterator[memoryview]:
    view = memoryview(buffer)
    try:
        for start in range(0, len(view), _COPY_SLICE):
            yield view[start : start + _COPY_SLICE]
    finally:
        view.release()


def _duplicate_id(exc: BaseException) -> bool:
    """Whether ``exc`` is the unique violation of an event id already stored (or given twice in
    the transaction): the append then fails with `DuplicateEvent`, naming the ids."""
    return (
        isinstance(exc, psycopg.errors.UniqueViolation)
        and exc.diag.constraint_name == _EVENT_ID_CONSTRAINT
    )


def _append_failed(exc: psycopg.Error, committing: bool) -> StorageError:
    """`StorageError` for an append that failed with ``exc`` (rolled back already); when the
    failure came with the commit, whether the append committed is unknown, and it says so."""
    return storage_error(exc, "appending", **({"outcome": "unknown"} if committing else {}))


class DuplicateInGroup(Exception):
    def __init__(self, error: EventStoreError) -> None:
        super().__init__(error)
        self.error = error


class TransactionState:
    """The head as a transaction of appends (`EventStore.transaction`, or appends in a
    caller's own transaction) has moved it."""

    __slots__ = ("hash", "head")

    def __init__(self) -> None:
        self.head: int | None = None
        self.hash = b""


class Appending(StoreState):
    """The append operations of a store (see `tamma_events.stores.core.StoreCore`)."""

    def _request(
        self, events: Iterable[DomainEvent | dict[str, Any]], condition: AppendCondition | None
    ) -> tuple[list[DomainEvent], Check | None, PreparedBatch | None]:
        """The batch, its condition's SQL parameters, and (up to ``chunk_events`` events) its
        encoding: everything validated before any database work."""
        batch = as_events(events)
        check = None if condition is None else condition_check(condition)
        if len(batch) <= self.chunk_events:
            return batch, check, _codec.prepare(batch, self.max_event_bytes)
        return batch, check, None

    def validate(self, events: Iterable[DomainEvent | dict[str, Any]]) -> list[DomainEvent]:
        """Check ``events`` as `append_batch` would before writing them (types, sizes, JSON,
        ids, timestamps), without touching the database; returns them as `DomainEvent`s.
        Raises the `EventStoreError` the append would raise (``VALIDATION_FAILED``, with the
        event's ``index`` and ``field``). Stored ids are found only by the append itself."""
        batch = as_events(events)
        _codec.prepare(batch, self.max_event_bytes)
        return batch

    def _full_request(
        self, events: Iterable[DomainEvent | dict[str, Any]], condition: AppendCondition | None
    ) -> AppendRequest:
        """A request with the whole batch encoded at once (appends in a transaction)."""
        batch, check, prepared = self._request(events, condition)
        if prepared is None:
            prepared = _codec.prepare(batch, self.max_event_bytes)
        return AppendRequest(batch, prepared, condition, check)

    def _op_write(self, requests: list[AppendRequest]) -> Op[None]:
        """One transaction: lock the head, check the conditions, write the accepted requests'
        events, move the head and commit; settles every request it accepts or refuses.

        Small groups (single appends, mostly) take one round trip: the ``append_group``
        function does it all server-side, committing as the statement ends. Larger ones lock
        and check, then send their rows by binary COPY, with the chain computed here.
        """
        statements = self._statements
        committing = False
        try:
            if sum(r.count for r in requests) <= _FUNCTION_MAX_EVENTS and (
                sum(len(r.batch.buffer) for r in requests) <= _FUNCTION_MAX_BYTES
            ):
                committing = True
                yield from self._op_write_by_function(requests)
                yield from self._op_note_commit()
                return
            head, head_hash, verdicts = yield from self._op_lock_and_check(requests)
            accepted = _accept(requests, head, verdicts)
            if not accepted:
                yield Run(ROLLBACK, fetch="none")
                return
            last_hash = head_hash
            for request in accepted:
                last_hash = self._seal(request.batch, request.first_position, last_hash)

            def chunks() -> Iterator[bytes | memoryview]:
                yield COPY_HEADER
                for request in accepted:
                    yield from _slices(request.batch.buffer)
                yield COPY_TRAILER

            yield CopyIn(statements.copy_events, chunks())
            committing = True
            # The COPY moved the head (the trigger of sql/schema/0010_baseline.sql).
            yield Run(COMMIT, fetch="none")
        except psycopg.Error as exc:
            yield Rollback()
            if not _duplicate_id(exc):
                raise _append_failed(exc, committing) from exc
            error = yield from self._op_duplicates_error(requests)
            if len(requests) > 1:
                raise DuplicateInGroup(error) from exc
            requests[0].fail(error)
            return
        for request in accepted:
            request.succeed(request.first_position)
        yield from self._op_note_commit()

    def _op_write_group(self, requests: list[AppendRequest]) -> Op[None]:
        """`_op_write` for a group commit's requests: when an event id of the group is
        already stored (or given twice), the transaction fails for all of them, so each is
        then written alone, its condition checked again, to find out whose it was."""
        try:
            yield from self._op_write(requests)
        except DuplicateInGroup:
            for request in requests:
                request.reset()
            for request in requests:
                try:
                    yield from self._op_write([request])
                except EventStoreError as exc:
                    request.fail(exc)

    def _fold_due(self, position: int) -> bool:
        """Whether an append that ended at ``position`` should start folding the summaries
        (none is running here, and the tail may be long): the caller then runs `_op_fold` in
        the background, and clears `_folding` when it is done."""
        if self._folding or position - self._folded < FOLD_EVENTS:
            return False
        self._folding = True
        return True

    def _op_fold(self, min_tail: int = FOLD_EVENTS, *, wait: bool = False) -> Op[int]:
        """Fold the summaries' tail if it holds at least ``min_tail`` events (unless another
        session is folding it and ``wait`` is false); returns the folded position."""
        row = yield Run(self._statements.fold_summaries, [min_tail, wait], fetch="one")
        self._folded = max(self._folded, int(row[0]))
        return self._folded

    def _op_note_commit(self) -> Op[None]:
        """With replicas, note the primary's WAL position after a commit: reads wait for a
        replica to have replayed it (read your writes)."""
        if self._replicas:
            try:
                row = yield Run(PRIMARY_LSN, fetch="one")
            except psycopg.Error:
                # The append committed; only its position is unknown. The next read asks the
                # primary for it before choosing a replica. Raising here would make the
                # append look failed, and a retry store it twice.
                self._replicas.pending = True
                return
            self._replicas.wrote(int(row[0]))

    def _op_write_by_function(self, requests: list[AppendRequest]) -> Op[None]:
        """One statement, in autocommit: ``append_group`` (sql/schema/0010_baseline.sql)."""
        described: list[list[Any]] = []
        events: list[list[Any]] = []
        rows = bytearray()
        offsets = [0]
        for request in requests:
            described.append([request.count, _condition_document(request.condition)])
            events += json_rows(request.batch)
            base = len(rows)
            rows += request.batch.buffer
            offsets += [base + offset for offset in request.batch.offsets[1:]]
        document = {"requests": described, "offsets": offsets, "events": events}
        params = [msgspec.json.encode(document).decode(), bytes(rows)]
        result = yield Run(self._statements.append_group, params, fetch="one")
        if result is None:  # pragma: no cover - the function always returns its array
            raise StorageError("the append function returned nothing")
        # The function returns the head its lock found; a request's check also saw the events
        # of the requests accepted before it in the group, so its error reports that head.
        seen, *firsts = result[0]
        for request, first in zip(requests, firsts, strict=True):
            if first is None:
                assert request.condition is not None
                request.fail(_condition_error(request.condition, seen))
            else:
                request.succeed(first)
                seen = first + request.count - 1

    def _op_lock_and_check(
        self, requests: list[AppendRequest]
    ) -> Op[tuple[int, bytes, list[bool]]]:
        """BEGIN and lock the head row (one round trip), then check the requests' conditions
        against the stored events (one more, if any). Returns the head, its hash and one verdict
        per condition (True: violated).

        The checks are a statement of their own, run after the lock is granted, so under READ
        COMMITTED they see every append committed before it: one statement taking the lock and
        checking would check against a snapshot from before the wait.
        """
        statements = self._statements
        row = yield Run(statements.begin_and_lock_head, fetch="last")
        if row is None:
            raise StorageError("the head row is missing: is the schema migrated?")
        checks = [r.check for r in requests if r.check is not None]
        verdicts: list[bool] = []
        if checks:
            found = yield Run(*statements.checks(checks), fetch="one", prepare=False)
            verdicts = list(found or ())
        return int(row[0]), bytes(row[1]), verdicts

    def _op_duplicates_error(self, requests: list[AppendRequest]) -> Op[EventStoreError]:
        """Name the ids that made an append fail: those already stored, and those that occur
        twice among ``requests`` (across the chunks of a large batch, or across a group)."""
        ids = [event.event_id for request in requests for event in request.events]
        ids = [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]
        try:
            rows = yield Run(self._statements.existing_ids, [ids])
        except psycopg.Error as exc:
            return storage_error(exc, "looking up duplicate event ids")
        existing = [str(row[0]) for row in rows]
        repeated = [str(i) for i, n in Counter(ids).items() if n > 1]
        parts = []
        if existing:
            parts.append(f"{len(existing)} already stored")
        if repeated:
            parts.append(f"{len(repeated)} given twice")
        return DuplicateEvent(
            f"duplicate event ids ({', '.join(parts) or 'none found'}); nothing was written",
            {"event_ids": list(dict.fromkeys(existing + repeated))},
        )

    def _op_append_large(
        self,
        batch: list[DomainEvent],
        condition: AppendCondition | None,
        check: Check | None,
    ) -> Op[tuple[int, int]]:
        """One transaction for a batch above ``chunk_events``, encoded chunk by chunk while
        earlier chunks stream to the server. Returns the last position and the bytes sent."""
        size = self.chunk_events
        first = _codec.prepare(batch[:size], self.max_event_bytes)
        request = AppendRequest(batch, first, condition, check)
        statements = self._statements
        committing = False
        sent = 0
        try:
            head, last_hash, verdicts = yield from self._op_lock_and_check([request])
            # The request's count is that of its first chunk; the condition concerns stored
            # events only, so the verdict is the same.
            if not _accept([request], head, verdicts):
                yield Run(ROLLBACK, fetch="none")
                return request.result(), 0
            position = head + 1

            def chunks() -> Iterator[bytes | memoryview]:
                nonlocal position, last_hash, sent
                yield COPY_HEADER
                prepared: PreparedBatch = first
                for start in range(0, len(batch), size):
                    if start:
                        prepared = _codec.prepare(
                            batch[start : start + size], self.max_event_bytes, start
                        )
                    last_hash = self._seal(prepared, position, last_hash)
                    sent += len(prepared.buffer)
                    yield from _slices(prepared.buffer)
                    position += prepared.count
                yield COPY_TRAILER

            yield CopyIn(statements.copy_events, chunks())
            committing = True
            yield Run(COMMIT, fetch="none")
        except EventStoreError as exc:
            yield Rollback()
            raise exc.with_traceback(None) from None
        except psycopg.Error as exc:
            yield Rollback()
            if not _duplicate_id(exc):
                raise _append_failed(exc, committing) from exc
            raise (yield from self._op_duplicates_error([request])) from exc
        yield from self._op_note_commit()
        return position - 1, sent

    def _op_tx_append(self, state: TransactionState, request: AppendRequest) -> Op[int]:
        """An append inside a transaction the store does not commit: lock the head (once per
        transaction), check, COPY (which moves the head). Each append runs in a savepoint, its
        lock included, so a failed one (a lock timeout, say) is undone alone and leaves the
        transaction usable."""
        statements = self._statements
        locked_here = False
        yield Run(SAVEPOINT, fetch="none")
        try:
            if state.head is None:
                row = yield Run(statements.lock_head, fetch="one")
                if row is None:
                    raise StorageError("the head row is missing: is the schema migrated?")
                state.head, state.hash = int(row[0]), bytes(row[1])
                locked_here = True
            verdicts: list[bool] = []
            if request.check is not None:
                found = yield Run(*statements.checks([request.check]), fetch="one", prepare=False)
                verdicts = list(found or ())
            if not _accept([request], state.head, verdicts):
                yield Run(RELEASE_SAVEPOINT, fetch="none")
                return request.result()
            last_hash = self._seal(request.batch, request.first_position, state.hash)
            yield CopyIn(
                statements.copy_events,
                [COPY_HEADER, *_slices(request.batch.buffer), COPY_TRAILER],
            )
            yield Run(RELEASE_SAVEPOINT, fetch="none")
        except psycopg.Error as exc:
            # Undo this append only (the head lock too, when it took it), so the transaction
            # stays usable when the connection is.
            if locked_here:
                state.head = None
            try:
                yield Run(ROLLBACK_TO_SAVEPOINT, fetch="none")
            except psycopg.Error:
                pass
            if _duplicate_id(exc):
                raise (yield from self._op_duplicates_error([request])) from exc
            raise _append_failed(exc, committing=False) from exc
        state.head = request.last_position
        state.hash = last_hash
        return request.last_position

    def _op_tx_commit(self, state: TransactionState) -> Op[None]:
        yield Run(COMMIT, fetch="none")
        if state.head is not None:
            yield from self._op_note_commit()
