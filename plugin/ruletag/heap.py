"""Giving freed heap back to the operating system.

glibc keeps memory that was freed (per thread arena) for later allocations; after a large
transient use (a connection that buffered megabytes, a tuning's Hyperscan compile) that
memory would stay in the process's RSS. :func:`malloc_trim` returns it, and
:func:`limit_arenas` keeps the threads of a serve (the event loop, the filter's executor, a
tuning) from each holding freed memory in an arena of its own.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

__all__ = ["ARENAS", "limit_arenas", "malloc_trim"]

#: glibc malloc arenas a serve uses (glibc's own default is 8 per core): a serve of every
#: rule tuning itself peaked at 303-308 MB with 16, 291-299 with 2 (docs/benchmarks.md)
ARENAS = 2
#: ``mallopt``'s parameter number for the arena limit (glibc's ``M_ARENA_MAX``)
_M_ARENA_MAX = -8

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


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Have glibc use at most ``arenas`` malloc arenas from now on (call it before threads
    start). Not done where ``MALLOC_ARENA_MAX`` is set (the user's choice, which glibc
    applies itself) or where unavailable (not glibc); whether the limit was set."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        fn = ctypes.CDLL(None).mallopt  # absent on musl
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(_M_ARENA_MAX, arenas))
