"""The query builder: DCB queries and event filters become SQL text plus bound parameters.

Every value and every tag key is a bound parameter; nothing a caller passes is spliced into SQL.
The text of a DCB read or condition depends only on the query's shape and is composed once per
shape. Filter statements (`Select`, and the summary statements that answer counts, listings and
aggregates) are composed per call, and the store never prepares them: each is planned for its
values (see docs/queries.md).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Final

import msgspec
from psycopg import sql

from tamma_events.checks import whole
from tamma_events.errors import QueryError, short_repr
from tamma_events.filters import Criteria, GroupBy
from tamma_events.model import AppendCondition, Query, QueryItem

__all__ = [
    "ADVISORY_LOCK",
    "ADVISORY_UNLOCK",
    "ADVISORY_XACT_LOCK",
    "BEGIN",
    "BEGIN_SNAPSHOT",
    "CHAIN_SELECT",
    "COMMIT",
    "CONFIGURED_SETTING",
    "EVENT_JSON",
    "EVENT_SELECT",
    "EXPORT_SELECT",
    "EXPORT_SNAPSHOT",
    "FEW_MATCHES",
    "POSITION_AND_ARCHIVED",
    "PRIMARY_LSN",
    "READ_COMMITTED",
    "RELEASE_SAVEPOINT",
    "RELOAD_CONFIGURATION",
    "REPLAY_LSN",
    "ROLLBACK",
    "ROLLBACK_TO_SAVEPOINT",
    "SAVEPOINT",
    "SCHEMA_COMMENT",
    "SERVER_VERSION",
    "SNAPSHOT",
    "TRY_ADVISORY_LOCK",
    "Check",
    "Select",
    "Statements",
    "aligned_grain",
    "alter_system",
    "copy_out",
    "count_statement",
    "explain",
    "import_snapshot",
    "listen",
    "query_shape",
    "statements_of",
    "summary_aggregate",
    "summary_count",
    "tag_matches",
    "window_positions",
]

#: A stored event as one JSON object, built by the server, that `msgspec` decodes straight into
#: a `SequencedEvent`; the jsonb columns go out as their own text, timestamps as ISO 8601 in UTC
#: whatever the session's time zone (some zones' historical offsets have seconds, which RFC 3339
#: cannot carry).
EVENT_JSON = sql.SQL(
    """concat('{"position":', position, ',"event_id":"', event_id, '","event_type":',"""
    """ to_json(event_type), ',"timestamp":', rtrim(to_json("timestamp" AT TIME ZONE 'UTC')"""
    """::text, '"'), 'Z","tags":', tags, ',"metadata":', metadata, ',"data":', data,"""
    """ ',"recorded_at":', rtrim(to_json(recorded_at AT TIME ZONE 'UTC')::text, '"'),"""
    """ 'Z","hash":"', encode(hash, 'base64'), '"}')"""
)

# Completes `to_char(<timestamptz>` into its ISO 8601 text in UTC, the key of a time bucket.
_UTC_TEXT = """ AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""

# Up to this many values of one tag field become `tags @> a OR tags @> b ...`, which the planner
# can serve with a BitmapOr of GIN scans or a scan in position order; longer lists look their
# events up value by value.
_TAG_OR_MAX = 64

_json = msgspec.json.Encoder(order="sorted")
# Statements kept per store, by shape; queries of other shapes are composed each time.
_CACHE_SIZE = 1024

#: The shape of a query: per item, how many types it names (0, 1 or more: 2) and whether it has
#: tags. The SQL text depends on the shape only, so it is composed once per shape and store, and
#: PostgreSQL can reuse the plan of a prepared statement. An empty shape matches every event.
Shape = tuple[tuple[int, bool], ...]

#: A condition as SQL: ``(shape, parameters)``; see `Statements.checks`.
Check = tuple[Shape, list[Any]]


#: The most items a DCB query may have: each is a few parameters of one statement, and a
#: statement takes at most 65,535.
MAX_QUERY_ITEMS = 1_000


