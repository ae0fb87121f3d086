"""Checks on measured figures (rates, latencies, CPU times): that each is there and well
formed, never how large it is, which depends on the machine and how busy it is."""

from __future__ import annotations

import math


def is_figure(value: object) -> bool:
    """A finite measured number, whatever its size."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
