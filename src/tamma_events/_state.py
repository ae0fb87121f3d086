"""What every operation of a store may use: its settings and state (see
`tamma_events._core.StoreCore`, which sets them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .archive import ArchiveReader
from .cache import QueryCache
from .metrics import Metrics
from .replicas import ReplicaSet
from .sql import Statements

__all__ = ["StoreState"]


class StoreState:
    """The settings and state the operation mixins (`tamma_events._appending`,
    `tamma_events._reading`, `tamma_events._exporting`) read and keep."""

    schema: str
    max_event_bytes: int
    chunk_events: int
    cache: QueryCache
    archive_dir: Path | None
    _statements: Statements
    _archive: ArchiveReader
    _metrics: Metrics
    _replicas: ReplicaSet
    _seal: Callable[..., Any]
    _folded: int
    _folding: bool