def _check_text(value: str, what: str, field: str) -> None:
    """Refuse strings PostgreSQL cannot store, so no event can hold them either."""
    if "\x00" in value:
        raise QueryError(
            f"{what} contains a NUL character", {"field": field, "value": short_repr(value)}
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(
            f"{what} contains a lone surrogate",
            {"field": field, "value": short_repr(value)},
        ) from None


def _item_shape(item: QueryItem, params: list[Any]) -> tuple[int, bool] | None:
    """Validate one item, append its parameters; None when it matches every event."""
    if not isinstance(item, QueryItem):
        raise QueryError(
            f"query items must be QueryItem, got {type(item).__name__}",
            {"field": "items"},
        )
    types = list(item.types)
    for event_type in types:
        if not isinstance(event_type, str):
            raise QueryError(
                f"query item types must be strings, got {type(event_type).__name__}",
                {"field": "types", "value": short_repr(event_type)},
            )
        _check_text(event_type, "a query type", "types")
    tags = item.tags
    if not isinstance(tags, dict):
        raise QueryError("query item tags must be a dict of str to str", {"field": "tags"})
    for key, value in tags.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise QueryError(
                "query item tags must map str to str",
                {"field": "tags", "value": short_repr(key if not isinstance(key, str) else value)},
            )
        _check_text(key, "a query tag key", "tags")
        _check_text(value, "a query tag value", "tags")
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
        raise QueryError(f"expected a Query, got {type(query).__name__}", {"field": "query"})
    if len(query.items) > MAX_QUERY_ITEMS:
        raise QueryError(
            f"a query has at most {MAX_QUERY_ITEMS:,} items, got {len(query.items):,}",
            {"field": "items"},
        )
    item_params: list[Any] = []
    shape = []
    for item in query.items:
        item_shape = _item_shape(item, item_params)
        if item_shape is None:
            return ()  # one item matching everything makes the whole query match everything
        shape.append(item_shape)
    params.extend(item_params)
    return tuple(shape)


def _predicate(shape: Shape, *, through_tags: bool = False) -> sql.Composable:
    """The boolean expression over the events table for a query of this shape.

    ``through_tags``: an item with tags is found through them, its types tested on the rows
    found (``IS TRUE`` keeps the planner off the type index): the plan of a condition check
    (see sql/schema/0010_baseline.sql)."""
    if not shape:
        return sql.SQL("TRUE")
    alternatives = []
    for types, tags in shape:
        parts = []
        wrap = "({}) IS TRUE" if through_tags and tags else "{}"
        if types == 1:
            parts.append(sql.SQL(wrap.format("event_type = %s")))
        elif types:
            parts.append(sql.SQL(wrap.format("event_type = ANY(%s)")))
        if tags:
            parts.append(sql.SQL("tags @> %s::jsonb"))
        alternatives.append(sql.SQL("({})").format(sql.SQL(" AND ").join(parts)))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives))


def _one_or_any(column: str, values: tuple[Any, ...], cast: str, params: list[Any]) -> sql.SQL:
    if len(values) == 1:
        params.append(values[0])
        return sql.SQL(f"{column} = %s")
    params.append(list(values))
    return sql.SQL(f"{column} = ANY(%s::{cast}[])")


def _grain_for(criteria: Criteria) -> str:
    """The time-summary grain whose buckets bound a window best at a small cost."""
    if criteria.start is None or criteria.end is None:
        return "day"
    span = (criteria.end - criteria.start).total_seconds()
    if span <= 2 * 3600:
        return "minute"
    return "hour" if span <= 3 * 86400 else "day"


def aligned_grain(criteria: Criteria) -> str | None:
    """The coarsest grain that both ends of the window fall on (None: not even a minute).

    Summed over such a grain's buckets, the time summary answers for the window exactly."""
    bounds = [b for b in (criteria.start, criteria.end) if b is not None]
    for grain in ("day", "hour", "minute"):
        if all(_on_grain(b, grain) for b in bounds):
            return grain
    return None


def _on_grain(moment: Any, grain: str) -> bool:
    if moment.second or moment.microsecond:
        return False
    if grain == "minute":
        return True
    return not moment.minute and (grain == "hour" or not moment.hour)


