"""Type stubs for the native codec; see `tamma_events._pycodec` for the behaviour."""

from collections.abc import Sequence

from ._pycodec import PreparedBatch
from .model import DomainEvent

def prepare(
    events: Sequence[DomainEvent], max_event_bytes: int = ..., first_index: int = ...
) -> PreparedBatch: ...
def seal(batch: PreparedBatch, first_position: int, prev_hash: bytes) -> bytes: ...
