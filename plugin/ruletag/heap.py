"""Giving freed heap back to the operating system.

glibc keeps memory that was freed (per thread arena) for later allocations; after a large
transient use (a connection that buffered megabytes, a tuning's Hyperscan compile) that
memory would stay in the process's RSS. :func:`malloc_trim` returns it.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

__all__ = ["malloc_trim"]

_malloc_trim: Callable[[int], int] | None = None
_malloc_trim_loaded = False


def malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``, every arena); False where
    unavailable (not glibc)."""
    global _malloc_trim, _malloc_trim_loaded
    if not _malloc_trim_loaded:
        _malloc_trim_loaded = True
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim  # absent on musl
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
                _malloc_trim = fn
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