class Select:
    """A statement over the events table for `Criteria`, composed piece by piece: the WHERE
    conjuncts and their parameters, in order."""

    def __init__(
        self,
        statements: Statements,
        criteria: Criteria,
        *,
        positions: tuple[int | None, int | None] | None = None,
        indexed_tag: int | None = None,
        archived: bool = False,
    ) -> None:
        """``positions``: the first and last position the criteria's window can match (see
        `window_positions`; None, None: no event can). ``indexed_tag``: the tag condition (an
        index into ``criteria.tags``) that the tag summary shows to be selective; the index is
        searched from it (see `_tags`)."""
        self.statements = statements
        self.criteria = criteria
        self.indexed_tag = indexed_tag
        #: What the statement reads: the live log, or with ``archived`` the whole history
        #: (`Statements.history`: archived events come with a NULL ``event``).
        self.archived = archived
        self.source: sql.Composable = statements.history if archived else statements.events
        #: The same rows without their JSON, for counts and lookups.
        self.index = statements.event_index if archived else statements.events
        # The conditions and their parameters, in the order of the text: the window's apart.
        self.where: list[sql.Composable] = []
        self.params: list[Any] = []
        self.window: list[sql.Composable] = []
        self.window_params: list[Any] = []
        self.ranged = positions is not None
        c = criteria
        if positions is not None:
            self.where.append(sql.SQL("position BETWEEN %s AND %s"))
            self.params += list(positions)
        if c.event_ids:
            self.where.append(sql.SQL("event_id = ANY(%s::uuid[])"))
            self.params.append(list(c.event_ids))
        if c.event_types:
            self.where.append(_one_or_any("event_type", c.event_types, "text", self.params))
        self._tags()
        if c.start is not None:
            self.window.append(sql.SQL('"timestamp" >= %s'))
            self.window_params.append(c.start)
        if c.end is not None:
            self.window.append(sql.SQL('"timestamp" < %s'))
            self.window_params.append(c.end)

    def _tags(self) -> None:
        """The tag conditions. Single values go to the GIN index as one containment, several
        values of a key as alternatives (or, past `_TAG_OR_MAX`, a lookup of each).

        With a selective condition (``indexed_tag``), the other single-valued conditions join
        its containment, one for each of its values: GIN then walks the selective value's short
        posting list and skips through the long ones of common values (its fast scan), so only
        the events matching them all are read from the heap. Checking the common values on the
        rows instead read every event of the selective value: at 10M events, 5-20 times as many
        heap pages, mostly outside the buffers. As separate conditions, a common value would be
        a bitmap of its whole posting list. Conditions of several values other than the
        selective one are checked on the rows it finds."""
        tags = self.criteria.tags
        indexed = self.indexed_tag
        joins = indexed is None or len(tags[indexed][1]) <= _TAG_OR_MAX
        single: dict[str, str] = {}
        rest: list[tuple[int, str, tuple[str, ...]]] = []
        for n, (key, values) in enumerate(tags):
            if indexed is not None and n != indexed and (len(values) > 1 or not joins):
                self.where.append(sql.SQL("tags ->> %s::text = ANY(%s::text[])"))
                self.params += [key, list(values)]
            elif len(values) == 1 and key not in single:
                single[key] = values[0]
            else:
                rest.append((n, key, values))
        for n, key, values in rest:
            if len(values) == 1:  # the same key asked twice: a second containment
                self.where.append(sql.SQL("tags @> %s::jsonb"))
                self.params.append(_json.encode({key: values[0]}).decode())
            elif len(values) <= _TAG_OR_MAX:
                shared: dict[str, str] = {}
                if n == indexed and key not in single:
                    shared, single = single, {}  # into each alternative
                alternatives = [sql.SQL("tags @> %s::jsonb")] * len(values)
                self.where.append(sql.SQL("({})").format(sql.SQL(" OR ").join(alternatives)))
                self.params += [_json.encode({**shared, key: value}).decode() for value in values]
            else:
                self.where.append(
                    sql.SQL(
                        "position = ANY(ARRAY(SELECT e.position FROM {} e,"
                        " unnest(%s::jsonb[]) AS wanted (tags) WHERE e.tags @> wanted.tags))"
                    ).format(self.index)
                )
                self.params.append([_json.encode({key: value}).decode() for value in values])
        if single:
            self.where.append(sql.SQL("tags @> %s::jsonb"))
            self.params.append(_json.encode(single).decode())

    def predicate(self) -> sql.Composable:
        """Every condition; its parameters are `all_params`."""
        return _conjunction(self.where + self.window)

    @property
    def all_params(self) -> list[Any]:
        return [*self.params, *self.window_params]

    def order(self, descending: bool) -> sql.Composable:
        direction = "DESC" if descending else "ASC"
        key = self.criteria.order_by
        if key == "position":
            return sql.SQL(f"ORDER BY position {direction}")
        column = '"timestamp"' if key == "timestamp" else "event_type"
        return sql.SQL(f"ORDER BY {column} {direction}, position {direction}")

    def after(self, until: int, last_key: Any, last_position: int | None) -> None:
        """Keyset paging: events at positions up to ``until``, after the last one returned."""
        self.where.append(sql.SQL("position <= %s"))
        self.params.append(until)
        if last_position is None:
            return
        op = "<" if self.criteria.descending else ">"
        key = self.criteria.order_by
        if key == "position":
            self.where.append(sql.SQL(f"position {op} %s"))
            self.params.append(last_position)
        else:
            column = '"timestamp"' if key == "timestamp" else "event_type"
            self.where.append(sql.SQL(f"({column}, position) {op} (%s, %s)"))
            self.params += [last_key, last_position]

    def events(
        self,
        *,
        limit: int | None,
        offset: int,
        few: bool = False,
        columns: sql.Composable = EVENT_JSON,
    ) -> tuple[sql.Composed, list[Any]]:
        """The matching events as JSON text (or ``columns``), one per row, in the criteria's
        order. Over the whole history, `EVENT_SELECT` reads `Statements.history_rows`.

        With ``few`` (the tag summary says the filter matches few events), the matches are
        collected first and ordered afterwards. Left to itself, the planner may walk the whole
        log in position order to find the first 100 of 50 matches when its sampled statistics
        overrate a tag value; the fence (OFFSET 0) keeps it from choosing that."""
        order = self.order(self.criteria.descending)
        base = self.source
        if self.archived and columns is EVENT_SELECT:
            base = self.statements.history_rows
        if few:
            source: sql.Composable = sql.SQL(
                "(SELECT * FROM {} WHERE {} OFFSET 0) AS matches"
            ).format(base, self.predicate())
            where: sql.Composable = sql.SQL("TRUE")
            params = self.all_params
        elif self.ranged:
            # The window's events, walked in log order inside their position range. The planner
            # would count the time condition and the position range as independent filters,
            # though they select the same events, and expect a handful of rows; checking the
            # time outside the fenced walk keeps it reading the range in order and stopping at
            # the limit.
            source = sql.SQL("(SELECT * FROM {} WHERE {} {} OFFSET 0) AS ranged").format(
                base, _conjunction(self.where), order
            )
            where = _conjunction(self.window)
            params = [*self.params, *self.window_params]
        else:
            source = base
            where = self.predicate()
            params = self.all_params
        if self.archived and columns is EVENT_JSON:
            columns = sql.SQL("event, position")
        text = sql.SQL("SELECT {} FROM {} WHERE {} {} LIMIT %s OFFSET %s").format(
            columns, source, where, order
        )
        return text, [*params, limit, offset]

    def count(self) -> tuple[sql.Composed, list[Any]]:
        text = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            self.index,
            self.predicate(),
        )
        return text, self.all_params

    def aggregate(self, group_by: GroupBy, tag_key: str | None) -> tuple[sql.Composed, list[Any]]:
        """Count, first and last timestamp per group, the key as text, in key order. Grouped
        by a tag, events without that tag are left out."""
        key_params: list[Any] = []
        if group_by == "event_type":
            key: sql.Composable = sql.SQL("event_type")
        elif group_by == "tag":
            key = sql.SQL("tags ->> %s::text")
            key_params.append(tag_key)
            self.where.append(sql.SQL("tags ? %s::text"))
            self.params.append(tag_key)
        else:
            key = sql.SQL(f"""to_char(date_trunc(%s, "timestamp", 'UTC'){_UTC_TEXT}""")
            key_params.append(group_by)
        text = sql.SQL(
            'SELECT {} AS key, count(*), min("timestamp"), max("timestamp") FROM {}'
            " WHERE {} GROUP BY 1 ORDER BY 1"
        ).format(
            key,
            self.index,
            self.predicate(),
        )
        return text, [*key_params, *self.all_params]


