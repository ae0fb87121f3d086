"""The libpq functions psycopg's connections run on, for the native COPY reader.

Reads and exports take ``COPY ... TO STDOUT`` rows with the native ``read_copy``, which calls
libpq's ``PQgetCopyData`` in a loop with the GIL released: no Python object per row, where psycopg's
``Copy`` iteration makes a memoryview and goes through its wait loop for each. It must call the
very libpq the connection was made with, so the functions are looked up in the library psycopg
itself loaded (its bundled copy for ``psycopg[binary]``, the ctypes one for the pure-Python
implementation, the system's for ``psycopg[c]``), and checked against the connection: the
backend PID libpq reports through our lookup must be the one psycopg reports. When anything
does not fit, `copy_functions` returns None and the rows are read through psycopg.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from functools import cache
from typing import Any

import psycopg
from psycopg import pq

__all__ = ["copy_functions"]


@cache
def _library() -> Any:
    """The libpq psycopg uses, as a ctypes library, or None."""
    try:
        if pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            return getattr(_pq_ctypes, "pq", None)
        if pq.__impl__ == "binary":
            import psycopg_binary

            root = os.path.dirname(os.path.dirname(psycopg_binary.__file__))
            found = glob.glob(os.path.join(root, "psycopg_binary.libs", "libpq*"))
            return ctypes.CDLL(found[0]) if len(found) == 1 else None
        name = ctypes.util.find_library("pq") if sys.platform != "win32" else None
        return ctypes.CDLL(name) if name else None
    except (ImportError, OSError, AttributeError):
        return None


@cache
def _functions() -> tuple[int, int, Any] | None:
    lib = _library()
    if lib is None:
        return None
    try:
        get_copy_data = ctypes.cast(lib.PQgetCopyData, ctypes.c_void_p).value
        freemem = ctypes.cast(lib.PQfreemem, ctypes.c_void_p).value
        backend_pid = lib.PQbackendPID
    except AttributeError:
        return None
    if not get_copy_data or not freemem:
        return None
    backend_pid.argtypes = [ctypes.c_void_p]
    backend_pid.restype = ctypes.c_int
    return get_copy_data, freemem, backend_pid


def copy_functions(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
) -> tuple[int, int, int] | None:
    """``(PGconn *, PQgetCopyData, PQfreemem)`` as addresses for ``conn``, or None when they
    cannot be found or do not belong to the library ``conn`` runs on."""
    functions = _functions()
    if functions is None:
        return None
    get_copy_data, freemem, backend_pid = functions
    pointer = getattr(conn.pgconn, "pgconn_ptr", None)
    if not pointer or backend_pid(pointer) != conn.pgconn.backend_pid:
        return None
    return pointer, get_copy_data, freemem
