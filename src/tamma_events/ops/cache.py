"""The in-process query result cache.

Entries are keyed by the normalised question (`tamma_events.filters.Criteria` and the method
asking it) and labelled with the head (position and hash) and the end of the compacted prefix,
read just before the answer was computed. A lookup reads the current label first (primary-key
reads of two small tables) and serves an entry only if it has not changed since: any append,
from this process or another, moves the head at its commit, and a compaction moves the end of
the compacted prefix, so a hit is exactly what the query would return now, and a caller always
sees its own appends. Entries also expire after ``ttl`` seconds, and the least recently
used ones go when the cache holds more than ``max_entries`` or ``max_bytes``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import msgspec

__all__ = ["CacheStats", "QueryCache"]


class CacheStats(msgspec.Struct, frozen=True):
    """Counters of a `QueryCache` since it was created (or cleared)."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int


class _Entry:
    __slots__ = ("expires", "head", "size", "value")

    def __init__(self, head: Hashable, value: Any, size: int, expires: float) -> None:
        self.head = head
        self.value = value
        self.size = size
        self.expires = expires


class QueryCache:
    """A bounded LRU of query results with a time to live; thread-safe.

    ``clock`` is what the time to live is measured on: a `time.monotonic`-like callable,
    read at each put and get (tests give one that moves only when told)."""

    def __init__(
        self,
        max_entries: int = 256,
        ttl: float = 5.0,
        max_bytes: int = 64 << 20,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0 or ttl < 0 or max_bytes < 0:
            raise ValueError("cache limits must be non-negative")
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.ttl > 0 and self.max_bytes > 0

    def get(self, key: Hashable, head: Hashable) -> Any | None:
        """The value stored for ``key`` if it was computed at ``head`` and has not expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            if entry.head != head or entry.expires <= self.clock():
                self._drop(key, entry)
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry.value

    def put(self, key: Hashable, head: Hashable, value: Any, size: int) -> None:
        """Store ``value`` (about ``size`` bytes) as computed at ``head``."""
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = _Entry(head, value, size, self.clock() + self.ttl)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                oldest, entry = next(iter(self._entries.items()))
                self._drop(oldest, entry)
                self._evictions += 1

    def _drop(self, key: Hashable, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size

    def clear(self) -> None:
        """Forget every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._bytes = self._hits = self._misses = self._evictions = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._entries), self._bytes
            )