def _conjunction(conditions: list[sql.Composable]) -> sql.Composable:
    return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("TRUE")


def window_positions(st: Statements, c: Criteria) -> tuple[sql.Composed, list[Any]] | None:
    """The statement reading, from the time summary, the first and last position of the
    buckets the criteria's window overlaps (of its types); None without a window.

    Every event of a bucket lies between the bucket's first and last position, so the events of
    the window do too: reads in log order then start inside the window instead of scanning up
    to it. The store reads the range first and passes it to `Select` as values, so the planner
    sees how narrow it is (a range computed inside the statement would be an unknown to it)."""
    if c.start is None and c.end is None:
        return None
    conditions, params = _bucket_conditions(c, _grain_for(c), overlapping=True)
    text = sql.SQL("SELECT min(first_position), max(last_position) FROM {} WHERE {}").format(
        st.time_totals, sql.SQL(" AND ").join(conditions)
    )
    return text, params


def summary_count(st: Statements, c: Criteria) -> tuple[sql.Composed, list[Any]] | None:
    """The summary statement that counts the events matching ``c`` exactly without reading
    the events table, or None when no summary can: by type, by one tag (any of its values), or
    by type over a window whose ends fall on minute, hour or day boundaries. The count of all
    events is the head position: positions are gapless."""
    if c.event_ids or (c.tags and (c.event_types or len(c.tags) > 1)):
        return None
    windowed = c.start is not None or c.end is not None
    if c.tags:
        if windowed:
            return None
        key, values = c.tags[0]
        return (
            sql.SQL(
                "SELECT coalesce(sum(count), 0) FROM {}"
                " WHERE key = %s AND digest = ANY(%s::bytea[])"
            ).format(st.tag_totals),
            [key, _digests(values)],
        )
    if windowed:
        grain = aligned_grain(c)
        if grain is None:
            return None
        conditions, params = _bucket_conditions(c, grain)
        return (
            sql.SQL("SELECT coalesce(sum(count), 0) FROM {} WHERE {}").format(
                st.time_totals, sql.SQL(" AND ").join(conditions)
            ),
            params,
        )
    if c.event_types:
        params = []
        condition = _one_or_any("event_type", c.event_types, "text", params)
        return (
            sql.SQL("SELECT coalesce(sum(count), 0) FROM {} WHERE {}").format(
                st.type_totals, condition
            ),
            params,
        )
    return sql.SQL("SELECT position FROM {}").format(st.head), []


def count_statement(st: Statements, c: Criteria) -> tuple[sql.Composed, list[Any]]:
    """The statement counting the events matching ``c`` (limit and offset aside) over the
    whole history, archived events included (as the summaries count them): from a summary
    where one can answer, else over the events and the archive's index."""
    unpaged = c.unpaged()
    return summary_count(st, unpaged) or Select(st, unpaged, archived=True).count()


#: Filters whose tags match at most this many events (per the tag summary) are planned as
#: "collect the matches, then order them".
FEW_MATCHES = 5_000


def tag_matches(st: Statements, c: Criteria) -> tuple[sql.Composed, list[Any]] | None:
    """The statement reading, from the tag summary, how many events match each of the
    criteria's tag conditions (one row, one column per condition); None without tags."""
    if not c.tags:
        return None
    counts = []
    params: list[Any] = []
    for key, values in c.tags:
        counts.append(
            sql.SQL(
                "(SELECT coalesce(sum(count), 0) FROM {} WHERE key = %s AND digest = ANY(%s))"
            ).format(st.tag_totals)
        )
        params += [key, _digests(values)]
    return sql.SQL("SELECT {}").format(sql.SQL(", ").join(counts)), params


def _digests(values: tuple[str, ...]) -> list[bytes]:
    """The tag summary's keys of these values."""
    return [hashlib.sha256(value.encode()).digest() for value in values]


def _bucket_conditions(
    c: Criteria, grain: str, *, overlapping: bool = False
) -> tuple[list[sql.Composable], list[Any]]:
    """The time summary's rows of ``grain`` inside the window (with ``overlapping``, also the
    bucket the window starts in), of the criteria's types."""
    conditions: list[sql.Composable] = [sql.SQL("grain = %s")]
    params: list[Any] = [grain]
    if c.start is not None and overlapping:
        conditions.append(sql.SQL("bucket >= date_trunc(%s, %s::timestamptz, 'UTC')"))
        params += [grain, c.start]
    elif c.start is not None:
        conditions.append(sql.SQL("bucket >= %s"))
        params.append(c.start)
    if c.end is not None:
        conditions.append(sql.SQL("bucket < %s"))
        params.append(c.end)
    if c.event_types:
        conditions.append(_one_or_any("event_type", c.event_types, "text", params))
    return conditions, params


