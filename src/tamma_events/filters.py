"""`EventFilter`, the read side's question, and what the store answers with.

A filter is validated and normalised once (`normalize`) into a `Criteria`: plain, sorted and
hashable, so two filters that ask the same question have the same criteria. The criteria are what
the query builder (`tamma_events.sql`) turns into SQL and what the result cache keys on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timezone
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from tamma_events.checks import MAX_BIGINT, whole
from tamma_events.codec.reference import parse_uuid
from tamma_events.errors import EventStoreError, QueryError, short_repr
from tamma_events.model import SequencedEvent

__all__ = [
    "MAX_FILTER_VALUES",
    "TAG_FIELDS",
    "AggregateRow",
    "Criteria",
    "EventFilter",
    "Page",
    "TagValue",
    "TagValuesPage",
    "filter_from_params",
    "normalize",
]

#: The most tag pairs one filter may require (``EventFilter.tags``, ``tag=`` parameters).
MAX_FILTER_TAGS = 1_000

#: The most values one list field of a filter may hold.
MAX_FILTER_VALUES = 10_000

#: The filter fields that name a tag key, and that key.
TAG_FIELDS: dict[str, str] = {
    "issue_ids": "issueId",
    "pr_ids": "prId",
    "user_ids": "userId",
    "providers": "provider",
    "platforms": "platform",
}

_T = TypeVar("_T")

OrderBy = Literal["position", "timestamp", "type"]
OrderDirection = Literal["asc", "desc"]
GroupBy = Literal["event_type", "tag", "minute", "hour", "day"]

_ORDERS = ("position", "timestamp", "type")
_DIRECTIONS = ("asc", "desc")


class EventFilter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which events to return, in which order, and how many.

    Every field is optional and the fields combine with AND. Within a list field the values are
    alternatives (OR); a missing or empty list places no constraint. The tag fields name the
    platform's usual tags: ``issue_ids`` matches the tag ``issueId``, ``pr_ids`` ``prId``,
    ``user_ids`` ``userId``, ``providers`` ``provider`` and ``platforms`` ``platform``. ``tags``
    matches events carrying every pair it holds.

    ``start_time`` and ``end_time`` (datetimes with a timezone, ISO-8601 strings with an
    offset, or dates, ``date`` objects or ``"2026-01-02"``, meaning midnight UTC) select the
    half-open window ``start_time <= timestamp < end_time``.

    ``order_by`` is ``"position"`` (the log's order, the default), ``"timestamp"`` or ``"type"``;
    ties are broken by position, in the same direction. ``order_direction`` is ``"asc"`` or
    ``"desc"``. ``limit`` and ``offset`` page through the result; for a walk that stays correct
    while events are appended, use `EventStore.paginate` instead of offsets.
    """

    event_ids: Sequence[uuid.UUID | str] | None = None
    event_types: Sequence[str] | None = None
    issue_ids: Sequence[str] | None = None
    pr_ids: Sequence[str] | None = None
    user_ids: Sequence[str] | None = None
    providers: Sequence[str] | None = None
    platforms: Sequence[str] | None = None
    tags: dict[str, str] | None = None
    start_time: datetime | date | str | None = None
    end_time: datetime | date | str | None = None
    limit: int | None = None
    offset: int = 0
    order_by: OrderBy = "position"
    order_direction: OrderDirection = "asc"


class Criteria(NamedTuple):
    """A validated, normalised `EventFilter`.

    ``tags`` holds, per tag key, the sorted values any of which the event's tag must equal; a key
    may appear twice (from a tag field and from ``tags``), each entry being a separate condition.
    """

    event_ids: tuple[uuid.UUID, ...] = ()
    event_types: tuple[str, ...] = ()
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    limit: int | None = None
    offset: int = 0
    order_by: OrderBy = "position"
    descending: bool = False

    def unpaged(self) -> Criteria:
        """The same question without limit and offset."""
        return self._replace(limit=None, offset=0)


class AggregateRow(msgspec.Struct, frozen=True):
    """One group of `EventStore.aggregate`: its key (an event type, a tag value, or the start of
    a UTC time bucket in ISO 8601), how many events it holds, and their first and last
    timestamps."""

    key: str
    count: int
    first_timestamp: datetime
    last_timestamp: datetime


class Page(msgspec.Struct, frozen=True):
    """One page of `EventStore.get_page`: its events and the token of the next page (None
    after the last one)."""

    events: list[SequencedEvent]
    next_token: str | None


class TagValue(msgspec.Struct, frozen=True):
    """A value of a tag key, and how many events carry it."""

    value: str
    events: int


