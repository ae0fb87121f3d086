"""The one exception type of the store, and its codes.

Every failure a caller can see is an `EventStoreError` carrying a `code`, a human message and a
JSON-serialisable `context` naming what went wrong (the event index, its id, the field, ...).
"""

from __future__ import annotations

from typing import Any, Final, Literal

__all__ = [
    "APPEND_CONDITION_FAILED",
    "DUPLICATE_EVENT",
    "QUERY_ERROR",
    "STORAGE_ERROR",
    "VALIDATION_FAILED",
    "ErrorCode",
    "EventStoreError",
    "shown",
]

ErrorCode = Literal[
    "DUPLICATE_EVENT",
    "VALIDATION_FAILED",
    "STORAGE_ERROR",
    "QUERY_ERROR",
    "APPEND_CONDITION_FAILED",
]

DUPLICATE_EVENT: Final = "DUPLICATE_EVENT"
VALIDATION_FAILED: Final = "VALIDATION_FAILED"
STORAGE_ERROR: Final = "STORAGE_ERROR"
QUERY_ERROR: Final = "QUERY_ERROR"
APPEND_CONDITION_FAILED: Final = "APPEND_CONDITION_FAILED"

_CODES: Final = frozenset(
    (DUPLICATE_EVENT, VALIDATION_FAILED, STORAGE_ERROR, QUERY_ERROR, APPEND_CONDITION_FAILED)
)


class EventStoreError(Exception):
    """An error raised by the event store.

    ``code`` is one of the `ErrorCode` values; ``context`` holds plain JSON values describing
    the failure (for validation errors: ``index``, ``field``, and ``event_id`` / ``path`` where
    known).
    """

    code: ErrorCode
    message: str
    context: dict[str, Any]

    def __init__(
        self, code: ErrorCode, message: str, context: dict[str, Any] | None = None
    ) -> None:
        if code not in _CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(code, message, context or {})
        self.code = code
        self.message = message
        self.context = context or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"EventStoreError({self.code!r}, {self.message!r}, {self.context!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventStoreError):
            return NotImplemented
        return (self.code, self.message, self.context) == (other.code, other.message, other.context)

    __hash__ = Exception.__hash__

    def to_dict(self) -> dict[str, Any]:
        """The error as plain JSON values, for the CLI and HTTP boundaries."""
        return {"code": self.code, "message": self.message, "context": self.context}


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters; a value whose repr
    fails (an int of too many digits, a list nested too deep for the interpreter) is named by
    its type instead, so that reporting bad input never raises something else."""
    try:
        text = repr(value)
    except Exception:
        return f"<a {type(value).__name__} too large or too deep to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