def summary_aggregate(
    st: Statements, c: Criteria, group_by: GroupBy
) -> tuple[sql.Composed, list[Any]] | None:
    """The summary statement for `EventStore.aggregate`, or None when it must read events:
    grouped by type or by a time bucket, for a filter of types and a window on the buckets."""
    if c.event_ids or c.tags or group_by == "tag":
        return None
    windowed = c.start is not None or c.end is not None
    if group_by == "event_type" and not windowed:
        params: list[Any] = []
        where: sql.Composable = sql.SQL("TRUE")
        if c.event_types:
            where = _one_or_any("event_type", c.event_types, "text", params)
        return (
            sql.SQL(
                "SELECT event_type, count, first_timestamp, last_timestamp FROM {} WHERE {}"
                " ORDER BY 1"
            ).format(st.type_totals, where),
            params,
        )
    if group_by == "event_type":
        grain = aligned_grain(c)
        key: sql.Composable = sql.SQL("event_type")
        group: sql.Composable = key
    else:
        bounds = [b for b in (c.start, c.end) if b is not None]
        grain = group_by if all(_on_grain(b, group_by) for b in bounds) else None
        key = sql.SQL(f"to_char(bucket{_UTC_TEXT}")
        group = sql.SQL("bucket")  # the index's order; the key text sorts the same way
    if grain is None:
        return None
    conditions, params = _bucket_conditions(c, grain)
    return (
        sql.SQL(
            "SELECT {} AS key, sum(count)::bigint, min(first_timestamp), max(last_timestamp)"
            " FROM {} WHERE {} GROUP BY {} ORDER BY {}"
        ).format(key, st.time_totals, sql.SQL(" AND ").join(conditions), group, group),
        params,
    )


def after_position(after: int | None) -> int:
    """``after`` as a position (0 for None), or QUERY_ERROR."""
    if after is None:
        return 0
    return whole(after, "after", "a position (an int from 0 to 2**63-1) or None", error=QueryError)


def condition_check(condition: AppendCondition) -> Check:
    """Validate ``condition``; its shape and parameters for `Statements.checks`."""
    if not isinstance(condition, AppendCondition):
        raise QueryError(f"expected an AppendCondition, got {type(condition).__name__}")
    params: list[Any] = [after_position(condition.after)]
    return query_shape(condition.fail_if_events_match, params), params


#: The export's columns as a SELECT list, in the order the codec's ``decode_rows`` reads them
#: (`tamma_events.codec.arrow.EXPORT_SCHEMA`).
EXPORT_SELECT: Final = sql.SQL(
    'position, event_id, event_type, "timestamp", recorded_at, tags, metadata, data, hash'
)
#: A read's columns as a SELECT list, in the order the codec's ``decode_events`` reads them
#: (`tamma_events.codec.reference.EVENT_COLUMNS`): binary COPY, decoded into the events.
EVENT_SELECT: Final = sql.SQL(
    'position, hash, event_id, event_type, "timestamp", recorded_at, tags, metadata, data'
)
#: A history row's position, and whether it is archived (its payload is in a file).
POSITION_AND_ARCHIVED: Final = sql.SQL("position, event IS NULL")
#: The columns of a chain check: the row as the append hashed it, and its hash.
CHAIN_SELECT: Final = sql.SQL(
    'position, event_id, event_type, "timestamp", tags, metadata, data, hash'
)

# -- statements of no schema -----------------------------------------------------------------

BEGIN: Final = "BEGIN"
COMMIT: Final = "COMMIT"
ROLLBACK: Final = "ROLLBACK"
#: An append in a transaction that is not the store's: undone alone when it fails.
SAVEPOINT: Final = "SAVEPOINT tamma_append"
RELEASE_SAVEPOINT: Final = "RELEASE SAVEPOINT tamma_append"
ROLLBACK_TO_SAVEPOINT: Final = "ROLLBACK TO SAVEPOINT tamma_append"
#: A read of several statements that agree with each other (`EventStore.stats`).
BEGIN_SNAPSHOT: Final = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
#: The same, for a transaction already begun (`verify`).
SNAPSHOT: Final = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
#: The snapshot of the transaction in progress, for another connection to import.
EXPORT_SNAPSHOT: Final = "SELECT pg_export_snapshot()"


def import_snapshot(snapshot: str) -> sql.Composed:
    """Make the transaction starting see the snapshot another one exported."""
    return sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot))


#: Whatever the server's default (migrations see the appends that committed while they waited).
READ_COMMITTED: Final = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"
SERVER_VERSION: Final = "SELECT current_setting('server_version')"
#: Advisory locks on a text key: one compaction, one migration, one demo load at a time.
TRY_ADVISORY_LOCK: Final = "SELECT pg_try_advisory_lock(hashtext(%s))"
ADVISORY_LOCK: Final = "SELECT pg_advisory_lock(hashtext(%s))"
ADVISORY_UNLOCK: Final = "SELECT pg_advisory_unlock(hashtext(%s))"
ADVISORY_XACT_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext(%s))"
RELOAD_CONFIGURATION: Final = "SELECT pg_reload_conf()"
#: The WAL positions, as numbers of bytes: the primary's, and a replica's replayed one with
#: its replay lag in seconds (0 when it has replayed all it received).
PRIMARY_LSN: Final = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
REPLAY_LSN: Final = (
    "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn,"
    " CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"
)


