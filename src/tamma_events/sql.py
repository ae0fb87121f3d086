"""The query builder: DCB queries become `psycopg.sql` fragments plus bound parameters.

Every value and every tag key is a bound parameter; nothing a caller passes is spliced into SQL.
"""

from __future__ import annotations

from typing import Any

import msgspec
from psycopg import sql

from .errors import QUERY_ERROR, EventStoreError
from .model import AppendCondition, Query, QueryItem

__all__ = ["Statements", "condition_check", "query_predicate", "select_all"]

_TRUE = sql.SQL("TRUE")
_json = msgspec.json.Encoder(order="sorted")


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
        for event_type in types:
            _check_text(event_type, "a query type")
        if len(types) == 1:
            parts.append(sql.SQL("event_type = %s"))
            params.append(types[0])
        else:
            parts.append(sql.SQL("event_type = ANY(%s)"))
            params.append(types)
    if item.tags:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in item.tags.items()):
            raise EventStoreError(QUERY_ERROR, "query item tags must map str to str")
        for key, value in item.tags.items():
            _check_text(key, "a query tag key")
            _check_text(value, "a query tag value")
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


def condition_check(
    events: sql.Identifier, condition: AppendCondition
) -> tuple[sql.Composed, list[Any]]:
    """A boolean SQL expression, true when a stored event violates ``condition``, with its
    parameters. Raises `EventStoreError` (``QUERY_ERROR``) for a malformed condition."""
    if not isinstance(condition, AppendCondition):
        raise EventStoreError(
            QUERY_ERROR, f"expected an AppendCondition, got {type(condition).__name__}"
        )
    params: list[Any] = [_after(condition.after)]
    predicate = query_predicate(condition.fail_if_events_match, params)
    expression = sql.SQL("EXISTS (SELECT 1 FROM {} WHERE position > %s AND {})").format(
        events, predicate
    )
    return expression, params


def select_all(checks: list[tuple[sql.Composed, list[Any]]]) -> tuple[sql.Composed, list[Any]]:
    """One statement evaluating every check, one column each."""
    params = [p for _, check_params in checks for p in check_params]
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(c for c, _ in checks)), params


class Statements:
    """The fixed statements of one store, composed once for its schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.events = sql.Identifier(schema, "events")
        self.head = sql.Identifier(schema, "head")
        self.lock_head = sql.SQL("SELECT position, hash FROM {} FOR UPDATE").format(self.head)
        self.copy_events = sql.SQL(
            'COPY {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " FROM STDIN (FORMAT BINARY)"
        ).format(self.events)
        self.insert_rows = sql.SQL(
            "INSERT INTO {}"
            ' (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " SELECT * FROM unnest(%s::bigint[], %s::uuid[], %s::text[], %s::timestamptz[],"
            " %s::jsonb[], %s::jsonb[], %s::jsonb[], %s::bytea[])"
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
        self.set_head = sql.SQL("UPDATE {} SET position = %s, hash = %s").format(self.head)


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
