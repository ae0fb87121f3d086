"""The query builder: DCB queries become SQL text plus bound parameters.

Every value and every tag key is a bound parameter; nothing a caller passes is spliced into SQL.
The text depends only on the query's shape and is composed once per shape.
"""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg import sql

from .errors import QUERY_ERROR, EventStoreError
from .model import AppendCondition, Query, QueryItem

__all__ = ["Check", "Statements", "query_shape"]

_json = msgspec.json.Encoder(order="sorted")
# Statements kept per store, by shape; queries of other shapes are composed each time.
_CACHE_SIZE = 1024

#: The shape of a query: per item, how many types it names (0, 1 or more: 2) and whether it has
#: tags. The SQL text depends on the shape only, so it is composed once per shape and store, and
#: PostgreSQL can reuse the plan of a prepared statement. An empty shape matches every event.
Shape = tuple[tuple[int, bool], ...]

#: A condition as SQL: ``(shape, parameters)``; see `Statements.checks`.
Check = tuple[Shape, list[Any]]


def _check_text(value: str, what: str) -> None:
    """Refuse strings PostgreSQL cannot store, so no event can hold them either."""
    if "\x00" in value:
        raise EventStoreError(
            QUERY_ERROR, f"{what} contains a NUL character", {"value": repr(value)}
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EventStoreError(
            QUERY_ERROR, f"{what} contains a lone surrogate", {"value": repr(value)}
        ) from None


def _item_shape(item: QueryItem, params: list[Any]) -> tuple[int, bool] | None:
    """Validate one item, append its parameters; None when it matches every event."""
    if not isinstance(item, QueryItem):
        raise EventStoreError(
            QUERY_ERROR, f"query items must be QueryItem, got {type(item).__name__}"
        )
    types = list(item.types)
    for event_type in types:
        if not isinstance(event_type, str):
            raise EventStoreError(
                QUERY_ERROR, "query item types must be strings", {"types": repr(types)}
            )
        _check_text(event_type, "a query type")
    tags = item.tags
    if not isinstance(tags, dict):
        raise EventStoreError(QUERY_ERROR, "query item tags must be a dict of str to str")
    for key, value in tags.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise EventStoreError(QUERY_ERROR, "query item tags must map str to str")
        _check_text(key, "a query tag key")
        _check_text(value, "a query tag value")
    if not types and not tags:
        return None
    if len(types) == 1:
        params.append(types[0])
    elif types:
        params.append(types)
    if tags:
        params.append(_json.encode(tags).decode())
    return (min(len(types), 2), bool(tags))


def query_shape(query: Query | None, params: list[Any]) -> Shape:
    """Validate ``query``; append its parameters to ``params`` and return its shape."""
    if query is None:
        return ()
    if not isinstance(query, Query):
        raise EventStoreError(QUERY_ERROR, f"expected a Query, got {type(query).__name__}")
    item_params: list[Any] = []
    shape = []
    for item in query.items:
        item_shape = _item_shape(item, item_params)
        if item_shape is None:
            return ()  # one item matching everything makes the whole query match everything
        shape.append(item_shape)
    params.extend(item_params)
    return tuple(shape)


def _predicate(shape: Shape) -> sql.Composable:
    """The boolean expression over the events table for a query of this shape."""
    if not shape:
        return sql.SQL("TRUE")
    alternatives = []
    for types, tags in shape:
        parts = []
        if types == 1:
            parts.append(sql.SQL("event_type = %s"))
        elif types:
            parts.append(sql.SQL("event_type = ANY(%s)"))
        if tags:
            parts.append(sql.SQL("tags @> %s::jsonb"))
        alternatives.append(sql.SQL("({})").format(sql.SQL(" AND ").join(parts)))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives))


def after_position(after: int | None) -> int:
    """``after`` as a position (0 for None), or QUERY_ERROR."""
    if after is None:
        return 0
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise EventStoreError(
            QUERY_ERROR, f"after must be a non-negative int or None, got {after!r}"
        )
    return after


