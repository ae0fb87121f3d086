"""Exporting: keyset and range batches of the log as Arrow record batches, by binary COPY."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

from tamma_events import codec as _codec
from tamma_events.codec.arrow import EXPORT_SCHEMA, to_batch
from tamma_events.filters import (
    Criteria,
)
from tamma_events.ops.reading import Reading
from tamma_events.ops.steps import CopyOut, Op, Run
from tamma_events.sql import EXPORT_SELECT, POSITION_AND_ARCHIVED

_T = TypeVar("_T")
_S = TypeVar("_S")


def _batches(chunks: list[tuple[bytes | bytearray, int]]) -> list[pa.RecordBatch]:
    """The raw COPY rows of a `CopyOut` step, decoded as record batches."""
    return [to_batch(_codec.decode_rows(rows, count)) for rows, count in chunks]


class Exporting(Reading):
    """The export operations of a store (see `tamma_events.stores.core.StoreCore`)."""

    @staticmethod
    def _export_last(
        criteria: Criteria, batches: list[pa.RecordBatch]
    ) -> Callable[[], tuple[Any, int]]:
        def last() -> tuple[Any, int]:
            batch = batches[-1]
            key: Any = None
            if criteria.order_by == "timestamp":
                key = batch.column("timestamp")[-1].as_py()
            elif criteria.order_by == "type":
                key = batch.column("event_type")[-1].as_py()
            return key, batch.column("position")[-1].as_py()

        return last

    @staticmethod
    def _export_by_ranges(criteria: Criteria, archived: bool) -> bool:
        """Whether an export is read as consecutive ranges of positions, several at once."""
        return (
            criteria.order_by == "position"
            and not criteria.descending
            and criteria.limit is None
            and not criteria.offset
            and not archived
        )

    def _op_export_batch(
        self,
        criteria: Criteria,
        until: int | None,
        last_key: Any,
        last_position: int | None,
        limit: int,
        offset: int,
        archived: bool,
    ) -> Op[tuple[int, list[pa.RecordBatch]]]:
        """`_op_keyset_rows`, as record batches read by binary COPY."""
        until, select, few = yield from self._op_keyset_select(
            criteria, until, last_key, last_position, archived
        )
        if not archived:
            text, params = select.events(limit=limit, offset=offset, few=few, columns=EXPORT_SELECT)
            return until, _batches((yield CopyOut(text, params)))
        # The batch's positions in order, from one snapshot of the whole history; then the
        # live ones by COPY and the archived ones from their files. An event compacted
        # between the two statements is read from its archive.
        text, params = select.events(
            limit=limit, offset=offset, few=few, columns=POSITION_AND_ARCHIVED
        )
        order = yield Run(text, params, prepare=False)
        live = [position for position, is_archived in order if not is_archived]
        pieces: list[pa.RecordBatch] = []
        if live:
            chunks = yield CopyOut(self._statements.export_positions, [live])
            pieces = _batches(chunks)
        found = set()
        for piece in pieces:
            found.update(piece.column("position").to_pylist())
        elsewhere = [position for position, _ in order if position not in found]
        archived_table = yield from self._archive.table(elsewhere)
        table = pa.Table.from_batches([*pieces, *archived_table.to_batches()], schema=EXPORT_SCHEMA)
        if not table.num_rows:
            return until, []
        index = {p: i for i, p in enumerate(table.column("position").to_pylist())}
        table = table.take(pa.array([index[p] for p, _ in order], pa.int64()))
        table = table.unify_dictionaries().combine_chunks()
        return until, table.to_batches()
