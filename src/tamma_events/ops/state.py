"""What every operation of a store may use: its settings and state (see
`tamma_events.stores.core.StoreCore`, which sets them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tamma_events.ops.archiving import ArchiveReader
from tamma_events.ops.cache import QueryCache
from tamma_events.ops.replicas import ReplicaSet
from tamma_events.sql import Statements

__all__ = ["StoreState"]


class StoreState:
    """The settings and state the operation mixins (`tamma_events.ops.appending`,
    `tamma_events.ops.reading`, `tamma_events.ops.exporting`) read and keep."""

    schema: str
    max_event_bytes: int
    chunk_events: int
    cache: QueryCache
    archive_dir: Path | None
    _statements: Statements
    _archive: ArchiveReader
    _replicas: ReplicaSet
    _seal: Callable[..., Any]
    _folded: int
    _folding: bool