#: The comment on a schema, by its name (the demo marks the schemas it makes).
SCHEMA_COMMENT: Final = (
    "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s"
)
#: The last value the configuration files set for a setting (one waiting for a restart counts),
#: else the one in force.
CONFIGURED_SETTING: Final = (
    "SELECT coalesce((SELECT setting FROM pg_file_settings WHERE name = %s"
    " ORDER BY seqno DESC LIMIT 1), current_setting(%s))"
)


def listen(channel: str) -> sql.Composed:
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


def copy_out(statement: sql.Composable) -> sql.Composed:
    """``COPY (statement) TO STDOUT (FORMAT BINARY)``."""
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(statement)


def explain(statement: sql.Composable, analyze: bool) -> sql.Composed:
    """PostgreSQL's plan of ``statement`` as JSON (run, with buffers, when ``analyze``)."""
    options = sql.SQL("ANALYZE, BUFFERS, " if analyze else "")
    return sql.SQL("EXPLAIN ({}FORMAT JSON) {}").format(options, statement)


def alter_system(name: str, value: str) -> sql.Composed:
    return sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))


class Statements:
    """The fixed statements of one store, composed once for its schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.events = sql.Identifier(schema, "events")
        self.head = sql.Identifier(schema, "head")
        # The head row's lock, taken as the schema's owner (sql/schema/0010_baseline.sql):
        # the COPY's trigger then moves the head.
        self.lock_head = sql.SQL("SELECT position, hash FROM {}()").format(
            sql.Identifier(schema, "lock_head")
        )
        # Simple protocol (no parameters): BEGIN rides in the lock's round trip.
        self.begin_and_lock_head = sql.SQL("BEGIN; {}").format(self.lock_head).as_bytes(None)
        self.copy_events = sql.SQL(
            'COPY {} (position, event_id, event_type, "timestamp", tags, metadata, data, hash)'
            " FROM STDIN (FORMAT BINARY)"
        ).format(self.events)
        # Every event of the history, live or archived (sql/schema/0010_baseline.sql).
        self.event_index = sql.Identifier(schema, "event_index")
        self.archived_events = sql.Identifier(schema, "archived_events")
        self.archives = sql.Identifier(schema, "archives")
        # The events with the archived ones: a live event carries its `EVENT_JSON` as `event`,
        # an archived one NULL (its payload is in its archive file).
        self.history = sql.SQL(
            '(SELECT position, event_id, event_type, "timestamp", tags, {event} AS event'
            " FROM {events} UNION ALL"
            ' SELECT position, event_id, event_type, "timestamp", tags, NULL::text'
            " FROM {archived}) AS history"
        ).format(event=EVENT_JSON, events=self.events, archived=self.archived_events)
        # The same, with the columns of `EVENT_SELECT`: an archived event has a NULL hash
        # (and payload); its filter columns are there, for the WHERE clause.
        self.history_rows = sql.SQL(
            '(SELECT position, hash, event_id, event_type, "timestamp", recorded_at, tags,'
            " metadata, data FROM {events} UNION ALL"
            ' SELECT position, NULL::bytea, event_id, event_type, "timestamp",'
            " NULL::timestamptz, tags, NULL::jsonb, NULL::jsonb FROM {archived}) AS history"
        ).format(events=self.events, archived=self.archived_events)
        self.existing_ids = sql.SQL(
            "SELECT event_id FROM {} WHERE event_id = ANY(%s) ORDER BY position"
        ).format(self.event_index)
        self._checks: dict[tuple[Shape, ...], bytes] = {}
        self._reads: dict[tuple[Shape, bool], sql.Composed] = {}
        self._tag_values: dict[tuple[bool, bool, bool], sql.Composed] = {}
        self.tag_summary = sql.Identifier(schema, "tag_summary")
        self.append_group = (
            # Binary parameters: text and bytea go as they are, without escaping.
            sql.SQL("SELECT {}(%b::jsonb, %b)")
            .format(sql.Identifier(schema, "append_group"))
            .as_bytes(None)
        )
        self.get_event = sql.SQL("SELECT event, position FROM {} WHERE event_id = %s").format(
            self.history
        )
        self.head_position = sql.SQL("SELECT position FROM {}").format(self.head)
        # What a cached answer is labelled with: the head, and how far the log is compacted
        # (a compaction changes what the live log holds without moving the head).
        self.head_label = sql.SQL(
            "SELECT position, hash, (SELECT max(last_position) FROM {} WHERE compacted_at"
            " IS NOT NULL) FROM {}"
        ).format(sql.Identifier(schema, "archives"), self.head)
        self.append_channel = sql.SQL("SELECT {}()").format(
            sql.Identifier(schema, "append_channel")
        )
        # The summaries as of now: the folded tables plus the tail after them
        # (sql/schema/0010_baseline.sql), so every read of them is exact.
        self.type_totals = sql.Identifier(schema, "type_totals")
        self.tag_totals = sql.Identifier(schema, "tag_totals")
        self.time_totals = sql.Identifier(schema, "time_totals")
        #: Fold the summaries' tail when it holds at least %s events (waiting for a fold running
        #: elsewhere when %s is true); returns the folded position.
        self.fold_summaries = sql.SQL("SELECT {}(%s, %s)").format(
            sql.Identifier(schema, "fold_summaries")
        )
        snapshots = sql.Identifier(schema, "event_snapshots")
        # The head row is read in the same statement: a version beyond it inserts nothing.
        self.save_snapshot = sql.SQL(
            "INSERT INTO {} (aggregate_id, version, data) SELECT %s, %s, %s::jsonb FROM {}"
            " WHERE position >= %s ON CONFLICT (aggregate_id, version) DO UPDATE"
            " SET data = excluded.data, created_at = now() RETURNING created_at"
        ).format(snapshots, self.head)
        self.latest_snapshot = sql.SQL(
            "SELECT version, data::text, created_at FROM {} WHERE aggregate_id = %s"
            " ORDER BY version DESC LIMIT 1"
        ).format(snapshots)

        # -- listings and stats (`EventStore.get_event_types`, `get_tags`, `stats`)
        self.event_types = sql.SQL("SELECT event_type FROM {} ORDER BY 1").format(self.type_totals)
        self.tags = sql.SQL(
            "SELECT key, array_agg(value ORDER BY value) FROM {} GROUP BY key ORDER BY key"
        ).format(self.tag_totals)
        self.type_stats = sql.SQL(
            "SELECT event_type, count, first_timestamp, last_timestamp FROM {}"
            " ORDER BY count DESC, event_type"
        ).format(self.type_totals)
        self.tag_stats = sql.SQL("SELECT count(DISTINCT key), count(*) FROM {}").format(
            self.tag_totals
        )
        self.archive_stats = sql.SQL(
            "SELECT count(*), coalesce(sum(events), 0), coalesce(sum(bytes), 0) FROM {}"
            " WHERE compacted_at IS NOT NULL"
        ).format(self.archives)
        #: The schema's size on disk; its name is the parameter.
        self.schema_size = (
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm')"
        )

        # -- exports
        self.export_positions = sql.SQL("SELECT {} FROM {} WHERE position = ANY(%s)").format(
            EXPORT_SELECT, self.events
        )
        self.export_range = sql.SQL(
            "SELECT {} FROM {} WHERE position BETWEEN %s AND %s ORDER BY position"
        ).format(EXPORT_SELECT, self.events)

        # -- the hash chain (`verify`)
        self.head_row = sql.SQL("SELECT position, hash FROM {}").format(self.head)
        self.genesis = sql.SQL("SELECT genesis FROM {}").format(sql.Identifier(schema, "chain"))
        self.first_position_to = sql.SQL(
            "SELECT min(position) FROM {} WHERE position <= %s"
        ).format(self.events)
        self.first_position_after = sql.SQL(
            "SELECT min(position) FROM {} WHERE position > %s"
        ).format(self.events)
        self.hash_at = sql.SQL("SELECT hash FROM {} WHERE position = %s").format(self.events)
        self.chain_rows = sql.SQL(
            "SELECT {} FROM {} WHERE position >= %s AND position <= %s ORDER BY position"
        ).format(CHAIN_SELECT, self.events)

        # -- archives and compaction
        self.manifest = sql.SQL(
            "SELECT first_position, last_position, directory, file_name, events, bytes, sha256,"
            " prev_hash, last_hash, compacted_at IS NOT NULL FROM {} ORDER BY first_position"
        ).format(self.archives)
        self.manifest_files = sql.SQL("SELECT directory, file_name FROM {}").format(self.archives)
        self.prefix_before = sql.SQL(
            "SELECT coalesce((SELECT min(position) - 1 FROM {} WHERE recorded_at >= %s),"
            " (SELECT position FROM {}))"
        ).format(self.events, self.head)
        self.record_archive = sql.SQL(
            "INSERT INTO {} (first_position, last_position, file_name, directory, events,"
            " bytes, sha256, prev_hash, last_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(self.archives)
        self.fold_everything = sql.SQL("SELECT {}(0, true)").format(
            sql.Identifier(schema, "fold_summaries")
        )
        self.index_archived = sql.SQL(
            'INSERT INTO {} (position, event_id, event_type, "timestamp", tags)'
            ' SELECT position, event_id, event_type, "timestamp", tags FROM {}'
            " WHERE position BETWEEN %s AND %s"
        ).format(self.archived_events, self.events)
        self.delete_range = sql.SQL("DELETE FROM {} WHERE position BETWEEN %s AND %s").format(
            self.events
        )
        self.mark_compacted = sql.SQL(
            "UPDATE {} SET compacted_at = now() WHERE first_position = %s"
        ).format(self.archives)

        # -- the schema itself (`tamma_events.ops.migrating`, `grant_app_role`, the demo)
        name = sql.Identifier(schema)
        self.create_schema = sql.SQL("CREATE SCHEMA {}").format(name)
        self.create_schema_if_missing = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name)
        self.drop_schema = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(name)
        self.search_path = sql.SQL("SET LOCAL search_path TO {}").format(name)
        migrations = sql.Identifier(schema, "schema_migrations")
        #: Whether the schema has a migrations table; its qualified name is the parameter.
        self.relation_exists = "SELECT to_regclass(%s) IS NOT NULL"
        self.migrations_table = migrations.as_string(None)
        self.schema_version = sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(migrations)
        # Within the migration's transaction, with search_path set to the schema.
        self.create_migrations = (
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        self.applied_versions = "SELECT version FROM schema_migrations"
        self.record_migration = "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)"

    def comment_schema(self, text: str) -> sql.Composed:
        return sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
            sql.Identifier(self.schema), sql.Literal(text)
        )

    def grants(self, role: str, create: bool) -> list[sql.Composed]:
        """What `EventStore.grant_app_role` runs for ``role`` (creating it first, NOLOGIN, when
        ``create``): read everything, append events, save snapshots, run consumers."""
        schema = sql.Identifier(self.schema)
        name = sql.Identifier(role)
        statements: list[sql.Composed] = []
        if create:
            statements.append(
                sql.SQL(
                    "DO $$BEGIN CREATE ROLE {} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL;"
                    " END$$"
                ).format(name)
            )
        statements += [
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(schema, name),
            sql.SQL("GRANT INSERT ON {} TO {}").format(self.events, name),
            sql.SQL("GRANT INSERT, UPDATE ON {} TO {}").format(
                sql.Identifier(self.schema, "event_snapshots"), name
            ),
            # Running durable consumers: checkpoints, leases, workers, parked events (tables
            # that a store of a version before 12 does not have yet; its migration grants them
            # to the roles that can append).
            sql.SQL(
                "DO $$BEGIN IF to_regclass({}) IS NOT NULL THEN EXECUTE {}; END IF; END$$"
            ).format(
                sql.Literal(sql.Identifier(self.schema, "consumers").as_string(None)),
                sql.Literal(
                    sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}")
                    .format(
                        sql.SQL(", ").join(
                            sql.Identifier(self.schema, table)
                            for table in (
                                "consumers",
                                "consumer_partitions",
                                "consumer_workers",
                                "parked_events",
                            )
                        ),
                        name,
                    )
                    .as_string(None)
                ),
            ),
        ]
        return statements

    def checks(self, checks: list[Check]) -> tuple[bytes, list[Any]]:
        """One statement with a column per condition: true when a stored event violates it."""
        key = tuple(shape for shape, _ in checks)
        text = self._checks.get(key)
        if text is None:
            columns = [
                sql.SQL("EXISTS (SELECT 1 FROM {} WHERE position > %s AND {})").format(
                    self.event_index, _predicate(shape, through_tags=True)
                )
                for shape in key
            ]
            text = sql.SQL("SELECT {}").format(sql.SQL(", ").join(columns)).as_bytes(None)
            if len(self._checks) < _CACHE_SIZE:
                self._checks[key] = text
        return text, [p for _, params in checks for p in params]

    def tag_values(self, bounded: bool, after: bool, long_prefix: bool) -> sql.Composed:
        """A page of one key's values by prefix (sql/schema/0011_tag_values.sql): the summary's
        rows through their index, in its order, and the tail's added up.

        Parameters: the key, then the lower bound of the values' first 200 characters (the
        prefix's), or with ``after`` the last page's (those characters, then the digest); with
        ``bounded``, the upper bound; with ``long_prefix`` (over 200 characters, more than the
        bounds hold), the prefix; then the page's size plus one. The key, the prefix and the
        page's size again, for the tail. Only one lower bound goes to the index: given two, the
        scan may start from the lesser."""
        key = (bounded, after, long_prefix)
        text = self._tag_values.get(key)
        if text is None:
            order = sql.SQL('substr(value, 1, 200) COLLATE "C"')
            if after:
                low = sql.SQL('({}, digest) > (%s COLLATE "C", %s)').format(order)
            else:
                low = sql.SQL("{} >= %s").format(order)
            high = sql.SQL(" AND {} < %s").format(order) if bounded else sql.SQL("")
            exact = sql.SQL(" AND starts_with(value, %s)") if long_prefix else sql.SQL("")
            text = sql.SQL(
                "SELECT value, sum(count)::bigint FROM ("
                "(SELECT value, digest, count FROM {summary} WHERE key = %s AND {low}{high}"
                "{exact} ORDER BY {order}, digest LIMIT %s)"
                " UNION ALL"
                " (SELECT v.value, sha256(convert_to(v.value, 'UTF8')), count(*)"
                " FROM {schema}.unfolded_events() AS t, jsonb_each_text(t.tags) AS v"
                " WHERE v.key = %s AND starts_with(v.value, %s) GROUP BY v.value)) AS parts"
                " WHERE {low} GROUP BY value, digest ORDER BY {order}, digest LIMIT %s"
            ).format(
                summary=self.tag_summary,
                schema=sql.Identifier(self.schema),
                low=low,
                high=high,
                exact=exact,
                order=order,
            )
            self._tag_values[key] = text
        return text

    def read(self, shape: Shape, backwards: bool) -> sql.Composed:
        """Events after a position, up to another (the head, read first), matching a query of
        ``shape``, as `EVENT_SELECT` rows for a binary COPY: archived events come with a NULL
        hash (see `history_rows`).

        Parameters: after, the query's parameters, the last position, limit (None for no
        limit)."""
        key = (shape, backwards)
        text = self._reads.get(key)
        if text is None:
            direction = sql.SQL("DESC" if backwards else "ASC")
            text = sql.SQL(
                "SELECT {columns} FROM {history} WHERE position > %s AND {predicate}"
                " AND position <= %s ORDER BY position {direction} LIMIT %s"
            ).format(
                columns=EVENT_SELECT,
                history=self.history_rows,
                predicate=_predicate(shape),
                direction=direction,
            )
            if len(self._reads) < _CACHE_SIZE:
                self._reads[key] = text
        return text


@functools.lru_cache(maxsize=64)
def statements_of(schema: str) -> Statements:
    """The `Statements` of ``schema``, composed once per process: for the maintenance jobs,
    the migrator and the CLI, which are handed a schema's name rather than a store."""
    return Statements(schema)
