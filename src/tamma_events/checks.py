"""Declared argument checks: one place that says what a number argument must be.

Every public call checks its arguments before any database work, and refuses a bad one with the
store's error naming it (``context["field"]``). A check is declared, in the manner of
msgspec's ``Meta(ge=0)`` and psycopg_pool's ``_check_size``:

    batch_size = whole(batch_size, "batch_size", "a positive int", low=1)
    timeout = seconds(timeout, "pool_timeout", "a finite positive number of seconds")

``bool`` is never a number here (``True`` is an int to Python, not a batch size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from tamma_events.errors import ValidationFailed, short_repr

__all__ = ["MAX_BIGINT", "seconds", "whole"]

#: The largest value of PostgreSQL's bigint: positions, counts and limits stay within it.
MAX_BIGINT: Final = 2**63 - 1

#: Makes the error for a refused argument from its message and context.
Refuse = Callable[[str, dict[str, Any]], Exception]


def whole(
    value: object,
    field: str,
    what: str,
    *,
    low: int = 0,
    high: int = MAX_BIGINT,
    error: Refuse = ValidationFailed,
    context: dict[str, Any] | None = None,
) -> int:
    """``value`` when it is an int (not a bool) from ``low`` to ``high``; else ``error`` with
    ``"{field} must be {what}, got {value}"`` and ``{"field": field, **context}``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(
            f"{field} must be {what}, got {short_repr(value)}", {"field": field, **(context or {})}
        )
    return value


def seconds(
    value: object,
    field: str,
    what: str,
    *,
    zero: bool = False,
    finite: bool = True,
    error: Refuse = ValidationFailed,
) -> float:
    """``value`` as a float when it is a number (not a bool) above 0 (or from 0, with
    ``zero``), and finite unless ``finite=False``; else ``error`` with
    ``"{field} must be {what}, got {value}"``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or (finite and math.isinf(value))
        or value < 0
        or (value == 0 and not zero)
    ):
        raise error(f"{field} must be {what}, got {short_repr(value)}", {"field": field})
    return float(value)
