"""Reading: DCB reads, queries, summaries, pages and keyset walks, snapshots and projections."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import psycopg
import psycopg.errors
from psycopg import sql

from tamma_events import codec as _codec
from tamma_events.checks import whole
from tamma_events.codec.reference import MAX_TAG_KEY_LENGTH, parse_uuid
from tamma_events.errors import (
    QueryError,
    ValidationFailed,
    short_repr,
)
from tamma_events.filters import (
    AggregateRow,
    Criteria,
    EventFilter,
    GroupBy,
    Page,
    TagValue,
    TagValuesPage,
    check_count,
    check_text,
    decode_tag_token,
    decode_token,
    encode_tag_token,
    encode_token,
    normalize,
    token_key,
)
from tamma_events.model import (
    Projection,
    Query,
    ReadResult,
    SequencedEvent,
    Snapshot,
    StoreStats,
    TypeStats,
)
from tamma_events.ops.replicas import Behind
from tamma_events.ops.state import StoreState
from tamma_events.ops.steps import CopyOut, Op, Run
from tamma_events.sql import (
    BEGIN_SNAPSHOT,
    COMMIT,
    EVENT_SELECT,
    FEW_MATCHES,
    SERVER_VERSION,
    Select,
    after_position,
    count_statement,
    explain,
    query_shape,
    summary_aggregate,
    tag_matches,
    window_positions,
)

_T = TypeVar("_T")
_S = TypeVar("_S")


_GROUPS = ("event_type", "tag", "minute", "hour", "day")


#: The largest page `get_page` serves.
MAX_PAGE_SIZE = 100_000


_decode_events = msgspec.json.Decoder(list[SequencedEvent]).decode


_decode_event = msgspec.json.Decoder(SequencedEvent).decode

# A read's binary COPY rows are decoded this many at a time (or this many bytes), each chunk
# as soon as it arrives: the client decodes while the server still sends the rest.
READ_CHUNK_ROWS = 128
READ_CHUNK_BYTES = 256 << 10


#: A key's values are ordered by this many of their first characters (then by digest): the
#: expression `tag_summary_key_value` indexes (sql/schema/0011_tag_values.sql).
ORDER_CHARS = 200


def _successor(prefix: str) -> str | None:
    """The least string after every string that starts with ``prefix``, bytewise (by code
    point): its last character one higher; None when there is none (an empty prefix, or one of
    U+10FFFF only)."""
    prefix = prefix.rstrip("\U0010ffff")
    if not prefix:
        return None
    point = ord(prefix[-1]) + 1
    if 0xD800 <= point < 0xE000:  # surrogates are not characters: the next one is U+E000
        point = 0xE000
    return prefix[:-1] + chr(point)


def check_tag_key(key: object, field: str = "key") -> str:
    """``key`` if it can be a tag key (a string of 1 to 128 characters), else QUERY_ERROR."""
    check_text(key, field)
    assert isinstance(key, str)
    if not 1 <= len(key) <= MAX_TAG_KEY_LENGTH:
        raise QueryError(
            f"{field} must be 1 to {MAX_TAG_KEY_LENGTH} characters, got {len(key)}",
            {"field": field},
        )
    return key


def _check_limit(limit: int | None) -> None:
    if limit is not None:
        whole(limit, "limit", "a non-negative int up to 2**63 - 1, or None", error=QueryError)


def _size_of_strings(values: list[str]) -> int:
    return sum(len(value) + 56 for value in values)


def json_array(texts: list[str]) -> str:
    return "[" + ",".join(texts) + "]"


def decode_document(document: str) -> list[SequencedEvent]:
    """The events of a JSON array of them (`get_events`' cached answer)."""
    return _decode_events(document)


def check_size(value: int, field: str) -> None:
    """QUERY_ERROR unless ``value`` is an int from 1 to `MAX_PAGE_SIZE` (a page or batch)."""
    check_count(value, field, allow_none=False)
    if not 0 < value <= MAX_PAGE_SIZE:
        raise QueryError(
            f"{field} must be between 1 and {MAX_PAGE_SIZE}, got {value}",
            {"field": field},
        )


def _check_aggregate_id(aggregate_id: object) -> None:
    if not isinstance(aggregate_id, str) or not 0 < len(aggregate_id) <= 255:
        raise ValidationFailed(
            f"aggregate_id must be a string of 1 to 255 characters, got {short_repr(aggregate_id)}",
            {"field": "aggregate_id"},
        )
    check_text(aggregate_id, "aggregate_id")


def _sort_key(event: SequencedEvent, criteria: Criteria) -> datetime | str | None:
    """The event's key in the criteria's order (besides its position, which breaks ties)."""
    if criteria.order_by == "timestamp":
        return event.timestamp
    if criteria.order_by == "type":
        return event.event_type
    return None


def subscription_criteria(event_filter: EventFilter) -> Criteria:
    """The filter of a subscription: it selects events; the log decides their order."""
    criteria = normalize(event_filter)
    for field, ok in (
        ("limit", criteria.limit is None),
        ("offset", not criteria.offset),
        ("order_by", criteria.order_by == "position"),
        ("order_direction", not criteria.descending),
    ):
        if not ok:
            raise QueryError(
                "a subscription delivers events in log order, all of them: its filter may not"
                " set limit, offset, order_by or order_direction",
                {"field": field},
            )
    return criteria


def event_key(event_id: uuid.UUID | str) -> uuid.UUID:
    try:
        if isinstance(event_id, uuid.UUID):
            return event_id
        if not isinstance(event_id, str):
            raise ValueError
        return parse_uuid(event_id)
    except ValueError:
        raise QueryError(
            f"event_id must be a UUID, got {short_repr(event_id)}",
            {
                "event_id": event_id
                if isinstance(event_id, str) and len(event_id) <= 100
                else short_repr(event_id)
            },
        ) from None


#: A keyset batch's arguments: ``until``, ``last_key``, ``last_position``, ``limit``,
#: ``offset`` (see `StoreCore._op_keyset_rows`).
Keyset = tuple[int | None, Any, int | None, int, int]


class KeysetWalk:
    """The arithmetic of a keyset walk over ``criteria`` (`stream_events`, exports): each
    batch asks for ``(until, last_key, last_position, limit, offset)``; the criteria's offset
    and limit apply to the whole walk."""

    def __init__(self, criteria: Criteria, batch_size: int) -> None:
        self.remaining = criteria.limit
        self.batch_size = batch_size
        self.size = batch_size if self.remaining is None else min(batch_size, self.remaining)
        self.first: Keyset = (None, None, None, self.size, criteria.offset)

    def after(self, until: int, got: int, last: Callable[[], tuple[Any, int]]) -> Keyset | None:
        """The next batch's arguments after one of ``got`` events (``last()``: the keyset of
        its last), or None when the walk is over."""
        if self.remaining is not None:
            self.remaining -= got
        if got < self.size or (self.remaining is not None and self.remaining <= 0):
            return None
        key, position = last()
        size = self.batch_size if self.remaining is None else min(self.batch_size, self.remaining)
        self.size = size
        return (until, key, position, size, 0)


class Reading(StoreState):
    """The read operations of a store (see `tamma_events.stores.core.StoreCore`)."""

    @staticmethod
    def _page_start(
        event_filter: EventFilter | None, page_size: int, token: str | None
    ) -> tuple[Criteria, int | None, Any, int | None]:
        criteria = normalize(event_filter)
        if criteria.limit is not None or criteria.offset:
            raise QueryError(
                "a paged filter may not set limit or offset; use page_size and the page token",
                {"field": "limit" if criteria.limit is not None else "offset"},
            )
        check_size(page_size, "page_size")
        if token is None:
            return criteria, None, None, None
        decoded = decode_token(token, criteria)
        return criteria, decoded.until, token_key(decoded, criteria), decoded.last_position

    @staticmethod
    def _page(criteria: Criteria, until: int, events: list[SequencedEvent], page_size: int) -> Page:
        if len(events) <= page_size:
            return Page(events, None)
        del events[page_size:]
        key = _sort_key(events[-1], criteria)
        if isinstance(key, datetime):
            key = key.isoformat()
        return Page(events, encode_token(criteria, until, key, events[-1].position))

    @staticmethod
    def _aggregate_args(group_by: str, tag_key: str | None) -> None:
        if group_by not in _GROUPS:
            raise QueryError(
                f"group_by must be one of {', '.join(_GROUPS)}, got {short_repr(group_by)}",
                {"field": "group_by"},
            )
        if (group_by == "tag") != (tag_key is not None):
            raise QueryError(
                "tag_key is required with group_by='tag', and only with it",
                {"field": "tag_key"},
            )
        if tag_key is not None:
            check_text(tag_key, "tag_key")

    @staticmethod
    def _snapshot_data(aggregate_id: str, version: int, state: Any) -> bytes:
        _check_aggregate_id(aggregate_id)
        whole(
            version,
            "version",
            "a position (an int from 0 to the head)",
            context={"aggregate_id": aggregate_id},
        )
        try:
            return msgspec.json.encode(state)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise ValidationFailed(
                f"state cannot be encoded as JSON: {exc}",
                {"field": "state", "aggregate_id": aggregate_id},
            ) from None

    @staticmethod
    def _project_args(key: str | None, snapshot_every: int | None, batch_size: int) -> None:
        if snapshot_every is not None:
            whole(
                snapshot_every, "snapshot_every", "a positive int or None", low=1, error=QueryError
            )
        if snapshot_every is not None and key is None:
            raise QueryError("snapshot_every needs a key to save under", {"field": "key"})
        check_size(batch_size, "batch_size")

    @staticmethod
    def _count_result(criteria: Criteria, total: int) -> int:
        total = max(total - criteria.offset, 0)
        return total if criteria.limit is None else min(total, criteria.limit)

    def _op_fill_archived(self, rows: list[Any], event: int, position: int) -> Op[list[str]]:
        """The JSON texts of ``rows`` (column ``event``, NULL for an archived event, whose
        position is column ``position``), the archived ones read from their files."""
        missing = [
            row[position] for row in rows if row[event] is None and row[position] is not None
        ]
        if not missing:
            return [row[event] for row in rows if row[event] is not None]
        archived = iter((yield from self._archive.json_texts(missing)))
        return [
            row[event] if row[event] is not None else next(archived)
            for row in rows
            if row[position] is not None
        ]

    def _op_event_rows(self, statement: tuple[Any, list[Any]], archived: bool) -> Op[list[str]]:
        """The events a statement selects as `EVENT_JSON` rows, as their JSON texts; over the
        whole history (`Select` with ``archived``), its rows are ``(event, position)``, the
        event NULL when it is archived, read from its archive file as the same text."""
        text, params = statement
        rows = yield Run(text, params, prepare=False)
        if archived:
            return (yield from self._op_fill_archived(rows, 0, 1))
        return [row[0] for row in rows]

    def _op_read_events(self, statement: sql.Composable, params: list[Any]) -> Op[list[Any]]:
        """The events of a statement selecting `EVENT_SELECT` rows, by binary COPY decoded by
        the codec; archived events (over `Statements.history_rows`) read from their files."""
        chunks = yield CopyOut(
            statement,
            params,
            decode=_codec.decode_events,
            max_rows=READ_CHUNK_ROWS,
            max_bytes=READ_CHUNK_BYTES,
        )
        events: list[Any] = chunks[0] if len(chunks) == 1 else [e for c in chunks for e in c]
        missing = [event for event in events if type(event) is int]
        if not missing:
            return events
        archived = iter((yield from self._archive.json_texts(missing)))
        return [_decode_event(next(archived)) if type(e) is int else e for e in events]

    def _op_read_with_head(
        self, query: Query | None, after: int | None, limit: int | None, backwards: bool
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """The events `read` returns, and the store's head they were read up to: read first,
        it bounds the read (every event up to it is committed)."""
        _check_limit(limit)
        head = yield from self._op_head()
        params: list[Any] = [after_position(after)]
        shape = query_shape(query, params)
        params += [head, limit]
        # The statement is composed with its values (a COPY is not prepared): PostgreSQL
        # plans it for them, as filter statements are (see `Run`).
        events = yield from self._op_read_events(self._statements.read(shape, backwards), params)
        return events, head

    def _op_read(
        self, query: Query | None, after: int | None, limit: int | None, backwards: bool
    ) -> Op[ReadResult]:
        events, store_head = yield from self._op_read_with_head(query, after, limit, backwards)
        if limit is None:
            head: int | None = store_head
        elif events:
            head = events[0].position if backwards else events[-1].position
        else:
            head = None
        return ReadResult(events, head)

    def _op_get_event(self, key: uuid.UUID) -> Op[SequencedEvent | None]:
        rows = yield Run(self._statements.get_event, [key])
        texts = yield from self._op_fill_archived(rows, 0, 1)
        return _decode_event(texts[0]) if texts else None

    def _op_head(self) -> Op[int]:
        row = yield Run(self._statements.head_position, fetch="one")
        return int(row[0]) if row else 0

    def _op_cached(
        self, key: tuple[Any, ...], compute: Callable[[], Op[_T]], size: Callable[[_T], int]
    ) -> Op[_T]:
        """``compute()``'s result, or the cache's answer computed at the current head."""
        if not self.cache.enabled:
            return (yield from compute())
        # The head's hash too: a schema dropped and refilled may reach the same position.
        head = yield Run(self._statements.head_label, fetch="one")
        value = self.cache.get(key, head)
        if value is None:
            value = yield from compute()
            self.cache.put(key, head, value, size(value))
        return value

    def _op_select(self, criteria: Criteria, archived: bool = False) -> Op[tuple[Select, bool]]:
        """The statement builder for reading events matching ``criteria``, and whether they
        are few (then collected before they are ordered; see `Select.events`).

        With tag conditions, the tag summary's exact counts decide: when one condition matches
        few events, only it goes to the GIN index."""
        statements = self._statements
        positions = None
        if criteria.order_by == "position":
            window = window_positions(statements, criteria)
            if window is not None:
                positions = yield Run(*window, fetch="one")
        statement = tag_matches(statements, criteria)
        row = None if statement is None else (yield Run(*statement, fetch="one"))
        if not row:
            return Select(statements, criteria, positions=positions, archived=archived), False
        counts = [int(count) for count in row]
        smallest = min(range(len(counts)), key=counts.__getitem__)
        if counts[smallest] > FEW_MATCHES:
            return Select(statements, criteria, positions=positions, archived=archived), False
        indexed = smallest if len(counts) > 1 else None
        select = Select(
            statements, criteria, positions=positions, indexed_tag=indexed, archived=archived
        )
        return select, True

    def _op_get_events(self, criteria: Criteria, include_archived: bool) -> Op[str]:
        """`get_events`' answer, as a JSON array of events."""

        def compute() -> Op[str]:
            select, few = yield from self._op_select(criteria, include_archived)
            statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
            return json_array((yield from self._op_event_rows(statement, include_archived)))

        return (yield from self._op_cached(("events", criteria, include_archived), compute, len))

    def _op_count(self, criteria: Criteria) -> Op[int]:
        """How many events match ``criteria`` (its offset and limit are the caller's)."""
        unpaged = criteria.unpaged()

        def compute() -> Op[int]:
            row = yield Run(*count_statement(self._statements, unpaged), fetch="one", prepare=False)
            return int(row[0]) if row else 0

        return (yield from self._op_cached(("count", unpaged), compute, lambda _: 64))

    def _op_schema_version(self) -> Op[int]:
        from tamma_events.ops.migrating import version_op

        return (yield from version_op(self.schema))

    def _op_stats(self) -> Op[StoreStats]:
        """`StoreStats`, from the summaries, the archive manifest and the catalog: a cost that
        does not grow with the log. One snapshot: the counts and timestamps agree with each
        other while appends and compactions go on (the size on disk is read as it is now)."""
        from tamma_events.ops.migrating import no_store_error, version_op

        # On an error, `run` rolls the transaction back.
        yield Run(BEGIN_SNAPSHOT, fetch="none")
        version = yield from version_op(self.schema)
        if version == 0:
            raise no_store_error(self.schema)
        head = yield from self._op_head()
        statements = self._statements
        server = yield Run(SERVER_VERSION, fetch="one")
        types = yield Run(statements.type_stats)
        tags = yield Run(statements.tag_stats, fetch="one")
        archives = yield Run(statements.archive_stats, fetch="one")
        size = yield Run(statements.schema_size, [self.schema], fetch="one")
        yield Run(COMMIT, fetch="none")
        event_types = [TypeStats(name, int(n), first, last) for name, n, first, last in types]
        archived = int(archives[1])
        return StoreStats(
            schema=self.schema,
            schema_version=version,
            server_version=str(server[0]),
            codec=_codec.IMPL,
            head=head,
            events=head,
            live_events=head - archived,
            archived_events=archived,
            archive_files=int(archives[0]),
            archive_bytes=int(archives[2]),
            table_bytes=int(size[0]),
            tag_keys=int(tags[0]),
            tag_values=int(tags[1]),
            first_timestamp=min((t.first_timestamp for t in event_types), default=None),
            last_timestamp=max((t.last_timestamp for t in event_types), default=None),
            event_types=event_types,
        )

    def _op_event_types(self) -> Op[list[str]]:
        text = self._statements.event_types

        def compute() -> Op[list[str]]:
            return [row[0] for row in (yield Run(text))]

        return list((yield from self._op_cached(("types",), compute, _size_of_strings)))

    def _op_tags(self) -> Op[dict[str, list[str]]]:
        text = self._statements.tags

        def compute() -> Op[dict[str, list[str]]]:
            return {key: values for key, values in (yield Run(text))}

        tags = yield from self._op_cached(
            ("tags",), compute, lambda t: sum(_size_of_strings(v) for v in t.values())
        )
        return {key: list(values) for key, values in tags.items()}

    def _op_tag_values(
        self, key: str, prefix: str, page_size: int, token: str | None
    ) -> Op[TagValuesPage]:
        """A page of ``key``'s values starting with ``prefix``, with their counts, in the order
        of their first 200 characters (bytewise), then their digests."""
        low = prefix[:ORDER_CHARS]
        high = _successor(low)
        long_prefix = len(prefix) > ORDER_CHARS
        # The lower bound: the prefix's, or after the last page's value. A value within the
        # bounds of a prefix of 200 characters or fewer starts with it.
        bound: list[Any] = [low] if token is None else list(decode_tag_token(token, key, prefix))
        text = self._statements.tag_values(high is not None, token is not None, long_prefix)
        params: list[Any] = [key, *bound, *([] if high is None else [high])]
        params += [*([prefix] if long_prefix else []), page_size + 1, key, prefix, *bound]
        params.append(page_size + 1)
        # Prepared: the plan is the same whatever the values (a range scan of the key's index),
        # and planning it each time took longer than reading a page.
        rows = yield Run(text, params, prepare=True)
        values = [TagValue(value, count) for value, count in rows[:page_size]]
        if len(rows) <= page_size:
            return TagValuesPage(values, None)
        last = rows[page_size - 1][0]
        digest = hashlib.sha256(last.encode()).digest()
        return TagValuesPage(values, encode_tag_token(key, prefix, last[:ORDER_CHARS], digest))

    def _op_aggregate(
        self, criteria: Criteria, group_by: GroupBy, tag_key: str | None
    ) -> Op[list[AggregateRow]]:
        def compute() -> Op[list[AggregateRow]]:
            statement = summary_aggregate(self._statements, criteria, group_by) or Select(
                self._statements, criteria, archived=True
            ).aggregate(group_by, tag_key)
            rows = yield Run(*statement, prepare=False)
            return [AggregateRow(key, int(count), first, last) for key, count, first, last in rows]

        rows = yield from self._op_cached(
            ("aggregate", criteria, group_by, tag_key), compute, lambda r: 128 * len(r)
        )
        return list(rows)

    def _op_keyset_select(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        archived: bool,
    ) -> Op[tuple[int, Select, bool]]:
        """The statement builder of a keyset batch (see `_op_keyset_rows`), whether its
        matches are few (see `_op_select`), and ``until``, read from the head when None.

        With replicas, a batch pinned to a head the server has not reached (a lagging replica)
        raises `Behind`: its reader asks the primary instead."""
        if until is None or self._replicas:
            head = yield from self._op_head()
            if until is None:
                until = head
            elif head < until:
                raise Behind(f"head {head} is behind {until}")
        select, few = yield from self._op_select(criteria, archived)
        select.after(until, last_key, last_position)
        return until, select, few

    def _op_keyset_rows(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool = False,
    ) -> Op[tuple[int, list[SequencedEvent]]]:
        """The events matching ``criteria`` at positions up to ``until`` (the head now, when
        None) that follow the event ``(last_key, last_position)`` in the criteria's order (from
        the first, when None), at most ``limit`` after skipping ``offset``; and ``until``. With
        ``archived``, over the whole history."""
        until, select, few = yield from self._op_keyset_select(
            criteria, until, last_key, last_position, archived
        )
        text, params = select.events(limit=limit, offset=offset, few=few, columns=EVENT_SELECT)
        return until, (yield from self._op_read_events(text, params))

    @staticmethod
    def _stream_last(
        criteria: Criteria, events: list[SequencedEvent]
    ) -> Callable[[], tuple[Any, int]]:
        def last() -> tuple[Any, int]:
            event = events[-1]
            return _sort_key(event, criteria), event.position

        return last

    def _op_read_after(
        self, query: Query | None, after: int, limit: int
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """A subscription's read: at most ``limit`` events matching ``query`` after ``after``,
        and the position read up to (see `tamma_events.streaming.subscriptions.ReadAfter`)."""
        events, head = yield from self._op_read_with_head(query, after, limit, False)
        return events, events[-1].position if len(events) >= limit else head

    def _op_filter_after(
        self, criteria: Criteria, after: int, limit: int
    ) -> Op[tuple[list[SequencedEvent], int]]:
        """`_op_read_after` for a filter: a keyset page in log order after ``after``."""
        head, events = yield from self._op_keyset_rows(criteria, None, None, after, limit, 0, True)
        return events, events[-1].position if len(events) >= limit else head

    def _op_explain(self, criteria: Criteria, count: bool, analyze: bool) -> Op[dict[str, Any]]:
        if count:
            statement = count_statement(self._statements, criteria)
        else:
            select, few = yield from self._op_select(criteria)
            statement = select.events(limit=criteria.limit, offset=criteria.offset, few=few)
        row = yield Run(explain(statement[0], analyze), statement[1], fetch="one", prepare=False)
        plan: dict[str, Any] = row[0][0] if row else {}
        return plan

    def _op_create_snapshot(self, aggregate_id: str, version: int, state: Any) -> Op[Snapshot]:
        data = self._snapshot_data(aggregate_id, version, state)
        try:
            row = yield Run(
                self._statements.save_snapshot,
                [aggregate_id, version, data.decode(), version],
                fetch="one",
            )
        except psycopg.errors.UntranslatableCharacter:
            raise ValidationFailed(
                "state holds a NUL character, which PostgreSQL's jsonb cannot store",
                {"field": "state", "aggregate_id": aggregate_id},
            ) from None
        if row is None:
            head = yield from self._op_head()
            raise ValidationFailed(
                f"version {version} is beyond the head ({head})",
                {"field": "version", "aggregate_id": aggregate_id},
            )
        return Snapshot(aggregate_id, version, state, row[0])

    def _op_get_snapshot(self, aggregate_id: str, state_type: Any) -> Op[Snapshot | None]:
        _check_aggregate_id(aggregate_id)
        row = yield Run(self._statements.latest_snapshot, [aggregate_id], fetch="one")
        if row is None:
            return None
        version, data, created_at = row
        try:
            state = msgspec.json.decode(data, type=state_type)
        except msgspec.ValidationError as exc:
            raise QueryError(
                f"the snapshot of {short_repr(aggregate_id)} at version {version}"
                f" is not a {state_type}: {exc}",
                {"field": "state_type", "aggregate_id": aggregate_id, "version": version},
            ) from None
        return Snapshot(aggregate_id, int(version), state, created_at)

    def _op_project(
        self,
        query: Query | None,
        initial: _S,
        fold: Callable[[_S, SequencedEvent], _S],
        key: str | None,
        snapshot_every: int | None,
        state_type: Any,
        batch_size: int,
    ) -> Op[Projection]:
        state: Any = initial
        after = 0
        if key is not None:
            if state_type is None:
                state_type = Any if initial is None else type(initial)
            snapshot = yield from self._op_get_snapshot(key, state_type)
            if snapshot is not None:
                state, after = snapshot.state, snapshot.version
        folded = 0
        while True:
            events, head = yield from self._op_read_with_head(query, after, batch_size, False)
            for event in events:
                state = fold(state, event)
                folded += 1
                if snapshot_every is not None and key is not None and folded % snapshot_every == 0:
                    yield from self._op_create_snapshot(key, event.position, state)
            if len(events) < batch_size:
                return Projection(state, max(head, after))
            after = events[-1].position