class TagValuesPage(msgspec.Struct, frozen=True):
    """One page of `EventStore.get_tag_values`: values of one key, in order, and the token of
    the next page (None after the last one)."""

    values: list[TagValue]
    next_token: str | None


def _error(message: str, field: str, **context: Any) -> EventStoreError:
    return QueryError(message, {"field": field, **context})


def check_text(value: object, field: str) -> str:
    """``value`` if it is a string PostgreSQL can hold, else QUERY_ERROR naming ``field``."""
    if not isinstance(value, str):
        raise _error(f"{field} must hold strings, got {type(value).__name__}", field)
    if "\x00" in value:
        raise _error(f"{field} holds a string with a NUL character", field, value=repr(value))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _error(
            f"{field} holds a string with a lone surrogate", field, value=repr(value)
        ) from None
    return value


def _list(values: object, field: str, of: str) -> Sequence[object]:
    """A list field's values (none when it is None), or QUERY_ERROR."""
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise _error(f"{field} must be a list of {of}, got {type(values).__name__}", field)
    if len(values) > MAX_FILTER_VALUES:
        raise _error(
            f"{field} holds {len(values)} values; at most {MAX_FILTER_VALUES} are allowed",
            field,
            count=len(values),
        )
    return values


def _values(values: object, field: str) -> tuple[str, ...]:
    return tuple(sorted({check_text(value, field) for value in _list(values, field, "strings")}))


def _event_types(values: object) -> tuple[str, ...]:
    types = _values(values, "event_types")
    if "" in types:
        # No event has an empty type: an empty value is a mistake (an unset variable, say),
        # not a filter that matches nothing.
        raise _error("event_types holds an empty string, which is no event type", "event_types")
    return types


def _event_ids(values: object) -> tuple[uuid.UUID, ...]:
    field = "event_ids"
    ids = set()
    for value in _list(values, field, "UUIDs"):
        if isinstance(value, uuid.UUID):
            ids.add(value)
            continue
        try:
            if not isinstance(value, str):
                raise TypeError
            ids.add(parse_uuid(value))
        except (TypeError, ValueError):
            raise _error(
                f"event_ids holds {short_repr(value)}, which is not a UUID", field
            ) from None
    return tuple(sorted(ids))


