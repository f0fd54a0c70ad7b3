"""Giving freed memory back to the system after a burst.

CPython frees objects into the C allocator, and glibc keeps freed heap pages for reuse
unless asked: after a burst of hundreds of thousands of requests the process would stay
near its peak for ever. ``malloc_trim(0)`` returns every free page of the heap (it takes
about a millisecond per 100 MB), so the service calls it once a second while traffic
flows and once more when it stops. Elsewhere than glibc it is a no-op.
"""

import ctypes
import ctypes.util

_libc: ctypes.CDLL | bool | None = None  # False: not available


def _load():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def trim() -> bool:
    """Return the C heap's free pages to the system; True if anything was released."""
    libc = _load()
    return bool(libc and libc.malloc_trim(0))