def condition_check(condition: AppendCondition) -> Check:
    """Validate ``condition``; its shape and parameters for `Statements.checks`."""
    if not isinstance(condition, AppendCondition):
        raise EventStoreError(
            QUERY_ERROR, f"expected an AppendCondition, got {type(condition).__name__}"
        )
    params: list[Any] = [after_position(condition.after)]
    return query_shape(condition.fail_if_events_match, params), params


class Statements:
    """The fixed statements of one store, composed once for its schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.events = sql.Identifier(schema, "events")
        self.head = sql.Identifier(schema, "head")
        self.lock_head = sql.SQL("SELECT position, hash FROM {} FOR UPDATE").format(self.head)
        # Simple protocol (no parameters): BEGIN rides in the lock's round trip.
        self.begin_and_lock_head = sql.SQL("BEGIN; {}").format(self.lock_head).as_bytes(None)
        self.copy_events = sql.SQL(
            'COPY {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " FROM STDIN (FORMAT BINARY)"
        ).format(self.events)
        self.existing_ids = sql.SQL(
            "SELECT event_id FROM {} WHERE event_id = ANY(%s) ORDER BY position"
        ).format(self.events)
        self._checks: dict[tuple[Shape, ...], bytes] = {}
        self._reads: dict[tuple[Shape, bool], bytes] = {}
        self.append_group = sql.SQL(
            "SELECT {}(%s::integer[], %s::jsonb[], %s::jsonb, %s::bytea, %s::integer[])"
        ).format(sql.Identifier(schema, "append_group")).as_bytes(None)
        self.columns = sql.SQL(
            'position, event_id, event_type, "timestamp", tags, metadata, data, recorded_at, hash'
        )
        self.get_event = sql.SQL("SELECT {} FROM {} WHERE event_id = %s").format(
            self.columns, self.events
        )
        self.head_position = sql.SQL("SELECT position FROM {}").format(self.head)
        self.set_head = sql.SQL("UPDATE {} SET position = %s, hash = %s").format(self.head)

    def set_head_and_commit(self, position: int, hash_: bytes) -> bytes:
        """Move the head and commit in one simple-protocol round trip. The two values are the
        store's own (an int and a digest), quoted by psycopg."""
        return (
            sql.SQL("UPDATE {} SET position = {}, hash = {}; COMMIT")
            .format(self.head, sql.Literal(position), sql.Literal(hash_))
            .as_bytes(None)
        )

    def checks(self, checks: list[Check]) -> tuple[bytes, list[Any]]:
        """One statement with a column per condition: true when a stored event violates it."""
        key = tuple(shape for shape, _ in checks)
        text = self._checks.get(key)
        if text is None:
            columns = [
                sql.SQL("EXISTS (SELECT 1 FROM {} WHERE position > %s AND {})").format(
                    self.events, _predicate(shape)
                )
                for shape in key
            ]
            text = sql.SQL("SELECT {}").format(sql.SQL(", ").join(columns)).as_bytes(None)
            if len(self._checks) < _CACHE_SIZE:
                self._checks[key] = text
        return text, [p for _, params in checks for p in params]

    def read(self, shape: Shape, backwards: bool) -> bytes:
        """Events after a position matching a query of ``shape`` and, in the same snapshot, the
        head.

        Parameters: after, the query's parameters, limit (None for no limit). A row with a NULL
        position means no event matched.
        """
        key = (shape, backwards)
        text = self._reads.get(key)
        if text is None:
            direction = sql.SQL("DESC" if backwards else "ASC")
            text = (
                sql.SQL(
                    "SELECT h.position, e.* FROM {head} h LEFT JOIN LATERAL ("
                    "SELECT {columns} FROM {events} WHERE position > %s AND {predicate}"
                    " ORDER BY position {direction} LIMIT %s) e ON true"
                    " ORDER BY e.position {direction}"
                )
                .format(
                    head=self.head,
                    columns=self.columns,
                    events=self.events,
                    predicate=_predicate(shape),
                    direction=direction,
                )
                .as_bytes(None)
            )
            if len(self._reads) < _CACHE_SIZE:
                self._reads[key] = text
        return text
