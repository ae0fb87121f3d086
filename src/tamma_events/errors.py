"""The store's exceptions and their codes.

Every failure a caller can see is an `EventStoreError` carrying a `code`, a human message and a
JSON-serialisable `context` naming what went wrong (the event index, its id, the field, ...).
Each code has its own subclass, so a caller can catch one kind of failure (as psycopg's
``UniqueViolation`` is a ``psycopg.Error`` with its ``sqlstate``):

- ``APPEND_CONDITION_FAILED``: `AppendConditionFailed`
- ``DUPLICATE_EVENT``: `DuplicateEvent`
- ``VALIDATION_FAILED``: `ValidationFailed`
- ``QUERY_ERROR``: `QueryError`
- ``STORAGE_ERROR``: `StorageError`
- ``CONSUMER_CONFLICT``: `ConsumerConflict`

    try:
        store.append(event, condition)
    except AppendConditionFailed:
        ...  # decide again on the new facts

``EventStoreError(code, message, context)`` still builds an error from its code: it returns an
instance of that code's class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

__all__ = [
    "APPEND_CONDITION_FAILED",
    "CONSUMER_CONFLICT",
    "DUPLICATE_EVENT",
    "QUERY_ERROR",
    "STORAGE_ERROR",
    "VALIDATION_FAILED",
    "AppendConditionFailed",
    "ConsumerConflict",
    "DuplicateEvent",
    "ErrorCode",
    "EventStoreError",
    "QueryError",
    "StorageError",
    "ValidationFailed",
    "short_repr",
    "storage_error",
]

ErrorCode = Literal[
    "DUPLICATE_EVENT",
    "VALIDATION_FAILED",
    "STORAGE_ERROR",
    "QUERY_ERROR",
    "APPEND_CONDITION_FAILED",
    "CONSUMER_CONFLICT",
]

DUPLICATE_EVENT: Final = "DUPLICATE_EVENT"
VALIDATION_FAILED: Final = "VALIDATION_FAILED"
STORAGE_ERROR: Final = "STORAGE_ERROR"
QUERY_ERROR: Final = "QUERY_ERROR"
APPEND_CONDITION_FAILED: Final = "APPEND_CONDITION_FAILED"
CONSUMER_CONFLICT: Final = "CONSUMER_CONFLICT"


class _ErrorType(type):
    """Makes ``EventStoreError(code, message, context)`` an instance of the code's class."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is EventStoreError:
            code = args[0] if args else kwargs.pop("code", None)
            subclass = _CLASSES.get(code) if isinstance(code, str) else None
            if subclass is None:
                raise ValueError(f"unknown error code {code!r}")
            return subclass(*args[1:], **kwargs)
        return super().__call__(*args, **kwargs)


class EventStoreError(Exception, metaclass=_ErrorType):
    """An error raised by the event store: the base of one class per code.

    ``code`` is one of the `ErrorCode` values; ``context`` holds plain JSON values describing
    the failure (for validation errors: ``index``, ``field``, and ``event_id`` / ``path`` where
    known). A subclass is built from its message and context:
    ``ValidationFailed("...", {"index": 3})``.
    """

    code: ClassVar[ErrorCode]
    message: str
    context: dict[str, Any]

    def __init__(self, message: str, context: dict[str, Any] | None = None) -> None:
        # One dict, in the arguments too: what is added to the context later survives pickling.
        context = {} if context is None else context
        super().__init__(message, context)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.context!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventStoreError):
            return NotImplemented
        return (self.code, self.message, self.context) == (other.code, other.message, other.context)

    __hash__ = Exception.__hash__

    def to_dict(self) -> dict[str, Any]:
        """The error as plain JSON values, for the CLI and HTTP boundaries."""
        return {"code": self.code, "message": self.message, "context": self.context}


class AppendConditionFailed(EventStoreError):
    """An event matching the append condition exists: nothing was written."""

    code = APPEND_CONDITION_FAILED


class DuplicateEvent(EventStoreError):
    """An event id that is already in the store (or twice in one batch): nothing was written."""

    code = DUPLICATE_EVENT


class ValidationFailed(EventStoreError):
    """Input that is not a valid event, condition or argument: nothing was written."""

    code = VALIDATION_FAILED


class QueryError(EventStoreError):
    """A query, filter or read argument the store cannot answer."""

    code = QUERY_ERROR


class StorageError(EventStoreError):
    """PostgreSQL, the network, the pool or the files failed; ``context["outcome"]`` is
    ``"unknown"`` when an append may or may not have committed."""

    code = STORAGE_ERROR


class ConsumerConflict(EventStoreError):
    """A durable consumer cannot do what was asked in its present state: it exists with other
    partitions, or a reset was asked while workers hold its partitions."""

    code = CONSUMER_CONFLICT


_CLASSES: Final[dict[str, type[EventStoreError]]] = {
    cls.code: cls
    for cls in (
        AppendConditionFailed,
        DuplicateEvent,
        ValidationFailed,
        QueryError,
        StorageError,
        ConsumerConflict,
    )
}


def storage_error(exc: BaseException, action: str, **context: Any) -> StorageError:
    """The one translation of a failure of PostgreSQL, psycopg or the pool into the store's
    error: `StorageError` saying what ``action`` failed and why, with psycopg's ``sqlstate``
    in its context when it has one. Raise it ``from exc``."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        context["sqlstate"] = sqlstate
    message = str(exc).strip() or type(exc).__name__
    return StorageError(f"{action} failed: {message}", context)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters; a value whose repr
    fails (an int of too many digits, a list nested too deep for the interpreter) is named by
    its type instead, so that reporting bad input never raises something else."""
    try:
        text = repr(value)
    except Exception:
        return f"<a {type(value).__name__} too large or too deep to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