#: A calendar date alone, as ISO 8601 writes it: read as midnight UTC.
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_time(value: object, field: str) -> datetime | None:
    """A filter's time bound as an aware UTC datetime (None stays None). It takes an aware
    datetime; an ISO-8601 date-time with an offset (``2026-01-02T15:04:05Z``,
    ``2026-01-02T17:04:05+02:00``); or a date, a `datetime.date` or ``2026-01-02``, which
    means midnight UTC at its start."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            if _DATE.fullmatch(value):
                value = datetime.combine(date.fromisoformat(value), time(), timezone.utc)
            else:
                value = msgspec.convert(value, datetime)
        except (
            msgspec.ValidationError,
            ValueError,
            UnicodeEncodeError,
        ):  # the last: a lone surrogate
            raise _error(
                f"{field} must be an ISO-8601 date-time with an offset (2026-01-02T15:04:05Z,"
                f" 2026-01-02T17:04:05+02:00) or a date (2026-01-02, midnight UTC),"
                f" got {short_repr(value)}",
                field,
            ) from None
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, time(), timezone.utc)
    if not isinstance(value, datetime):
        raise _error(
            f"{field} must be a datetime, a date or an ISO-8601 string, got {type(value).__name__}",
            field,
        )
    try:
        offset = value.utcoffset()
    except Exception as exc:  # a tzinfo of the caller's: whatever it raises, it is no zone
        raise _error(
            f"{field}'s time zone gives no valid offset: {short_repr(exc)}", field
        ) from None
    if value.tzinfo is None or offset is None:
        raise _error(f"{field} must have a timezone (got the naive {value.isoformat()})", field)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise _error(f"{field} is out of range in UTC: {value.isoformat()}", field) from None


def check_count(value: object, field: str, *, allow_none: bool) -> int | None:
    """A non-negative int that fits PostgreSQL's bigint (or None where allowed), else
    QUERY_ERROR."""
    if value is None and allow_none:
        return None
    expected = "a non-negative int or None" if allow_none else "a non-negative int"
    return whole(value, field, f"{expected} up to 2**63 - 1", error=QueryError)


def normalize(event_filter: EventFilter | None) -> Criteria:
    """Validate ``event_filter`` (None: every event) into `Criteria`; QUERY_ERROR if it is
    malformed."""
    if event_filter is None:
        return Criteria()
    if not isinstance(event_filter, EventFilter):
        raise QueryError(f"expected an EventFilter, got {type(event_filter).__name__}")
    f = event_filter
    tags: list[tuple[str, tuple[str, ...]]] = []
    for field, key in TAG_FIELDS.items():
        values = _values(getattr(f, field), field)
        if values:
            tags.append((key, values))
    if f.tags is not None:
        if not isinstance(f.tags, dict):
            raise _error(f"tags must be a dict of str to str, got {type(f.tags).__name__}", "tags")
        if len(f.tags) > MAX_FILTER_TAGS:
            # Each is a condition of the statement, whose lists PostgreSQL bounds.
            raise _error(
                f"tags holds at most {MAX_FILTER_TAGS:,} pairs, got {len(f.tags):,}", "tags"
            )
        for key, value in f.tags.items():
            tags.append((check_text(key, "tags"), (check_text(value, "tags"),)))
    start = parse_time(f.start_time, "start_time")
    end = parse_time(f.end_time, "end_time")
    if start is not None and end is not None and end < start:
        raise _error(
            f"end_time ({end.isoformat()}) is before start_time ({start.isoformat()})",
            "end_time",
        )
    if f.order_by not in _ORDERS:
        raise _error(
            f"order_by must be one of {', '.join(_ORDERS)}, got {short_repr(f.order_by)}",
            "order_by",
        )
    if f.order_direction not in _DIRECTIONS:
        raise _error(
            f"order_direction must be asc or desc, got {short_repr(f.order_direction)}",
            "order_direction",
        )
    return Criteria(
        event_ids=_event_ids(f.event_ids),
        event_types=_event_types(f.event_types),
        tags=tuple(sorted(set(tags))),
        start=start,
        end=end,
        limit=check_count(f.limit, "limit", allow_none=True),
        offset=check_count(f.offset, "offset", allow_none=False) or 0,
        order_by=f.order_by,
        descending=f.order_direction == "desc",
    )


# -- page tokens ---------------------------------------------------------------------------


class _Token(msgspec.Struct, array_like=True, frozen=True):
    """What a page token carries: the filter's fingerprint, the head the walk is pinned to, and
    the sort key and position of the last event returned."""

    fingerprint: str
    until: int
    last_key: str | None
    last_position: int


_token_encoder = msgspec.msgpack.Encoder()
_token_decoder = msgspec.msgpack.Decoder(_Token)


def fingerprint(criteria: Criteria) -> str:
    """A short digest of the criteria a walk was started with."""
    text = repr(criteria.unpaged()).encode()
    return hashlib.blake2s(text, digest_size=8).hexdigest()


def _pack(token: msgspec.Struct) -> str:
    return base64.urlsafe_b64encode(_token_encoder.encode(token)).decode().rstrip("=")


def _unpack(token: object, decoder: msgspec.msgpack.Decoder[_T]) -> _T:
    """What a page token holds; QUERY_ERROR if it is not a token ``decoder`` reads."""
    if not isinstance(token, str):
        raise _error(f"page token must be a string, got {type(token).__name__}", "token")
    try:
        return decoder.decode(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise _error("the page token is malformed", "token") from None


def encode_token(criteria: Criteria, until: int, last_key: str | None, last_position: int) -> str:
    return _pack(_Token(fingerprint(criteria), until, last_key, last_position))


def decode_token(token: str, criteria: Criteria) -> _Token:
    """The token's contents; QUERY_ERROR if it is malformed or from another filter."""
    decoded = _unpack(token, _token_decoder)
    if decoded.fingerprint != fingerprint(criteria):
        raise _error("the page token belongs to a different filter", "token")
    if not (0 <= decoded.until <= MAX_BIGINT and 0 <= decoded.last_position <= MAX_BIGINT):
        raise _error("the page token is malformed", "token")
    return decoded


class _TagToken(msgspec.Struct, array_like=True, frozen=True):
    """Where a walk of a key's values is: its key and prefix, and the last value returned (the
    first 200 characters the order uses, and its digest)."""

    key: str
    prefix: str
    last_value: str
    last_digest: bytes


_tag_token_decoder = msgspec.msgpack.Decoder(_TagToken)


def encode_tag_token(key: str, prefix: str, last_value: str, last_digest: bytes) -> str:
    return _pack(_TagToken(key, prefix, last_value, last_digest))


