"""Type stubs for the native codec; see `tamma_events.codec.reference` for the behaviour."""

from collections.abc import Sequence

from tamma_events.codec.reference import DecodedRows, PreparedBatch, Rehashed
from tamma_events.model import DomainEvent, SequencedEvent

#: Whether the hash chain is computed with libcrypto's SHA-256 (else through hashlib).
HAVE_LIBCRYPTO: bool

def prepare(
    events: Sequence[DomainEvent], max_event_bytes: int = ..., first_index: int = ...
) -> PreparedBatch: ...
def seal(
    batch: PreparedBatch, first_position: int, prev_hash: bytes, *, chain: bool = ...
) -> bytes: ...
def canonical_json(text: bytes | bytearray | memoryview, tags: bool = ...) -> bytes | None: ...
def decode_rows(rows: bytes | bytearray | memoryview, count: int) -> DecodedRows: ...
def decode_events(
    rows: bytes | bytearray | memoryview, count: int
) -> list[SequencedEvent | int]: ...
def read_copy(
    conn: int,
    get_copy_data: int,
    freemem: int,
    max_rows: int,
    max_bytes: int,
    first: bool,
    nonblocking: bool = ...,
) -> tuple[bytes, int, int]: ...
def rehash(
    rows: bytes | bytearray | memoryview, count: int, first_position: int, prev_hash: bytes
) -> Rehashed: ...
