"""The query builder: DCB queries become `psycopg.sql` fragments plus bound parameters.

Every value and every tag key is a bound parameter; nothing a caller passes is spliced into SQL.
"""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg import sql

from .errors import QUERY_ERROR, EventStoreError
from .model import AppendCondition, Query, QueryItem

__all__ = ["Statements", "condition_checks", "query_predicate"]

_TRUE = sql.SQL("TRUE")
_json = msgspec.json.Encoder(order="sorted")


def _item_predicate(item: QueryItem, params: list[Any]) -> sql.Composable | None:
    parts: list[sql.Composable] = []
    if not isinstance(item, QueryItem):
        raise EventStoreError(
            QUERY_ERROR, f"query items must be QueryItem, got {type(item).__name__}"
        )
    if item.types:
        types = list(item.types)
        if not all(isinstance(t, str) for t in types):
            raise EventStoreError(
                QUERY_ERROR, "query item types must be strings", {"types": repr(types)}
            )
        if len(types) == 1:
            parts.append(sql.SQL("event_type = %s"))
            params.append(types[0])
        else:
            parts.append(sql.SQL("event_type = ANY(%s)"))
            params.append(types)
    if item.tags:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in item.tags.items()):
            raise EventStoreError(QUERY_ERROR, "query item tags must map str to str")
        parts.append(sql.SQL("tags @> %s::jsonb"))
        params.append(_json.encode(item.tags).decode())
    if not parts:
        return None  # an item with no types and no tags matches every event
    return sql.SQL(" AND ").join(parts) if len(parts) > 1 else parts[0]


def query_predicate(query: Query | None, params: list[Any]) -> sql.Composable:
    """A boolean SQL expression over the events table that is true for events matching
    ``query``; appends its parameters to ``params``."""
    if query is None:
        return _TRUE
    if not isinstance(query, Query):
        raise EventStoreError(QUERY_ERROR, f"expected a Query, got {type(query).__name__}")
    if not query.items:
        return _TRUE
    alternatives: list[sql.Composable] = []
    item_params: list[Any] = []
    for item in query.items:
        predicate = _item_predicate(item, item_params)
        if predicate is None:
            return _TRUE
        alternatives.append(sql.SQL("({})").format(predicate))
    params.extend(item_params)
    if len(alternatives) == 1:
        return alternatives[0]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives))


def _after(after: int | None) -> int:
    if after is None:
        return 0
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise EventStoreError(
            QUERY_ERROR, f"after must be a non-negative int or None, got {after!r}"
        )
    return after


def condition_checks(
    events: sql.Identifier, conditions: list[AppendCondition]
) -> tuple[sql.Composed, list[Any]]:
    """One statement returning, for each condition, whether a stored event violates it."""
    params: list[Any] = []
    columns: list[sql.Composable] = []
    for condition in conditions:
        if not isinstance(condition, AppendCondition):
            raise EventStoreError(
                QUERY_ERROR, f"expected an AppendCondition, got {type(condition).__name__}"
            )
        after = _after(condition.after)
        item_params: list[Any] = []
        predicate = query_predicate(condition.fail_if_events_match, item_params)
        columns.append(
            sql.SQL("EXISTS (SELECT 1 FROM {} WHERE position > %s AND {})").format(
                events, predicate
            )
        )
        params.append(after)
        params.extend(item_params)
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(columns)), params


class Statements:
    """The fixed statements of one store, composed once for its schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.events = sql.Identifier(schema, "events")
        self.head = sql.Identifier(schema, "head")
        # Simple-protocol strings: BEGIN rides in the same round trip as the lock.
        self.begin_and_lock_head = sql.SQL(
            "BEGIN; SELECT position, hash FROM {} FOR UPDATE"
        ).format(self.head)
        self.lock_head = sql.SQL("SELECT position, hash FROM {} FOR UPDATE").format(self.head)
        self.copy_events = sql.SQL(
            'COPY {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " FROM STDIN (FORMAT BINARY)"
        ).format(self.events)
        self.existing_ids = sql.SQL(
            "SELECT event_id FROM {} WHERE event_id = ANY(%s) ORDER BY position"
        ).format(self.events)
        self.columns = sql.SQL(
            'position, event_id, event_type, "timestamp", tags, metadata, data, recorded_at, hash'
        )
        self.get_event = sql.SQL("SELECT {} FROM {} WHERE event_id = %s").format(
            self.columns, self.events
        )
        self.head_position = sql.SQL("SELECT position FROM {}").format(self.head)

    def set_head_and_commit(self, position: int, hash_: bytes) -> sql.Composed:
        """One simple-protocol round trip that moves the head and commits."""
        return sql.SQL("UPDATE {} SET position = {}, hash = {}; COMMIT").format(
            self.head, sql.Literal(position), sql.Literal(hash_)
        )

    def set_head(self, position: int, hash_: bytes) -> sql.Composed:
        return sql.SQL("UPDATE {} SET position = {}, hash = {}").format(
            self.head, sql.Literal(position), sql.Literal(hash_)
        )

    def read(self, predicate: sql.Composable, backwards: bool) -> sql.Composed:
        """Events after a position matching ``predicate`` and, in the same snapshot, the head.

        Parameters: after, the predicate's parameters, limit (None for no limit). A row with a
        NULL position means no event matched.
        """
        direction = sql.SQL("DESC" if backwards else "ASC")
        return sql.SQL(
            "SELECT h.position, e.* FROM {head} h LEFT JOIN LATERAL ("
            "SELECT {columns} FROM {events} WHERE position > %s AND {predicate}"
            " ORDER BY position {direction} LIMIT %s) e ON true"
            " ORDER BY e.position {direction}"
        ).format(
            head=self.head,
            columns=self.columns,
            events=self.events,
            predicate=predicate,
            direction=direction,
        )
