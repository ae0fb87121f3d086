"""The codec: validation, serialization, binary COPY encoding and decoding, and the hash chain.

The hot path is native (`tamma_events._native`, compiled from ``ext/_native.pyx``);
`tamma_events.codec.reference` is the pure-Python reference that makes the same bytes and the
same errors. `tamma_events.codec.arrow` turns decoded COPY rows into Arrow record batches and
writes Parquet files; `tamma_events.codec.chain` recomputes the hash chain.

This module picks the implementation: the native extension, or the pure-Python reference.

``TAMMA_EVENTS_IMPL=native`` or ``python`` forces one; a forced native codec that cannot be
imported raises instead of falling back. ``IMPL`` says which one loaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

__all__ = ["IMPL", "decode_events", "decode_rows", "prepare", "rehash", "seal"]

_requested: Final = os.environ.get("TAMMA_EVENTS_IMPL", "").strip().lower()

if _requested not in ("", "native", "python"):
    raise ImportError(
        f"TAMMA_EVENTS_IMPL must be 'native' or 'python', not {os.environ['TAMMA_EVENTS_IMPL']!r}"
    )

if TYPE_CHECKING:
    from tamma_events.codec.reference import decode_events, decode_rows, prepare, rehash, seal

    IMPL: str
elif _requested == "python":
    from tamma_events.codec.reference import decode_events, decode_rows, prepare, rehash, seal

    IMPL = "python"
else:
    try:
        from tamma_events._native import decode_events, decode_rows, prepare, rehash, seal
    except ImportError as exc:
        if _requested == "native":
            raise ImportError(
                "TAMMA_EVENTS_IMPL=native but the native codec (tamma_events._native) did not "
                f"load: {exc}. Rebuild with `pip install -e .` (needs a C compiler)."
            ) from exc
        from tamma_events.codec.reference import decode_events, decode_rows, prepare, rehash, seal

        IMPL = "python"
    else:
        IMPL = "native"