def decode_tag_token(token: str, key: str, prefix: str) -> tuple[str, bytes]:
    """The last value (its order prefix) and digest a tag values token holds; QUERY_ERROR if
    it is malformed or from another key or prefix."""
    decoded = _unpack(token, _tag_token_decoder)
    if decoded.key != key or decoded.prefix != prefix:
        raise _error("the page token belongs to a different key or prefix", "token")
    return decoded.last_value, decoded.last_digest


def token_key(token: _Token, criteria: Criteria) -> datetime | str | None:
    """The sort key of the token's last event, as the keyset condition compares it: None in
    log order, a datetime in time order, an event type in type order; QUERY_ERROR if the token
    does not hold one."""
    key = token.last_key
    if criteria.order_by == "position":
        if key is not None:
            raise _error("the page token is malformed", "token")
        return None
    if not isinstance(key, str):
        raise _error("the page token is malformed", "token")
    if criteria.order_by == "type":
        try:
            return check_text(key, "token")
        except EventStoreError:
            raise _error("the page token is malformed", "token") from None
    try:
        moment = datetime.fromisoformat(key)
    except ValueError:
        raise _error("the page token is malformed", "token") from None
    if moment.tzinfo is None:
        raise _error("the page token is malformed", "token")
    return moment


#: Parameters of `filter_from_params` that may repeat, each value an alternative, and the
#: `EventFilter` field each fills.
PARAM_LISTS: dict[str, str] = {
    "type": "event_types",
    "event_id": "event_ids",
    "issue_id": "issue_ids",
    "pr_id": "pr_ids",
    "user_id": "user_ids",
    "provider": "providers",
    "platform": "platforms",
}
_PARAM_OF_FIELD = {field: name for name, field in PARAM_LISTS.items()} | {"tags": "tag"}
#: Parameters of `filter_from_params` given at most once.
PARAM_SCALARS = ("start_time", "end_time", "order_by", "order_direction")


def filter_from_params(
    params: Mapping[str, Sequence[str]], *, ordered: bool = True, others: Sequence[str] = ()
) -> EventFilter | None:
    """The `EventFilter` that string parameters (an HTTP query, command-line options) ask for,
    or None when they ask for nothing.

    ``type``, ``event_id``, ``issue_id``, ``pr_id``, ``user_id``, ``provider`` and
    ``platform`` may repeat (any of the values matches); ``tag`` takes ``key:value`` and may
    repeat with different keys (every pair must match); ``start_time``, ``end_time`` and, when
    ``ordered``, ``order_by`` and ``order_direction`` are given at most once. Anything else is
    QUERY_ERROR naming the parameter and listing the known ones (with ``others``, the names the
    caller took out of ``params`` itself, such as ``page_size``), as is every malformed value
    (checked by `normalize`)."""
    scalars = PARAM_SCALARS if ordered else PARAM_SCALARS[:2]
    fields: dict[str, Any] = {}
    for name, values in params.items():
        if not values:
            continue
        if name in PARAM_LISTS:
            fields[PARAM_LISTS[name]] = list(values)
        elif name in scalars:
            if len(values) > 1:
                raise _error(f"{name} may be given once, got {len(values)} values", name)
            fields[name] = values[0]
        elif name == "tag":
            tags: dict[str, str] = {}
            for item in values:
                key, colon, value = item.partition(":")
                if not colon or not key:
                    raise _error(f"tag must be key:value, got {short_repr(item)}", "tag")
                if tags.get(key, value) != value:
                    raise _error(
                        f"tag names the key {short_repr(key)} twice;"
                        " an event has one value per key",
                        "tag",
                    )
                tags[key] = value
            fields["tags"] = tags
        else:
            known = [*PARAM_LISTS, "tag", *scalars, *others]
            hint = (
                " (a page's size is page_size, and the next page is ?token=<next_token>)"
                if name in ("limit", "offset", "size", "per_page") and "page_size" in others
                else ""
            )
            raise QueryError(
                f"unknown parameter {short_repr(name)}{hint};"
                f" the known ones are {', '.join(known)}",
                {"field": name, "known": known},
            )
    if not fields:
        return None
    event_filter = EventFilter(**fields)
    try:
        normalize(event_filter)
    except EventStoreError as exc:
        # Name the parameter the caller gave, not the filter field it filled.
        field = exc.context.get("field")
        if field not in _PARAM_OF_FIELD:
            raise
        name = _PARAM_OF_FIELD[field]
        raise type(exc)(
            exc.message.replace(field, name, 1), {**exc.context, "field": name}
        ) from None
    return event_filter
