"""Picks the codec: the native extension, or the pure-Python reference in `_pycodec`.

``TAMMA_EVENTS_IMPL=native`` or ``python`` forces one; a forced native codec that cannot be
imported raises instead of falling back. ``IMPL`` says which one loaded.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

__all__ = ["IMPL", "decode_rows", "prepare", "rehash", "seal"]

_requested: Final = os.environ.get("TAMMA_EVENTS_IMPL", "").strip().lower()

if _requested not in ("", "native", "python"):
    raise ImportError(
        f"TAMMA_EVENTS_IMPL must be 'native' or 'python', not {os.environ['TAMMA_EVENTS_IMPL']!r}"
    )

if TYPE_CHECKING:
    from ._pycodec import decode_rows, prepare, rehash, seal

    IMPL: str
elif _requested == "python":
    from ._pycodec import decode_rows, prepare, rehash, seal

    IMPL = "python"
else:
    try:
        from ._native import decode_rows, prepare, rehash, seal
    except ImportError as exc:
        if _requested == "native":
            raise ImportError(
                "TAMMA_EVENTS_IMPL=native but the native codec (tamma_events._native) did not "
                f"load: {exc}. Rebuild with `pip install -e .` (needs a C compiler)."
            ) from exc
        from ._pycodec import decode_rows, prepare, rehash, seal

        IMPL = "python"
    else:
        IMPL = "native"
